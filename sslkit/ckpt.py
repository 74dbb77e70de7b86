"""Atomic, per-rank checkpoints with retention and automatic resume.

Layout under `<out>/checkpoints/`:
    step-00001234/global.pt      config, model, optimizer, scaler, step, epoch, method (rank 0)
    step-00001234/rank{R}.pt     loader state and method per-rank state (every rank)
    step-00001234/COMPLETE       written by rank 0 after every rank has written its file
    latest                       the name of the newest complete checkpoint (atomically replaced)
A checkpoint without COMPLETE was interrupted and is ignored; `latest` never points at one.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from .dist import DistInfo, barrier

VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here (one-line reason)."""


def _atomic_save(obj: Any, path: str):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(out: str, step: int, global_state: dict, rank_state: dict, info: DistInfo, keep: bool, keep_last_n: int):
    """Collective: every rank calls it. `keep` marks a periodic checkpoint that survives retention."""
    root = os.path.join(out, "checkpoints")
    d = os.path.join(root, f"step-{step:08d}")
    os.makedirs(d, exist_ok=True)
    _atomic_save({"version": VERSION, "step": step, **rank_state}, os.path.join(d, f"rank{info.rank}.pt"))
    if info.is_main:
        _atomic_save({"version": VERSION, "step": step, "world_size": info.world_size, **global_state},
                     os.path.join(d, "global.pt"))
    barrier(info)
    if info.is_main:
        if keep:
            _write_text(os.path.join(d, "KEEP"), "")
        _write_text(os.path.join(d, "COMPLETE"), "")
        _write_text(os.path.join(root, "latest"), os.path.basename(d))
        _prune(root, os.path.basename(d), keep_last_n)
    barrier(info)


def _prune(root: str, newest: str, keep_last_n: int):
    """Drop every checkpoint except the newest and the last `keep_last_n` periodic ones."""
    names = sorted(n for n in os.listdir(root) if n.startswith("step-"))
    periodic = [n for n in names if os.path.exists(os.path.join(root, n, "KEEP"))]
    keep = {newest} | set(periodic[-keep_last_n:] if keep_last_n > 0 else [])
    for n in names:
        if n not in keep:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def find_latest(out: str) -> str | None:
    root = os.path.join(out, "checkpoints")
    try:
        with open(os.path.join(root, "latest")) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    d = os.path.join(root, name)
    return d if os.path.exists(os.path.join(d, "COMPLETE")) else None


def load(d: str, info: DistInfo) -> tuple[dict, dict]:
    g = torch.load(os.path.join(d, "global.pt"), map_location="cpu", weights_only=False)
    if g.get("version") != VERSION:
        raise CheckpointError(f"{d}: checkpoint version {g.get('version')}, this sslkit reads {VERSION}")
    if g["world_size"] != info.world_size:
        raise CheckpointError(f"{d} was written by {g['world_size']} ranks; resume with the same world size "
                           f"(per-rank memory banks and loader positions cannot be re-split)")
    r = torch.load(os.path.join(d, f"rank{info.rank}.pt"), map_location="cpu", weights_only=False)
    if r["step"] != g["step"]:
        raise CheckpointError(f"{d}: rank {info.rank} file is from step {r['step']}, global from {g['step']}")
    return g, r
