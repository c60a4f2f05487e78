"""Measuring stage calibration (SPEC §11): per-level RMS of a data sample -> ``stage_scales``.

The rule (``stage_scales: auto``): every level is brought to the RMS of the coarsest level,
``c_s = RMS(P_0) / RMS(P_s)`` (so ``c_0 = 1``). Why this rule and not "every level to unit RMS":

- stage 0 stays exactly the reference's stage, so the recipe tuned for it (the logit-normal
  times, the earlier-stage noise ``sigmoid(N(-2, 1))``, the hand-over threshold tau) keeps its
  meaning; SD-VAE latents (x 0.18215) are already scaled to about unit variance by design;
- every finer stage then has the coarse stage's signal-to-noise ratio at the same time t, which
  is what the shared time schedule of the sampler and the objective assume.
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch

from dfm.decompositions import Decomposition

DIGITS = 4  # stored scales are rounded: readable in configs and logs, identical on every rank


class LevelEnergy:
    """Running float64 sums of squares of every (unscaled) level of ``decomposition`` over batches
    of data: the levels of the decomposition the model uses (``model.decomposition``)."""

    def __init__(self, decomposition: Decomposition):
        num_stages = decomposition.num_stages
        self.decomposition = decomposition
        self.sum_sq = [0.0] * num_stages
        self.count = [0] * num_stages

    def add(self, x: torch.Tensor) -> None:
        """x: (B, C, H, W) data in the model's input space (scaled latents or pixels in [-1, 1])."""
        for s, level in enumerate(self.decomposition.levels(x.to(torch.float64))):
            self.sum_sq[s] += float((level ** 2).sum())
            self.count[s] += level.numel()

    def rms(self) -> List[float]:
        if not all(self.count):
            raise ValueError("no data to calibrate the stages on")
        return [math.sqrt(q / n) for q, n in zip(self.sum_sq, self.count)]

    def scales(self) -> List[float]:
        """``c_s = RMS(P_0) / RMS(P_s)``, rounded to DIGITS decimals (ValueError for a level with no signal)."""
        rms = self.rms()
        empty = [s for s, r in enumerate(rms) if not r > 0 or not math.isfinite(r)]
        if empty:
            raise ValueError(f"pyramid level(s) {empty} of the data have RMS {[rms[s] for s in empty]}: "
                             "nothing to calibrate on (constant images?); give stage_scales as a list")
        return [round(rms[0] / r, DIGITS) for r in rms]


def measure_stage_scales(batches: Iterable[torch.Tensor], decomposition: Decomposition) -> List[float]:
    """The ``auto`` stage scales of data given as batches (B, C, H, W) (see the module docstring)."""
    energy = LevelEnergy(decomposition)
    for x in batches:
        energy.add(x)
    return energy.scales()
