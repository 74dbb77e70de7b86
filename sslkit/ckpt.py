"""Atomic, checksummed, per-rank checkpoints with retention and automatic resume.

Layout under `<out>/checkpoints/`:
    step-00001234/global.pt      config, model, optimizer, scaler, step, epoch, trunk, data (rank 0)
    step-00001234/rank{R}.pt     loader position, method per-rank state, RNG, epoch statistics (every rank)
    step-00001234/COMPLETE       written last, by rank 0, once every rank has written its file: the size
                                 and sha256 of every file above (JSON), checked whenever one is loaded
    step-00001234/KEEP           a periodic checkpoint (every `ckpt_every` epochs): never pruned
    latest                       the name of the newest complete checkpoint (for people and tools)

Resuming never trusts `latest` alone: every rank tries the checkpoints newest first and all ranks take
the newest one that EVERY rank can read and verify, saying in one line which newer ones were skipped and
why (missing COMPLETE, a truncated file, a sha256 that differs from the one recorded, ...). With
checkpoint folders present but none usable, resuming is an error: silently starting over would
overwrite a run. Tools reading a run (`global_file`: eval, convert, pseudolabel, init_from) fall back the
same way. Checkpoints written before checksums existed (an empty COMPLETE) are checked with the CRC-32
that torch's zip format stores for every member (it catches truncation and flipped bytes) and loaded
with a one-line note.

A checkpoint that cannot be written (full disk, read-only folder, ...) stops every rank with the same
one line naming the file; the files of the failed checkpoint and every `.tmp` are removed, and the
previous complete checkpoint is untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from typing import Any, Callable

import torch

from .dist import AgreedError, DistInfo, broadcast_object, gather_objects
from .errors import SslkitError
from .files import atomic_file, atomic_write, sha256_file
from .runlock import os_reason

VERSION = 2
PREFIX = "step-"
COMPLETE = "COMPLETE"


class CheckpointError(SslkitError, RuntimeError):
    """A checkpoint that cannot be resumed here (one-line reason)."""


def write_error(e: BaseException, path: str) -> str:
    """One line naming the file and what went wrong while writing it."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"cannot write {e.filename or path}: {os_reason(e)}"
    first = (str(e).splitlines() or [""])[0][:160]
    return f"cannot write {path}: {type(e).__name__}: {first}"


class _HashingWriter:
    """What torch.save writes, passed on to a file while its size and sha256 are taken."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _remove(path: str):
    """Remove a file if it is there; never raises (cleanup on a disk that may refuse it)."""
    try:
        os.remove(path)
    except OSError:
        pass


def _atomic_save(obj: Any, path: str) -> dict:
    """torch.save via `path.tmp`, fsync, rename (sslkit.files): {"bytes", "sha256"} of the file, taken
    while it is written. Any failure removes the .tmp and re-raises (through a Python file object, a
    full disk is an OSError with its errno, not torch's `basic_ios::clear`)."""
    with atomic_file(path, "wb", tmp=path + ".tmp") as f:
        w = _HashingWriter(f)
        torch.save(obj, w)
    return {"bytes": w.bytes, "sha256": w.sha.hexdigest()}


def _write_text(path: str, text: str):
    """KEEP, COMPLETE, `latest`: through `path.tmp` too, the one temporary name a checkpoint uses."""
    atomic_write(path, text, tmp=path + ".tmp")


def save(out: str, step: int, global_state: dict, rank_state: dict, info: DistInfo, keep: bool, keep_last: int):
    """Collective: every rank calls it. `keep` marks a periodic checkpoint that retention never prunes;
    besides those, the newest `keep_last` checkpoints are kept. Every rank learns every rank's outcome
    (one gather, one broadcast), so a failure anywhere is the same CheckpointError on every rank."""
    root = os.path.join(out, "checkpoints")
    d = os.path.join(root, f"{PREFIX}{step:08d}")
    files = {f"rank{info.rank}.pt": {"version": VERSION, "step": step, **rank_state}}
    if info.is_main:
        files["global.pt"] = {"version": VERSION, "step": step, "world_size": info.world_size, **global_state}
    written, why, current = {}, None, d
    try:
        os.makedirs(d, exist_ok=True)
        if info.is_main:
            _remove(os.path.join(d, COMPLETE))  # rewriting a step: its old list no longer describes it
        for name, obj in files.items():
            current = os.path.join(d, name)
            written[name] = _atomic_save(obj, current)
    except Exception as e:  # noqa: BLE001 - whatever it is, every rank must reach the gather below
        why = write_error(e, current)
    outcomes = gather_objects((written, why), info)  # also the barrier: every rank's file is on disk
    problems = [w for _, w in outcomes if w]
    if not problems:
        why = None
        if info.is_main:
            why = _complete(root, d, {n: s for w, _ in outcomes for n, s in w.items()}, keep, keep_last)
        why = broadcast_object(why, info)
        problems = [why] if why else []
    if problems:
        last = _discard(root, d, written, info)
        msg = (f"{problems[0]}; the step-{step} checkpoint was not saved (the last complete one, "
               f"{last or 'none yet'}, is intact)")
        raise CheckpointError(msg) if info.is_main else AgreedError(msg)


def _discard(root: str, d: str, written: dict, info: DistInfo) -> str | None:
    """After a failed save: this rank's files of it go (rank 0: KEEP, the folder if empty, and `latest`
    back to the newest complete checkpoint, which it returns). Nothing here raises: on a full or
    read-only disk the cleanup may fail too, and the one-line error must still be raised."""
    for name in written:
        _remove(os.path.join(d, name))
    last = find_latest(os.path.dirname(root))
    if info.is_main:
        _remove(os.path.join(d, "KEEP"))
        try:
            os.rmdir(d)  # only if empty: another rank may still be removing its file
        except OSError:
            pass
        try:
            if last:     # `latest` may name the step just rewritten
                _write_text(os.path.join(root, "latest"), os.path.basename(last))
        except OSError:
            pass
    return last


def _complete(root: str, d: str, sums: dict, keep: bool, keep_last: int) -> str | None:
    """Rank 0, once every rank's file is written: KEEP, then COMPLETE with every file's checksum,
    `latest`, retention. The reason it failed, or None."""
    path = os.path.join(d, "KEEP")
    try:
        if keep:
            _write_text(path, "")
        path = os.path.join(d, COMPLETE)
        _write_text(path, json.dumps({"files": sums}, indent=1, sort_keys=True) + "\n")
        path = os.path.join(root, "latest")
        _write_text(path, os.path.basename(d))
    except Exception as e:  # noqa: BLE001
        return write_error(e, path)
    prune(root, keep_last)
    return None


def _step_dirs(root: str) -> list[str]:
    """Checkpoint folder names, newest (highest step) first."""
    try:
        names = [n for n in os.listdir(root) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(names, key=lambda n: int(n[len(PREFIX):]), reverse=True)


def prune(root: str, keep_last: int):
    """Keep the newest `keep_last` complete checkpoints and every periodic (KEEP) one; drop the rest,
    including incomplete folders older than the newest complete checkpoint."""
    complete = [n for n in _step_dirs(root) if os.path.exists(os.path.join(root, n, COMPLETE))]
    if not complete:
        return
    keep = set(complete[:max(keep_last, 1)])
    newest = int(complete[0][len(PREFIX):])
    for n in _step_dirs(root):
        d = os.path.join(root, n)
        if n in keep or os.path.exists(os.path.join(d, "KEEP")):
            continue
        if os.path.exists(os.path.join(d, COMPLETE)) or int(n[len(PREFIX):]) < newest:
            shutil.rmtree(d, ignore_errors=True)


def find_latest(out: str) -> str | None:
    """The newest checkpoint folder of run `out` that is marked complete (no file is read), or None.
    For messages; tools read a run with `global_file`, the trainer with `load_agreed` (both verify)."""
    root = os.path.join(out, "checkpoints")
    for n in _step_dirs(root):
        if os.path.exists(os.path.join(root, n, COMPLETE)):
            return os.path.join(root, n)
    return None


# -- verification ------------------------------------------------------------------------------------

def checksums(d: str) -> dict | None:
    """{file name: {"bytes", "sha256"}} from checkpoint folder `d`'s COMPLETE; None for a checkpoint
    written before checksums existed (an empty COMPLETE). A CheckpointError when COMPLETE is missing
    or damaged."""
    path = os.path.join(d, COMPLETE)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{d} is incomplete (no {COMPLETE} marker: interrupted while saving)") from None
    if not text.strip():
        return None
    try:
        files = json.loads(text)["files"]
        if not all(isinstance(v["bytes"], int) and isinstance(v["sha256"], str) for v in files.values()):
            raise TypeError("an entry without bytes/sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged checksum list ({type(e).__name__}: {str(e)[:80]})") from None
    return files


def verify_file(path: str, sums: dict | None):
    """CheckpointError unless `path` has the size and sha256 recorded in `sums` (its folder's COMPLETE);
    without a list (an older checkpoint) the CRC-32 of every member of torch's zip format is checked."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing")
    size = os.path.getsize(path)
    if sums is None:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:80]})") from None
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt (member {bad} fails its CRC-32)")
        return
    want = sums.get(os.path.basename(path))
    if want is None:
        raise CheckpointError(f"{path}: not listed in its {COMPLETE} (written by another checkpoint?)")
    if size != want["bytes"]:
        what = "truncated" if size < want["bytes"] else "grown"
        raise CheckpointError(f"{path}: unreadable ({what}: {size} bytes, {want['bytes']} when written)")
    if sha256_file(path) != want["sha256"]:
        raise CheckpointError(f"{path}: corrupt (its sha256 differs from the one recorded when it was written)")


def _read(path: str, sums: dict | None = None, verify: bool = False) -> dict:
    """A checkpoint file, verified first when `verify` (against `sums`, see verify_file)."""
    if verify:
        verify_file(path, sums)
    elif not os.path.exists(path):
        raise CheckpointError(f"{path}: missing")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file (truncated, not a pickle) is the same problem
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(obj, dict) or obj.get("version") != VERSION:
        version = obj.get("version") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: checkpoint version {version}, this sslkit reads {VERSION}")
    return obj


def _unverified_note(d: str) -> str:
    return (f"{d} has no checksum list (written before sslkit recorded them): checked with the zip format's "
            "CRC-32s only")


def _default_warn(msg: str):
    logging.getLogger("sslkit").warning("%s", msg)


def verified_global(path: str, warn: Callable[[str], None] | None = None) -> str:
    """`path` (a global.pt) after checking it against the checksums of its checkpoint folder; a file
    outside a checkpoint folder (no COMPLETE beside it) is returned as it is."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(os.path.join(d, COMPLETE)):
        return path
    sums = checksums(d)
    verify_file(path, sums)
    if sums is None:
        (warn or _default_warn)(_unverified_note(d))
    return path


def global_file(path: str, warn: Callable[[str], None] | None = None) -> str:
    """A run folder (its newest complete checkpoint whose global.pt verifies), a checkpoint folder or
    a `global.pt` -> the verified `global.pt` to read; a CheckpointError naming the path otherwise.
    In a run folder, newer checkpoints that fail verification are skipped with one line through `warn`
    (default: the "sslkit" logger), as the trainer's resume does."""
    if os.path.isfile(path):
        return verified_global(path, warn)
    if os.path.isfile(os.path.join(path, "global.pt")):
        return verified_global(os.path.join(path, "global.pt"), warn)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        root, skipped = os.path.join(path, "checkpoints"), []
        for n in _step_dirs(root):
            d = os.path.join(root, n)
            if not os.path.exists(os.path.join(d, COMPLETE)):
                continue  # being written (or interrupted): never a candidate, as for find_latest
            try:
                notes = []
                file = verified_global(os.path.join(d, "global.pt"), notes.append)
            except CheckpointError as e:
                skipped.append(str(e))
                continue
            if skipped:
                (warn or _default_warn)(f"using {d}, not the newer {'; '.join(skipped)}")
            for note in notes:
                (warn or _default_warn)(note)
            return file
        if skipped:
            raise CheckpointError(f"{root}: no usable complete checkpoint (newest: {skipped[0]})")
        raise CheckpointError(f"{path}: no complete checkpoint under checkpoints/ (is the run still starting?)")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    raise CheckpointError(f"{path}: neither a run folder (checkpoints/), a checkpoint folder nor a global.pt")


def read_global(d: str, warn: Callable[[str], None] | None = None) -> dict:
    """`global.pt` of checkpoint folder `d`, verified, or a CheckpointError naming the file."""
    return _read(verified_global(os.path.join(d, "global.pt"), warn))


def _try_load(d: str, info: DistInfo) -> tuple[dict | None, dict | None, str | None, bool]:
    """This rank's view of checkpoint `d`: (global, rank state, None, verified by sha256) or
    (None, None, why not, False). Written by another world size, the rank state is that of old rank
    `rank % old world size` (its loader position, statistics and RNG; `rank_states` reads every old
    rank's method state), and every old rank's file must be there."""
    try:
        sums = checksums(d)
        g = _read(os.path.join(d, "global.pt"), sums, verify=True)
        old_world = g["world_size"]
        for q in range(old_world):
            if not os.path.exists(os.path.join(d, f"rank{q}.pt")):
                raise CheckpointError(f"{os.path.join(d, f'rank{q}.pt')}: missing (one of the {old_world} ranks' "
                                      "files; a resume needs them all)")
        r = _read(os.path.join(d, f"rank{info.rank % old_world}.pt"), sums, verify=True)
    except CheckpointError as e:
        return None, None, str(e), False
    if r["step"] != g["step"]:
        return None, None, f"{d}: rank{info.rank % old_world}.pt is from step {r['step']}, global.pt from step {g['step']}", False
    return g, r, None, sums is not None


def rank_states(d: str, world_size: int):
    """Every rank file of checkpoint `d` (written by `world_size` ranks), in rank order, each verified
    and read only when asked for: what a method re-splits its per-rank state from on another world size."""
    sums = checksums(d)
    for q in range(world_size):
        yield _read(os.path.join(d, f"rank{q}.pt"), sums, verify=True)


def load_agreed(out: str, info: DistInfo, log=None) -> tuple[str, dict, dict] | None:
    """Collective. The newest checkpoint every rank can read and verify: (folder, global state, this
    rank's state -- see `_try_load` for a checkpoint of another world size); None when the run has no
    checkpoint folder at all (a fresh start)."""
    root = os.path.join(out, "checkpoints")
    names = broadcast_object(_step_dirs(root), info)  # rank 0's listing: every rank walks the same list
    skipped = []
    for n in names:
        d = os.path.join(root, n)
        g, r, why, verified = _try_load(d, info)
        problems = [p for p in gather_objects(why, info) if p]
        if not problems:
            if log is not None and info.is_main:
                if skipped:
                    log.warning("resuming from %s, not from the newer %s", d, "; ".join(skipped))
                if not verified:
                    log.warning("%s", _unverified_note(d))
            return d, g, r
        skipped.append(problems[0])
    if names:
        raise CheckpointError(f"{root} holds {len(names)} checkpoint folder(s) but none can be resumed "
                              f"(newest: {skipped[0]}); fix or move them, or use another --out")
    return None


def unwrap_state_dict(obj, path: str) -> dict:
    """The tensors of the checkpoint shapes found online: a bare state dict, `{"state_dict": ...}` or
    `{"model": ...}` (with other entries beside, e.g. an epoch), keys with DDP's `module.` prefix."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (nor one under 'state_dict' or 'model')")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj
