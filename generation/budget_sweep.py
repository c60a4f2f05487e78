r"""Budget sweep of an ELIT checkpoint: the same seeds at every budget, FLOPs per forward, pictures.

    python -m generation.budget_sweep --ckpt CKPT --class-label 207 [seed=0] [num_seeds=4]
        [num_steps_per_scale=[40,10]] [method=heun] [cfg_scale=1] [budgets=[0.25,0.5,1] | --all-levels]
        [vae=...] [model=NAME] [use_ema=false] [precision=tf32] [compile=true] [cpu_threads=N]
        [sample_dir=results/budget_sweep] [run_name=NAME]

generate.py's option language and names (`key=value` or `--key value`, dashes as underscores,
`--config FILE.yaml`; `python -m generation.budget_sweep --help` lists them); the sweep's earlier
`--steps 40,10`, `--no-ema` and `--out DIR` still work. Budgets: the levels the model was trained
with (``models.budget_levels``), ``all_levels`` for every ``k / g^2`` (k = 1 .. g^2), or an
explicit ``budgets`` list. Row i of the grid is sample i of ``generate.py`` at the same seed
(noise from (seed, i)), one column per budget, the lowest budget on the left. Writes into
``<sample_dir>/<run_name>`` (default ``results/budget_sweep/<experiment>-<step>/``):
``grid.png`` (upscaled to at least 256 px per column, each column labelled with its budget, latents
and GFLOPs), ``flops.png`` (GFLOPs per forward of one image vs budget, counted with
``torch.utils.flop_counter``) and ``budget_sweep.json``: all three or, when the folder cannot be
written (read-only, disk full), none, with one line naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
import typing
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from utils.atomic import atomic_write, reported_write_errors
from utils.config import Alias
from utils.threads import cpu_threads_problem, using_cpu_threads
from .config import GenerateConfig, GenerationError, checkpoint_tag, resolve_config, validate_config

MIN_COLUMN_PX = 256  # grid.png: tiny samples are upscaled (nearest) to at least this width per column


# generate.py's keys the sweep takes, with generate.py's names, meanings and defaults
_SHARED = ("ckpt", "model", "seed", "method", "num_steps_per_scale", "thresholds", "cfg_scale", "vae", "use_ema",
           "precision", "compile", "cpu_threads", "trust_checkpoint")


def _shared_fields():
    fields = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    types = typing.get_type_hints(GenerateConfig)
    return [(name, types[name], dataclasses.field(default=fields[name].default, metadata=fields[name].metadata))
            for name in _SHARED]


def _field(text: str, default=None):
    from utils.config import option_help

    return dataclasses.field(default=default, metadata=option_help(text))


BudgetSweepConfig = dataclasses.make_dataclass("BudgetSweepConfig", _shared_fields() + [
    ("class_label", Optional[int], _field("class of every sample (required)")),
    ("num_seeds", int, _field("samples, the grid's rows; row i uses generate.py's noise of (seed, i)", 4)),
    ("budgets", Optional[List[float]], _field("explicit budgets (fractions in (0, 1] or latent counts), e.g. "
                                              "[0.25,0.5,1]; null = the model's training levels")),
    ("all_levels", bool, _field("every k / g^2, k = 1 .. g^2, instead of the training levels", False)),
    ("sample_dir", str, _field("parent folder of the sweep's folder (as generate.py's)", "results/budget_sweep")),
    ("run_name", Optional[str], _field("the sweep's folder (null: <experiment>-<step> of the checkpoint)")),
    ("device", Optional[str], _field("cuda, cuda:N or cpu (null: cuda if available)")),
])


def _out_folder(value, cfg) -> dict:
    folder = os.path.normpath(str(value))
    return {"sample_dir": os.path.dirname(folder) or ".", "run_name": os.path.basename(folder)}


# the sweep's own earlier option names (kept working), and the reference's sampler names
SWEEP_ALIASES = {
    "steps": Alias("num_steps_per_scale"),
    "no_ema": Alias(convert=lambda value, cfg: {"use_ema": not value}, note="use_ema=false"),
    "out": Alias(convert=_out_folder, note="sample_dir/run_name"),
}


def load_sweep_config(argv: Sequence[str]):
    """The sweep's config: defaults <- --config FILE.yaml <- key=value / --key value (generate.py's
    option language; `--steps`, `--no-ema` and `--out DIR` are accepted as before)."""
    from utils.config import load_config

    return load_config(BudgetSweepConfig, argv, aliases=SWEEP_ALIASES)


def sweep_budgets(model, budgets: Optional[List[float]], all_levels: bool) -> List[float]:
    """The budgets to sample: explicit, all ``k / g^2``, or the model's training levels."""
    from models import budget_levels

    if budgets:
        for b in budgets:
            model.kept_latents(b)  # ValueError naming inference_budget for a bad one
        return list(budgets)
    if all_levels:
        g2 = model.group_size ** 2
        return [k / g2 for k in range(1, g2 + 1)]
    return budget_levels(model)


MAX_SEEDS = 1024


def budget_sweep(ckpt: str, class_label: int, out: Optional[str] = None, *, seed: int = 0, num_seeds: int = 4,
                 steps: Optional[List[int]] = None, thresholds: Optional[List[float]] = None,
                 method: str = "euler", cfg_scale: float = 1.0, budgets: Optional[List[float]] = None,
                 all_levels: bool = False, vae: Optional[str] = None, model_name: Optional[str] = None,
                 use_ema: bool = True, precision: str = "tf32", device: Optional[str] = None,
                 compile: bool = False, sample_dir: str = "results/budget_sweep", trust_checkpoint: bool = False) -> dict:
    """Run the sweep; returns the JSON record (also written to ``<out>/budget_sweep.json``; ``out``
    null: ``<sample_dir>/<experiment>-<step>``). ``compile``: torch.compile the model's blocks
    (models/compile.py) for every budget."""
    import samplers
    from bench.flops import counted_forward_flops
    from omegaconf import OmegaConf
    from .model_loading import load_sampling_model
    from .noise import initial_noise, sde_generators
    from .runner import Decoder, _autocast, model_transport, set_precision

    if not 1 <= num_seeds <= MAX_SEEDS:  # one grid row per seed; 10**20 was an OverflowError traceback
        raise GenerationError(f"config key 'num_seeds': must be from 1 to {MAX_SEEDS} (one grid row each), got {num_seeds}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = OmegaConf.structured(GenerateConfig(
        ckpt=ckpt, model=model_name, seed=seed, method=method, num_steps_per_scale=steps, thresholds=thresholds,
        cfg_scale=cfg_scale, vae=vae, precision=precision, use_ema=use_ema))
    validate_config(cfg)
    set_precision(cfg.precision)
    model, train_config = load_sampling_model(ckpt, model_name, use_ema, dev, trust_checkpoint=trust_checkpoint)
    if not hasattr(model, "kept_latents"):
        raise GenerationError(f"{ckpt} holds a {model.arch.get('name')} model, which has no compute budget; "
                              "the budget sweep needs an ELIT-SiT or DFM-ELIT-SiT checkpoint")
    if not 0 <= class_label < model.num_classes:
        raise GenerationError(f"config key 'class_label': must be in [0, {model.num_classes}), got {class_label}")
    cfg = resolve_config(cfg, arch_name=model.arch.get("name", model_name), num_stages=model.num_stages,
                         num_classes=model.num_classes, input_size=model.input_size, ckpt_config=train_config,
                         stage_scales=model.stage_scales, **model_transport(model))
    try:
        levels = sweep_budgets(model, budgets, all_levels)
    except ValueError as error:
        raise GenerationError(f"config key 'budgets': {error}") from None
    if compile:
        from models.compile import compile_model

        compile_model(model)
    out = out or os.path.join(sample_dir, checkpoint_tag(ckpt))  # exps/RUN/checkpoints/STEP.pt -> RUN-STEP
    decoder = Decoder(cfg.vae, model.in_channels, dev)
    indices = list(range(num_seeds))
    noise = [n.to(dev) for n in initial_noise(seed, indices, model.stage_shapes)]
    y = torch.full((num_seeds,), class_label, dtype=torch.long, device=dev)
    tokens = model.grid * model.grid
    rows, columns = [], []
    print(f"{len(levels)} budget(s) of {model.arch.get('name')}, {num_seeds} image(s) each, on {dev.type}", flush=True)
    for budget in levels:
        generator = sde_generators(seed, indices)
        start = time.perf_counter()
        with torch.no_grad(), _autocast(cfg.precision, dev):
            final = samplers.sample(model, noise, y, num_steps_per_scale=list(cfg.num_steps_per_scale),
                                    thresholds=list(cfg.thresholds), method=cfg.method, cfg_scale=cfg.cfg_scale,
                                    generator=generator, inference_budget=budget)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        columns.append(decoder(model.decomposition.recompose([f.float() for f in final])))
        k = model.kept_latents(budget)
        rows.append({"budget": float(budget), "latents_per_window": k, "latents": k * tokens // model.group_size ** 2,
                     "gflops_per_forward": counted_forward_flops(model, budget) / 1e9,
                     "sampling_seconds": seconds})
        print(f"  budget {budget:g} ({k} of {model.group_size ** 2} latents per window): "
              f"{rows[-1]['gflops_per_forward']:.3g} GFLOPs per forward, sampled in {seconds:.1f} s", flush=True)
    images = np.stack([columns[c][i] for i in indices for c in range(len(levels))])
    grid_path, plot_path = os.path.join(out, "grid.png"), os.path.join(out, "flops.png")
    grid_png = png_bytes(labelled_grid(images, [_column_label(r) for r in rows]))
    plot_png = plot_flops(rows, title=f"{model.arch.get('name')} ({tokens} tokens, group size {model.group_size})")
    record = {"ckpt": ckpt, "model": model.arch.get("name"), "class_label": class_label, "seed": seed,
              "num_seeds": num_seeds, "method": OmegaConf.to_container(cfg)["method"],
              "num_steps_per_scale": list(cfg.num_steps_per_scale),
              "thresholds": list(cfg.thresholds), "cfg_scale": cfg.cfg_scale, "vae": cfg.vae,
              "group_size": model.group_size, "tokens": tokens, "device": str(dev), "precision": cfg.precision,
              "budgets": rows, "grid": grid_path, "flops_plot": plot_path}
    write_outputs({grid_path: grid_png, plot_path: plot_png,
                   os.path.join(out, "budget_sweep.json"): json.dumps(record, indent=2).encode()})
    return record


def write_outputs(files: Dict[str, bytes]) -> None:
    """Write all of ``files`` (path -> bytes, in one folder) or none: each goes to a temporary file
    first, where a full disk or a read-only folder fails, and only when all are written are they
    renamed into place. A failure is one GenerationError naming the file; the folder is left as it
    was (earlier outputs kept, no temporary files, a folder this call created removed)."""
    folder = os.path.dirname(os.path.abspath(next(iter(files))))
    created = not os.path.isdir(folder)
    advice = "; nothing was written (free space or fix the permissions, or choose another --out)"
    try:
        with reported_write_errors(folder, GenerationError, advice), contextlib.ExitStack() as stack:
            for path, data in files.items():
                with reported_write_errors(path, GenerationError, advice):
                    f = stack.enter_context(atomic_write(path, "wb"))
                    f.write(data)
                    f.flush()  # a full disk fails here, before any file is renamed into place
    except GenerationError:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _column_label(row: dict) -> str:
    return f"budget {row['budget']:.4g}\n{row['latents']} latents\n{row['gflops_per_forward']:.4g} GFLOPs"


def labelled_grid(images: np.ndarray, labels: List[str], min_column_px: int = MIN_COLUMN_PX) -> np.ndarray:
    """(N, H, W, 3) uint8, one column per label (row-major) -> the grid, each image upscaled by
    the integer factor `k = ceil(min_column_px / W)` (nearest), under a white band holding each
    column's label (PIL's default font). Returns (band + rows*(k*H + pad) + pad, cols*(k*W + pad) + pad, 3)."""
    from training.previews import label_band, make_grid, upscaled

    k = max(1, math.ceil(min_column_px / images.shape[2]))
    big = upscaled(images, k)
    pad = 2 * k
    grid = make_grid(big, nrow=len(labels), pad=pad, pad_value=255)
    width = big.shape[2] + pad
    band = label_band(grid.shape[1], [(pad + c * width + width // 2 - pad // 2, text) for c, text in enumerate(labels)])
    return np.concatenate([band, grid], axis=0)


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> the bytes of a PNG file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def plot_flops(rows: List[dict], title: str = "") -> bytes:
    """The PNG (bytes) of GFLOPs per forward (one image) against the budget, one marker per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([r["budget"] for r in rows], [r["gflops_per_forward"] for r in rows], marker="o")
    ax.set_xlabel("inference budget (fraction of latents per window)")
    ax.set_ylabel("GFLOPs per forward (1 image)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        from utils.cli import print_text
        from utils.config import config_help

        return print_text(f"{__doc__}\noptions (defaults <- --config FILE.yaml <- key=value / --key value):\n"
                          + config_help(BudgetSweepConfig, SWEEP_ALIASES))
    try:
        try:
            cfg = load_sweep_config(argv)
        except (ValueError, FileNotFoundError) as error:
            raise GenerationError(str(error)) from None
        if cfg.class_label is None:
            raise GenerationError("config key 'class_label': required, e.g. --class-label 207 (an ImageNet class)")
        if problem := cpu_threads_problem(cfg.cpu_threads):
            raise GenerationError(f"config key 'cpu_threads': {problem}")
        out = os.path.join(cfg.sample_dir, cfg.run_name) if cfg.run_name else None
        with using_cpu_threads(cfg.cpu_threads):
            record = budget_sweep(cfg.ckpt, cfg.class_label, out, seed=cfg.seed, num_seeds=cfg.num_seeds,
                                  steps=cfg.num_steps_per_scale, thresholds=cfg.thresholds, method=cfg.method,
                                  cfg_scale=cfg.cfg_scale, budgets=cfg.budgets, all_levels=cfg.all_levels,
                                  vae=cfg.vae, model_name=cfg.model, use_ema=cfg.use_ema, precision=cfg.precision,
                                  device=cfg.device, compile=cfg.compile, sample_dir=cfg.sample_dir,
                                  trust_checkpoint=cfg.trust_checkpoint)
    except GenerationError as error:
        print(f"budget_sweep: error: {error}", file=sys.stderr, flush=True)
        return 2
    for row in record["budgets"]:
        print(f"budget {row['budget']:.4g}: {row['latents']} latents, {row['gflops_per_forward']:.3f} GFLOPs/forward, "
              f"{row['sampling_seconds']:.2f}s")
    print(f"wrote {record['grid']}, {record['flops_plot']}, {os.path.dirname(record['grid'])}/budget_sweep.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
