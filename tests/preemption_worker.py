"""A process of the 2-rank preemption test (tests/test_train_preemption.py), in a module of its own so
that the spawned processes import torch and training.preemption only."""
import os
import signal

import torch

from training.preemption import Preemption


def agreement_worker(rank, init_file, signal_rank, signal_step, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with Preemption() as preemption:
            preemption.connect(2)
            step = 0
            while step < 50:
                if preemption.requested():
                    break
                if rank == signal_rank and step == signal_step:
                    os.kill(os.getpid(), signal.SIGTERM)  # this rank only
                step += 1
            preemption.stop_line(step, None)
        results.put((rank, step, preemption.signal_name))
    finally:
        torch.distributed.destroy_process_group()
