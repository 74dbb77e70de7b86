"""Files written whole or not at all, the sha256 of a file, and the records of an append-only JSON-lines
file: the one copy of each, for checkpoints, manifests, index files, journals and logs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import IO, Iterator

BLOCK = 1 << 22     # bytes per read when hashing (large enough that the Python loop costs nothing)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in blocks (Python 3.10 has no hashlib.file_digest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _remove(path: str):
    try:
        os.remove(path)
    except OSError:     # cleanup on a disk that may refuse it: the original error is what matters
        pass


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", *, tmp: str | None = None, durable: bool = True) -> Iterator[IO]:
    """A file object whose contents replace `path` when the block ends without an error: written to a
    temporary file beside it, flushed (and fsync'd when `durable`), then renamed over it, so readers
    see the old file or the new one, never a partial one. On any error the temporary file is removed
    and the error re-raised. `tmp` names the temporary file (a checkpoint's `path.tmp`); by default it
    is a fresh hidden name, which can never be a file someone else wrote."""
    fd = None
    if tmp is None:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                                   suffix=os.path.basename(path))
    text = {} if "b" in mode else {"encoding": "utf-8"}
    try:
        with (open(tmp, mode, **text) if fd is None else os.fdopen(fd, mode, **text)) as f:
            if fd is not None:
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: str, data: str | bytes, *, tmp: str | None = None, durable: bool = True):
    """Write `data` (text or bytes) to `path` through `atomic_file`."""
    with atomic_file(path, "w" if isinstance(data, str) else "wb", tmp=tmp, durable=durable) as f:
        f.write(data)


def json_lines(path: str) -> Iterator[dict]:
    """The records of an append-only JSON-lines file (a journal, a log) up to the first line that does
    not parse: the torn last line a kill mid-write leaves. Nothing when the file does not exist."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return
