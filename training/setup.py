"""Setting up a training run: processes, data, resume target, model + EMA + optimizer, previews.

Each function does one part of `training.loop.train`'s start-up and raises `ConfigError` with a
message that says what to change; the loop itself stays a readable sequence of steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from training.checkpoint import list_checkpoints, load_checkpoint, select_resume_checkpoint
from training.config import is_pixel_space, model_kwargs
from training.ema import EMA, create_ema
from training.errors import ConfigError
from training.resume_check import check_resume_state


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
    # compile=true compiles regions of the model in build_train_state (models/compile.py), not here:
    # accelerate would compile the whole DDP-wrapped model
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"accelerate reports {accelerator.num_processes} process(es) but WORLD_SIZE={expected}: "
            "the processes would train as independent copies. On a machine without GPUs launch with "
            "`accelerate launch --multi_gpu --num_processes N ...` or "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N train.py ...`")
    return accelerator


def gather_objects(accelerator, obj) -> list:
    """`obj` of every process, in rank order (no collective with one process)."""
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def write_demo_data(cfg, accelerator, log) -> None:
    """`make_demo_data`: rank 0 writes the synthetic dataset if it is missing; all ranks wait."""
    error = None
    if cfg.make_demo_data and accelerator.is_main_process:
        from training.demo_data import demo_dataset_is_complete, write_demo_dataset

        if not demo_dataset_is_complete(cfg.data_dir):
            log.info(f"writing the demo dataset to {cfg.data_dir} "
                     f"({cfg.num_classes} classes x {cfg.demo_images_per_class} images, {cfg.resolution} px)")
            try:
                write_demo_dataset(cfg.data_dir, cfg.resolution, cfg.num_classes, cfg.demo_images_per_class,
                                   seed=cfg.seed)
            except ValueError as e:
                error = ConfigError(f"data_dir: {e}")
    accelerator.wait_for_everyone()  # the other processes then fail on the missing dataset
    if error is not None:
        raise error


def open_training_dataset(cfg):
    """data.open_dataset + checks that the items fit the configured model. Returns
    (dataset, in_channels, input_size). REPA runs (proj_coeff > 0) get the two-view
    `data.open_paired` dataset: items (uint8 image, latent moments, label), alignment checked."""
    import data
    from training.repa import repa_enabled

    pixel = is_pixel_space(cfg)
    if repa_enabled(cfg):
        try:
            dataset = data.open_paired(cfg.data_dir, cfg.images_dir or None, resolution=cfg.resolution)
        except (FileNotFoundError, ValueError, OSError, KeyError) as e:
            raise ConfigError(f"data_dir / images_dir (REPA needs images and their latents): {e}") from None
    else:
        try:
            dataset = data.open_dataset(cfg.data_dir)
        except (FileNotFoundError, ValueError, OSError, KeyError) as e:
            raise ConfigError(f"data_dir: cannot open {cfg.data_dir!r}: {e}") from None
    if len(dataset) == 0:
        raise ConfigError(f"data_dir: {cfg.data_dir!r} holds no items")
    size = cfg.resolution if pixel else cfg.resolution // 8
    want = (3 if pixel else 8, size, size)
    # per-image readers take the configured shape when most items have it (an odd first item is a bad sample)
    shape = dataset.expect_item_shape(want) if hasattr(dataset, "expect_item_shape") else tuple(dataset.item_shape)
    if pixel:
        if dataset.kind != "images":
            raise ConfigError(f"data_dir {cfg.data_dir!r} holds VAE latents but vae=none (pixel space); "
                              "set vae to the VAE the latents were encoded with (e.g. vae=ft-ema)")
        if shape != want:
            raise ConfigError(f"data_dir {cfg.data_dir!r}: images are {shape[1]}x{shape[2]} (shape {shape}) but "
                              f"resolution={cfg.resolution} expects {want}; set resolution={shape[1]} or "
                              "convert the data at the wanted resolution")
        in_channels, input_size = 3, cfg.resolution
    else:
        if dataset.kind not in ("latents", "paired"):
            raise ConfigError(f"data_dir {cfg.data_dir!r} holds images, but vae={cfg.vae!r} trains on latents: "
                              "encode them first (`python dataset_tools.py encode`) or set vae=none to "
                              "train in pixel space")
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


def resume_target(cfg, exp_dir: str, log):
    """(path, checkpoint dict) to continue from, or (None, None) for a fresh run.

    `resume=auto` takes the newest usable checkpoint of the experiment; unreadable ones, ones
    that fail their checksum and ones whose contents cannot be resumed from
    (`training.resume_check`: damaged fields, non-finite weights) are skipped with a warning each,
    and when some existed but none is usable the log says loudly that the run starts from step 0.
    An explicit checkpoint that fails is one ConfigError.
    """
    if cfg.resume == "auto":
        choice = select_resume_checkpoint(exp_dir, check=check_resume_state)
        for line in choice.messages():
            log.warning(line)
        return choice.path, choice.state
    if cfg.resume != "none":
        try:
            state = load_checkpoint(cfg.resume)
        except ValueError as e:
            raise ConfigError(f"resume: {e}") from None
        try:
            check_resume_state(state)
        except ValueError as e:
            raise ConfigError(f"resume: checkpoint {cfg.resume} cannot be resumed from: {e} (the file is damaged "
                              "or was edited; resume from another checkpoint)") from None
        return cfg.resume, state
    if list_checkpoints(exp_dir):
        raise ConfigError(f"resume=none but {exp_dir} already holds checkpoints; use resume=auto to continue "
                          "that run, or choose another exp_name / output_dir")
    return None, None


@dataclass
class TrainState:
    """What a checkpoint restores: the raw model, its EMA copy, the optimizer and the LR schedule."""
    model: torch.nn.Module
    ema_model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    start_step: int


def lr_lambda(cfg):
    """Multiplier of `lr` for optimizer step `step` (0-based): constant, or a linear warm-up
    `step / warmup_steps` up to 1 (diffusers' / transformers' constant-with-warm-up schedule, so
    the very first update has lr 0)."""
    warmup = int(cfg.warmup_steps) if cfg.lr_scheduler == "constant_with_linear_warmup" else 0
    if warmup <= 0:
        return lambda step: 1.0
    return lambda step: min(1.0, step / warmup)


def build_train_state(cfg, in_channels: int, input_size: int, device, ckpt: Optional[dict],
                      resume_path: Optional[str], extra_model_kwargs: Optional[dict] = None) -> TrainState:
    """Model (identical on every rank), EMA, AdamW and LR schedule; restored from `ckpt` if given."""
    import models

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every launch
    kwargs = model_kwargs(cfg, in_channels, input_size)
    kwargs.update(extra_model_kwargs or {})
    try:
        model = models.create_model(cfg.model, **kwargs)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if ckpt is not None:
        from models.checkpoints import stored_arch

        stored = stored_arch(ckpt)
        if stored is not None:
            from models.registry import arch_differences

            try:
                changed = arch_differences(stored, model.arch)
            except ValueError as e:  # an option this checkout does not know
                raise ConfigError(f"resume: checkpoint {resume_path}: its architecture cannot be built here: {e}") from None
            if changed:
                raise ConfigError(f"resume: checkpoint {resume_path} was trained with another architecture than the "
                                  f"config builds ({'; '.join(changed)}); resume with the checkpoint's settings")
        from models.checkpoints import load_state_dict_strict

        try:  # a checkpoint without an arch (older runs) meets the config's model only here
            load_state_dict_strict(model, ckpt["model"])
        except ValueError as e:
            raise ConfigError(f"resume: checkpoint {resume_path}: {e}; resume with the checkpoint's settings") from None
    model.to(device).train()
    ema_model = create_ema(model)
    if ckpt is not None:
        ema_model.load_state_dict(ckpt["ema"])  # the same keys and shapes as the model (training.resume_check)
    if cfg.compile:  # after the EMA copy: a deep copy of a compiled module would call the original
        from models.compile import compile_model

        compile_model(model)
        compile_model(ema_model)  # previews and evaluation sample with it
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
        # fused on GPUs; on_nonfinite=skip needs the fused kernel everywhere (it skips a step on the device)
        fused=torch.device(device).type == "cuda" or cfg.on_nonfinite == "skip")
    if ckpt is not None:
        load_optimizer_state(optimizer, ckpt.get("opt"), resume_path)
    start_step = int(ckpt["steps"]) if ckpt is not None else 0
    # The schedule is a pure function of (lr, step): rebuilt at the resumed step, nothing to store.
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg), last_epoch=-1)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * schedule.lr_lambdas[0](start_step)
    schedule.last_epoch = start_step
    return TrainState(model, ema_model, EMA(model, ema_model, cfg.ema_decay), optimizer, schedule, start_step)


ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")
OPTIMIZER_KERNEL_OPTIONS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state, path: str) -> None:
    """Load a checkpoint's AdamW state, checked first: every parameter's state holds `step` and two
    moments of the parameter's shape. A state that does not fit (a damaged or edited file) is one
    ConfigError here, not a KeyError at the first optimizer step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def fail(why: str):
        raise ConfigError(f"resume: checkpoint {path}: its optimizer state does not fit this model ({why}); the "
                          "file is damaged or was edited (resume from another checkpoint)")

    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        fail(f"expected AdamW's state dict, found {type(state).__name__}")
    # Which kernel runs the update is this run's choice, not state: a run resumed with on_nonfinite=skip
    # needs the fused kernel (found_inf) even when the checkpoint's run used the for-each one. Set before
    # loading, so that torch places the step counts where the chosen kernel wants them.
    groups = state.get("param_groups")
    if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
        kernels = [{k: group[k] for k in OPTIMIZER_KERNEL_OPTIONS if k in group} for group in optimizer.param_groups]
        state = {**state, "param_groups": [{**saved, **chosen} for saved, chosen in zip(groups, kernels)]
                 + groups[len(kernels):]}
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        fail(str(e).splitlines()[0][:160] if str(e) else type(e).__name__)
    for index, param in enumerate(params):
        entry = optimizer.state.get(param)
        if entry is None:
            continue
        missing = [k for k in ADAMW_STATE if k not in entry]
        if missing:
            fail(f"parameter {index} has no {', '.join(missing)}")
        wrong = [k for k in ADAMW_STATE[1:] if tuple(entry[k].shape) != tuple(param.shape)]
        if wrong:
            fail(f"parameter {index}: {wrong[0]} has shape {tuple(entry[wrong[0]].shape)}, the parameter "
                 f"{tuple(param.shape)}")


def previews_on(cfg, is_main: bool) -> bool:
    return cfg.preview.num_samples > 0 and is_main


def load_decoder_vae(cfg, device):
    """The VAE that decodes previews and evaluation samples (None for pixel-space runs); loaded
    once per process, before training, so a missing VAE fails here."""
    if is_pixel_space(cfg):
        return None
    import data.vae as dvae

    try:
        return dvae.load_vae(cfg.vae, device=device)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"vae: cannot load {cfg.vae!r} to decode the previews and evaluation samples: {e}\n"
                          "Pass a local VAE folder (vae=/path/to/sd-vae-ft-ema), or turn previews off with "
                          "preview.num_samples=0 (and evaluation with eval_every=0).") from None


def model_decomposition(cfg, in_channels: int, input_size: int):
    """The decomposition (without stage scales) of the model this config builds, from a meta-device
    twin: what `stage_scales: auto` measures."""
    from models.registry import skeleton_model

    kwargs = {**model_kwargs(cfg, in_channels, input_size), "stage_scales": None}
    return skeleton_model(cfg.model, **kwargs).decomposition


def make_previewer(cfg, model, exp_dir, device, is_main, vae=None):
    """The preview maker (rank 0), or None. `vae`: the run's decoder (load_decoder_vae)."""
    if not previews_on(cfg, is_main):
        return None
    from training.previews import PreviewMaker, autocast_dtype

    autocast = autocast_dtype(cfg.mixed_precision)
    budgets = list(cfg.preview.get("budgets") or [])  # ELIT: the fraction of latents each keeps
    fractions = [model.kept_latents(b) / model.group_size ** 2 for b in budgets]
    if budgets:
        from bench.flops import counted_forward_flops

        flops = [counted_forward_flops(model, b) for b in budgets]
    return PreviewMaker(cfg.preview, num_classes=cfg.num_classes, stage_shapes=list(model.stage_shapes),
                        out_dir=os.path.join(exp_dir, "previews"), device=device, vae=vae,
                        autocast_dtype=autocast, budget_fractions=fractions, budget_flops=flops if budgets else None)


def bad_sample_guard(cfg, dataset, exp_dir: str, num_processes: int):
    """(dataset for the loader, tracker): `bad_samples: error | skip` (data/robust.py). Every item
    gains a last `bad` column; the tracker (main process of each rank) turns it into one clear
    error or a record in `<exp_dir>/bad_samples.json`."""
    from data.robust import BadSampleTracker, ReplaceBadSamples

    tracker = BadSampleTracker(dataset, cfg.bad_samples, defer_errors=num_processes > 1)
    tracker.merge(earlier_bad_samples(os.path.join(exp_dir, "bad_samples.json")))
    return ReplaceBadSamples(dataset), tracker


MAX_BAD_SAMPLES_BYTES = 64 << 20  # ~300,000 records


def earlier_bad_samples(path: str) -> list:
    """The records of `<exp_dir>/bad_samples.json` written by an earlier launch of the run ([] when
    there is none), read as a run-folder record (utils/records.py); ConfigError for one that is not."""
    from utils.records import RecordError, read_record

    try:
        found = read_record(path, "bad samples record", max_bytes=MAX_BAD_SAMPLES_BYTES, missing_ok=True)
    except RecordError as e:
        raise ConfigError(f"{e}; move it away to start its list again") from None
    files = found.get("files", []) if isinstance(found, dict) else found
    if found is not None and not (isinstance(files, list)
                                  and all(isinstance(r, dict) and isinstance(r.get("index"), int) for r in files)):
        raise ConfigError(f"bad samples record {path}: not a list of files with their index (as written by a run); "
                          "move it away to start its list again")
    return files or []
