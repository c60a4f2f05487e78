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
  processes on this machine (LOCAL_WORLD_SIZE), less the CPUs other jobs keep busy right now
  (measured over 0.1 s from /proc/stat when the process starts), at least 1.

Why the load counts: OpenMP threads spin waiting for each other, and a thread that shares its
core with another job stalls all of them, so on a machine shared with other jobs more threads
are much slower, not faster (docs/PERFORMANCE.md "CPU threads": `python -m bench.threads`).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Optional

import torch


# more threads than any machine has CPUs only costs memory and start-up (a typo of 10**20 reached
# torch.set_num_threads as an OverflowError traceback)
MAX_CPU_THREADS = 1024


def cpu_threads_problem(value: Optional[int]) -> Optional[str]:
    """What is wrong with a `cpu_threads` setting (None when nothing is): the one check of every entry
    point's config and of `--cpu-threads`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be >= 1 or null, got {value}"
    if value > MAX_CPU_THREADS:
        return f"must be at most {MAX_CPU_THREADS} (or null for the default rule), got {value}"
    return None


def cpu_threads_arg(text: str) -> int:
    """argparse type of `--cpu-threads`: an integer from 1 to MAX_CPU_THREADS (leave the option out for
    the default rule)."""
    import argparse

    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    if problem := cpu_threads_problem(int(text)):
        raise argparse.ArgumentTypeError(problem)
    return int(text)


CPU_THREADS_HELP = ("torch CPU threads (default: OMP_NUM_THREADS if set, else the usable CPUs / processes "
                    "per machine less the CPUs other jobs keep busy, at least 1)")


def _cpu_times() -> Optional[tuple]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])  # steal (the hypervisor's other guests) counts as busy


def busy_cpus(window: float = 0.1) -> float:
    """How many CPUs of the machine other processes keep busy, averaged over `window` seconds while
    this process sleeps (0.0 where /proc/stat cannot be read)."""
    first = _cpu_times()
    if first is None:
        return 0.0
    time.sleep(window)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return 0.0
    return (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or 1)


def default_cpu_threads() -> int:
    """The threads of `cpu_threads: null` (see the module docstring)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    share = cpus // processes
    if share <= 1:
        return 1
    return max(1, min(share, int(cpus - busy_cpus() + 0.5) // processes))


def apply_cpu_threads(setting: Optional[int]) -> int:
    """Set torch's CPU threads by the rule; returns the number set."""
    problem = cpu_threads_problem(setting)
    if problem:  # the entry points say it in one line before they start; this is the last guard
        raise ValueError(f"cpu_threads {problem}")
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
