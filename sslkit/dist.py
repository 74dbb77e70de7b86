"""Distributed setup: torchrun's environment -> one process group; a single process works the same.

NCCL on GPUs, gloo on CPUs. Rank, world size and local rank come from torchrun (RANK, WORLD_SIZE,
LOCAL_RANK); without them the run is a world of one and no process group is created.

Every collective here must be called by every rank at the same point of the program, whatever its
terminal, logging or data: control flow that differs between ranks around a collective is a deadlock
(or, with the timeout below, an error after `timeout_s`, which `peer_failure` turns into one line naming
the rank that did not answer).

A collective that fails because another rank is hung, stopped or dead becomes one line naming the
rank and what happened (`peer_failure`); work only rank 0 does (taking the run folder's lock, writing
its files) reports its outcome to every rank through one broadcast (`on_main`), so a failure there
stops every rank with the same message instead of leaving the others waiting.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .config import ConfigError
from .errors import SslkitError


class AgreedError(SslkitError):
    """An error every rank raises together with the same message: rank 0 reports it, the others do not
    repeat it."""


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
    peers: tuple = ()           # (host, pid) of every rank, in rank order: who died, when one does

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
        peers = [None] * world
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
        return DistInfo(rank, world, local, dev, backend, float(timeout_s), tuple(peers))
    return DistInfo(rank, world, local, dev, backend, float(timeout_s), ((socket.gethostname(), os.getpid()),))


def rank_world(group=None) -> tuple[int, int]:
    """(rank in `group`, its world size), the default group when None; (0, 1) in a process without an
    initialised torch.distributed, where naming a group is a ValueError (the caller expected one)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_timeout(e: BaseException) -> bool:
    """True for the error a collective raises when its peers do not answer in time."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", RuntimeError)) or "timed out" in text or "timeout" in text


# what gloo/NCCL say when the other end of a connection is gone (the process died, its host went down)
LOST_PEER_WORDS = ("connection reset", "connection closed", "closed by peer", "broken pipe", "connection refused",
                   "remote process exited", "socket closed", "end of file", "network error")


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def dead_peers(info: DistInfo) -> list[tuple[int, int]]:
    """(rank, pid) of the other ranks on this host whose process has ended."""
    host = socket.gethostname()
    return [(r, pid) for r, (h, pid) in enumerate(info.peers) if r != info.rank and h == host and not _alive(pid)]


def peer_failure(e: BaseException, info: DistInfo) -> str | None:
    """One line for an error a collective raised because another rank is gone, hung or stopped (naming
    the dead rank when it ran on this host); None for any other error."""
    if not info.backend:
        return None
    text = str(e).strip()
    # gloo's first sentence, without its source location: "Connection closed by peer [127.0.0.1]:3504"
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(e).__name__).split(". ")[0][:160]
    if any(w in text.lower() for w in LOST_PEER_WORDS):
        dead = dead_peers(info)
        who = (", ".join(f"rank {r} (pid {pid})" for r, pid in dead) + " died" if dead
               else "another rank closed its connection: it died or its host is unreachable")
        return (f"rank {info.rank}: {who}; this rank stops too (re-run the same command to resume from the last "
                f"checkpoint) ({first})")
    if is_timeout(e):
        return (f"rank {info.rank}: a collective failed (timeout {info.timeout_s:.0f} s): another rank is hung, "
                f"stopped or died ({first})")
    return None


T = TypeVar("T")


def on_main(fn: Callable[[], T], info: DistInfo) -> T | None:
    """`fn()` on rank 0 only (None elsewhere). Collective: every rank learns through one broadcast
    whether it raised; rank 0 re-raises the error (a bug keeps its traceback there), the others raise
    an AgreedError with its message, so no rank waits in a later collective for a rank 0 that stopped."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
            error = e
    text = None
    if error is not None:
        text = str(error) if isinstance(error, SslkitError) else \
            f"rank 0 failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
    why = broadcast_object(text, info)
    if error is not None:
        raise error
    if why is not None:
        raise AgreedError(why)
    return result


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
