"""The device work of one training step, exactly as `training.loop` runs it.

Per micro-batch the S-stage objective and its backward pass (gradients are synchronised across
processes on the last micro-batch only); then gradient clipping, AdamW, the LR schedule, the
EMA and the device-side metrics. Nothing here reads a device value on the host (no `.item()`,
`.cpu()`, `.tolist()`, no Python branch on a tensor), so a GPU never waits for the host and
the step could be captured in a CUDA graph; tests/test_host_sync.py runs it on the meta device,
where any such read raises.
"""
from __future__ import annotations

import contextlib


class TrainStep:
    """`micro_batch(inputs, generator, step, index)` for each of the `accumulation` micro-batches,
    then `finish()`. `inputs`: a `ModelInputs` (x, y, encoder_features, model_kwargs); `metrics`:
    the loop's `MetricWindow`; `accelerator`: the run's `accelerate.Accelerator`."""

    def __init__(self, accelerator, model, objective, optimizer, lr_schedule, ema, metrics, *,
                 accumulation: int, max_grad_norm: float, logged_terms=(), guard=None, averages=()):
        """`ema`: the EMA (`training.ema.EMA`); `averages`: more weight averages updated like it
        (the post-hoc EMA profiles); `guard`: `training.nonfinite.SkipGuard` for `on_nonfinite: skip`."""
        self.accelerator, self.model, self.objective = accelerator, model, objective
        self.parameters = list(model.parameters())  # walking the module tree every step costs ~0.3 ms on a CPU
        self.optimizer, self.lr_schedule, self.ema, self.metrics = optimizer, lr_schedule, ema, metrics
        self.averages = [ema, *averages]
        self.guard = guard
        self.accumulation = int(accumulation)
        self.max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        self.logged_terms = tuple(logged_terms)

    def micro_batch(self, inputs, generator, step: int, index: int) -> dict:
        """Forward and backward of micro-batch `index` (0-based) of optimizer step `step`; returns
        the objective's output."""
        A = self.accumulation
        last = index == A - 1
        with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
            out = self.objective(self.model, inputs.x, inputs.y, generator=generator,
                                 encoder_features=inputs.encoder_features, model_kwargs=inputs.model_kwargs)
            self.accelerator.backward(out["loss"] / A)
        self.metrics.add_micro_batch(out, step, A, terms=self.logged_terms)
        return out

    def finish(self, step: int = 0) -> None:
        """Clip, AdamW, LR schedule, EMA, and the step's gradient norm into the metrics; with a guard,
        a step whose gradient norm is not finite changes nothing (decided on the device)."""
        grad_norm = self.accelerator.clip_grad_norm_(self.parameters, self.max_norm)
        skip = self.guard.decide(grad_norm, step) if self.guard is not None else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        for average in self.averages:
            average.update(skip)
        self.metrics.add_step(grad_norm, skip)
