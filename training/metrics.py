"""Metrics of the training loop, kept on the device between two log steps."""
from __future__ import annotations

import time
from typing import Optional

import torch


class MetricWindow:
    """Device-side sums of the loss terms between two log steps (no host synchronisation), and
    the first step whose loss was non-finite.

    With `skips` (`on_nonfinite: skip`), a step's values wait in a pending buffer until
    `add_step(grad_norm, skip)` keeps them (or drops a skipped step's), so that a skipped step's
    NaN never poisons the window's averages; averages are then over the steps kept."""

    def __init__(self, num_stages: int, device, skips: bool = False):
        zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        self.S = num_stages
        self.loss, self.grad, self.stage_sum, self.stage_cnt = zeros(()), zeros(()), zeros(num_stages), \
            zeros(num_stages)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.terms = {}  # other scalar loss terms the objective reports (e.g. REPA's proj_loss)
        self.device = device
        self.steps = 0
        self.start = time.time()
        self.skips = skips
        self.kept = zeros(())
        self.pending = None  # skips: [loss, stage_sum, stage_cnt, *terms] of the step in progress

    def _sums(self) -> list:
        return [self.loss, self.stage_sum, self.stage_cnt] + [self.terms[n] for n in sorted(self.terms)]

    def add_micro_batch(self, out: dict, step: int, accumulation: int, terms=()) -> None:
        """Add one micro-batch's `loss`, `stage_losses` and the named scalar `terms` of `out`."""
        for name in terms:
            if name not in self.terms:
                self.terms[name] = torch.zeros((), device=self.device)
        loss = out["loss"].detach()
        values = [loss, out["stage_losses"], (out["stage_losses"] > 0).float()] + \
            [out[name].detach().float() for name in sorted(self.terms)]
        if self.skips:
            if self.pending is None:
                self.pending = [torch.zeros_like(t) for t in self._sums()]
            for buffer, value in zip(self.pending, values):
                buffer += value / accumulation
            return
        for total, value in zip(self._sums(), values):
            total += value / accumulation
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step + 1, self.first_bad)

    def add_step(self, grad_norm, skip: Optional[torch.Tensor] = None) -> None:
        """The step's gradient norm; with `skips`, `skip` (1.0 = the step was skipped) decides whether
        its pending values count."""
        norm = grad_norm.detach().float() if torch.is_tensor(grad_norm) else grad_norm
        if self.skips and skip is not None:
            keep = skip < 0.5
            for total, value in zip(self._sums(), self.pending or []):
                total += torch.where(keep, value, torch.zeros_like(value))
            self.pending = None
            norm = torch.where(keep, norm, torch.zeros_like(norm))
            self.kept += keep.float()
        self.grad += norm
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of work between steps (checkpoints, previews, evaluation) out of the
        window's `images_per_sec`, which measures training."""
        self.start += seconds

    def first_nonfinite_step(self, accelerator) -> Optional[int]:
        never = 2**62
        bad = torch.where(self.first_bad < 0, torch.full_like(self.first_bad, never), self.first_bad)
        if accelerator.num_processes > 1:  # every rank must stop together, or the others hang
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        bad = int(bad.item())
        return None if bad == never else bad

    def read(self, accelerator, batch_size: int) -> dict:
        """Averages over the window (and the processes), then start a new window."""
        S, P = self.S, accelerator.num_processes
        names = sorted(self.terms)
        stats = torch.cat([self.loss[None], self.grad[None], self.stage_sum, self.stage_cnt]
                          + [self.terms[n][None] for n in names] + ([self.kept[None]] if self.skips else []))
        stats = (accelerator.reduce(stats, reduction="sum") if P > 1 else stats).tolist()
        elapsed = time.time() - self.start
        counted = max(stats[-1], 1e-9) if self.skips else P * self.steps  # skips: the kept steps of every rank
        values = {"loss": stats[0] / counted, "grad_norm": stats[1] / counted,
                  "images_per_sec": batch_size * self.steps / max(elapsed, 1e-9)}
        for s in range(S):
            if stats[2 + S + s] > 0 and S > 1:
                values[f"loss_stage{s}"] = stats[2 + s] / stats[2 + S + s]
        for i, name in enumerate(names):
            values[name] = stats[2 + 2 * S + i] / counted
        for t in (self.loss, self.grad, self.stage_sum, self.stage_cnt, self.kept, *self.terms.values()):
            t.zero_()
        self.steps = 0
        self.start = time.time()
        return values
