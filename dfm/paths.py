"""Probability paths between data (t = 0) and noise (t = 1), chosen by name (SPEC §1).

A path gives ``x_t = alpha(t) x + sigma(t) eps`` and the derivatives of both coefficients; from
them follow the velocity target ``v = alpha'(t) x + sigma'(t) eps``, the score of the marginal
from a velocity (the SDE sampler's drift), the diffusion coefficient of the reverse SDE, and the
time at which the noise-to-signal ratio ``sigma / alpha`` takes a given value (REPA's
``lognormal`` draws that ratio). The model owns its path (``model.path``, built from the
``path_type`` option of its ``arch``), so the objective, the samplers, the time distributions,
``generate.py`` and the provenance records all read the same one.

A new path is one class here, registered by name::

    @PATHS.register("my_path")
    class MyPath(Path):
        def __init__(self, sharpness: float = 2.0): ...
        def coefficients(self, t): ...        # (alpha, sigma, d_alpha, d_sigma) at t
        def time_at_noise_ratio(self, r): ... # t with sigma(t) / alpha(t) = r (optional)

and selected with ``path_type: my_path`` (or ``{name: my_path, sharpness: 3.0}``) in a training
config. ``diffusion(t)`` (the reverse SDE's ``w(t)``) defaults to REPA's ``2 t``.
"""
from __future__ import annotations

import math

import torch

from utils.modules import inner_module
from utils.registry import Registry

PATHS = Registry("probability path", default="linear")


class Path:
    """Base class: ``x_t = alpha(t) x + sigma(t) eps`` (t = 0 data, t = 1 noise)."""

    def coefficients(self, t: torch.Tensor):
        """``(alpha, sigma, d_alpha, d_sigma)`` at times ``t`` (any shape, broadcast as given)."""
        raise NotImplementedError

    def time_at_noise_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        """The time at which ``sigma / alpha`` equals ``ratio`` (> 0): what REPA's ``lognormal``
        samples (``ratio = exp(N(0, 1))``). A path without a closed form may leave it out."""
        raise NotImplementedError(f"the probability path {type(self).__name__} does not define "
                                  "time_at_noise_ratio; choose a time distribution defined in t")

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """``w(t)`` of the reverse SDE ``dx = (v - w/2 score) dt + sqrt(w) dW`` (REPA: ``2 t``)."""
        return 2 * t

    # ------------------------------------------------------------------ provided
    def interpolate(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor):
        """``(x_t, v)`` for data ``x`` (B, ...), noise ``eps`` and per-sample times ``t`` (B,)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha, sigma, d_alpha, d_sigma = (a.view(shape) for a in self.coefficients(t))
        return alpha * x + sigma * eps, d_alpha * x + d_sigma * eps

    def score_from_velocity(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score of the marginal at ``t`` (broadcastable to ``x_t``) from the velocity: with
        ``x = (x_t - sigma eps) / alpha`` in ``v = alpha' x + sigma' eps``, ``eps = -sigma score``.
        Linear path: ``s = -((1 - t) v + x_t) / t``."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t)
        ratio = alpha / d_alpha
        variance = sigma ** 2 - ratio * d_sigma * sigma
        return (ratio * v - x_t) / variance


@PATHS.register("linear")
class Linear(Path):
    """The rectified-flow / SiT linear path: alpha = 1 - t, sigma = t."""

    def coefficients(self, t):
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)

    def time_at_noise_ratio(self, ratio):
        return ratio / (1 + ratio)


@PATHS.register("cosine")
class Cosine(Path):
    """REPA's cosine path (SiT's GVP): alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""

    def coefficients(self, t):
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))

    def time_at_noise_ratio(self, ratio):
        return 2 / math.pi * torch.atan(ratio)


@PATHS.register("vp")
class VP(Path):
    """SiT's VP path (DDPM's variance-preserving SDE with a linear beta schedule), in our time:
    ``log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``, ``sigma = sqrt(1 - alpha^2)``;
    its reverse SDE has ``w(t) = beta(t) = beta_min + t (beta_max - beta_min)``. At t = 1 alpha is
    exp(-5.025) = 0.0066 (beta 0.1 .. 20), not 0: sampling starts from N(0, I) there, as SiT's does."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"probability path 'vp': need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def coefficients(self, t):
        log_alpha = -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(-torch.expm1(2 * log_alpha))  # sqrt(1 - alpha^2), accurate near t = 0
        d_alpha = -0.5 * self.beta(t) * alpha
        return alpha, sigma, d_alpha, -alpha * d_alpha / sigma

    def diffusion(self, t):
        return self.beta(t)

    def time_at_noise_ratio(self, ratio):
        # sigma / alpha = r  <=>  alpha^2 = 1 / (1 + r^2)  <=>  a t^2 + b t = log(1 + r^2) / 2
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        c = 0.5 * torch.log1p(ratio ** 2)
        return ((-b + torch.sqrt(b * b + 4 * a * c)) / (2 * a)).clamp(0.0, 1.0)


_DEFAULT = []  # the default path, built once (stand-ins share one object: caches keyed by path stay small)


def path_of(model) -> Path:
    """The path ``model`` owns (through DDP / compile wrappers), or the default (linear) path for a
    stand-in without one (an analytic velocity field in a test)."""
    found = getattr(inner_module(model), "path", None)
    if found is not None:
        return found
    if not _DEFAULT:
        _DEFAULT.append(PATHS.build(None))
    return _DEFAULT[0]
