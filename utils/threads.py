"""`cpu_threads`: torch's CPU threads per process, one rule for every entry point.

train.py, generate.py (`cpu_threads` keys), `python -m generation.budget_sweep`,
`python -m evaluation.evaluate` and `python -m evaluation.ref_stats` (`--cpu-threads`) all call
:func:`using_cpu_threads`. The rule:

* a number: exactly that many threads, whatever a launcher set (accelerate's CPU launch resets
  torch to "physical cores / processes of this machine" when OMP_NUM_THREADS is unset: one
  process per node on 2-core machines got 2 threads; train.py applies the setting again after
  accelerate starts);
* null: OMP_NUM_THREADS when it is set (the user's or the launcher's choice; torchrun sets 1
  for several processes per machine), otherwise the CPUs this process may run on divided by the
  processes on this machine (LOCAL_WORLD_SIZE), at least 1.

On a machine shared with other jobs, 1 is often much faster than the default: OpenMP threads
spin waiting for each other (generate.py on the CPU demo's checkpoint, 2 busy cores: 21.9 s
with 2 threads, 2.2 s with 1, identical images).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch


def cpu_threads_arg(text: str) -> int:
    """argparse type of `--cpu-threads`: an integer >= 1 (leave the option out for the default rule)."""
    import argparse

    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


CPU_THREADS_HELP = ("torch CPU threads (default: OMP_NUM_THREADS if set, else the usable CPUs / processes "
                    "per machine; 1 is often fastest on a busy machine)")


def default_cpu_threads() -> int:
    """The threads of `cpu_threads: null` (see the module docstring)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, cpus // processes)


def apply_cpu_threads(setting: Optional[int]) -> int:
    """Set torch's CPU threads by the rule; returns the number set."""
    threads = default_cpu_threads() if setting is None else int(setting)
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def using_cpu_threads(setting: Optional[int]):
    """`apply_cpu_threads(setting)` for the block; the previous number is restored afterwards (the
    entry points run in-process in the tests)."""
    before = torch.get_num_threads()
    try:
        yield apply_cpu_threads(setting)
    finally:
        torch.set_num_threads(before)
