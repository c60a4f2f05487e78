"""Per-sample randomness: everything random about sample i comes from (seed, i).

Each sample gets its own `torch.Generator`, seeded by a hash of (stream, seed, index), so a
sample's initial noise and SDE noise do not depend on the batch it lands in, the number of
processes, or the device. Streams ("noise", "sde", "label") are independent of each other.
"""

from __future__ import annotations

from typing import Sequence

import torch

from utils.seeds import derive_seed

__all__ = ["derive_seed", "sample_generator", "initial_noise", "sde_generators"]


def sample_generator(seed: int, index: int, stream: str, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, index, stream))


def initial_noise(seed: int, indices: Sequence[int],
                  stage_shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """N(0, I) starting noise of every stage for the given sample indices.

    stage_shapes: per stage `(C, H_s, W_s)`, stage 0 the coarsest.
    Returns S float32 CPU tensors `(B, C, H_s, W_s)`; row b depends only on (seed, indices[b]).
    Drawn on the CPU in float32 so that the noise is identical on every machine.
    """
    per_stage: list[list[torch.Tensor]] = [[] for _ in stage_shapes]
    for index in indices:
        gen = sample_generator(seed, index, "noise")
        for s, shape in enumerate(stage_shapes):
            per_stage[s].append(torch.randn(tuple(shape), generator=gen, dtype=torch.float32))
    return [torch.stack(rows) if rows else torch.empty(0, *shape)
            for rows, shape in zip(per_stage, stage_shapes)]


def sde_generators(seed: int, indices: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per sample for the SDE's per-step noise (a stream apart from the start noise)."""
    return [sample_generator(seed, index, "sde", device=device) for index in indices]
