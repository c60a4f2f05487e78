"""Metrics of the training loop, kept on the device between two log steps."""
from __future__ import annotations

import time
from typing import Optional

import torch


class MetricWindow:
    """Device-side sums of the loss terms between two log steps (no host synchronisation), and
    the first step whose loss was non-finite."""

    def __init__(self, num_stages: int, device):
        zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        self.S = num_stages
        self.loss, self.grad, self.stage_sum, self.stage_cnt = zeros(()), zeros(()), zeros(num_stages), \
            zeros(num_stages)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.terms = {}  # other scalar loss terms the objective reports (e.g. REPA's proj_loss)
        self.device = device
        self.steps = 0
        self.start = time.time()

    def add_micro_batch(self, out: dict, step: int, accumulation: int, terms=()) -> None:
        """Add one micro-batch's `loss`, `stage_losses` and the named scalar `terms` of `out`."""
        for name in terms:
            if name not in self.terms:
                self.terms[name] = torch.zeros((), device=self.device)
            self.terms[name] += out[name].detach().float() / accumulation
        loss = out["loss"].detach()
        self.loss += loss / accumulation
        self.stage_sum += out["stage_losses"] / accumulation
        self.stage_cnt += (out["stage_losses"] > 0).float() / accumulation
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step + 1, self.first_bad)

    def add_step(self, grad_norm) -> None:
        self.grad += grad_norm.detach().float() if torch.is_tensor(grad_norm) else grad_norm
        self.steps += 1

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
                          + [self.terms[n][None] for n in names])
        stats = (accelerator.reduce(stats, reduction="sum") if P > 1 else stats).tolist()
        elapsed = time.time() - self.start
        values = {"loss": stats[0] / (P * self.steps), "grad_norm": stats[1] / (P * self.steps),
                  "images_per_sec": batch_size * self.steps / max(elapsed, 1e-9)}
        for s in range(S):
            if stats[2 + S + s] > 0 and S > 1:
                values[f"loss_stage{s}"] = stats[2 + s] / stats[2 + S + s]
        for i, name in enumerate(names):
            values[name] = stats[2 + 2 * S + i] / (P * self.steps)
        for t in (self.loss, self.grad, self.stage_sum, self.stage_cnt, *self.terms.values()):
            t.zero_()
        self.steps = 0
        self.start = time.time()
        return values
