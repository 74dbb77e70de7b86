"""The manifest: the contract between a shard folder and everything that reads it.

`manifest.json` lists every shard with its sample count, size and sha256, the classes, and the
options that built it. Readers start from it, never from a glob, and `load()` refuses a manifest
that is missing, malformed or inconsistent with the files beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from ..errors import SslkitError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTED = "rejected.tsv"
KEY_DIGITS = 10          # keys and the `index` component are the zero-padded sample index
CLS_DIGITS = 10          # `cls` is zero-padded too, so DALI sees a fixed-size field


class ManifestError(SslkitError, ValueError):
    """The shard folder cannot be read as described (one-line reason)."""


def key_for(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def atomic_write(path: str, text: str):
    """Write `text` to `path` so that readers see the old file or the new one, never a partial one."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write(directory: str, manifest: dict):
    atomic_write(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1, sort_keys=False) + "\n")


def load(directory: str, check_files: bool = True) -> dict:
    """Load and sanity-check `directory/manifest.json`; with `check_files`, also that each shard and
    index file exists with the recorded size (cheap: no hashing, see `verify` for that)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ManifestError(f"{directory}: no such shard folder")
    if not os.path.exists(path):
        hint = " (a build is in progress or was interrupted: re-run it)" if os.path.isdir(
            os.path.join(directory, ".build")) else ""
        raise ManifestError(f"{path}: missing{hint}; build shards with `python -m sslkit.shard build`")
    try:
        with open(path) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    for field in ("format_version", "total", "shards", "classes", "rejected"):
        if field not in m:
            raise ManifestError(f"{path}: missing field {field!r}")
    if m["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {m['format_version']} (this sslkit reads {FORMAT_VERSION})")
    total = sum(s["count"] for s in m["shards"])
    if total != m["total"]:
        raise ManifestError(f"{path}: shards hold {total} samples but total says {m['total']}")
    first = 0
    for s in m["shards"]:
        if s.get("first_index") != first:
            raise ManifestError(f"{path}: shard {s['path']} starts at index {s.get('first_index')}, expected {first}")
        first += s["count"]
    if check_files:
        for s in m["shards"]:
            tar = os.path.join(directory, s["path"])
            if not os.path.exists(tar):
                raise ManifestError(f"{tar}: listed in the manifest but missing")
            if os.path.getsize(tar) != s["bytes"]:
                raise ManifestError(f"{tar}: {os.path.getsize(tar)} bytes, manifest says {s['bytes']}")
            idx = os.path.join(directory, s["index"])
            if not os.path.exists(idx):
                raise ManifestError(f"{idx}: DALI index file missing (rebuild, or run wds2idx)")
    return m


def shard_paths(directory: str, m: dict) -> tuple[list[str], list[str]]:
    """Absolute tar and index paths of a loaded manifest, in order."""
    tars = [os.path.join(os.path.abspath(directory), s["path"]) for s in m["shards"]]
    idxs = [os.path.join(os.path.abspath(directory), s["index"]) for s in m["shards"]]
    return tars, idxs


def identity(m: dict) -> str:
    """What makes two shard folders the same dataset, whatever their path: the shards' checksums and
    counts, and the classes. A run resumes on moved or copied shards when this matches."""
    blob = json.dumps({"total": m["total"], "classes": m.get("classes"),
                       "shards": [[s["sha256"], s["count"]] for s in m["shards"]]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
