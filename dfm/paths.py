"""Interpolation paths between data (t = 0) and noise (t = 1) (SPEC §1)."""
from __future__ import annotations

import math

import torch

PATH_TYPES = ("linear", "cosine")


def interpolant(t: torch.Tensor, path_type: str = "linear"):
    """Return ``(alpha, sigma, d_alpha, d_sigma)`` with ``x_t = alpha * x + sigma * eps``."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))
    raise ValueError(f"path_type must be one of {PATH_TYPES}, got {path_type!r}")


def velocity_target(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, path_type: str = "linear"):
    """Return ``(x_t, v)`` for data ``x``, noise ``eps`` and per-sample ``t`` of shape (B,)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    alpha, sigma, d_alpha, d_sigma = (a.view(shape) for a in interpolant(t, path_type))
    return alpha * x + sigma * eps, d_alpha * x + d_sigma * eps


def score_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, path_type: str = "linear"):
    """Score of the marginal at time ``t`` from the velocity (``t`` broadcastable to ``x_t``).

    Linear path: ``s = -((1 - t) v + x_t) / t``.
    """
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    ratio = alpha / d_alpha
    variance = sigma ** 2 - ratio * d_sigma * sigma
    return (ratio * v - x_t) / variance
