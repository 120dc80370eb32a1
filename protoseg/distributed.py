"""Data-parallel set-up from the ``torchrun`` environment (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: the local GPU when there is one, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from .config import ConfigError

            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"train.device=cuda but no CUDA device is available (torch {torch.__version__}, "
                              f"{build}); use train.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class DistributedContext:
    """This process's place in the run; ``group`` is None for a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: Any | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_choice: str = "auto") -> DistributedContext:
        """Join the process group described by ``torchrun``'s variables (RANK,
        WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), if any."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_choice, local_rank)
        if world_size == 1:
            return cls(device=device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device, dist.group.WORLD)

    def all_gather_object(self, value: Any) -> list:
        if self.group is None:
            return [value]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average over ranks (identity for a single process)."""
        if self.group is None:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=self.group)
        return tensor / self.world_size

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.group = None
