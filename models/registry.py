"""Model names -> architectures: ``SiT-{S,B,L,XL}/{2,4,8}`` and ``DFM-SiT-{S,B,L,XL}/{2,4,8}``."""
from __future__ import annotations

import re

from models.sit import SiT

SIZES = {  # depth, hidden, heads, REPA encoder_depth
    "S": dict(depth=12, hidden_size=384, num_heads=6, encoder_depth=4),
    "B": dict(depth=12, hidden_size=768, num_heads=12, encoder_depth=4),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, encoder_depth=8),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16, encoder_depth=8),
}
PATCH_SIZES = (2, 4, 8)
MODEL_NAMES = [f"{prefix}SiT-{size}/{p}" for prefix in ("", "DFM-") for size in SIZES for p in PATCH_SIZES]
DEFAULT_DFM_STAGES = 2
OVERRIDES = {"input_size", "in_channels", "num_classes", "stages", "qk_norm", "class_dropout_prob",
             "z_dims", "encoder_depth", "projector_dim", "depth", "hidden_size", "num_heads",
             "mlp_ratio", "time_flip"}
_NAME = re.compile(r"^(DFM-)?SiT-(S|B|L|XL)/(2|4|8)$")


def parse_name(name: str):
    """``"DFM-SiT-XL/2"`` -> ``(True, "XL", 2)``; unknown names raise a ValueError."""
    match = _NAME.match(str(name))
    if match is None:
        raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    return match.group(1) is not None, match.group(2), int(match.group(3))


def create_model(name: str, **overrides) -> SiT:
    """Build a freshly initialised model by name.

    Overrides: input_size (full-resolution side; 32 = 256 px latents), in_channels (4),
    num_classes (1000), stages (DFM only, default 2), qk_norm, class_dropout_prob (0.1),
    z_dims (REPA projector output dims), encoder_depth, and depth/hidden_size/num_heads/
    mlp_ratio for small experiments. ``create_model(**model.arch)`` rebuilds a model.
    """
    multistage, size, patch = parse_name(name)
    unknown = set(overrides) - OVERRIDES
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; allowed: {sorted(OVERRIDES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    stages = overrides.pop("stages", DEFAULT_DFM_STAGES if multistage else 1)
    if not multistage and stages != 1:
        raise ValueError(f"stages={stages} is not allowed for {name}: SiT models have 1 stage; "
                         f"use DFM-SiT-{size}/{patch} for a multi-stage model")
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
    config = dict(SIZES[size])
    config.update(overrides)
    if "z_dims" in config:
        config["z_dims"] = [int(z) for z in config["z_dims"]]
    model = SiT(patch_size=patch, stages=stages, multistage=multistage, **config)
    model.arch = {"name": name, "stages": stages, **{k: v for k, v in config.items() if k in OVERRIDES}}
    if not multistage:
        model.arch.pop("stages")
    return model
