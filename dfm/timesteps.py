"""Timestep distributions (SPEC §1 and §4)."""
from __future__ import annotations

import math
from typing import Optional

import torch

WEIGHTINGS = ("uniform", "lognormal")


def sample_timesteps(n: int, weighting: str = "uniform", path_type: str = "linear",
                     device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Training times of the trained stage, shape (n,).

    ``uniform``: U(0, 1). ``lognormal``: ``sigma = exp(N(0, 1))`` then ``t = sigma / (1 + sigma)``
    on the linear path (logit-normal(0, 1)) or ``t = 2/pi * atan(sigma)`` on the cosine path.
    """
    if weighting == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if weighting == "lognormal":
        sigma = torch.randn(n, device=device, generator=generator).exp()
        if path_type == "linear":
            return sigma / (1 + sigma)
        if path_type == "cosine":
            return 2 / math.pi * torch.atan(sigma)
        raise ValueError(f"path_type must be 'linear' or 'cosine', got {path_type!r}")
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def sample_logit_normal(shape, loc: float = -2.0, scale: float = 1.0, device=None,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``sigmoid(N(loc, scale^2))``: the earlier-stage distribution (median sigmoid(loc))."""
    return torch.sigmoid(loc + scale * torch.randn(shape, device=device, generator=generator))
