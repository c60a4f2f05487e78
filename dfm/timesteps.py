"""Time distributions of the trained stage (SPEC §1 and §4), chosen by name.

A training config picks one with ``time_distribution`` (REPA's and the reference's ``weighting``
is the same key): a name, or a mapping with the name and its parameters, e.g.
``{name: logit_normal, loc: 0.0, scale: 1.0}``. A new distribution is one class here::

    @TIME_DISTRIBUTIONS.register("my_times")
    class MyTimes(TimeDistribution):
        def __init__(self, path_type: str = "linear", sharpness: float = 2.0): ...
        def __call__(self, shape, device=None, generator=None): ...   # t in [0, 1], float32

``path_type`` (the interpolation path of the run) is passed to every entry; the other
parameters are its config. Draw every random number from ``generator`` (the run's "data"
stream, seeded per micro-batch): a draw from torch's global generator would take numbers from
the stream of the model's label dropout. Samplers of ``torch.distributions`` (Beta, Gamma, ...)
take no generator; wrap them in :func:`generator_as_global`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from utils.registry import Registry

# The reference's / REPA's `weighting` values (uniform, lognormal) are the names of two entries.
TIME_DISTRIBUTIONS = Registry("time distribution", default="lognormal", context=("path_type",))


class TimeDistribution:
    """Base class: ``dist(shape, device, generator)`` -> times in [0, 1] (float32, t = 1 is noise)."""

    def __init__(self, path_type: str = "linear"):
        self.path_type = path_type

    def __call__(self, shape, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError


@TIME_DISTRIBUTIONS.register("uniform")
class Uniform(TimeDistribution):
    """U(0, 1)."""

    def __call__(self, shape, device=None, generator=None):
        return torch.rand(shape, device=device, generator=generator)


@TIME_DISTRIBUTIONS.register("lognormal")
class LogNormal(TimeDistribution):
    """REPA's lognormal: sigma = exp(N(0, 1)), t = sigma / (1 + sigma) (logit-normal(0, 1)) on the
    linear path, t = 2/pi * atan(sigma) on the cosine path."""

    def __init__(self, path_type: str = "linear"):
        if path_type not in ("linear", "cosine"):
            raise ValueError(f"path_type must be 'linear' or 'cosine', got {path_type!r}")
        super().__init__(path_type)

    def __call__(self, shape, device=None, generator=None):
        sigma = torch.randn(shape, device=device, generator=generator).exp()
        if self.path_type == "linear":
            return sigma / (1 + sigma)
        return 2 / math.pi * torch.atan(sigma)


@TIME_DISTRIBUTIONS.register("logit_normal")
class LogitNormal(TimeDistribution):
    """sigmoid(N(loc, scale^2)) on any path (loc > 0: noisier times; SD3's default is loc 0, scale 1)."""

    def __init__(self, path_type: str = "linear", loc: float = 0.0, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"time distribution 'logit_normal': scale must be > 0, got {scale}")
        super().__init__(path_type)
        self.loc, self.scale = float(loc), float(scale)

    def __call__(self, shape, device=None, generator=None):
        return sample_logit_normal(shape, self.loc, self.scale, device, generator)


def sample_logit_normal(shape, loc: float = -2.0, scale: float = 1.0, device=None,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``sigmoid(N(loc, scale^2))``: the earlier-stage distribution (median sigmoid(loc))."""
    return torch.sigmoid(loc + scale * torch.randn(shape, device=device, generator=generator))


def sample_timesteps(n: int, weighting="uniform", path_type: str = "linear", device=None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Times of the trained stage, shape (n,), from the distribution ``weighting`` (a spec)."""
    return TIME_DISTRIBUTIONS.build(weighting, path_type=path_type)((n,), device, generator)


@contextlib.contextmanager
def generator_as_global(generator: Optional[torch.Generator]):
    """Run a sampler that draws from torch's global generator (``torch.distributions``) on a private
    stream seeded from ``generator`` (one draw from it), leaving the global streams as they were.
    The draw reads one number on the host: fine on a CPU, one synchronisation per step on a GPU."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
    devices = [generator.device] if generator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
