"""Sampling run: shard the sample indices over processes, generate the missing ones, write
PNGs atomically, then assemble the .npz in index order on rank 0.

Guarantees
- Sample i's label, starting noise and SDE noise depend only on (seed, i) (and N for balanced
  labels), never on the number of processes or the batch size.
- Resumable: an existing `{i:06d}.png` with intact chunks (images.is_complete_png: structure and
  CRCs, not a decode) is kept; only missing or damaged ones are generated again. Partial writes
  never carry a final name.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from .config import GenerationError, mismatched_keys, resolve_config, validate_config
from utils.atomic import reported_write_errors
from utils.regular_files import NotRegularFile, check_regular
from utils.distributed import DistContext, setup_distributed
from utils.threads import using_cpu_threads
from .images import (missing_pngs, npz_is_complete, png_path, remove_stale_temporaries, write_npz_from_pngs,
                     write_png_atomic)
from .labels import class_labels
from .model_loading import load_sampling_model
from .provenance import RunRecord
from .noise import initial_noise, sde_generators


def _log(ctx: DistContext, *msg) -> None:
    if ctx.is_main:
        print(*msg, flush=True)


def set_precision(precision: str) -> None:
    """TF32 matmuls and convolutions only for precision=tf32 (fp32 means strict fp32)."""
    tf32 = precision == "tf32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Decoder:
    """Final full-resolution model output (B, C, H, W) -> uint8 images (B, H, W, 3) on the CPU."""

    def __init__(self, vae_name: str, channels: int, device: torch.device):
        """channels: the model's output channels, checked against the VAE latent (or RGB)."""
        from data import vae as vae_lib

        self.lib = vae_lib
        self.vae = None
        if vae_name == "none":
            if channels != 3:
                raise GenerationError(f"config key 'vae': none (pixel space) needs a 3-channel model, "
                                      f"but this one makes {channels}-channel latents; name the VAE")
            return
        try:
            self.vae = vae_lib.load_vae(vae_name, device=device)
        except (RuntimeError, FileNotFoundError, OSError) as error:
            raise GenerationError(f"config key 'vae': {error}") from None
        latent = getattr(self.vae.config, "latent_channels", channels)
        if latent != channels:
            raise GenerationError(f"config key 'vae': {vae_name} has {latent}-channel latents but the model "
                                  f"makes {channels} channels (vae: none for a pixel-space model)")

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return self.lib.samples_to_uint8(self.vae, x)


def find_missing(run_dir: Path, num_samples: int, size: int, ctx: DistContext) -> list[int]:
    """Indices without a complete PNG; the check is split over the ranks and the result shared."""
    mine = missing_pngs(run_dir, range(ctx.rank, num_samples, ctx.world_size), size)
    return sorted(i for part in ctx.all_gather_object(mine) for i in part)


def generate_batch(model, cfg: DictConfig, indices: list[int], labels: torch.Tensor, decoder: Decoder,
                   device: torch.device) -> np.ndarray:
    """uint8 images (B, H, W, 3) of the given sample indices."""
    import samplers

    noise = [n.to(device) for n in initial_noise(cfg.seed, indices, model.stage_shapes)]
    y = labels[indices].to(device)
    generator = sde_generators(cfg.seed, indices)  # per-step noise of a stochastic method
    with torch.no_grad(), _autocast(cfg.precision, device):
        final = samplers.sample(
            model, noise, y, num_steps_per_scale=list(cfg.num_steps_per_scale),
            thresholds=list(cfg.thresholds), method=cfg.method, cfg_scale=cfg.cfg_scale,
            guidance_low=cfg.guidance_low, guidance_high=cfg.guidance_high,
            generator=generator, **budget_kwargs(cfg))
    with torch.no_grad():
        x = model.decomposition.recompose([f.float() for f in final])
        return decoder(x)


def model_transport(model) -> dict:
    """``{"path_type", "prediction"}`` specs of a loaded model (its arch; defaults when it stores none)."""
    from dfm import PATHS, PREDICTIONS

    return {"path_type": PATHS.compact(model.arch.get("path_type")),
            "prediction": PREDICTIONS.compact(model.arch.get("prediction"))}


def budget_kwargs(cfg: DictConfig) -> dict:
    """The ELIT keys of `cfg` as `samplers.sample` arguments."""
    return dict(inference_budget=cfg.inference_budget,
                unconditional_inference_budget=cfg.unconditional_inference_budget,
                autoguidance=bool(cfg.autoguidance))


def budget_text(model, cfg: DictConfig) -> str:
    """' budget 0.3 (the level used: 0.25 = 4 of 16 latents per window) ...' for the run's first line:
    the level a budget between the trained ones is rounded down to, said as it is used."""
    def level(budget) -> str:
        k, g2 = model.kept_latents(budget), model.group_size ** 2
        used = f"{k / g2:g} = {k} of {g2} latents per window"
        return f"{budget:g}" + ("" if budget > 1 or abs(budget - k / g2) < 1e-9 else f" (the level used: {used})")

    text = "" if cfg.inference_budget is None else f" budget {level(cfg.inference_budget)}"
    if cfg.unconditional_inference_budget is not None:
        text += (f" ({'autoguidance' if cfg.autoguidance else 'unconditional pass'} at budget "
                 f"{level(cfg.unconditional_inference_budget)})")
    return text


def check_model_budgets(model, cfg: DictConfig) -> None:
    """Budget keys against the loaded model (before any image is written); GenerationError naming the key."""
    import samplers

    try:
        samplers.check_budgets(model, **budget_kwargs(cfg))
    except ValueError as error:
        raise GenerationError(str(error)) from None  # the message names the key
    if cfg.unconditional_inference_budget is not None and cfg.cfg_scale == 1.0:
        from utils.config import warn

        warn(f"unconditional_inference_budget={cfg.unconditional_inference_budget:g} has no effect with cfg_scale=1: "
             "the guiding pass runs only with guidance (cfg_scale > 1)")


def keep_legacy_run_name(cfg: DictConfig, given_name, ctx: DistContext) -> DictConfig:
    """A default run name whose folder does not exist yet, while the folder of the name an earlier
    version gave the same settings does (`default_run_name(legacy=True)`): go on in that folder, so a
    rerun after an upgrade resumes instead of starting over (one line says so)."""
    from .config import default_run_name

    if given_name is not None or (Path(cfg.sample_dir) / cfg.run_name).exists():
        return cfg
    legacy = default_run_name(cfg, legacy=True)
    if legacy == cfg.run_name or not (Path(cfg.sample_dir) / legacy / "config.yaml").is_file():
        return cfg
    _log(ctx, f"note: continuing the run folder {Path(cfg.sample_dir) / legacy} (named by an earlier version; "
              f"a new run of these settings is named {cfg.run_name})")
    cfg.run_name = legacy
    return cfg


def writing(path):
    """An OSError while writing `path` (read-only folder, disk full, quota) ends in one GenerationError."""
    return reported_write_errors(path, GenerationError, "; the complete PNGs written so far are kept and a rerun of "
                                 "the same command resumes from them (free space or fix the permissions first), or "
                                 "choose another sample_dir")


def check_sample_dir(sample_dir: str) -> None:
    """`sample_dir` (or the nearest existing folder above it) must be a folder, not a file."""
    for path in (Path(sample_dir), *Path(sample_dir).parents):
        if path.exists():
            if not path.is_dir():
                raise GenerationError(f"sample_dir {sample_dir}: {path} is a file, not a folder; choose another "
                                      "sample_dir (the samples go to <sample_dir>/<run_name>/)")
            return


def check_sample_files(*paths) -> None:
    """The names a run reads in its sample folder hold regular files (or nothing): a link, FIFO or
    folder planted there is one GenerationError naming it (utils/regular_files.py)."""
    try:
        check_regular(paths)
    except NotRegularFile as error:
        raise GenerationError(str(error)) from None


def read_saved_config(path: Path) -> Optional[dict]:
    """The config a run folder's earlier run saved (`<run>/config.yaml`), as plain data never
    interpolated, or None when there is none; one GenerationError for a file that is not such a config."""
    from utils.config import MAX_CONFIG_BYTES
    from utils.records import RecordError, read_record

    try:
        saved = read_record(path, "saved config", fmt="yaml", max_bytes=MAX_CONFIG_BYTES, missing_ok=True)
    except RecordError as error:
        raise GenerationError(f"{error}; its samples cannot be matched to their settings: choose another run_name "
                              f"or sample_dir, or delete {path.parent}") from None
    if saved is not None and not isinstance(saved, dict):
        raise GenerationError(f"saved config {path}: holds a {type(saved).__name__}, not the mapping generate.py "
                              f"writes; choose another run_name or sample_dir, or delete {path.parent}")
    return saved


def run(cfg: DictConfig) -> dict:
    """Generate the samples described by `cfg` (a GenerateConfig DictConfig); returns a summary:
    run_dir, npz (or None), generated (new images, all ranks), seconds, images_per_second."""
    validate_config(cfg)
    check_sample_dir(cfg.sample_dir)
    with using_cpu_threads(cfg.cpu_threads):
        ctx = setup_distributed()
        try:
            return _run(cfg, ctx)
        finally:
            ctx.close()


def _run(cfg: DictConfig, ctx: DistContext) -> dict:
    from samplers.methods import describe
    from utils.config import save_config

    set_precision(cfg.precision)
    given_name = cfg.run_name
    model, train_config = load_sampling_model(cfg.ckpt, cfg.model, cfg.use_ema, ctx.device,
                                               trust_checkpoint=cfg.trust_checkpoint,
                                               foreign_options={"path_type": cfg.path_type, "prediction": cfg.prediction})
    cfg = resolve_config(cfg, arch_name=model.arch.get("name", cfg.model), num_stages=model.num_stages,
                         num_classes=model.num_classes, input_size=model.input_size,
                         ckpt_config=train_config, stage_scales=model.stage_scales, **model_transport(model))
    check_model_budgets(model, cfg)
    cfg = keep_legacy_run_name(cfg, given_name, ctx)
    N, size = cfg.num_samples, cfg.resolution
    run_dir = Path(cfg.sample_dir) / cfg.run_name
    npz_path = Path(cfg.sample_dir) / f"{cfg.run_name}.npz"
    record = RunRecord(cfg, model, ctx.world_size)  # {run_name}.provenance.json beside the .npz, rank 0 writes it
    summary = {"run_dir": str(run_dir), "npz": str(npz_path) if cfg.save_npz else None,
               "generated": 0, "seconds": 0.0, "images_per_second": 0.0}

    saved_config = run_dir / "config.yaml"
    check_sample_files(saved_config, npz_path, record.path)  # before any of them is read
    saved = read_saved_config(saved_config)
    if saved is not None:
        diff = mismatched_keys(saved, cfg)
        if diff:
            raise GenerationError(
                f"{run_dir} holds samples made with other settings ({'; '.join(diff)}); "
                "choose another run_name or sample_dir, or delete that folder")
        finished = saved.get("num_samples")
        if (isinstance(finished, int) and finished != N and cfg.save_npz
                and npz_is_complete(npz_path, (finished, size, size, 3))):
            raise GenerationError(
                f"{run_dir} is a finished run of {finished} samples ({npz_path} is complete); num_samples={N} "
                f"would replace it: choose another run_name, or delete {npz_path} first")
    if cfg.save_npz and npz_is_complete(npz_path, (N, size, size, 3)) and saved is not None:
        _log(ctx, f"{npz_path} is already complete; nothing to do")
        if ctx.is_main and not record.is_complete():  # finished before records existed, or killed just before it
            with writing(record.path):
                record.write(complete=True)
        return summary
    decoder = Decoder(cfg.vae, model.in_channels, ctx.device)  # before writing anything
    # The record describes the .npz: a finished run's record is rewritten only by a run that writes the .npz
    # again (with save_npz=false it would say `npz: null` of a genuine .npz, which evaluate then refuses).
    keep_record = ctx.is_main and not cfg.save_npz and record.is_complete()
    ctx.barrier()  # every rank has read config.yaml before rank 0 rewrites it
    if ctx.is_main:
        with writing(saved_config):
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(run_dir)
            for name in (npz_path.name, record.path.name):  # from a killed .npz or record write
                for tmp in npz_path.parent.glob(f".tmp-*-{name}"):
                    tmp.unlink(missing_ok=True)
            save_config(cfg, saved_config)
        if keep_record:
            print(f"{record.path} is kept as it is: it describes {npz_path.name}, which this run (save_npz=false) "
                  "does not rewrite", flush=True)
        else:
            with writing(record.path):
                record.write(complete=False)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {cfg.model} ({n_params:,} parameters, {cfg.stages} stage(s)), "
              f"{'EMA' if cfg.use_ema else 'raw'} weights from {cfg.ckpt}", flush=True)
        budget = budget_text(model, cfg)
        print(f"sampler {describe(cfg.method)} steps {list(cfg.num_steps_per_scale)} thresholds "
              f"{list(cfg.thresholds)} cfg {cfg.cfg_scale} [{cfg.guidance_low}, {cfg.guidance_high}]{budget}; "
              f"{N} images {size}px -> {run_dir}", flush=True)
    ctx.barrier()

    model.eval()
    if cfg.compile:
        from models.compile import compile_model

        compile_model(model)
    labels = class_labels(N, cfg.num_classes, cfg.seed, cfg.labels)

    missing = find_missing(run_dir, N, size, ctx)
    # Deal the missing indices round-robin so ranks finish together even after a partial run.
    mine = missing[ctx.rank::ctx.world_size]
    _log(ctx, f"{N - len(missing)} of {N} images already present; generating {len(missing)} "
              f"on {ctx.world_size} process(es)")

    ctx.barrier()
    start = time.perf_counter()
    batch = cfg.per_proc_batch_size
    from utils.progress import progress_bar
    with progress_bar(total=len(mine), unit="img", disable=not ctx.is_main, dynamic_ncols=True,
              file=sys.stdout, desc="sampling (rank 0)") as bar:
        for b in range(math.ceil(len(mine) / batch)):
            indices = mine[b * batch:(b + 1) * batch]
            images = generate_batch(model, cfg, indices, labels, decoder, ctx.device)
            for index, image in zip(indices, images):
                with writing(png_path(run_dir, index)):
                    write_png_atomic(png_path(run_dir, index), image)
            bar.update(len(indices))
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    ctx.barrier()
    seconds = time.perf_counter() - start
    generated = ctx.sum_int(len(mine))
    summary.update(generated=generated, seconds=seconds,
                   images_per_second=generated / seconds if generated and seconds > 0 else 0.0)
    if generated:
        _log(ctx, f"generated {generated} images in {seconds:.1f}s: "
                  f"{summary['images_per_second']:.2f} images/s ({ctx.world_size} process(es))")

    if ctx.is_main:
        if cfg.save_npz:
            with writing(npz_path):
                write_npz_from_pngs(npz_path, run_dir, N, size, labels=labels.numpy())
            print(f"wrote {npz_path} (arr_0 uint8 {[N, size, size, 3]}, arr_1 labels)", flush=True)
        if not cfg.save_png:
            for i in range(N):
                png_path(run_dir, i).unlink(missing_ok=True)
        if not keep_record:
            with writing(record.path):
                record.write(complete=True)
    return summary
