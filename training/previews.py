"""Preview grids during training: fixed noise and labels -> EMA model -> sampler -> PNG.

The noise and labels are drawn once (from `preview.seed`), so grids of different steps are
directly comparable. Row `r` of the grid shows class `labels[r]` unless explicit per-sample
`preview.labels` are given. ELIT models are sampled at every budget of `preview.budgets` (in
that order, ascending by default) from the same noise: one grid per budget, side by side, each
under a bar whose green part is the budget's fraction of the latents. Sampling runs inside
`torch.random.fork_rng`, so previews never change the training random streams (exact resume
does not depend on them).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from samplers.methods import SAMPLER_METHODS
from training.errors import ConfigError
from utils.atomic import atomic_write
from utils.config import option_help as _help

# ImageNet classes shown in previews when num_classes == 1000 (REPA / DiT favourites):
# golden retriever, otter, red panda, geyser, macaw, valley, balloon, arctic fox.
IMAGENET_PREVIEW_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


@dataclass
class SamplerSettings:
    """Solver and guidance keys shared by the preview and evaluation samplers (as in generate.py)."""
    method: Any = field(default="euler", metadata=_help(
        "sampler method: a name or {name: ..., parameter: value} (samplers/methods.py)", registry=SAMPLER_METHODS))
    cfg_scale: float = field(default=1.0, metadata=_help("classifier-free guidance scale (1 = off)"))
    guidance_low: float = field(default=0.0, metadata=_help("CFG only where t >= guidance_low"))
    guidance_high: float = field(default=1.0, metadata=_help("CFG only where t <= guidance_high"))


@dataclass
class PreviewConfig(SamplerSettings):
    num_samples: int = field(default=16, metadata=_help("images in each preview grid (0 = no previews)"))
    num_steps_per_scale: Optional[List[int]] = field(default=None, metadata=_help(
        "sampler steps per stage; null = [50] for S=1, [40,10] for S=2, [40]+[10]*(S-1) for S>=3"))
    thresholds: Optional[List[float]] = field(default=None, metadata=_help(
        "stage hand-over times tau_0 > ... (length S-1); null = [0.1] for S=2, 0.1/2^i for S>=3"))
    labels: Optional[List[int]] = field(default=None, metadata=_help(
        "class labels of the preview samples (cycled); null = one class per grid row (8 fixed ImageNet "
        "classes for 1000 classes, else 0, 1, 2, ...)"))
    nrow: Optional[int] = field(default=None, metadata=_help("images per grid row; null = about sqrt(num_samples)"))
    show_stages: bool = field(default=False, metadata=_help(
        "also save the coarse-stage previews (end of each sampler chunk) beside the final images"))
    seed: int = field(default=0, metadata=_help("seed of the fixed preview noise"))
    upscale: int = field(default=1, metadata=_help("enlarge the saved grids by this factor (nearest), for tiny images"))
    budgets: Optional[List[float]] = field(default=None, metadata=_help(
        "ELIT: inference budgets of the preview, one grid each, side by side (lowest left); null = the "
        "training budget (single-budget) or the smallest, middle and largest level (multi-budget)"))


def check_sampler_keys(node, steps, thresholds, S: int, prefix: str, method=None) -> None:
    """Fill a sampler group's null `num_steps_per_scale` / `thresholds` (and `method`) with the given
    defaults; check them (ConfigError naming `prefix` + key). `method` is stored in its compact form."""
    from samplers.methods import check_sampler_settings

    if node.num_steps_per_scale is None:
        node.num_steps_per_scale = list(steps)
        if node.thresholds is None:
            node.thresholds = list(thresholds)
    if node.thresholds is None:
        node.thresholds = list(thresholds)
    node.num_steps_per_scale = [int(n) for n in node.num_steps_per_scale]
    node.thresholds = [float(x) for x in node.thresholds]
    if node.method is None:
        node.method = method
    try:
        node.method = check_sampler_settings(node.method, node.num_steps_per_scale, node.thresholds, S)
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None


def check_preview_keys(cfg, steps, thresholds) -> None:
    """The `preview` group of a training config (ELIT budgets: training.budget)."""
    p = cfg.preview
    if p.num_samples < 0:
        raise ConfigError(f"preview.num_samples must be >= 0, got {p.num_samples}")
    check_sampler_keys(p, steps, thresholds, cfg.stages, "preview.")
    if p.labels is not None:
        bad = [label for label in p.labels if not 0 <= label <= cfg.num_classes]
        if bad or not len(p.labels):
            raise ConfigError(f"preview.labels must be non-empty class indices in [0, {cfg.num_classes}] "
                              f"({cfg.num_classes} = unconditional), got {list(p.labels)}")
    if p.upscale < 1:
        raise ConfigError(f"preview.upscale must be >= 1, got {p.upscale}")
    if p.nrow is not None and p.nrow < 1:
        raise ConfigError(f"preview.nrow must be >= 1, got {p.nrow}")


def grid_nrow(num_samples: int, nrow: Optional[int]) -> int:
    return nrow or max(1, math.ceil(math.sqrt(num_samples)))


def preview_labels(num_samples: int, num_classes: int, nrow: int, labels: Optional[List[int]] = None) -> list:
    """Explicit `labels` are cycled over the samples; otherwise row r shows one class."""
    if labels:
        return [int(labels[i % len(labels)]) for i in range(num_samples)]
    classes = IMAGENET_PREVIEW_CLASSES if num_classes == 1000 else list(range(num_classes))
    return [int(classes[(i // nrow) % len(classes)]) for i in range(num_samples)]


def make_grid(images: np.ndarray, nrow: int, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) uint8 grid
    (`torchvision.utils.make_grid` on the NHWC arrays the previews and the budget sweep hold)."""
    from torchvision.utils import make_grid as torchvision_grid

    grid = torchvision_grid(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), nrow=nrow,
                            padding=pad, pad_value=pad_value)
    return grid.permute(1, 2, 0).numpy()


GRID_GAP = 8  # white columns between the grids of one preview (side_by_side, and the captions above them)


def upscaled(image: np.ndarray, k: int) -> np.ndarray:
    """(..., H, W, C) -> (..., k*H, k*W, C), every pixel repeated k x k (nearest neighbour)."""
    return image.repeat(k, axis=-3).repeat(k, axis=-2) if k > 1 else image


def save_png(image: np.ndarray, path: str, upscale: int = 1) -> None:
    img = Image.fromarray(upscaled(image, upscale))
    with atomic_write(path, "wb") as f:
        img.save(f, format="PNG")


def side_by_side(grids: List[np.ndarray], gap: int = GRID_GAP) -> np.ndarray:
    """Equal-height (H, W_i, 3) uint8 grids -> one image, separated by white columns `gap` wide."""
    parts = []
    for g in grids:
        parts += [g, np.full((g.shape[0], gap, 3), 255, dtype=np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def label_band(width: int, labels: List[tuple], font_size: int = 16) -> np.ndarray:
    """A white (H, width, 3) uint8 band holding each `(x_center, text)` label (multi-line text,
    centred; PIL's default font at `font_size` px) -- the captions above image columns."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    line = font.getbbox("Ag")[3] + 4
    lines = max((text.count("\n") + 1 for _, text in labels), default=1)
    band = Image.new("RGB", (width, line * lines + 8), "white")
    draw = ImageDraw.Draw(band)
    for x, text in labels:
        draw.multiline_text((x, 4), text, fill="black", font=font, anchor="ma", align="center", spacing=4)
    return np.asarray(band)


def with_budget_bar(grid: np.ndarray, fraction: float, height: int = 3) -> np.ndarray:
    """`grid` under a bar `height` px tall whose left `fraction` of the width is filled (green on grey)."""
    bar = np.full((height, grid.shape[1], 3), 64, dtype=np.uint8)
    bar[:, :max(1, round(fraction * grid.shape[1]))] = (80, 200, 120)
    return np.concatenate([bar, grid], axis=0)


def autocast_dtype(mixed_precision: str):
    """The sampling dtype of a run's `mixed_precision` (None: full precision)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def cuda_autocast(device: torch.device, dtype):
    """Autocast for sampling on a GPU in `dtype`; a no-op on the CPU or without a dtype."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


class PreviewMaker:
    """Samples a fixed preview batch from a model and writes PNG grids to `out_dir`."""

    def __init__(self, preview_cfg, *, num_classes: int, stage_shapes: List[tuple],
                 out_dir: str, device, vae=None, autocast_dtype=None, batch_size: int = 64,
                 budget_fractions: Optional[List[float]] = None, budget_flops: Optional[List[float]] = None):
        """budget_fractions: ELIT models only, the fraction of latents each of `preview.budgets`
        keeps (drawn as the bar above its grid); budget_flops: the FLOPs of one forward pass on
        one image at each budget (written above each grid of the saved PNG)."""
        self.cfg = preview_cfg
        self.budgets = list(preview_cfg.get("budgets") or []) or [None]  # None: a model without budgets
        self.budget_fractions = list(budget_fractions or [])
        self.budget_flops = list(budget_flops or [])
        self.out_dir = out_dir
        self.device = torch.device(device)
        self.vae = vae
        self.autocast_dtype = autocast_dtype
        self.batch_size = batch_size
        n = int(preview_cfg.num_samples)
        self.nrow = grid_nrow(n, preview_cfg.nrow)
        self.labels = torch.tensor(
            preview_labels(n, num_classes, self.nrow, list(preview_cfg.labels) if preview_cfg.labels else None),
            dtype=torch.long)
        g = torch.Generator().manual_seed(int(preview_cfg.seed))
        self.noise = [torch.randn(n, *shape, generator=g) for shape in stage_shapes]
        self.sde_seed = int(preview_cfg.seed) + 1

    def _decode(self, x: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) latents or pixels -> (B, H, W, 3) uint8."""
        from data.vae import samples_to_uint8

        return samples_to_uint8(self.vae, x)

    def _autocast(self):
        return cuda_autocast(self.device, self.autocast_dtype)

    @torch.no_grad()
    def sample(self, model, inference_budget=None) -> tuple[np.ndarray, list]:
        """Returns (final images (N, H, W, 3) uint8, per coarse stage images or [])."""
        import samplers

        was_training = model.training
        model.eval()
        finals, stages = [], []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for lo in range(0, len(self.labels), self.batch_size):
                hi = min(lo + self.batch_size, len(self.labels))
                noise = [z[lo:hi].to(self.device) for z in self.noise]
                y = self.labels[lo:hi].to(self.device)
                gen = torch.Generator(device=self.device).manual_seed(self.sde_seed + lo)
                with self._autocast():
                    out = samplers.sample(
                        model, noise, y, num_steps_per_scale=list(self.cfg.num_steps_per_scale),
                        thresholds=list(self.cfg.thresholds), method=self.cfg.method,
                        cfg_scale=float(self.cfg.cfg_scale), guidance_low=float(self.cfg.guidance_low),
                        guidance_high=float(self.cfg.guidance_high),
                        generator=gen, return_previews=True, inference_budget=inference_budget)
                final, previews = out
                images = self._decode(previews[-1])  # the full recomposition (scales removed)
                finals.append(images)
                if self.cfg.show_stages:
                    H = images.shape[1]
                    coarse = []
                    for p in previews[:-1]:
                        img = torch.from_numpy(self._decode(p)).permute(0, 3, 1, 2)
                        img = F.interpolate(img.float(), size=(H, H), mode="nearest").to(torch.uint8)
                        coarse.append(img.permute(0, 2, 3, 1).numpy())
                    stages.append(coarse)
        model.train(was_training)
        final = np.concatenate(finals)
        per_stage = [np.concatenate([b[i] for b in stages]) for i in range(len(stages[0]))] if stages and stages[0] else []
        return final, per_stage

    def _captioned(self, grid: np.ndarray, grids: List[np.ndarray], gap: int = GRID_GAP) -> np.ndarray:
        """The grid as saved: upscaled by `preview.upscale` (nearest) and, for ELIT models, under a
        band naming each budget column's budget, latent fraction and FLOPs per forward."""
        k = int(self.cfg.upscale)
        big = upscaled(grid, k)
        if not self.budget_flops:
            return big
        labels, x = [], 0
        for g, budget, fraction, flops in zip(grids, self.budgets, self.budget_fractions, self.budget_flops):
            labels.append(((x + g.shape[1] // 2) * k,
                           f"budget {budget:g} ({fraction:.0%} of latents)\n{flops / 1e6:.4g} MFLOPs / forward"))
            x += g.shape[1] + gap
        return np.concatenate([label_band(big.shape[1], labels), big], axis=0)

    def __call__(self, model, step: int) -> dict:
        """Sample, save `<out_dir>/<step:07d>.png` (and `_stages.png`, at the last budget); returns
        {name: (grid, path)}."""
        grids = []
        for budget in self.budgets:
            final, per_stage = self.sample(model, budget)
            grids.append(make_grid(final, self.nrow))
        if self.budget_fractions:
            grids = [with_budget_bar(g, f) for g, f in zip(grids, self.budget_fractions)]
        grid = side_by_side(grids)
        path = os.path.join(self.out_dir, f"{step:07d}.png")
        save_png(self._captioned(grid, grids), path)
        out = {"samples": (grid, path)}
        if per_stage:
            side = side_by_side([make_grid(imgs, self.nrow) for imgs in per_stage] + [make_grid(final, self.nrow)])
            spath = os.path.join(self.out_dir, f"{step:07d}_stages.png")
            save_png(side, spath, self.cfg.upscale)
            out["samples_stages"] = (side, spath)
        return out
