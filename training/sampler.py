"""Deterministic, resumable data order for distributed training.

Every optimizer step consumes exactly one global batch of `batch_size` distinct samples:
epoch `e` is the permutation `randperm(N, seed + e)`, cut into `N // batch_size` global
batches (the incomplete tail is dropped). The global batch of a step is split into
`gradient_accumulation_steps` micro-steps x `num_processes` ranks of `micro_batch` samples:
micro-step `a` of rank `r` takes the slice `[(a * P + r) * b, (a * P + r + 1) * b)`.

So the data position is a pure function of the step count: `position(step) =
(step // steps_per_epoch, step % steps_per_epoch)`, and a resumed run continues with exactly
the next batch. The order of a step does not depend on the number of processes (the same
global batch is split differently), which is what lets a 1-process and an N-process run see
the same data.
"""

from __future__ import annotations

from typing import Iterator

import torch


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches (lists of indices) from optimizer step `start_step` on,
    forever (the training loop decides when to stop)."""

    def __init__(self, dataset_len: int, batch_size: int, num_processes: int = 1, rank: int = 0,
                 gradient_accumulation_steps: int = 1, seed: int = 0, start_step: int = 0):
        if batch_size % (num_processes * gradient_accumulation_steps):
            raise ValueError(
                f"batch_size {batch_size} cannot be split evenly over {num_processes} processes x "
                f"{gradient_accumulation_steps} accumulation steps")
        if dataset_len < batch_size:
            raise ValueError(f"the dataset has {dataset_len} items, fewer than one global batch "
                             f"(batch_size={batch_size})")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.rank = rank
        self.accum = gradient_accumulation_steps
        self.micro_batch = batch_size // (num_processes * gradient_accumulation_steps)
        self.seed = seed
        self.start_step = start_step
        self.steps_per_epoch = dataset_len // batch_size

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_len, generator=g)

    def global_batch(self, step: int) -> torch.Tensor:
        """All `batch_size` indices of optimizer step `step` (every rank, every micro-step)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self.epoch_permutation(epoch)
        return perm[pos * self.batch_size:(pos + 1) * self.batch_size]

    def position(self, step: int) -> dict:
        epoch, pos = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": pos, "steps_per_epoch": self.steps_per_epoch,
                "dataset_len": self.dataset_len, "batch_size": self.batch_size, "seed": self.seed}

    def __iter__(self) -> Iterator[list]:
        step = self.start_step
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self.epoch_permutation(epoch)
        b, P = self.micro_batch, self.num_processes
        while True:
            if pos == self.steps_per_epoch:
                epoch, pos = epoch + 1, 0
                perm = self.epoch_permutation(epoch)
            batch = perm[pos * self.batch_size:(pos + 1) * self.batch_size]
            for a in range(self.accum):
                lo = (a * P + self.rank) * b
                yield batch[lo:lo + b].tolist()
            pos += 1

    def __len__(self) -> int:  # a DataLoader asks; the stream is effectively infinite
        return 2**62


def check_data_position(saved, now: dict, log) -> None:
    """One warning line when the checkpoint's `data_position` says the data order changed (other
    dataset size, batch size or seed), or when it is unreadable (the order is a pure function of
    (seed, step) and continues regardless)."""
    if saved is None:
        return
    if not isinstance(saved, dict):
        log.warning(f"WARNING: the checkpoint's data_position is unreadable ({type(saved).__name__}); the data "
                    "order continues from the step as usual (it depends on seed and step only)")
        return
    changed = [k for k in ("dataset_len", "batch_size", "seed") if saved.get(k) != now.get(k)]
    if changed:
        log.warning(f"WARNING: {', '.join(changed)} changed since the checkpoint; the data order differs "
                    "from the interrupted run")
