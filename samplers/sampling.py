"""Sampling over a (multistage) schedule (SPEC §5) with any registered method (samplers/methods.py).

One loop serves SiT (one stage) and DFM (S stages): every step moves the active stages from
their current time to the next; inactive stages keep their initial noise at ``t = 1``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from dfm.decompositions import decomposition_of
from dfm.paths import path_of
from dfm.predictions import prediction_of
from samplers.methods import StepContext, build_method


def _per_stage(value, num_stages: int, name: str) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * num_stages
    value = [float(v) for v in value]
    if len(value) != num_stages:
        raise ValueError(f"{name} must be a number or a list with one entry per stage ({num_stages}), got {value}")
    return value


class GuidedVelocity:
    """Model velocity with classifier-free guidance inside per-stage windows.

    Where any active stage is inside its window ``[low_s, high_s]`` the model is also run
    unconditionally; guided stages get ``v_u + w (v_c - v_u)``, the others the conditional
    velocity ``v_c``. Plain CFG: both passes at ``inference_budget`` in one doubled batch.
    Cheap CFG (``unconditional_inference_budget`` set): the unconditional pass runs at that
    budget with the null label, as a second forward; autoguidance: the same low-budget pass
    keeps the real label. Budgets are passed to the model only when set (ELIT models). The
    (guided) output is turned into a velocity by the model's prediction target on its path
    (``model.prediction``, ``model.path``); for a velocity model that is the output itself.
    """

    def __init__(self, model, y: torch.Tensor, cfg_scale: float, low: List[float], high: List[float],
                 inference_budget=None, unconditional_inference_budget=None, autoguidance: bool = False):
        self.model = model
        self.y = y
        self.cfg_scale = float(cfg_scale)
        self.low, self.high = low, high
        self.dtype = next(model.parameters()).dtype
        self.y_null = torch.full_like(y, model.num_classes)
        self.budget = {} if inference_budget is None else {"inference_budget": inference_budget}
        self.low_budget = (None if unconditional_inference_budget is None
                           else {"inference_budget": unconditional_inference_budget})
        self.y_low = y if autoguidance else self.y_null
        self.path, self.prediction = path_of(model), prediction_of(model)

    def guided_stages(self, t: torch.Tensor) -> List[bool]:
        if self.cfg_scale == 1.0:
            return [False] * len(self.low)
        return [lo <= float(ts) <= hi for ts, lo, hi in zip(t, self.low, self.high)]

    def __call__(self, xs: List[torch.Tensor], t: torch.Tensor, active: torch.Tensor,
                 t_model: Optional[torch.Tensor] = None, active_model: Optional[torch.Tensor] = None
                 ) -> List[torch.Tensor]:
        """xs: float64 states; t: (S,) float64 CPU times; active: (S,) bool CPU -> float64 velocities.

        ``t_model``/``active_model``: the same rows already on the model's device and in its dtype
        (``sample`` moves the whole schedule once, so no step pays a blocking host-to-device copy).
        """
        B = xs[0].shape[0]
        guided = [g and bool(a) for g, a in zip(self.guided_stages(t), active)]
        inputs = [x.to(self.dtype) for x in xs]
        if t_model is None:
            t_model = t.to(device=inputs[0].device, dtype=self.dtype)
        if active_model is None:
            active_model = active.to(inputs[0].device)
        if any(guided) and self.low_budget is not None:  # two budgets: two forwards
            time = t_model[None].expand(B, -1)
            cond = self.model(inputs, time, self.y, active_model, **self.budget)
            uncond = self.model(inputs, time, self.y_low, active_model, **self.low_budget)
            out = [torch.cat([c, u]) for c, u in zip(cond, uncond)]
        else:
            y = self.y
            if any(guided):
                inputs = [torch.cat([x, x]) for x in inputs]
                y = torch.cat([self.y, self.y_null])
            n = inputs[0].shape[0]
            out = self.model(inputs, t_model[None].expand(n, -1), y, active_model, **self.budget)
        velocities = []
        for s, v in enumerate(out):
            v = v.to(torch.float64)
            if any(guided):
                v_cond, v_uncond = v[:B], v[B:]
                v = v_uncond + self.cfg_scale * (v_cond - v_uncond) if guided[s] else v_cond
            velocities.append(self.prediction.velocity(v, xs[s], t[s], self.path))
        return velocities


def check_budgets(model, inference_budget=None, unconditional_inference_budget=None,
                  autoguidance: bool = False) -> None:
    """Budget errors before the first step (the arguments of :func:`sample`): ValueError naming
    the key and what is allowed."""
    budget, unconditional_budget = inference_budget, unconditional_inference_budget
    if autoguidance and unconditional_budget is None:
        raise ValueError("autoguidance needs unconditional_inference_budget (the budget of the guiding "
                         "pass, e.g. 0.0625)")
    if not hasattr(model, "kept_latents"):  # no compute budget (SiT, DFM-SiT)
        for key, value in (("inference_budget", budget), ("unconditional_inference_budget", unconditional_budget)):
            if value is not None:
                raise ValueError(f"{key}={value!r} given, but the model has no compute budget (only ELIT-SiT / "
                                 f"DFM-ELIT-SiT models take one); leave it unset")
        return
    model.kept_latents(budget)  # raises for a bad budget, or a missing one on a multi-budget model
    if unconditional_budget is not None:
        try:
            model.kept_latents(unconditional_budget)
        except ValueError as error:
            raise ValueError(f"unconditional_inference_budget: {error}") from None


def _to_device(t: torch.Tensor, device: torch.device, dtype=None) -> torch.Tensor:
    """A host tensor on `device` without the host waiting for the GPU: a pageable copy would
    synchronise the stream, a pinned one is asynchronous (its buffer is kept until the copy ran)."""
    if t.device != device and device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device=device, dtype=dtype)


def _randn_like(x: torch.Tensor, generator: Union[None, torch.Generator, Sequence[torch.Generator]]):
    if generator is None or isinstance(generator, torch.Generator):
        g_device = generator.device if generator is not None else x.device
        return _to_device(torch.randn(x.shape, generator=generator, device=g_device, dtype=torch.float32),
                          x.device, x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return _to_device(torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                                   for g in generator]), x.device, x.dtype)


@torch.no_grad()
def sample(model, noise: Sequence[torch.Tensor], y: torch.Tensor, *, num_steps_per_scale: Sequence[int],
           thresholds: Sequence[float] = (), method="euler", cfg_scale: float = 1.0,
           guidance_low=0.0, guidance_high=1.0,
           generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
           return_previews: bool = False, inference_budget=None, unconditional_inference_budget=None,
           autoguidance: bool = False):
    """Integrate from noise (t = 1) to data (t = 0).

    noise: list of S tensors (B, C_s, H_s, W_s), each stage's N(0, I) in its shape
    (``model.stage_shapes``, coarsest first); y: (B,) labels. ``method``: a spec of
    ``samplers.methods.SAMPLER_METHODS`` -- ``euler`` (NFE = N), ``heun`` (corrects every step
    but the last, NFE = 2N - 1), ``sde`` (Euler–Maruyama with ``w(t) = 2t``, last step
    deterministic, NFE = N; its noise comes from ``generator``: one generator or one per sample)
    or a registered method of one's own. ``guidance_low``/``guidance_high`` are numbers or
    per-stage lists. The probability path and the prediction target are the model's
    (``model.path``, ``model.prediction``; a stand-in without them: linear, velocity).
    ELIT models: ``inference_budget`` (a fraction in (0, 1] or a latent count; None: the model's
    only budget) for the conditional pass; ``unconditional_inference_budget`` turns CFG into cheap
    CFG (the unconditional pass at that budget); ``autoguidance`` keeps the real label in that
    low-budget pass (it needs ``unconditional_inference_budget``). See :class:`GuidedVelocity`.
    Every stage lives in the model's (scaled) decomposition space (``model.decomposition``, SPEC
    §11): ``noise`` is N(0, I) there and the returned stages are there;
    ``model.decomposition.recompose`` turns them into an image. Returns the list of S final
    per-stage tensors (float32); with ``return_previews`` also ``previews``: previews[i] is the
    image of stages 0..i at the end of stage i's chunk (scales removed).
    """
    solver = build_method(method)
    S = len(noise)
    if S != model.num_stages:
        raise ValueError(f"model has {model.num_stages} stages but {S} noise tensors were given")
    if len(list(num_steps_per_scale)) != S:
        raise ValueError(f"num_steps_per_scale must have one entry per stage ({S}), got {list(num_steps_per_scale)}")
    times, active = solver.schedule(num_steps_per_scale, thresholds)
    check_budgets(model, inference_budget, unconditional_inference_budget, autoguidance)
    velocity = GuidedVelocity(model, y, cfg_scale, _per_stage(guidance_low, S, "guidance_low"),
                              _per_stage(guidance_high, S, "guidance_high"), inference_budget,
                              unconditional_inference_budget, autoguidance)
    N = active.shape[0]
    # the preview of stage i is taken where stage i + 1 starts to move
    chunk_ends = {int(active[:, i + 1].nonzero()[0]): i for i in range(S - 1)}
    xs = [z.to(torch.float64) for z in noise]
    times_model = _to_device(times, xs[0].device, velocity.dtype)
    active_model = _to_device(active, xs[0].device)

    def guided(states, time_row: int, active_row: int):
        return velocity(states, times[time_row], active[active_row], times_model[time_row], active_model[active_row])

    def guided_at(states, t: torch.Tensor, active_row: int):
        return velocity(states, t, active[active_row], None, active_model[active_row])

    ctx = StepContext(velocity=guided, velocity_at=guided_at, times=times, active=active, num_steps=N,
                      generator=generator, path=velocity.path, noise_like=_randn_like, state={})
    previews = []
    decomposition = decomposition_of(model, S)
    for step in range(N):
        xs = solver.step(ctx, step, xs)
        if return_previews and (step + 1) in chunk_ends:
            i = chunk_ends[step + 1]
            previews.append(decomposition.recompose_first(xs, i + 1).float())
    final = [x.float() for x in xs]
    if return_previews:
        return final, previews + [decomposition.recompose(final)]
    return final
