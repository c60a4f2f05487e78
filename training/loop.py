"""The training run: config -> data -> model -> objective -> loop, with exact resume.

`train(cfg)` is what `train.py` calls (one call per process under accelerate/torchrun).
Every step: draw `gradient_accumulation_steps` micro-batches of this process's share of the
global batch, sample posterior latents (or scale pixels to [-1, 1]), compute the S-stage
flow-matching loss, backpropagate (gradients are synchronised on the last micro-batch only),
clip, AdamW, EMA. Metrics stay on the device and are read every `log_every` steps (the only
host synchronisation in the loop).

Random draws of micro-batch slot j (= accumulation index x processes + rank) of step s are
seeded from (seed, s, j): a resumed run repeats the uninterrupted one bit for bit, and
P processes x A accumulation steps compute the same thing for any split of the same P x A.

Non-finite loss policy: the first step whose loss is NaN/inf is recorded on the device; at
the next log or checkpoint step the run stops with `NonFiniteLossError` naming that step.
No checkpoint is written after it, so the newest checkpoint is the last good one.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from training.checkpoint import (checkpoint_path, find_resume_checkpoint, list_checkpoints, load_checkpoint,
                                 prune_checkpoints, remove_stale_temporaries, atomic_torch_save)
from training.config import ConfigError, is_pixel_space, model_kwargs
from training.ema import EMA, create_ema
from training.logger import RunLogger, setup_file_logger
from training.sampler import ResumableBatchSampler
from utils.config import config_to_dict, save_config


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- set-up helpers

def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_batch_split(cfg, num_processes: int) -> int:
    """Per-process micro-batch size, or ConfigError if the global batch does not split evenly."""
    denom = num_processes * cfg.gradient_accumulation_steps
    if cfg.batch_size % denom:
        raise ConfigError(
            f"batch_size={cfg.batch_size} cannot be split evenly over {num_processes} processes x "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}; choose a batch_size that "
            f"is a multiple of {denom}")
    return cfg.batch_size // denom


def create_accelerator(cfg):
    """An Accelerator that really distributes on CPU-only machines too (gloo)."""
    from accelerate import Accelerator

    expected = world_size_from_env()
    # compile=true: accelerate compiles the model after wrapping it in DDP (the supported order)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              dynamo_backend="inductor" if cfg.compile else None)
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"accelerate reports {accelerator.num_processes} process(es) but WORLD_SIZE={expected}: "
            "the processes would train as independent copies. On a machine without GPUs launch with "
            "`accelerate launch --multi_gpu --num_processes N ...` or "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N train.py ...`")
    return accelerator


def open_training_dataset(cfg):
    """data.open_dataset + checks that the items fit the configured model. Returns
    (dataset, in_channels, input_size)."""
    import data

    pixel = is_pixel_space(cfg)
    try:
        dataset = data.open_dataset(cfg.data_dir)
    except (FileNotFoundError, ValueError, OSError, KeyError) as e:
        raise ConfigError(f"data_dir: cannot open {cfg.data_dir!r}: {e}") from None
    if len(dataset) == 0:
        raise ConfigError(f"data_dir: {cfg.data_dir!r} holds no items")
    shape = tuple(dataset.item_shape)
    if pixel:
        if dataset.kind != "images":
            raise ConfigError(f"data_dir {cfg.data_dir!r} holds VAE latents but vae=none (pixel space); "
                              "set vae to the VAE the latents were encoded with (e.g. vae=ft-ema)")
        want = (3, cfg.resolution, cfg.resolution)
        if shape != want:
            raise ConfigError(f"data_dir {cfg.data_dir!r}: images are {shape[1]}x{shape[2]} (shape {shape}) but "
                              f"resolution={cfg.resolution} expects {want}; set resolution={shape[1]} or "
                              "convert the data at the wanted resolution")
        in_channels, input_size = 3, cfg.resolution
    else:
        if dataset.kind != "latents":
            raise ConfigError(f"data_dir {cfg.data_dir!r} holds images, but vae={cfg.vae!r} trains on latents: "
                              "encode them first (`python dataset_tools.py encode`) or set vae=none to "
                              "train in pixel space")
        size = cfg.resolution // 8
        want = (8, size, size)
        if shape != want:
            raise ConfigError(f"data_dir {cfg.data_dir!r}: latent items have shape {shape} but "
                              f"resolution={cfg.resolution} expects posterior moments {want} (mean||std of "
                              f"a {size}x{size}x4 latent); set resolution={shape[-1] * 8} or re-encode")
        in_channels, input_size = 4, size
    if dataset.num_classes > cfg.num_classes:
        raise ConfigError(f"data_dir {cfg.data_dir!r} has {dataset.num_classes} classes but num_classes="
                          f"{cfg.num_classes}; set num_classes={dataset.num_classes}")
    if len(dataset) < cfg.batch_size:
        raise ConfigError(f"data_dir {cfg.data_dir!r} has {len(dataset)} items, fewer than one global batch "
                          f"(batch_size={cfg.batch_size})")
    return dataset, in_channels, input_size


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    generator.set_state(state["generator"])


def seed_process(seed: int, rank: int, generator: torch.Generator) -> None:
    """Per-process random streams (label dropout, noise, timesteps differ across ranks)."""
    s = seed * 1000 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    generator.manual_seed(s + 7919)


def micro_batch_seed(seed: int, step: int, slot: int) -> int:
    return ((seed * 1_000_003 + step) * 10_007 + slot) % (2**63 - 1)


def seed_micro_batch(seed: int, step: int, slot: int, generator: torch.Generator) -> None:
    """Random draws of micro-batch `slot` (= accumulation index x processes + rank) of optimizer
    step `step` depend on (seed, step, slot) only: the same whatever the process count or the
    interruptions. `generator` draws posterior samples, stages, times and noise; the global
    torch RNG draws the model's label dropout."""
    s = micro_batch_seed(seed, step, slot)
    generator.manual_seed(s)
    torch.manual_seed(s)


def gather_objects(accelerator, obj) -> list:
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- the run

@dataclass
class TrainResult:
    exp_dir: str
    steps: int
    last_checkpoint: Optional[str]
    last_preview: Optional[str]
    wall_time: float


def train(cfg, *, stop_after_step: Optional[int] = None) -> TrainResult:
    """Run (or continue) the training described by the resolved config `cfg`.

    `stop_after_step` (tests) ends the run after that step without the final checkpoint or
    preview, as if the job had been killed.
    """
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(int(cfg.cpu_threads))
    try:
        return _train(cfg, stop_after_step)
    finally:
        torch.set_num_threads(threads)


def _train(cfg, stop_after_step: Optional[int]) -> TrainResult:
    t_start = time.time()
    num_processes = world_size_from_env()
    micro_batch = check_batch_split(cfg, num_processes)
    accelerator = create_accelerator(cfg)
    rank, is_main, device = accelerator.process_index, accelerator.is_main_process, accelerator.device
    exp_dir = os.path.join(cfg.output_dir, cfg.exp_name)
    if is_main:
        os.makedirs(exp_dir, exist_ok=True)
    log = setup_file_logger(exp_dir if is_main else None, is_main)

    demo_error = None
    if cfg.make_demo_data and is_main:
        from training.demo_data import demo_dataset_is_complete, write_demo_dataset

        if not demo_dataset_is_complete(cfg.data_dir):
            log.info(f"writing the demo dataset to {cfg.data_dir} "
                     f"({cfg.num_classes} classes x {cfg.demo_images_per_class} images, {cfg.resolution} px)")
            try:
                write_demo_dataset(cfg.data_dir, cfg.resolution, cfg.num_classes, cfg.demo_images_per_class,
                                   seed=cfg.seed)
            except ValueError as e:
                demo_error = ConfigError(f"data_dir: {e}")
    accelerator.wait_for_everyone()  # the other processes then fail on the missing dataset
    if demo_error is not None:
        raise demo_error
    dataset, in_channels, input_size = open_training_dataset(cfg)

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.allow_tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.allow_tf32)

    # ---- resume target (before building anything heavy: a bad path or arch fails early)
    if is_main:
        remove_stale_temporaries(exp_dir)
    resume_path, ckpt = None, None
    if cfg.resume == "auto":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resume_path, ckpt = find_resume_checkpoint(exp_dir)
        for w in caught:
            log.warning(f"WARNING: {w.message}")
    elif cfg.resume != "none":
        try:
            resume_path, ckpt = cfg.resume, load_checkpoint(cfg.resume)
        except ValueError as e:
            raise ConfigError(f"resume: {e}") from None
    elif list_checkpoints(exp_dir):
        raise ConfigError(f"resume=none but {exp_dir} already holds checkpoints; use resume=auto to continue "
                          "that run, or choose another exp_name / output_dir")

    # ---- model, EMA, optimizer
    import dfm
    import models

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every launch
    kwargs = model_kwargs(cfg, in_channels, input_size)
    try:
        raw_model = models.create_model(cfg.model, **kwargs)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if ckpt is not None:
        if ckpt.get("arch") not in (None, raw_model.arch):
            raise ConfigError(f"resume: checkpoint {resume_path} was trained with arch {ckpt['arch']}, but the "
                              f"config builds {raw_model.arch}; resume with the checkpoint's settings")
        raw_model.load_state_dict(ckpt["model"])
    raw_model.to(device).train()
    ema_model = create_ema(raw_model)
    if ckpt is not None:
        ema_model.load_state_dict(ckpt["ema"])
    ema = EMA(raw_model, ema_model, cfg.ema_decay)
    optimizer = torch.optim.AdamW(
        [p for p in raw_model.parameters() if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay, eps=cfg.adam_eps, fused=(device.type == "cuda"))
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["opt"])
    start_step = int(ckpt["steps"]) if ckpt is not None else 0

    objective = dfm.FlowMatchingObjective(
        cfg.stages, stage_weights=list(cfg.stage_weights), stage_sampling=cfg.stage_sampling,
        weighting=cfg.weighting, path_type=cfg.path_type, earlier_stage_loc=cfg.earlier_stage_loc,
        earlier_stage_scale=cfg.earlier_stage_scale, proj_coeff=cfg.proj_coeff)

    model, optimizer = accelerator.prepare(raw_model, optimizer)

    # ---- random streams and data position
    generator = torch.Generator(device=device)
    seed_process(cfg.seed, rank, generator)
    if ckpt is not None:
        states = ckpt.get("rng") or []
        if len(states) == accelerator.num_processes:
            set_rng_state(states[rank], generator)
        else:  # harmless: every micro-batch re-seeds from (seed, step, slot)
            log.info(f"the checkpoint holds random states of {len(states)} process(es), this run has "
                     f"{accelerator.num_processes}; the per-process states are not restored")
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, accelerator.num_processes, rank,
                                    cfg.gradient_accumulation_steps, cfg.seed, start_step)
    if ckpt is not None and ckpt.get("data_position"):
        saved, now = ckpt["data_position"], sampler.position(start_step)
        changed = [k for k in ("dataset_len", "batch_size", "seed") if saved.get(k) != now.get(k)]
        if changed:
            log.warning(f"WARNING: {', '.join(changed)} changed since the checkpoint; the data order differs "
                        "from the interrupted run")
    resumed, ckpt = ckpt is not None, None  # free the loaded tensors
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=(device.type == "cuda"),
        persistent_workers=cfg.num_workers > 0, generator=torch.Generator().manual_seed(cfg.seed))

    # ---- previews (loads the VAE for latent runs: fails here, before any training), logging
    previewer = _make_previewer(cfg, raw_model, in_channels, exp_dir, device, is_main, log)
    config_dict = config_to_dict(cfg)
    if is_main:
        save_config(cfg, os.path.join(exp_dir, "config.yaml"))
    tracker = RunLogger(exp_dir, log, cfg.report_to, is_main, config=config_dict, project=cfg.wandb_project,
                        run_name=cfg.exp_name, wandb_mode=cfg.wandb_mode)
    n_params = sum(p.numel() for p in raw_model.parameters())
    log.info(f"experiment {exp_dir}: {cfg.model} ({n_params / 1e6:.2f}M parameters, {cfg.stages} stage(s)), "
             f"{len(dataset)} {dataset.kind} items, {accelerator.num_processes} process(es) on {device.type}, "
             f"global batch {cfg.batch_size} = {accelerator.num_processes} x {cfg.gradient_accumulation_steps} x "
             f"{micro_batch}, mixed precision {cfg.mixed_precision}")
    if resumed:
        log.info(f"resuming from {resume_path} at step {start_step}")

    # ---- loop state (device tensors; read at log steps only)
    pixel = is_pixel_space(cfg)
    S = cfg.stages
    A = cfg.gradient_accumulation_steps
    zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
    loss_sum, grad_sum, stage_sum, stage_cnt = zeros(()), zeros(()), zeros(S), zeros(S)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    steps_in_window = 0
    window_start = time.time()
    last_ckpt = resume_path
    last_preview = None
    last_saved_step = start_step if resumed else -1
    step = start_step

    def check_finite():
        bad_t = torch.where(first_bad < 0, torch.full_like(first_bad, 2**62), first_bad)
        if accelerator.num_processes > 1:  # every rank must stop together, or the others hang
            torch.distributed.all_reduce(bad_t, op=torch.distributed.ReduceOp.MIN)
        bad = int(bad_t.item())
        bad = -1 if bad == 2**62 else bad
        if bad >= 0:
            tracker.close()
            good = list_checkpoints(exp_dir)
            where = f"the last good checkpoint is {good[-1][1]}" if good else "no checkpoint was written"
            raise NonFiniteLossError(
                f"the training loss became non-finite (NaN/inf) at step {bad}; training stopped ({where}). "
                "Lower lr, check the data, or use mixed_precision=bf16/no instead of fp16.")

    def save(step_now: int):
        nonlocal last_ckpt, last_saved_step
        check_finite()
        if accelerator.num_processes > 1:  # DDP keeps ranks identical; a mismatch is a setup bug
            checksum = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum()
            sums = accelerator.gather(checksum[None]).tolist()
            if any(v != sums[0] for v in sums):
                raise RuntimeError(f"processes hold different weights at step {step_now} (checksums {sums}); "
                                   "the run is not synchronised")
        states = gather_objects(accelerator, rng_state(generator))
        if is_main:
            path = checkpoint_path(exp_dir, step_now)
            atomic_torch_save({
                "model": raw_model.state_dict(), "ema": ema_model.state_dict(), "opt": optimizer.state_dict(),
                "arch": dict(raw_model.arch), "config": config_dict, "steps": step_now, "rng": states,
                "data_position": sampler.position(step_now)}, path)
            removed = prune_checkpoints(exp_dir, cfg.checkpoints_total_limit)
            log.info(f"saved checkpoint {path}" + (f" (removed {len(removed)} old)" if removed else ""))
            last_ckpt = path
        last_saved_step = step_now
        accelerator.wait_for_everyone()

    def preview(step_now: int):
        nonlocal last_preview
        if previewer is not None:
            out = previewer(ema_model, step_now)
            for name, (grid, path) in out.items():
                tracker.log_image(f"previews/{name}", grid, step_now, caption=f"step {step_now}")
            last_preview = out["samples"][1]
            log.info(f"preview {last_preview}")
        accelerator.wait_for_everyone()

    if cfg.preview.num_samples > 0 and step < cfg.max_train_steps:
        preview(step)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_train_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    data_iter = iter(loader)
    model.train()
    while step < cfg.max_train_steps:
        for a in range(A):
            x, y = next(data_iter)
            seed_micro_batch(cfg.seed, step, a * accelerator.num_processes + rank, generator)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if pixel:
                x = x.float() / 127.5 - 1.0
            else:
                import data.vae as dvae

                x = dvae.sample_latents(x, generator=generator)
            sync = contextlib.nullcontext() if a == A - 1 else accelerator.no_sync(model)
            with sync:
                out = objective(model, x, y, generator=generator)
                accelerator.backward(out["loss"] / A)
            loss = out["loss"].detach()
            loss_sum += loss / A
            stage_sum += out["stage_losses"] / A
            stage_cnt += (out["stage_losses"] > 0).float() / A
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step + 1, first_bad)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        step += 1
        steps_in_window += 1
        grad_sum += grad_norm.detach().float() if torch.is_tensor(grad_norm) else grad_norm
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_train_steps:
            try:
                check_finite()
            except NonFiniteLossError:
                bar.close()
                raise
            stats = torch.cat([loss_sum[None], grad_sum[None], stage_sum, stage_cnt])
            stats = accelerator.reduce(stats, reduction="sum") if accelerator.num_processes > 1 else stats
            stats = stats.tolist()
            P = accelerator.num_processes
            elapsed = time.time() - window_start
            metrics = {"loss": stats[0] / (P * steps_in_window), "grad_norm": stats[1] / (P * steps_in_window),
                       "lr": optimizer.param_groups[0]["lr"],
                       "images_per_sec": cfg.batch_size * steps_in_window / max(elapsed, 1e-9)}
            for s in range(S):
                if stats[2 + S + s] > 0 and S > 1:
                    metrics[f"loss_stage{s}"] = stats[2 + s] / stats[2 + S + s]
            tracker.log_metrics(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if is_main:
                log.info(f"step {step}/{cfg.max_train_steps} " + " ".join(
                    f"{k}={v:.4g}" for k, v in metrics.items()))
            loss_sum.zero_(); grad_sum.zero_(); stage_sum.zero_(); stage_cnt.zero_()  # noqa: E702
            steps_in_window = 0
            window_start = time.time()
        if stop_after_step is not None and step >= stop_after_step:
            bar.close()
            tracker.close()
            return TrainResult(exp_dir, step, last_ckpt, last_preview, time.time() - t_start)
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            save(step)
        if cfg.preview.num_samples > 0 and (
                (cfg.sampling_steps and step % cfg.sampling_steps == 0) or step == cfg.max_train_steps):
            preview(step)
    bar.close()
    if last_saved_step != step:
        save(step)
    log.info(f"done: {step} steps in {time.time() - t_start:.1f} s; checkpoint {last_ckpt}"
             + (f"; samples {last_preview}" if last_preview else ""))
    tracker.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(exp_dir, step, last_ckpt, last_preview, time.time() - t_start)


def _make_previewer(cfg, raw_model, in_channels, exp_dir, device, is_main, log):
    if cfg.preview.num_samples <= 0 or not is_main:
        return None
    from training.previews import PreviewMaker

    vae = None
    if not is_pixel_space(cfg):
        import data.vae as dvae

        try:
            vae = dvae.load_vae(cfg.vae, device=device)
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"vae: cannot load {cfg.vae!r} to decode the previews: {e}\n"
                              "Pass a local VAE folder (vae=/path/to/sd-vae-ft-ema) or turn previews off "
                              "with preview.num_samples=0.") from None
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    return PreviewMaker(cfg.preview, num_classes=cfg.num_classes, in_channels=in_channels,
                        stage_sizes=list(raw_model.stage_sizes), path_type=cfg.path_type,
                        out_dir=os.path.join(exp_dir, "previews"), device=device, vae=vae,
                        autocast_dtype=autocast)
