"""Which stage a training sample trains (SPEC §4, step 2)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

STAGE_SAMPLING = ("per_batch", "per_sample")


def default_stage_weights(num_stages: int) -> list:
    """``[1]`` for one stage, the reference ``[0.9, 0.1]`` for two.

    For S >= 3 (not specified anywhere) the reference's 9:1 preference for the coarsest stage
    is kept and the remaining 0.1 is split evenly over the finer stages.
    """
    if num_stages == 1:
        return [1.0]
    if num_stages == 2:
        return [0.9, 0.1]
    rest = 0.1 / (num_stages - 1)
    return [0.9] + [rest] * (num_stages - 1)


def validate_stage_weights(weights: Sequence[float], num_stages: int) -> list:
    weights = [float(w) for w in weights]
    if len(weights) != num_stages:
        raise ValueError(f"stage_weights must have one entry per stage ({num_stages}), got {weights}")
    if any(w < 0 for w in weights):
        raise ValueError(f"stage_weights must be non-negative, got {weights}")
    if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ValueError(f"stage_weights must sum to 1, got {weights} (sum {sum(weights):.6g})")
    return weights


def sample_stages(batch_size: int, weights: torch.Tensor, mode: str = "per_batch",
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Index ``k`` of the trained stage for every sample, shape (B,), int64.

    ``per_batch`` (reference): one draw shared by the whole (per-process) batch.
    ``per_sample``: an independent draw for every sample.
    """
    if mode == "per_batch":
        k = torch.multinomial(weights, 1, generator=generator)
        return k.expand(batch_size).contiguous()
    if mode == "per_sample":
        return torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    raise ValueError(f"stage_sampling must be one of {STAGE_SAMPLING}, got {mode!r}")
