"""Atomic, per-rank checkpoints with retention and automatic resume.

Layout under `<out>/checkpoints/`:
    step-00001234/global.pt      config, model, optimizer, scaler, step, epoch, trunk, data (rank 0)
    step-00001234/rank{R}.pt     loader position, method per-rank state, RNG, epoch statistics (every rank)
    step-00001234/COMPLETE       written by rank 0 after every rank has written its file
    step-00001234/KEEP           a periodic checkpoint (every `ckpt_every` epochs): never pruned
    latest                       the name of the newest complete checkpoint (for people and tools)

Resuming never trusts `latest` alone: every rank tries the checkpoints newest first and all ranks take
the newest one that EVERY rank can read, saying in one line which newer ones were skipped and why
(missing COMPLETE, a truncated file, ...). With checkpoint folders present but none usable, resuming
is an error: silently starting over would overwrite a run.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from .dist import DistInfo, barrier, broadcast_object, gather_objects
from .errors import SslkitError

VERSION = 2
PREFIX = "step-"


class CheckpointError(SslkitError, RuntimeError):
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


def save(out: str, step: int, global_state: dict, rank_state: dict, info: DistInfo, keep: bool, keep_last: int):
    """Collective: every rank calls it. `keep` marks a periodic checkpoint that retention never prunes;
    besides those, the newest `keep_last` checkpoints are kept."""
    root = os.path.join(out, "checkpoints")
    d = os.path.join(root, f"{PREFIX}{step:08d}")
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
        prune(root, keep_last)
    barrier(info)


def _step_dirs(root: str) -> list[str]:
    """Checkpoint folder names, newest (highest step) first."""
    try:
        names = [n for n in os.listdir(root) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    except FileNotFoundError:
        return []
    return sorted(names, key=lambda n: int(n[len(PREFIX):]), reverse=True)


def prune(root: str, keep_last: int):
    """Keep the newest `keep_last` complete checkpoints and every periodic (KEEP) one; drop the rest,
    including incomplete folders older than the newest complete checkpoint."""
    complete = [n for n in _step_dirs(root) if os.path.exists(os.path.join(root, n, "COMPLETE"))]
    if not complete:
        return
    keep = set(complete[:max(keep_last, 1)])
    newest = int(complete[0][len(PREFIX):])
    for n in _step_dirs(root):
        d = os.path.join(root, n)
        if n in keep or os.path.exists(os.path.join(d, "KEEP")):
            continue
        if os.path.exists(os.path.join(d, "COMPLETE")) or int(n[len(PREFIX):]) < newest:
            shutil.rmtree(d, ignore_errors=True)


def find_latest(out: str) -> str | None:
    """The newest checkpoint folder of run `out` that is marked complete (no file is read), or None.
    For tools (evaluation, export); the trainer resumes with `load_agreed`, which also reads them."""
    root = os.path.join(out, "checkpoints")
    for n in _step_dirs(root):
        if os.path.exists(os.path.join(root, n, "COMPLETE")):
            return os.path.join(root, n)
    return None


def global_file(path: str) -> str:
    """A run folder (its newest complete checkpoint), a checkpoint folder or a `global.pt` -> the
    `global.pt` to read; a CheckpointError naming the path otherwise."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, "global.pt")):
        return os.path.join(path, "global.pt")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        d = find_latest(path)
        if d is None:
            raise CheckpointError(f"{path}: no complete checkpoint under checkpoints/ (is the run still starting?)")
        return os.path.join(d, "global.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    raise CheckpointError(f"{path}: neither a run folder (checkpoints/), a checkpoint folder nor a global.pt")


def read_global(d: str) -> dict:
    """`global.pt` of checkpoint folder `d`, or a CheckpointError naming the file."""
    return _read(os.path.join(d, "global.pt"))


def _read(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file (truncated, not a pickle) is the same problem
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(obj, dict) or obj.get("version") != VERSION:
        version = obj.get("version") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: checkpoint version {version}, this sslkit reads {VERSION}")
    return obj


def _try_load(d: str, info: DistInfo) -> tuple[dict | None, dict | None, str | None]:
    """This rank's view of checkpoint `d`: (global, rank state, None) or (None, None, why not)."""
    if not os.path.exists(os.path.join(d, "COMPLETE")):
        return None, None, f"{d} is incomplete (no COMPLETE marker: interrupted while saving)"
    try:
        g = _read(os.path.join(d, "global.pt"))
        r = _read(os.path.join(d, f"rank{info.rank}.pt"))
    except CheckpointError as e:
        return None, None, str(e)
    if r["step"] != g["step"]:
        return None, None, f"{d}: rank{info.rank}.pt is from step {r['step']}, global.pt from step {g['step']}"
    return g, r, None


def load_agreed(out: str, info: DistInfo, log=None) -> tuple[str, dict, dict] | None:
    """Collective. The newest checkpoint every rank can read: (folder, global state, this rank's
    state); None when the run has no checkpoint folder at all (a fresh start)."""
    root = os.path.join(out, "checkpoints")
    names = broadcast_object(_step_dirs(root), info)  # rank 0's listing: every rank walks the same list
    skipped = []
    for n in names:
        d = os.path.join(root, n)
        g, r, why = _try_load(d, info)
        problems = [p for p in gather_objects(why, info) if p]
        if not problems:
            if g["world_size"] != info.world_size:
                raise CheckpointError(f"{d} was written by {g['world_size']} ranks; resume with the same world size "
                                      "(per-rank memory banks and loader positions cannot be re-split)")
            if skipped and log is not None and info.is_main:
                log.warning("resuming from %s, not from the newer %s", d, "; ".join(skipped))
            return d, g, r
        skipped.append(problems[0])
    if names:
        raise CheckpointError(f"{root} holds {len(names)} checkpoint folder(s) but none can be resumed "
                              f"(newest: {skipped[0]}); fix or move them, or use another --out")
    return None


def init_from(method, source: str, log=None):
    """Start a fresh run from another run's weights: every tensor of its model whose name and shape
    match `method`'s (the trunk at least; e.g. a student's trunk and classifier for fine-tuning)."""
    path = global_file(source)
    theirs, mine = _read(path)["model"], method.state_dict()
    taken = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    if not any(k.startswith("backbone.") for k in taken):
        raise CheckpointError(f"init_from={path}: no trunk weights of this architecture (backbone.*) in its model")
    method.load_state_dict(taken, strict=False)
    if log is not None:
        left = sorted({k.split(".")[0] for k in mine} - {k.split(".")[0] for k in taken})
        log.info("initialised %d of %d tensors from %s%s", len(taken), len(mine), path,
                 f" (kept fresh: {', '.join(left)})" if left else "")
