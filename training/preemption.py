"""Preemption: SIGTERM / SIGUSR1 / SIGINT end a training run after the current optimizer step, with a checkpoint.

SLURM (at the time limit, or ahead of it with `--signal`) and Kubernetes (pod eviction) send
SIGTERM, then SIGKILL after a grace period. `Preemption` turns the signal into a flag; the loop
polls it once per step (`requested`), and when it says stop the loop writes one checkpoint of
the finished step, logs one line (`stop_line`) and train.py exits with `PREEMPTED_EXIT_CODE`.
`resume=auto` then continues bit for bit (every draw depends on (seed, step, slot) only).

Ranks must stop at the same step, or the ones still training wait forever in the next
all-reduce. A signal may reach only some processes (Kubernetes signals one container, a user
one PID), so with several processes the flags are combined by an all-reduce (MAX) of one CPU
int64 on a gloo group (the default group on CPU runs; a side group next to NCCL on GPUs, created
once), so it never waits on the GPU stream. It is asynchronous and pipelined: the
all-reduce started at poll n is waited for at poll n + 1, by which time it has long finished
(one optimizer step later), and every rank acts on the same combined value, so all stop
after the same step, one step after the first signal. Measured on the shared 2-core CPU VM
(load ~6) with 2 gloo processes: a median 0.4-0.6 ms per poll (docs/TRAINING.md), against steps
of 5-100 ms for the tiny CPU test models (not measured on GPUs yet). One process: no collective,
it stops after the step it is in.

A second signal while the checkpoint is being written changes nothing (the flag is already
set); a SIGKILL then cannot leave half a file either, since checkpoints are written atomically.
Ctrl-C (SIGINT) stops the same way, so an interrupted run keeps its last step; a second Ctrl-C
stops at once (KeyboardInterrupt, which train.py turns into one line: the atomic write of a
checkpoint in progress removes its temporary file).
After a stop the handlers stay installed, so that a launcher's SIGTERM to the remaining workers
(torchrun sends one as soon as the first worker has exited) does not turn their exit into a kill
(Python's own shutdown still restores the default handlers at the very end); otherwise the
previous handlers are restored when the `with` block ends.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

# EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry". Distinct from 0
# (finished), 1 (error), 2 (bad config) and 143 (killed by SIGTERM before the handler was set),
# so a job script or a Kubernetes podFailurePolicy can tell "checkpointed, resume me" apart.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    """Signal handlers for the length of a `with` block, and the once-per-step stop decision.

        with Preemption() as preemption:
            preemption.connect(num_processes)      # after the process group exists
            while step < max_steps and not preemption.requested():
                ...one optimizer step...
    """

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None  # the first signal this process got
        self.stopped_by: Optional[int] = None  # the signal the ranks agreed to stop on
        self._previous: dict = {}
        self._group = None
        self._num_processes = 1
        self._pending = None  # (work, tensor) of the all-reduce started at the last poll

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pending is not None and exc_type is None:
            self._pending[0].wait()  # every rank started it: it completes
        self._pending = None
        if self.stopped_by is not None:
            # The run stopped on a signal and the process is about to exit with PREEMPTED_EXIT_CODE:
            # keep absorbing signals (torchrun SIGTERMs the other workers as soon as one exits).
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT and self.received == signal.SIGINT and self.stopped_by is None:
            raise KeyboardInterrupt  # a second Ctrl-C before the run stopped: at once

    def connect(self, num_processes: int) -> None:
        """Use the process group of a `num_processes`-process run (a collective: every rank calls it)."""
        self._num_processes = num_processes
        if num_processes > 1:
            dist = torch.distributed
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def requested(self) -> bool:
        """Whether to stop now; every rank gets the same answer at the same poll."""
        if self.stopped_by is not None:
            return True
        if self._num_processes == 1:
            self.stopped_by = self.received
            return self.stopped_by is not None
        agreed = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag.item())
        if agreed:
            self._pending = None
            self.stopped_by = agreed
            return True
        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group,
                                            async_op=True)
        self._pending = (work, flag)
        return False

    @property
    def signal_name(self) -> Optional[str]:
        """"SIGTERM" / "SIGUSR1" once the ranks agreed to stop on it, else None."""
        return None if self.stopped_by is None else signal.Signals(self.stopped_by).name

    def stop_line(self, step: int, checkpoint: Optional[str]) -> Optional[str]:
        """At the end of the loop: the run's last log line if it stopped on a signal, else None.
        Also waits for the all-reduce still in flight (before the process group goes away)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        if self.stopped_by is None:
            return None
        return (f"preempted: {self.signal_name} received, stopped after step {step} with checkpoint {checkpoint}; "
                f"continue with resume=auto (exit code {PREEMPTED_EXIT_CODE})")
