"""Distributed setup: torchrun's environment -> one process group; single process works the same.

NCCL on GPUs, gloo on CPUs. Rank, world size and local rank come from torchrun (RANK, WORLD_SIZE,
LOCAL_RANK); without them the run is a world of one and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        return dist.group.WORLD if self.backend else None


def init(device: str = "auto") -> DistInfo:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but torch sees no CUDA device")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local, dev, backend)


def barrier(info: DistInfo):
    if info.backend:
        dist.barrier()


def any_true(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any rank (e.g. a preemption signal seen by one rank)."""
    if not info.backend:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return bool(t.item() > 0)


def all_mean(values: list[float], info: DistInfo) -> list[float]:
    if not info.backend:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def shutdown(info: DistInfo):
    if info.backend and dist.is_initialized():
        dist.destroy_process_group()
