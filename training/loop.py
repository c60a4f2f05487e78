"""The training run: config -> data -> model -> objective -> loop, with exact resume.

`train(cfg)` is what `train.py` calls (one call per process under accelerate/torchrun).
Every step: draw `gradient_accumulation_steps` micro-batches of this process's share of the
global batch, turn each into the objective's inputs (posterior latents or pixels in [-1, 1],
plus whatever the objective's terms need), compute the S-stage flow-matching loss,
backpropagate (gradients are synchronised on the last micro-batch only), clip, AdamW, LR
schedule, EMA. Metrics stay on the device and are read every `log_every` steps (the only host
synchronisation in the loop).

Randomness: see training/rng.py. Every micro-batch re-seeds its streams from
(seed, step, slot), so a resumed run repeats the uninterrupted one bit for bit.

Errors that stop a run (a bad config or data, a non-finite loss, a failed checkpoint write)
end in one line: `train.py` prints it on rank 0, and the run's log.txt holds it too. No
checkpoint is written after a non-finite loss, so the newest checkpoint is the last good one.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from training.checkpoint import list_checkpoints, remove_stale_temporaries
from training.batch import BatchPreparer
from training.budget import BudgetSampler
from training.calibration import run_stage_scales
from training.config import is_pixel_space
from training.evaluator import make_evaluator
from data.robust import CorruptSampleError
from training.errors import (CheckpointWriteError, ConfigError, CorruptDataError, NonFiniteLossError,
                             TrainingStopped, describe_write_error)
from training.logger import RunLogger, log_error_to_file
from training.metrics import MetricWindow
from training.nonfinite import SkipGuard
from training.posthoc_ema import start_profiles
from training.preemption import Preemption
from training.repa import RepaFeatures, load_run_encoders
from training.rng import restore_streams, rng_state, seed_micro_batch, seed_process
from training.sampler import ResumableBatchSampler, check_data_position
from training.objective import build_objective
from training.run_folder import RunFolder
from training.setup import (bad_sample_guard, build_train_state, check_batch_split, create_accelerator,
                            gather_objects, load_decoder_vae, make_previewer, model_decomposition,
                            open_training_dataset, previews_on, resume_target, world_size_from_env, write_demo_data)
from training.step import TrainStep
from utils.config import config_to_dict
from utils.progress import progress_bar
from utils.regular_files import NotRegularFile
from utils.threads import using_cpu_threads

__all__ = ["train", "TrainResult", "NonFiniteLossError", "CheckpointWriteError", "check_batch_split"]


@dataclass
class TrainResult:
    exp_dir: str
    steps: int
    last_checkpoint: Optional[str]
    last_preview: Optional[str]
    wall_time: float
    preempted: Optional[str] = None  # the signal that stopped the run early ("SIGTERM", "SIGUSR1")


def train(cfg, *, stop_after_step: Optional[int] = None) -> TrainResult:
    """Run (or continue) the training described by the resolved config `cfg`.

    `stop_after_step` (tests) ends the run after that step without the final checkpoint or
    preview, as if the job had been killed. SIGTERM / SIGUSR1 end it after the current step with
    a checkpoint (training/preemption.py); the result then names the signal in `preempted`.
    """
    logging.getLogger("dfm.train").handlers.clear()  # no log.txt of an earlier run in this process
    try:
        with using_cpu_threads(cfg.cpu_threads), Preemption() as preemption:
            return _train(cfg, stop_after_step, preemption)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops after the step, with a checkpoint)
        good = list_checkpoints(os.path.join(cfg.output_dir, cfg.exp_name))
        error = TrainingStopped(f"interrupted by a second Ctrl-C: stopped at once, without a checkpoint of the "
                                f"step in progress; {f'the last checkpoint is {good[-1][1]}' if good else 'no checkpoint was written'}")
        log_error_to_file(f"error: {error}")
        raise error from None
    except (ConfigError, TrainingStopped) as error:
        log_error_to_file(f"error: {error}")
        raise
    except NotRegularFile as error:  # a link, FIFO or folder planted in the run folder: its message names it
        log_error_to_file(f"error: {error}")
        raise ConfigError(str(error)) from None
    except CorruptSampleError as error:  # bad_samples=error: one line naming the file
        log_error_to_file(f"error: {error}")
        raise CorruptDataError(str(error)) from None
    except Exception as error:
        log_error_to_file(f"training stopped by an unexpected error: {error}", exc_info=sys.exc_info())
        raise


def _train(cfg, stop_after_step: Optional[int], preemption: Preemption) -> TrainResult:
    t_start = time.time()
    micro_batch = check_batch_split(cfg, world_size_from_env())
    threads = torch.get_num_threads()  # the rule's choice, made once by train() (it measures the machine)
    accelerator = create_accelerator(cfg)
    torch.set_num_threads(threads)  # again: accelerate's multi-CPU start-up resets them
    preemption.connect(accelerator.num_processes)
    gather = lambda obj: gather_objects(accelerator, obj)  # noqa: E731
    exp_dir = os.path.join(cfg.output_dir, cfg.exp_name)
    with RunFolder(cfg, exp_dir, accelerator, gather) as folder:  # the lock, then log.txt; one line on every rank
        return _run(cfg, stop_after_step, preemption, accelerator, folder, micro_batch, t_start)


def _run(cfg, stop_after_step, preemption, accelerator, folder, micro_batch: int, t_start: float) -> TrainResult:
    threads = torch.get_num_threads()
    rank, is_main, device = accelerator.process_index, accelerator.is_main_process, accelerator.device
    P, A, S = accelerator.num_processes, cfg.gradient_accumulation_steps, cfg.stages
    exp_dir, log, gather = folder.exp_dir, folder.log, folder.gather

    # ---- data, resume target (before building anything heavy: a bad path or arch fails early)
    write_demo_data(cfg, accelerator, log)
    dataset, in_channels, input_size = open_training_dataset(cfg)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.allow_tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.allow_tf32)
    if is_main:
        remove_stale_temporaries(exp_dir)
    resume_path, ckpt = resume_target(cfg, exp_dir, log)
    # REPA: the frozen encoders, on every rank (never part of the model or its checkpoints)
    repa_features = RepaFeatures(load_run_encoders(cfg, device), accelerator.autocast)

    # ---- model, EMA, optimizer, LR schedule, objective (which decomposes with the model's decomposition)
    cfg.stage_scales = run_stage_scales(cfg, dataset, ckpt, is_pixel_space(cfg), log,  # `auto` measured here
                                        model_decomposition(cfg, in_channels, input_size))
    extra = {"stage_scales": cfg.stage_scales, **({"z_dims": repa_features.z_dims()} if repa_features.encoders else {})}
    state = build_train_state(cfg, in_channels, input_size, device, ckpt, resume_path, extra_model_kwargs=extra)
    raw_model, ema_model, optimizer = state.model, state.ema_model, state.optimizer
    previous_config = ckpt.get("config") if ckpt is not None else None
    objective = build_objective(cfg)
    model, optimizer = accelerator.prepare(raw_model, optimizer)

    # ---- random streams and data position
    generator = torch.Generator(device=device)
    seed_process(cfg.seed, rank, generator)
    if ckpt is not None:
        restore_streams(ckpt, generator, rank, P, log)
    start_step = state.start_step
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, P, rank, A, cfg.seed, start_step)
    if ckpt is not None:
        check_data_position(ckpt.get("data_position"), sampler.position(start_step), log)
    # ---- what a step updates besides the model: post-hoc EMA profiles, the skip guard (with their saved state)
    profiles = start_profiles(cfg, raw_model, exp_dir, ckpt, resume_path, log, is_main)
    guard = SkipGuard(optimizer, cfg.max_skipped_steps, device) if cfg.on_nonfinite == "skip" else None
    if ckpt is not None and guard is not None:
        guard.load_state_dict(ckpt.get("nonfinite"))
    resumed, ckpt = ckpt is not None, None  # free the loaded tensors
    loader_dataset, bad_log = bad_sample_guard(cfg, dataset, exp_dir, P)
    loader = torch.utils.data.DataLoader(
        loader_dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=(device.type == "cuda"),
        persistent_workers=cfg.num_workers > 0, generator=torch.Generator().manual_seed(cfg.seed))

    # ---- previews (loads the VAE for latent runs: fails here, before any training), logging
    vae = load_decoder_vae(cfg, device) if previews_on(cfg, is_main) or cfg.eval_every else None
    previewer = make_previewer(cfg, raw_model, exp_dir, device, is_main, vae)
    evaluator = make_evaluator(cfg, exp_dir=exp_dir, device=device, rank=rank, num_processes=P, log=log,
                               gather=gather, vae=vae)
    config_dict = config_to_dict(cfg)
    tracker = RunLogger(exp_dir, log, cfg.report_to, is_main, config=config_dict, project=cfg.wandb_project,
                        run_name=cfg.exp_name, wandb_mode=cfg.wandb_mode)
    folder.record_config(cfg, start_step, previous_config)  # once every check of this start has passed
    n_params = sum(p.numel() for p in raw_model.parameters())
    log.info(f"experiment {exp_dir}: {cfg.model} ({n_params / 1e6:.2f}M parameters, {S} stage(s)), "
             f"{len(dataset)} training items ({dataset.kind}), {P} process(es) on {device.type} ({threads} CPU "
             f"threads each), global batch {cfg.batch_size} = {P} x {A} x {micro_batch}, mixed precision "
             f"{cfg.mixed_precision}" + (", compiled blocks" if cfg.compile else ""))
    if repa_features.encoders:
        log.info(f"REPA: proj_coeff {cfg.proj_coeff}, encoder_depth {raw_model.encoder_depth}, frozen "
                 + ", ".join(repr(e) for e in repa_features.encoders))
    if resumed:
        log.info(f"resuming from {resume_path} at step {start_step}")

    # ---- loop state (device tensors; read at log steps only)
    prepare = BatchPreparer(is_pixel_space(cfg), device, repa_features)
    budgets = BudgetSampler(raw_model, cfg.seed)  # ELIT: the budget of every micro-batch
    logged_terms = ("proj_loss",) if cfg.proj_coeff > 0 else ()
    metrics = MetricWindow(S, device, skips=guard is not None)
    last_ckpt, last_preview = resume_path, None
    last_saved_step = start_step if resumed else -1
    step = start_step
    bad_written = bad_log.count  # files listed in bad_samples.json so far

    def sync_bad_samples() -> None:
        """Stop every rank on a corrupt sample (bad_samples=error; any rank may hold it), or
        collect the skipped files on rank 0 and rewrite bad_samples.json when the list grew."""
        nonlocal bad_written
        if P > 1:
            pending = [p for p in gather_objects(accelerator, bad_log.pending) if p is not None]
            if pending:
                raise pending[0]
            if bad_log.policy == "skip":
                for records in gather_objects(accelerator, list(bad_log.records.values())):
                    bad_log.merge(records)
        if is_main and bad_log.count != bad_written:
            bad_log.write(os.path.join(exp_dir, "bad_samples.json"))
            bad_written = bad_log.count

    def check_finite(at_end: bool = False):
        if guard is None:
            bad = metrics.first_nonfinite_step(accelerator)
            what = None if bad is None else f"became non-finite (NaN/inf) at step {bad}"
        else:
            what = guard.failure(at_end)
        if what is not None:
            tracker.close()
            good = list_checkpoints(exp_dir)
            where = f"the last good checkpoint is {good[-1][1]}" if good else "no checkpoint was written"
            raise NonFiniteLossError(f"the training loss {what}; training stopped ({where}). "
                                     f"{nonfinite_suspects(cfg)}")

    def save(step_now: int):
        nonlocal last_ckpt, last_saved_step
        check_finite(at_end=step_now >= cfg.max_train_steps)
        sync_bad_samples()
        _check_ranks_agree(accelerator, raw_model, step_now)
        states = gather_objects(accelerator, rng_state(generator))
        payload = None if not is_main else {
            "model": raw_model.state_dict(), "ema": ema_model.state_dict(), "opt": optimizer.state_dict(),
            "arch": dict(raw_model.arch), "config": config_dict, "steps": step_now, "rng": states,
            "data_position": sampler.position(step_now), **({"nonfinite": guard.state_dict()} if guard else {}),
            **({"posthoc_ema": profiles.state_dict()} if profiles else {})}
        export = ({"ema": ema_model.state_dict(), "model": raw_model.state_dict()}
                  if is_main and cfg.save_format == "safetensors" else None)
        last_ckpt = folder.save_checkpoint(payload or {"steps": step_now}, last_ckpt,
                                           start_step if resumed else None, export)
        last_saved_step = step_now
        accelerator.wait_for_everyone()

    def preview(step_now: int):
        nonlocal last_preview

        def make() -> str:
            try:
                out = previewer(ema_model, step_now)
            except OSError as e:
                raise CheckpointWriteError(f"cannot write the preview of step {step_now} in {exp_dir}/previews: "
                                           f"{describe_write_error(e)}; {folder.checkpoints_kept()}") from None
            for name, (grid, path) in out.items():
                tracker.log_image(f"previews/{name}", grid, step_now, caption=f"step {step_now}")
            log.info(f"preview {out['samples'][1]}")
            return out["samples"][1]

        last_preview = folder.on_main(make if previewer is not None else lambda: None) or last_preview

    if cfg.preview.num_samples > 0 and step < cfg.max_train_steps:
        preview(step)

    if cfg.num_workers > 0:  # workers fork now: objects frozen out of the collector are shared, not copied
        gc.freeze()  # (its pass would touch every object's header, copying the pages into each worker)
    data_iter = iter(loader)
    model.train()
    train_step = TrainStep(accelerator, model, objective, optimizer, state.lr_schedule, state.ema, metrics,
                           accumulation=A, max_grad_norm=cfg.max_grad_norm, logged_terms=logged_terms, guard=guard,
                           averages=[profiles] if profiles else [])
    with progress_bar(total=cfg.max_train_steps, initial=step, disable=not is_main, desc="train",
                      dynamic_ncols=True) as bar:  # closed before any error line is printed
        while step < cfg.max_train_steps and not preemption.requested():  # polled once per step
            # ---- one optimizer step: A micro-batches, clip, AdamW, LR schedule, EMA
            for a in range(A):
                seed_micro_batch(cfg.seed, step, a * P + rank, generator)
                *items, bad = next(data_iter)
                for record in bad_log.observe(bad, step=step):
                    log.warning(f"WARNING: corrupt sample replaced (bad_samples=skip): {record['file']}: "
                                f"{record['reason']}")
                inputs = prepare(items, generator)
                inputs.model_kwargs.update(budgets(step, a))
                train_step.micro_batch(inputs, generator, step, a)
            train_step.finish(step)
            step += 1
            bar.update(1)

            # ---- logging, checkpoints, previews
            if step % cfg.log_every == 0 or step == cfg.max_train_steps:
                check_finite()
                sync_bad_samples()
                values = metrics.read(accelerator, cfg.batch_size)
                values["lr"] = optimizer.param_groups[0]["lr"]
                values.update(budgets.log_values())
                values["images_seen"] = step * cfg.batch_size
                if guard is not None:
                    values["skipped_steps"] = guard.skipped()
                if bad_log.count:
                    values["bad_samples"] = bad_log.count
                tracker.log_metrics(values, step)
                bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
                log.info(f"step {step}/{cfg.max_train_steps} " + " ".join(f"{k}={v:.4g}" for k, v in values.items()))
            if stop_after_step is not None and step >= stop_after_step:
                tracker.close()
                return TrainResult(exp_dir, step, last_ckpt, last_preview, time.time() - t_start)
            side_work = time.time()  # snapshots, checkpoints, previews, evaluation: not in images_per_sec
            if profiles is not None and profiles.due(step):  # before the checkpoint: a resume rewrites it
                folder.on_main(lambda: folder.write(profiles.snapshot, exp_dir, step, dict(raw_model.arch), config_dict))
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
                save(step)
            if cfg.preview.num_samples > 0 and (
                    (cfg.sampling_steps and step % cfg.sampling_steps == 0) or step == cfg.max_train_steps):
                preview(step)
            if evaluator is not None:
                evaluator.maybe_run(ema_model, step, tracker)
            metrics.exclude(time.time() - side_work)
    if last_saved_step != step:
        save(step)
    if start_step >= cfg.max_train_steps:
        log.warning(f"WARNING: the checkpoint is at step {start_step}, max_train_steps={cfg.max_train_steps}: nothing "
                    "was trained (raise max_train_steps to continue the run)")
    log.info(preemption.stop_line(step, last_ckpt) or f"done: {step} steps in {time.time() - t_start:.1f} s; "
             f"checkpoint {last_ckpt}" + (f"; samples {last_preview}" if last_preview else ""))
    tracker.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(exp_dir, step, last_ckpt, last_preview, time.time() - t_start, preemption.signal_name)


def nonfinite_suspects(cfg) -> str:
    """What to look at after a non-finite loss, most likely first for this config."""
    suspects = []
    scales = cfg.stage_scales if isinstance(cfg.stage_scales, (list, tuple)) or \
        type(cfg.stage_scales).__name__ == "ListConfig" else None
    if scales is not None and max(abs(math.log10(float(c))) for c in scales) > 2:
        energy = max(float(c) ** 2 for c in scales)
        suspects.append(f"the stage_scales {list(scales)} (they multiply a level's energy by up to {energy:.3g}: "
                        "choose scales nearer 1, or auto)")
    if cfg.mixed_precision == "fp16":
        suspects.append("fp16 (use mixed_precision=bf16 or no)")
    suspects += ["the learning rate (lower lr)", "the data (bad_samples, dataset_tools.py verify)"]
    return "Check " + "; ".join(suspects) + "."


def _check_ranks_agree(accelerator, model, step: int) -> None:
    """DDP keeps ranks identical; a mismatch at a checkpoint is a setup bug worth stopping for."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    sums = accelerator.gather(checksum[None]).tolist()
    if any(v != sums[0] for v in sums):
        raise RuntimeError(f"processes hold different weights at step {step} (checksums {sums}); "
                           "the run is not synchronised")
