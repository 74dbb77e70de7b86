"""Deterministic WebDataset tar writer that emits DALI's index file and a sha256 as it goes.

Every header field that could vary between runs (mtime, owner, mode) is fixed, so the same samples
always produce byte-identical shards: this is what lets an interrupted build be checked against an
uninterrupted one by checksum alone.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

from ..files import atomic_write

BLOCK = 512
# DALI's `wds2idx` writes this version; its lines are `ext offset size name` per component.
INDEX_VERSION = "v1.2"


def split_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) at the first dot after the last slash."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


class _HashingFile(io.RawIOBase):
    """File wrapper that hashes and counts everything written through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.pos = 0

    def writable(self):
        return True

    def write(self, b):
        self.f.write(b)
        self.sha.update(b)
        self.pos += len(b)
        return len(b)

    def tell(self):
        return self.pos


class ShardWriter:
    """Writes one tar shard and its DALI index next to it, under temporary names.

    `commit()` renames both to their final names (index first, so a complete `.tar` always has its
    `.idx`) and returns `{"count", "bytes", "sha256"}`. Components of a sample are written in the
    given order; DALI and `webdataset` both group consecutive members by key.
    """

    def __init__(self, tar_path: str, idx_path: str):
        self.tar_path, self.idx_path = tar_path, idx_path
        self._raw = open(tar_path + ".tmp", "wb")
        self._f = _HashingFile(self._raw)
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self._index_lines: list[str] = []
        self.count = 0

    @property
    def bytes_written(self) -> int:
        return self._f.pos

    def add(self, key: str, components: list[tuple[str, bytes]]):
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain dots or slashes")
        parts = []
        for ext, data in components:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors)
            data_offset = self._f.pos + len(header)
            self._tar.addfile(info, io.BytesIO(data))
            parts.append(f"{ext} {data_offset} {len(data)} {name}")
        self._index_lines.append(" ".join(parts))
        self.count += 1

    def commit(self) -> dict:
        self._tar.close()  # writes the two zero end-of-archive blocks and pads to the record size
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        text = f"{INDEX_VERSION} {self.count}\n" + "".join(line + "\n" for line in self._index_lines)
        atomic_write(self.idx_path, text, tmp=self.idx_path + ".tmp", durable=False)
        os.replace(self.tar_path + ".tmp", self.tar_path)
        return {"count": self.count, "bytes": self._f.pos, "sha256": self._f.sha.hexdigest()}

    def abort(self):
        try:
            self._tar.close()
        finally:
            self._raw.close()
            for p in (self.tar_path + ".tmp", self.idx_path + ".tmp"):
                if os.path.exists(p):
                    os.remove(p)


INDEX_VERSIONS = {"v1.1": 3, "v1.2": 4}   # fields per component: ext offset size (name, from v1.2)


def index_lines(idx_path: str) -> tuple[int, list[str]]:
    """(fields per component, one line per sample) of a DALI webdataset index, its header checked:
    a version this module knows and a sample count that matches the lines (a ValueError otherwise)."""
    with open(idx_path) as f:
        header = f.readline().split()
        lines = f.read().splitlines()
    if len(header) != 2 or header[0] not in INDEX_VERSIONS:
        raise ValueError(f"{idx_path}: not a DALI webdataset index (header {' '.join(header)!r})")
    if len(lines) != int(header[1]):
        raise ValueError(f"{idx_path}: header says {header[1]} samples, found {len(lines)}")
    return INDEX_VERSIONS[header[0]], lines


def parse_index_line(line: str, step: int, where: str) -> dict[str, tuple[int, int, str]]:
    """One sample's index line -> extension -> (offset, size, member name; "" before v1.2)."""
    fields = line.split()
    if not fields or len(fields) % step:
        raise ValueError(f"{where}: malformed index line")
    return {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3] if step == 4 else "")
            for i in range(0, len(fields), step)}


def read_index(idx_path: str) -> list[dict[str, tuple[int, int, str]]]:
    """Parse a DALI webdataset index (v1.1 or v1.2): one dict per sample, extension -> (offset, size,
    name). The one index parser: readers that need a few samples use `index_lines` and
    `parse_index_line` on the lines they want."""
    step, lines = index_lines(idx_path)
    return [parse_index_line(line, step, f"{idx_path}:{lineno}") for lineno, line in enumerate(lines, start=2)]


def index_of_tar(tar_path: str) -> list[dict[str, tuple[int, int, str]]]:
    """Compute what the index of `tar_path` must contain, by walking its headers (as wds2idx does)."""
    samples: list[dict] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = split_name(member.name)
            if not key or key.endswith("/"):
                continue
            if key != last_key:
                samples.append({})
                last_key = key
            samples[-1][ext] = (member.offset_data, member.size, member.name)
    return samples
