"""Distributed setup: torchrun's environment -> one process group; a single process works the same.

NCCL on GPUs, gloo on CPUs. Rank, world size and local rank come from torchrun (RANK, WORLD_SIZE,
LOCAL_RANK); without them the run is a world of one and no process group is created.

Every collective here must be called by every rank at the same point of the program, whatever its
terminal, logging or data: control flow that differs between ranks around a collective is a deadlock
(or, with the timeout below, a `HungRankError` after `timeout_s`).
"""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError
from .errors import SslkitError


class HungRankError(SslkitError):
    """A collective waited longer than the timeout: another rank is hung, stopped or dead."""


class Preempted(Exception):
    """Every rank agreed to stop (SIGTERM/SIGUSR1 seen by at least one of them)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        return dist.group.WORLD if self.backend else None

    @property
    def collective_device(self) -> torch.device:
        """Where tensors for collectives live: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def init(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
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
        # The default timeout is 30 minutes: a stopped rank would hold the whole job that long.
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, dev, backend, float(timeout_s))


def is_timeout(e: BaseException) -> bool:
    """True for the error a collective raises when its peers do not answer in time."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", RuntimeError)) or "timed out" in text or "timeout" in text


def barrier(info: DistInfo):
    if info.backend:
        dist.barrier()


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum over ranks (float64), one collective."""
    if not info.backend:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.collective_device)
    dist.all_reduce(t)
    return t.tolist()


def all_mean(values: list[float], info: DistInfo) -> list[float]:
    return [v / info.world_size for v in all_sum(values, info)]


def any_true(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any rank (e.g. a preemption signal seen by one rank)."""
    return all_sum([1.0 if flag else 0.0], info)[0] > 0


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank."""
    if not info.backend:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.backend:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class StopRequest:
    """SIGTERM/SIGUSR1 (preemption) seen by this process, agreed on by all ranks at safe points.

    The handler only records the signal; `check()` is a collective that raises `Preempted` on every
    rank when any rank saw one, so all ranks stop at the same step (the trainer checks at its log
    steps; long hooks such as a memory-bank pass or k-means check between their own steps)."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.signal_name: str | None = None
        self._previous: dict = {}

    def install(self):
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handler(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    def check(self):
        if any_true(self.signal_name is not None, self.info):
            raise Preempted(self.signal_name or "a signal on another rank")


def shutdown(info: DistInfo):
    if info.backend and dist.is_initialized():
        dist.destroy_process_group()
