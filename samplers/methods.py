"""Sampler methods (integrators), chosen by name: Euler and Heun ODE, Euler–Maruyama SDE (SPEC §5).

Every key that picks a method (generate.py's ``method``, ``preview.method``,
``eval_sampler.method``, the budget sweep's ``--method``) takes a name or a mapping with the
name and its parameters (``{name: sde, last_noisy_time: 0.04}``). A new method is one class here::

    @SAMPLER_METHODS.register("my_solver")
    class MySolver(SamplerMethod):
        def __init__(self, order: int = 2): ...
        def step(self, ctx, i, xs): ...     # state of step i -> state of step i + 1

:func:`samplers.sample` owns everything around the step: the schedule (``schedule``, the
multistage grid unless overridden), guidance, budgets and the prediction target
(``ctx.velocity`` is always a velocity), float64 states, the coarse-stage previews.

State across the steps of one call (a multistep method's earlier velocities) lives in
``ctx.state``, a dict that :func:`samplers.sample` makes empty for every call: a method object
is configuration only, so one object serves any number of calls (and threads) with the same
results. ``ctx.activated(i)`` lists the stages that start moving at step i (all active stages at
step 0; a DFM stage at its hand-over): the model's velocity of the other stages jumps there too
(their conditioning changes), so a method that extrapolates from earlier steps restarts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from dfm.paths import Path
from samplers.schedules import multistage_schedule, sde_schedule, validate_schedule
from utils.registry import Registry

SAMPLER_METHODS = Registry("sampler method", default="euler")


@dataclass
class StepContext:
    """What a method's ``step`` may use.

    ``velocity(xs, time_row, active_row)``: the guided model velocity (float64 list) of the states
    ``xs`` at schedule row ``time_row`` of ``times`` with the active mask of row ``active_row``
    (rows already on the device: no copy); ``velocity_at(xs, t, active_row)``: the same at any
    times ``t`` (S,) float64 on the CPU (a midpoint, say); ``times`` (N + 1, S) float64 and
    ``active`` (N, S) bool, on the CPU; ``num_steps`` N; ``generator``: the noise of a stochastic
    method (one generator or one per sample), drawn with ``noise_like(x, generator)``; ``path``:
    the model's probability path (``dfm.paths``: the SDE's score and diffusion); ``state``: this
    call's own dict (empty at step 0) for what a method keeps across steps.
    """
    velocity: Callable
    velocity_at: Callable
    times: torch.Tensor
    active: torch.Tensor
    num_steps: int
    generator: Union[None, torch.Generator, Sequence[torch.Generator]]
    path: Path
    noise_like: Callable  # noise_like(x, generator) -> N(0, I) of x's shape, device and dtype
    state: dict = field(default_factory=dict)

    def activated(self, i: int) -> List[int]:
        """The stages active at step ``i`` that were not at step ``i - 1`` (at step 0: every active one)."""
        before = self.active[i - 1] if i > 0 else torch.zeros_like(self.active[i])
        return [s for s in range(self.active.shape[1]) if self.active[i, s] and not before[s]]


class SamplerMethod:
    """Base class: the multistage schedule and one step of the integrator."""

    def schedule(self, num_steps_per_scale: Sequence[int], thresholds: Sequence[float]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(times (N + 1, S), active (N, S))`` of ``samplers.schedules``."""
        return multistage_schedule(num_steps_per_scale, thresholds)

    def nfe(self, num_steps: int) -> int:
        """Model evaluations per sample (without CFG doubling) over ``num_steps`` steps."""
        return num_steps

    def step(self, ctx: StepContext, i: int, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        raise NotImplementedError


def _euler(ctx: StepContext, i: int, xs, v) -> list:
    t_cur, t_next, on = ctx.times[i], ctx.times[i + 1], ctx.active[i]
    return [x + (t_next[s] - t_cur[s]) * vs if on[s] else x for s, (x, vs) in enumerate(zip(xs, v))]


@SAMPLER_METHODS.register("euler")
class Euler(SamplerMethod):
    """Euler ODE (the reference's solver), NFE = N."""

    def step(self, ctx, i, xs):
        return _euler(ctx, i, xs, ctx.velocity(xs, i, i))


@SAMPLER_METHODS.register("heun")
class Heun(SamplerMethod):
    """Heun ODE: Euler corrected by the velocity at the next time, every step but the last (NFE = 2N - 1)."""

    def nfe(self, num_steps: int) -> int:
        return 2 * num_steps - 1

    def step(self, ctx, i, xs):
        v = ctx.velocity(xs, i, i)
        xs_next = _euler(ctx, i, xs, v)
        if i == ctx.num_steps - 1:
            return xs_next
        t_cur, t_next, on = ctx.times[i], ctx.times[i + 1], ctx.active[i]
        v2 = ctx.velocity(xs_next, i + 1, i)
        return [x + (t_next[s] - t_cur[s]) * 0.5 * (a + b) if on[s] else x
                for s, (x, a, b) in enumerate(zip(xs, v, v2))]


@SAMPLER_METHODS.register("sde")
class EulerMaruyama(SamplerMethod):
    """Euler–Maruyama SDE with the path's diffusion w(t) (2t on the linear and cosine paths) down to
    ``last_noisy_time``, then one deterministic step to 0 (REPA's SDE sampler), NFE = N."""

    def __init__(self, last_noisy_time: float = 0.04):
        if not 0 < last_noisy_time < 1:
            raise ValueError(f"sampler method 'sde': last_noisy_time must be in (0, 1), got {last_noisy_time}")
        self.last_noisy_time = float(last_noisy_time)

    def schedule(self, num_steps_per_scale, thresholds):
        return sde_schedule(num_steps_per_scale, thresholds, last_noisy_time=self.last_noisy_time)

    def step(self, ctx, i, xs):
        v = ctx.velocity(xs, i, i)
        t_cur, t_next, on = ctx.times[i], ctx.times[i + 1], ctx.active[i]
        if i == ctx.num_steps - 1:  # last step: deterministic drift to t = 0
            out = []
            for s, (x, vs) in enumerate(zip(xs, v)):
                w = ctx.path.diffusion(t_cur[s])
                drift = vs - 0.5 * w * ctx.path.score_from_velocity(vs, x, t_cur[s])
                out.append(x + drift * (t_next[s] - t_cur[s]) if on[s] else x)
            return out
        out = []
        for s, (x, vs) in enumerate(zip(xs, v)):
            if not on[s]:
                out.append(x)
                continue
            dt = t_next[s] - t_cur[s]
            w = ctx.path.diffusion(t_cur[s])
            drift = vs - 0.5 * w * ctx.path.score_from_velocity(vs, x, t_cur[s])
            out.append(x + drift * dt + torch.sqrt(w * dt.abs()) * ctx.noise_like(x, ctx.generator))
        return out


@SAMPLER_METHODS.register("ab2")
class AdamsBashforth2(SamplerMethod):
    """Adams–Bashforth 2 ODE (second order, NFE = N): extrapolates from this step's and the previous
    step's velocities (variable steps: ``h ((1 + r/2) v_n - (r/2) v_{n-1})``, ``r = h_n / h_{n-1}``, per
    stage); restarts with an Euler step at step 0 and wherever a DFM stage starts moving."""

    def restart(self, ctx, i: int) -> bool:
        return bool(ctx.activated(i))

    def step(self, ctx, i, xs):
        v = ctx.velocity(xs, i, i)
        previous = ctx.state.get("previous")  # (velocities, step sizes) of step i - 1 of this call
        h = ctx.times[i + 1] - ctx.times[i]
        ctx.state["previous"] = (v, h)
        if previous is None or self.restart(ctx, i):
            return _euler(ctx, i, xs, v)
        v_prev, h_prev = previous
        out = []
        for s, (x, vs, vp) in enumerate(zip(xs, v, v_prev)):
            if not ctx.active[i, s]:
                out.append(x)
                continue
            r = h[s] / h_prev[s]
            out.append(x + h[s] * ((1 + r / 2) * vs - (r / 2) * vp))
        return out


def build_method(spec) -> SamplerMethod:
    """The method object of a spec (a name or ``{name, **params}``); RegistryError for a bad one."""
    return spec if isinstance(spec, SamplerMethod) else SAMPLER_METHODS.build(spec)


def check_sampler_settings(method, num_steps_per_scale: Sequence[int], thresholds: Sequence[float],
                           num_stages: Optional[int] = None):
    """The sampler settings of every entry point, checked before any work: generate.py and the budget
    sweep (``generation.config.resolve_config``), the previews and the evaluation during training
    (``training.previews.check_sampler_keys``). Returns the method's compact spec; ValueError (one
    line naming the key) for a bad method, a schedule of the wrong length (``num_stages``: the
    model's) or one the method cannot run: the method builds its own schedule here, as
    :func:`samplers.sample` will, so every method's constraints (the SDE's last noisy time below the
    last hand-over threshold) are checked by the code that imposes them."""
    try:
        spec = SAMPLER_METHODS.compact(method)
    except ValueError as error:
        raise ValueError(f"method: {error}") from None
    steps, taus = list(num_steps_per_scale), list(thresholds)
    if num_stages is not None and len(steps) != num_stages:
        raise ValueError(f"num_steps_per_scale needs {num_stages} positive entries (one per stage), got {steps}")
    if num_stages is not None and len(taus) != num_stages - 1:
        raise ValueError(f"thresholds needs {num_stages - 1} entries for {num_stages} stage(s), got {taus}")
    validate_schedule(steps, taus)  # messages name the key
    try:
        build_method(spec).schedule(steps, taus)
    except ValueError as error:
        raise ValueError(f"method {describe(spec)} cannot sample num_steps_per_scale={steps} with thresholds={taus}: "
                         f"{error}") from None
    return spec


def describe(spec) -> str:
    """``euler`` or ``sde(last_noisy_time=0.02)`` for logs."""
    name, given = SAMPLER_METHODS.split(spec)
    return name + (f"({', '.join(f'{k}={v}' for k, v in given.items())})" if given else "")


__all__ = ["SAMPLER_METHODS", "SamplerMethod", "StepContext", "build_method", "check_sampler_settings", "describe"]
