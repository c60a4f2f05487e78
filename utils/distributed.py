"""Process-group setup for torchrun jobs (generate.py, dataset_tools.py encode): WORLD_SIZE > 1
under torchrun, or a single plain process. train.py uses accelerate instead."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized: bool  # True when this module created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum_int(self, value: int) -> int:
        return sum(self.all_gather_object(int(value)))

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized = False


def setup_distributed(device: str | None = None) -> DistContext:
    """nccl with one GPU per process when CUDA is available, gloo on the CPU otherwise.

    ``device="cpu"`` forces the CPU (and gloo) on a machine with GPUs; ``None`` picks the GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    initialized = False
    if world_size > 1 and not dist.is_initialized():
        # Long timeout: ranks wait for each other only at the start and after their last image.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2),
                                **({"device_id": device} if cuda else {}))
        initialized = True
    if world_size > 1:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       initialized=initialized)
