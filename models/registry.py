"""Model names -> architectures: ``[DFM-][ELIT-]SiT-{S,B,L,XL}/{2,4,8}``.

``SiT``: plain flow transformer; ``DFM-``: per-stage patch embedders, timestep embedders and
heads (SPEC §3); ``ELIT-``: the latent interface between head and tail blocks (SPEC §9).
The prefixes compose: ``DFM-ELIT-SiT-XL/2`` is DFM's interfaces on the ELIT backbone.
"""
from __future__ import annotations

import contextlib
import re

import torch

from models.elit_sit import ELITSiT
from models.sit import SiT

SIZES = {  # depth, hidden, heads, REPA encoder_depth
    "S": dict(depth=12, hidden_size=384, num_heads=6, encoder_depth=4),
    "B": dict(depth=12, hidden_size=768, num_heads=12, encoder_depth=4),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, encoder_depth=8),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16, encoder_depth=8),
}
ELIT_ENCODER_DEPTH = 8  # ELIT's head blocks (the REPA argument's default) for every size
ELIT_TAIL_DEPTH = {"S": 2, "B": 2, "L": 4, "XL": 4}
ELIT_WINDOWS_PER_SIDE = 4  # default group_size = grid / 4: 4 at 256 px, 8 at 512 px for /2 models
PATCH_SIZES = (2, 4, 8)
PREFIXES = ("", "DFM-", "ELIT-", "DFM-ELIT-")
MODEL_NAMES = [f"{prefix}SiT-{size}/{p}" for prefix in PREFIXES for size in SIZES for p in PATCH_SIZES]
DEFAULT_DFM_STAGES = 2
OVERRIDES = {"input_size", "in_channels", "num_classes", "stages", "qk_norm", "class_dropout_prob",
             "z_dims", "encoder_depth", "projector_dim", "depth", "hidden_size", "num_heads",
             "mlp_ratio", "time_flip", "stage_scales"}
ELIT_OVERRIDES = {"group_size", "elit_min_mask_prob", "elit_max_mask_prob", "elit_tail_depth"}
_NAME = re.compile(r"^(DFM-)?(ELIT-)?SiT-(S|B|L|XL)/(2|4|8)$")


def _match(name: str):
    match = _NAME.match(str(name))
    if match is None:
        raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    return match


def parse_name(name: str):
    """``"DFM-SiT-XL/2"`` -> ``(True, "XL", 2)`` (multistage, size, patch); unknown names raise a ValueError."""
    match = _match(name)
    return match.group(1) is not None, match.group(3), int(match.group(4))


def is_elit(name: str) -> bool:
    """True for ``ELIT-SiT-*`` and ``DFM-ELIT-SiT-*`` names (unknown names raise a ValueError)."""
    return _match(name).group(2) is not None


def create_model(name: str, **overrides) -> SiT:
    """Build a freshly initialised model by name.

    Overrides: input_size (full-resolution side; 32 = 256 px latents), in_channels (4),
    num_classes (1000), stages (DFM only, default 2), qk_norm, class_dropout_prob (0.1),
    z_dims (REPA projector output dims), encoder_depth, and depth/hidden_size/num_heads/
    mlp_ratio for small experiments, stage_scales (stage calibration, SPEC §11: one positive
    multiplier per pyramid level, stored in ``arch``; None = the reference). ELIT models also take group_size (default: the token
    grid / 4), elit_min_mask_prob / elit_max_mask_prob (default 0 / 0: one budget, all
    latents), elit_tail_depth (default 4 for L/XL, 2 for S/B); their encoder_depth (head
    blocks) defaults to 8. ``create_model(**model.arch)`` rebuilds a model.
    """
    multistage, size, patch = parse_name(name)
    elit = is_elit(name)
    allowed = OVERRIDES | ELIT_OVERRIDES if elit else OVERRIDES
    unknown = set(overrides) - allowed
    if unknown:
        extra = f" ({', '.join(sorted(ELIT_OVERRIDES))} only for ELIT models)" if unknown & ELIT_OVERRIDES else ""
        raise ValueError(f"unknown model option(s) {sorted(unknown)} for {name}{extra}; allowed: {sorted(allowed)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    stages = overrides.pop("stages", DEFAULT_DFM_STAGES if multistage else 1)
    if not multistage and stages != 1:
        raise ValueError(f"stages={stages} is not allowed for {name}: SiT models have 1 stage; "
                         f"use DFM-{name} for a multi-stage model")
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
    config = dict(SIZES[size])
    if elit:
        config.update(encoder_depth=ELIT_ENCODER_DEPTH, elit_tail_depth=ELIT_TAIL_DEPTH[size],
                      elit_min_mask_prob=0.0, elit_max_mask_prob=0.0)
    config.update(overrides)
    if "z_dims" in config:
        config["z_dims"] = [int(z) for z in config["z_dims"]]
    if "stage_scales" in config:  # stored in arch as plain floats (checkpoint and safetensors header)
        config["stage_scales"] = [float(c) for c in config["stage_scales"]]
    if elit:
        if "group_size" not in config:
            config["group_size"] = _default_group_size(config.get("input_size", 32), patch)
        model = ELITSiT(patch_size=patch, stages=stages, multistage=multistage, **config)
    else:
        model = SiT(patch_size=patch, stages=stages, multistage=multistage, **config)
    model.arch = {"name": name, "stages": stages, **{k: v for k, v in config.items() if k in allowed}}
    if not multistage:
        model.arch.pop("stages")
    return model


def _default_group_size(input_size: int, patch: int) -> int:
    grid = input_size // patch
    if grid % ELIT_WINDOWS_PER_SIDE:
        raise ValueError(f"no default group_size for a {grid}x{grid} token grid (the default makes "
                         f"{ELIT_WINDOWS_PER_SIDE}x{ELIT_WINDOWS_PER_SIDE} windows); set group_size to a "
                         f"divisor of {grid}")
    return grid // ELIT_WINDOWS_PER_SIDE


@contextlib.contextmanager
def _initialisers_off():
    """torch.nn.init's in-place initialisers as no-ops. On the meta device there are no values to
    set, and running them costs the one-time import of torch's Python reference kernels (4-16 s on
    a busy 2-core machine) for nothing."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def skeleton_model(name: str, **overrides) -> SiT:
    """``create_model`` on the meta device, without initialising anything: the parameter names and
    shapes (and FLOP counts) of an architecture at no memory and almost no time."""
    with torch.device("meta"), _initialisers_off():
        return create_model(name, **overrides)
