"""What a training step does when its gradients are not finite: `on_nonfinite: stop | skip`.

`stop` (the default, and the behaviour before this key existed): the run stops at the next log
step with one line, and no checkpoint is written after the bad step.

`skip`: a step whose gradient norm (after the all-reduce, so every rank sees the same number) is
NaN or inf changes nothing: no weight, no optimizer moment or step count, no EMA. The decision
stays on the device, as AMP's loss scaler does it: the flag goes to the fused AdamW as its
`found_inf` (the kernel leaves parameters, moments and step counts alone) and weights the EMA
updates by `1 - flag`; nothing is read on the host in the step. Skipped steps are counted (in
the logged metrics, `skipped_steps`, and in the checkpoint); `max_skipped_steps` skipped in a
row stop the run with the `stop` line (checked at the log steps, where the host reads metrics
anyway), and so does a run that skipped every one of its steps, fewer than `max_skipped_steps`
(checked before its last checkpoint: it trained nothing, so it writes none and is not "done").
A skipped step still advances the step counter, the LR schedule and the data: the run goes on
with the next batch, and resume stays exact.
"""
from __future__ import annotations

from typing import Optional

import torch

from training.errors import ConfigError

POLICIES = ("stop", "skip")


def check_nonfinite_keys(cfg) -> None:
    """`on_nonfinite` and `max_skipped_steps` of a training config (ConfigError naming the key)."""
    if cfg.on_nonfinite not in POLICIES:
        raise ConfigError(f"on_nonfinite must be one of {list(POLICIES)}, got {cfg.on_nonfinite!r}")
    if isinstance(cfg.max_skipped_steps, bool) or not isinstance(cfg.max_skipped_steps, int) \
            or cfg.max_skipped_steps < 1:
        raise ConfigError(f"max_skipped_steps must be an integer >= 1, got {cfg.max_skipped_steps!r}")


class SkipGuard:
    """`on_nonfinite: skip`: per step, `decide(grad_norm)` sets the optimizer's `found_inf` and returns
    the device flag (1.0 = skip this step); counts on the device; `check()` at log steps."""

    def __init__(self, optimizer, max_in_a_row: int, device):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the AdamW
        self.max_in_a_row = int(max_in_a_row)
        zeros = lambda: torch.zeros((), dtype=torch.long, device=device)  # noqa: E731
        self.total, self.in_a_row, self.worst, self.first_of_worst = zeros(), zeros(), zeros(), zeros()
        self.skipped_here, self.decided_here, self.first_step = zeros(), 0, None  # this session's steps

    def decide(self, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """The skip flag (0-dim float, 1.0 = skip) of optimizer step `step` (0-based) from its norm."""
        bad = ~torch.isfinite(grad_norm.detach())
        flag = bad.to(torch.float32)
        self.optimizer.found_inf = flag
        self.total += bad.long()
        self.skipped_here += bad.long()
        self.decided_here += 1
        self.first_step = step + 1 if self.first_step is None else self.first_step
        self.in_a_row = torch.where(bad, self.in_a_row + 1, torch.zeros_like(self.in_a_row))
        longer = self.in_a_row > self.worst
        self.first_of_worst = torch.where(longer, step + 2 - self.in_a_row, self.first_of_worst)
        self.worst = torch.maximum(self.worst, self.in_a_row)
        return flag

    def too_many(self) -> Optional[int]:
        """The (1-based) step at which the longest run of skipped steps began, when it reached
        `max_skipped_steps`; None otherwise (one host read)."""
        worst, first = (int(v) for v in torch.stack([self.worst, self.first_of_worst]).tolist())
        return first if worst >= self.max_in_a_row else None

    def failure(self, at_end: bool = False) -> Optional[str]:
        """Why the run must stop ("stayed non-finite ... at step 7"), or None: `max_skipped_steps`
        skipped in a row, or (`at_end`: before the run's last checkpoint) every step of this
        session skipped, which trained nothing."""
        first = self.too_many()
        if first is not None:
            return f"stayed non-finite (NaN/inf) for {self.max_in_a_row} steps in a row (skipped) at step {first}"
        if at_end and self.decided_here and int(self.skipped_here) == self.decided_here:
            last = self.first_step + self.decided_here - 1
            return (f"was non-finite (NaN/inf) at every step of this run, steps {self.first_step}-{last} (all "
                    f"{self.decided_here} skipped, fewer than max_skipped_steps={self.max_in_a_row} in a row): "
                    "nothing was trained")
        return None

    def skipped(self) -> int:
        return int(self.total)

    def state_dict(self) -> dict:
        return {"skipped_steps": int(self.total), "skipped_in_a_row": int(self.in_a_row)}

    @staticmethod
    def check_state(state) -> None:
        """ValueError naming the field unless `state` (a checkpoint's `nonfinite` entry; None when
        absent) holds non-negative integer counters, the run in a row no longer than the total."""
        if state is None:
            return
        if not isinstance(state, dict):
            raise ValueError(f"its 'nonfinite' entry is a {type(state).__name__}, not a mapping of skipped-step "
                             "counters")
        for key in ("skipped_steps", "skipped_in_a_row"):
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"its nonfinite.{key} is {value!r}, not a non-negative integer count of skipped steps")
        if state.get("skipped_in_a_row", 0) > state.get("skipped_steps", 0):
            raise ValueError(f"its nonfinite.skipped_in_a_row ({state['skipped_in_a_row']}) exceeds "
                             f"nonfinite.skipped_steps ({state.get('skipped_steps', 0)})")

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.check_state(state)
        state = state if isinstance(state, dict) else {}
        self.total.fill_(int(state.get("skipped_steps", 0)))
        self.in_a_row.fill_(int(state.get("skipped_in_a_row", 0)))
