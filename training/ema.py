"""Exponential moving average of the model weights (fp32 copy, updated every optimizer step)."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen fp32 copy of `model` in eval mode (the EMA is initialised as a copy, SPEC §6)."""
    ema = copy.deepcopy(model).float().eval()
    ema.requires_grad_(False)
    return ema


class EMA:
    """`ema = decay * ema + (1 - decay) * param` for every trainable parameter.

    Uses one fused `torch._foreach_lerp_` over all tensors (no host sync). Non-trainable
    parameters (the fixed `pos_embed`) and buffers are copied as they are.
    """

    def __init__(self, model: nn.Module, ema_model: nn.Module, decay: float):
        self.decay = float(decay)
        self.ema_model = ema_model
        pairs = list(zip(ema_model.parameters(), model.parameters()))
        self._ema_params = [e for e, p in pairs if p.requires_grad]
        self._params = [p for e, p in pairs if p.requires_grad]
        self._ema_frozen = [e for e, p in pairs if not p.requires_grad]
        self._frozen = [p for e, p in pairs if not p.requires_grad]
        self._ema_buffers = list(ema_model.buffers())
        self._buffers = list(model.buffers())
        if len(pairs) != len(list(model.parameters())):
            raise ValueError("EMA model and model have different parameter lists")

    @torch.no_grad()
    def update(self, skip: Optional[torch.Tensor] = None) -> None:
        """One EMA step; `skip` (a device flag, 1.0 = the optimizer step was skipped) makes it a no-op
        without reading the flag on the host."""
        self.lerp(1.0 - self.decay, skip)

    @torch.no_grad()
    def lerp(self, weight: float, skip: Optional[torch.Tensor] = None) -> None:
        """`ema <- ema + weight (param - ema)` for the trainable parameters (weight 0 where `skip`);
        frozen parameters and buffers are copied."""
        if self._ema_params:
            params = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in self._params]
            if skip is None:
                torch._foreach_lerp_(self._ema_params, params, weight)
            else:
                torch._foreach_lerp_(self._ema_params, params, weight * (1.0 - skip))
        for e, p in zip(self._ema_frozen, self._frozen):
            e.copy_(p)
        for e, b in zip(self._ema_buffers, self._buffers):
            e.copy_(b)
