"""The S-stage flow-matching objective (SPEC §4). One stage is exactly SiT/REPA flow matching."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dfm.decompositions import decomposition_of
from dfm.paths import path_of
from dfm.predictions import prediction_of
from dfm.stages import STAGE_SAMPLING, default_stage_weights, sample_stages, validate_stage_weights
from dfm.timesteps import TIME_DISTRIBUTIONS, sample_logit_normal

# a time at exactly 0 or 1 would give logit(t) = -inf / inf in the time shift
_LOGIT_EPS = 1e-6


def projection_loss(zs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """REPA alignment loss: mean over encoders, tokens and samples of ``-cos(z, target)``.

    ``zs[i]`` and ``targets[i]`` are (B, T, D_i).
    """
    if len(zs) != len(targets):
        raise ValueError(f"got {len(zs)} projector outputs for {len(targets)} encoder features; "
                         "the model's z_dims must match the encoders")
    total = 0.0
    for z, target in zip(zs, targets):
        if z.shape != target.shape:
            raise ValueError(f"projector output {tuple(z.shape)} does not match encoder features "
                             f"{tuple(target.shape)}")
        cos = (F.normalize(z.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)
        total = total + (-cos).mean()
    return total / len(zs)


class FlowMatchingObjective:
    """Training loss of DFM with S stages; with S = 1 it is the plain flow-matching loss.

    Per step: decompose ``x`` with the model's decomposition (``model.decomposition``, which
    carries its stage scales, SPEC §11: stage s trains on ``c_s * P_s``), noise every level on the
    model's probability path (``model.path``) and compare the output with the model's prediction
    target in its loss space (``model.prediction``, velocity by default); draw the trained stage
    ``k``; give stages ``j < k`` low-noise times ``sigmoid(N(loc, scale))``, stage ``k`` a time of
    ``time_distribution`` (a spec of ``dfm.timesteps.TIME_DISTRIBUTIONS``), stages ``j > k``
    ``t = 1`` with their input zeroed and loss masked; sum the per-stage mean-squared errors over
    active stages and average over the batch. ``stage_time_shift``: when stage k is the trained
    stage its time is ``sigmoid(logit(t) + shift_k)`` (lognormal: logit-normal(shift_k, 1));
    None = the reference. A model without a ``decomposition``, ``path`` or ``prediction`` (a
    stand-in in tests) gets the Laplacian pyramid of ``num_stages``, the linear path and velocity.
    ``time_distribution`` is built for the path of the model it trains (validated on the linear
    path here).
    """

    def __init__(self, num_stages: int, stage_weights: Optional[Sequence[float]] = None,
                 stage_sampling: str = "per_batch", time_distribution="uniform",
                 earlier_stage_loc: float = -2.0, earlier_stage_scale: float = 1.0, proj_coeff: float = 0.0,
                 stage_time_shift: Optional[Sequence[float]] = None):
        if stage_sampling not in STAGE_SAMPLING:
            raise ValueError(f"stage_sampling must be one of {STAGE_SAMPLING}, got {stage_sampling!r}")
        if earlier_stage_scale <= 0:
            raise ValueError(f"earlier_stage_scale must be > 0, got {earlier_stage_scale}")
        self.time_distribution_spec = TIME_DISTRIBUTIONS.compact(time_distribution)
        self._time_distributions = {}  # path object -> its time distribution (one per model trained)
        self.time_distribution = self.times_on(path_of(None))  # the default path's (validates the spec)
        self.num_stages = num_stages
        weights = default_stage_weights(num_stages) if stage_weights is None else stage_weights
        self.stage_weights = validate_stage_weights(weights, num_stages)
        self.stage_sampling = stage_sampling
        self.earlier_stage_loc = float(earlier_stage_loc)
        self.earlier_stage_scale = float(earlier_stage_scale)
        self.proj_coeff = float(proj_coeff)
        if stage_time_shift is not None and len(stage_time_shift) != num_stages:
            raise ValueError(f"stage_time_shift needs one entry per stage ({num_stages}), got {list(stage_time_shift)}")
        self.stage_time_shift = None if stage_time_shift is None else [float(v) for v in stage_time_shift]
        self._weights_on_device = {}  # one host-to-device copy per device, not one per step

    def _on_device(self, name: str, values, device) -> torch.Tensor:
        key = (name, torch.device("cpu") if device is None else torch.device(device))
        if key not in self._weights_on_device:
            self._weights_on_device[key] = torch.tensor(values, dtype=torch.float32, device=key[1])
        return self._weights_on_device[key]

    def _stage_weights(self, device) -> torch.Tensor:
        return self._on_device("weights", self.stage_weights, device)

    def times_on(self, path):
        """The trained stage's time distribution on ``path`` (built once per path)."""
        if path not in self._time_distributions:
            self._time_distributions[path] = TIME_DISTRIBUTIONS.build(self.time_distribution_spec, path=path)
        return self._time_distributions[path]

    def sample_times(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None, path=None):
        """Draw ``(t, active)``: t (B, S) float32, active (B, S) bool (stage j active iff j <= k);
        ``path``: the model's path (None: linear)."""
        S = self.num_stages
        k = sample_stages(batch_size, self._stage_weights(device), self.stage_sampling, generator)
        times = self.time_distribution if path is None else self.times_on(path)
        t_main = times((batch_size,), device, generator)
        if self.stage_time_shift is not None:
            shift = self._on_device("time_shift", self.stage_time_shift, device)[k]
            t_main = torch.sigmoid(torch.logit(t_main, eps=_LOGIT_EPS) + shift)
        t_early = sample_logit_normal((batch_size, S), self.earlier_stage_loc,
                                      self.earlier_stage_scale, device, generator)
        index = torch.arange(S, device=device)[None, :]
        k = k[:, None]
        t = torch.where(index < k, t_early, torch.where(index == k, t_main[:, None], torch.ones_like(t_early)))
        return t, index <= k

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor,
                 encoder_features: Optional[Sequence[torch.Tensor]] = None,
                 generator: Optional[torch.Generator] = None, model_kwargs: Optional[dict] = None) -> dict:
        """Loss for a batch ``x`` (B, C, H, W) of scaled latents or pixels with labels ``y`` (B,).

        Returns ``{"loss": scalar to backpropagate, "stage_losses": (S,) mean loss of each stage
        over the samples where it is active (0 where none), "proj_loss": scalar}``.
        Random draws come from ``generator`` (on its device) or the global RNG on ``x``'s device.
        """
        B = x.shape[0]
        draw_device = generator.device if generator is not None else x.device
        levels = decomposition_of(model, self.num_stages).decompose(x)
        path, target = path_of(model), prediction_of(model)
        t, active = self.sample_times(B, draw_device, generator, path)
        t, active = t.to(x.device), active.to(x.device)
        inputs, noised = [], []
        for s, level in enumerate(levels):
            eps = torch.randn(level.shape, device=draw_device, generator=generator).to(x.device, level.dtype)
            x_t, v = path.interpolate(level, eps, t[:, s].to(level.dtype))
            inputs.append(x_t)
            noised.append((level, eps, x_t, v))
        want_features = encoder_features is not None and self.proj_coeff > 0
        out = model(inputs, t, y, active, return_features=want_features, **(model_kwargs or {}))
        predictions, zs = out if want_features else (out, None)
        dtype = torch.promote_types(levels[0].dtype, torch.float32)  # bf16 outputs: loss in fp32
        per_stage = []
        for s, (p, (level, eps, x_t, v)) in enumerate(zip(predictions, noised)):
            p, v = target.loss_pair(p.to(dtype), level.to(dtype), eps.to(dtype), x_t.to(dtype), v.to(dtype), t[:, s], path)
            per_stage.append(((p - v) ** 2).mean(dim=(1, 2, 3)))
        per_stage = torch.stack(per_stage, dim=1)
        mask = active.float()
        loss = (per_stage * mask).sum(dim=1).mean()
        stage_losses = (per_stage * mask).sum(dim=0) / mask.sum(dim=0).clamp_min(1.0)
        proj = projection_loss(zs, encoder_features) if want_features else loss.new_zeros(())
        return {"loss": loss + self.proj_coeff * proj, "stage_losses": stage_losses.detach(),
                "proj_loss": proj.detach(), "denoising_loss": loss.detach()}
