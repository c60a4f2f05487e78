"""Laplacian-pyramid decomposition of images or latents into S stages (SPEC §2).

Stage 0 is the coarsest level; stage S-1 has the input's resolution. There is no per-level
normalisation, so ``recompose(decompose(x)) == x`` up to float rounding.
"""
from __future__ import annotations

from typing import List, Sequence

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


class LaplacianPyramid:
    """S-level Laplacian pyramid. ``S = 1`` is the identity (plain flow matching)."""

    def __init__(self, num_stages: int):
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
        self.num_stages = num_stages

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
        return levels

    def recompose(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`decompose`: list of S levels (coarsest first) -> (B, C, H, W)."""
        if len(levels) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} pyramid levels, got {len(levels)}")
        cur = levels[0]
        for s in range(1, self.num_stages):
            cur = up(cur) + levels[s]
        return cur
