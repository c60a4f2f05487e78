"""Time grids: the single-stage grids of REPA and DFM's multistage schedule (SPEC §5)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


# a typo's bound (the schedule is one tensor of all the steps; 10**20 was a traceback from torch)
MAX_SAMPLING_STEPS = 100_000


def validate_schedule(num_steps_per_scale: Sequence[int], thresholds: Sequence[float]) -> Tuple[list, list]:
    steps = [int(n) for n in num_steps_per_scale]
    taus = [float(t) for t in thresholds]
    if not steps or any(n < 1 for n in steps):
        raise ValueError(f"num_steps_per_scale must be a non-empty list of positive integers, got {list(num_steps_per_scale)}")
    if sum(steps) > MAX_SAMPLING_STEPS:
        raise ValueError(f"num_steps_per_scale must add up to at most {MAX_SAMPLING_STEPS:,} steps, got {steps}")
    if len(taus) != len(steps) - 1:
        raise ValueError(f"thresholds must have len(num_steps_per_scale) - 1 = {len(steps) - 1} entries "
                         f"(one per stage transition), got {taus}")
    if any(not 0 < t < 1 for t in taus) or any(a <= b for a, b in zip(taus, taus[1:])):
        raise ValueError(f"thresholds must be strictly decreasing values in (0, 1), got {taus}")
    return steps, taus


def multistage_schedule(num_steps_per_scale: Sequence[int], thresholds: Sequence[float] = (),
                        final_time: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-step stage times ``(N + 1, S)`` float64 and active masks ``(N, S)`` bool.

    Chunk ``i`` has ``n_i`` steps; in it stage ``i`` moves linearly from 1 to ``end_i``
    (``end = [tau_0, ..., tau_{S-2}, final_time]``); stages ``> i`` wait at ``t = 1``, inactive.
    A stage whose own chunk is over keeps moving linearly from its threshold to ``final_time``
    over all remaining steps (so every stage's time is non-increasing for any S, and all stages
    reach ``final_time`` together). With one stage this is ``linspace(1, final_time, N + 1)``.
    """
    steps, taus = validate_schedule(num_steps_per_scale, thresholds)
    S, N = len(steps), sum(steps)
    ends = taus + [final_time]
    times = torch.ones(N + 1, S, dtype=torch.float64)
    active = torch.zeros(N, S, dtype=torch.bool)
    start = 0
    for i, n in enumerate(steps):
        # torch.linspace, so that one stage reproduces REPA's grid bit for bit
        times[start:start + n + 1, i] = torch.linspace(1, ends[i], n + 1, dtype=torch.float64)
        # after its own chunk, stage i glides from end_i to final_time over the remaining steps
        remaining = N - (start + n)
        if remaining:
            times[start + n:, i] = torch.linspace(ends[i], final_time, remaining + 1, dtype=torch.float64)
        active[start:, i] = True
        start += n
    return times, active


def sde_schedule(num_steps_per_scale: Sequence[int], thresholds: Sequence[float] = (),
                 last_noisy_time: float = 0.04) -> Tuple[torch.Tensor, torch.Tensor]:
    """Schedule for Euler–Maruyama: the multistage grid down to ``last_noisy_time`` over
    ``N - 1`` steps, then one deterministic step to 0 (for one stage: REPA's
    ``linspace(1, 0.04, N)`` followed by 0). NFE = N."""
    steps, taus = validate_schedule(num_steps_per_scale, thresholds)
    if steps[-1] < 2:
        raise ValueError("the SDE sampler needs at least 2 steps in the last stage")
    if taus and taus[-1] <= last_noisy_time:
        raise ValueError(f"thresholds must stay above the SDE's last noisy time {last_noisy_time}, got {taus}")
    times, active = multistage_schedule(steps[:-1] + [steps[-1] - 1], taus, final_time=last_noisy_time)
    times = torch.cat([times, torch.zeros(1, times.shape[1], dtype=torch.float64)])
    active = torch.cat([active, active[-1:]])
    return times, active


def default_schedule(num_stages: int) -> Tuple[list, list]:
    """``(num_steps_per_scale, thresholds)`` when a config leaves them null: ``[50]`` for one stage,
    the reference's ``[40, 10]`` with ``[0.1]`` for two (SPEC §5), ``[40] + [10] * (S - 1)`` with
    ``0.1 / 2^i`` beyond (50 + 10 (S - 2) NFE)."""
    if num_stages == 1:
        return [50], []
    if num_stages == 2:
        return [40, 10], [0.1]
    return [40] + [10] * (num_stages - 1), [0.1 / 2**i for i in range(num_stages - 1)]
