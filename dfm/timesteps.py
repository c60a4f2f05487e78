"""Time distributions of the trained stage (SPEC §1 and §4), chosen by name.

A training config picks one with ``time_distribution`` (REPA's and the reference's ``weighting``
is the same key): a name, or a mapping with the name and its parameters, e.g.
``{name: logit_normal, loc: 0.0, scale: 1.0}``. A new distribution is one class here::

    @TIME_DISTRIBUTIONS.register("my_times")
    class MyTimes(TimeDistribution):
        def __init__(self, path=None, sharpness: float = 2.0): ...
        def __call__(self, shape, device=None, generator=None): ...   # t in [0, 1], float32

``path`` (the probability path of the model being trained, a ``dfm.paths.Path``) is passed to
every entry; the other parameters are its config. Draw every random number from ``generator`` (the run's "data"
stream, seeded per micro-batch): a draw from torch's global generator would take numbers from
the stream of the model's label dropout. Samplers of ``torch.distributions`` (Beta, Gamma, ...)
take no generator; wrap them in :func:`generator_as_global`.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from dfm.paths import PATHS, Path
from utils.registry import Registry

# The reference's / REPA's `weighting` values (uniform, lognormal) are the names of two entries.
TIME_DISTRIBUTIONS = Registry("time distribution", default="lognormal", context=("path",))


class TimeDistribution:
    """Base class: ``dist(shape, device, generator)`` -> times in [0, 1] (float32, t = 1 is noise);
    ``self.path``: the probability path (the linear one when none is given)."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path if path is not None else PATHS.build(None)

    def __call__(self, shape, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError


@TIME_DISTRIBUTIONS.register("uniform")
class Uniform(TimeDistribution):
    """U(0, 1)."""

    def __call__(self, shape, device=None, generator=None):
        return torch.rand(shape, device=device, generator=generator)


@TIME_DISTRIBUTIONS.register("lognormal")
class LogNormal(TimeDistribution):
    """REPA's lognormal: the noise-to-signal ratio sigma / alpha = exp(N(0, 1)), turned into a time by
    the path (linear: t = r / (1 + r), i.e. logit-normal(0, 1); cosine: t = 2/pi * atan(r))."""

    def __init__(self, path: Optional[Path] = None):
        super().__init__(path)
        if type(self.path).time_at_noise_ratio is Path.time_at_noise_ratio:
            raise ValueError(f"time distribution 'lognormal' needs a path that defines time_at_noise_ratio; "
                             f"{type(self.path).__name__} does not (choose a time distribution defined in t, "
                             "e.g. logit_normal)")

    def __call__(self, shape, device=None, generator=None):
        ratio = torch.randn(shape, device=device, generator=generator).exp()
        return self.path.time_at_noise_ratio(ratio)


@TIME_DISTRIBUTIONS.register("logit_normal")
class LogitNormal(TimeDistribution):
    """sigmoid(N(loc, scale^2)) on any path (loc > 0: noisier times; SD3's default is loc 0, scale 1)."""

    def __init__(self, path: Optional[Path] = None, loc: float = 0.0, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"time distribution 'logit_normal': scale must be > 0, got {scale}")
        super().__init__(path)
        self.loc, self.scale = float(loc), float(scale)

    def __call__(self, shape, device=None, generator=None):
        return sample_logit_normal(shape, self.loc, self.scale, device, generator)


def sample_logit_normal(shape, loc: float = -2.0, scale: float = 1.0, device=None,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``sigmoid(N(loc, scale^2))``: the earlier-stage distribution (median sigmoid(loc))."""
    return torch.sigmoid(loc + scale * torch.randn(shape, device=device, generator=generator))


def sample_timesteps(n: int, weighting="uniform", path_type=None, device=None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Times of the trained stage, shape (n,), from the distribution ``weighting`` (a spec) on the
    path ``path_type`` (a spec of ``dfm.paths.PATHS``; None: linear)."""
    return TIME_DISTRIBUTIONS.build(weighting, path=PATHS.build(path_type))((n,), device, generator)


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
