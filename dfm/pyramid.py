"""Laplacian-pyramid decomposition of images or latents into S stages (SPEC §2).

Stage 0 is the coarsest level; stage S-1 has the input's resolution. The reference has no
per-level normalisation, so ``recompose(decompose(x)) == x`` up to float rounding.

Stage calibration (SPEC §11, ours): with ``scales = [c_0, ..., c_{S-1}]`` the pyramid's levels
are ``c_s * P_s`` -- the space in which stage s is trained and sampled. ``decompose`` applies the
scales right after the decomposition and ``recompose`` removes them right before recomposing, so
this class is the one place that knows about them. ``scales=None`` is the reference pyramid, bit
for bit (no multiplication at all).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F


def down(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x1/2 (align_corners=False, no antialias). (B, C, H, W) -> (B, C, H/2, W/2).

    For an exact halving this is 2x2 average pooling: every output sample sits half-way
    between two input samples in each direction.
    """
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(h // 2, w // 2), mode="bilinear", align_corners=False)


def up(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 (align_corners=False). (B, C, H, W) -> (B, C, 2H, 2W)."""
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)


def check_stage_scales(scales, num_stages: int) -> Optional[List[float]]:
    """None, or ``scales`` as a list of ``num_stages`` positive finite floats (ValueError otherwise)."""
    if scales is None:
        return None
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise ValueError(f"stage_scales must be null or a list of {num_stages} positive numbers, got {scales!r}")
    if len(scales) != num_stages:
        raise ValueError(f"stage_scales needs one entry per stage ({num_stages}), got {list(scales)}")
    try:
        values = [float(c) for c in scales]
    except (TypeError, ValueError):
        raise ValueError(f"stage_scales must be numbers, got {list(scales)}") from None
    if any(isinstance(c, bool) for c in scales) or not all(math.isfinite(c) and c > 0 for c in values):
        raise ValueError(f"stage_scales must be positive finite numbers, got {list(scales)}")
    return values


class LaplacianPyramid:
    """S-level Laplacian pyramid. ``S = 1`` is the identity (plain flow matching).

    ``scales``: optional per-level multipliers (stage calibration, see the module docstring).
    """

    def __init__(self, num_stages: int, scales: Optional[Sequence[float]] = None):
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
        self.num_stages = num_stages
        self.scales = check_stage_scales(scales, num_stages)

    def coarsest(self, num_stages: int) -> "LaplacianPyramid":
        """The pyramid of the first ``num_stages`` levels (with their scales): recomposes a
        partial pyramid, e.g. the sampler's preview after stage ``num_stages - 1``."""
        return LaplacianPyramid(num_stages, None if self.scales is None else self.scales[:num_stages])

    def check_size(self, height: int, width: int | None = None) -> None:
        """Raise a ValueError unless both sides halve exactly ``S - 1`` times."""
        factor = 2 ** (self.num_stages - 1)
        for name, side in (("height", height), ("width", width if width is not None else height)):
            if side % factor != 0:
                raise ValueError(
                    f"a {self.num_stages}-stage pyramid needs the {name} divisible by "
                    f"2^(stages-1) = {factor}, got {side}; use fewer stages or another size")

    def stage_sizes(self, size: int) -> List[int]:
        """Spatial size of every stage for a square input of side ``size``, coarsest first."""
        self.check_size(size)
        return [size // 2 ** (self.num_stages - 1 - s) for s in range(self.num_stages)]

    def decompose(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, C, H, W) -> [P_0 (B, C, H/2^(S-1), W/2^(S-1)), ..., P_{S-1} (B, C, H, W)]."""
        self.check_size(x.shape[-2], x.shape[-1])
        levels: List[torch.Tensor] = [None] * self.num_stages  # type: ignore[list-item]
        cur = x
        for s in range(self.num_stages - 1, 0, -1):
            low = down(cur)
            levels[s] = cur - up(low)
            cur = low
        levels[0] = cur
        if self.scales is not None:
            levels = [level * c for level, c in zip(levels, self.scales)]
        return levels

    def recompose(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`decompose`: list of S levels (coarsest first) -> (B, C, H, W)."""
        if len(levels) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} pyramid levels, got {len(levels)}")
        if self.scales is not None:
            levels = [level / c for level, c in zip(levels, self.scales)]
        cur = levels[0]
        for s in range(1, self.num_stages):
            cur = up(cur) + levels[s]
        return cur


def pyramid_of(model) -> LaplacianPyramid:
    """The pyramid whose (scaled) levels ``model``'s stages live in: ``model.num_stages`` levels
    and ``model.stage_scales`` (None for models trained without stage calibration)."""
    return LaplacianPyramid(model.num_stages, getattr(model, "stage_scales", None))
