"""The reader stage every graph shares: manifest -> `fn.readers.webdataset` -> (jpg, index, label).

Contract with `sslkit.shard`: keys and the `index` component are 10-digit zero-padded decimal sample
indices; `cls` is zero-padded decimal too. Fixed widths let the graph parse them with two
arithmetic ops, so indices come out of DALI as int64 and are never invented by the loader.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, types

from sslkit.shard import manifest as mf

READER_NAME = "Reader"
_POW10 = (10 ** np.arange(mf.KEY_DIGITS - 1, -1, -1)).astype(np.int64)


def _placeholder_jpeg() -> np.ndarray:
    """A small mid-gray JPEG that stands in for a corrupt sample (counted and reported, see loader)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (124, 116, 104)).save(buf, format="JPEG", quality=90)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


PLACEHOLDER_JPEG = _placeholder_jpeg()


@dataclass(frozen=True)
class ShardSet:
    """A shard folder as the reader needs it, checked against its manifest."""
    directory: str
    tars: tuple[str, ...]
    indexes: tuple[str, ...]
    total: int
    classes: dict | None

    @classmethod
    def open(cls, directory: str) -> "ShardSet":
        m = mf.load(directory)  # raises ManifestError: missing/inconsistent manifest, missing files
        if m.get("part", [0, 1])[1] > 1:
            raise mf.ManifestError(f"{directory} is part {m['part'][0]}/{m['part'][1]} of a build; "
                                   "merge the parts (python -m sslkit.shard merge) before training")
        tars, idxs = mf.shard_paths(directory, m)
        for tar, idx in zip(tars, idxs):
            _check_index_header(tar, idx, m)
        return cls(os.path.abspath(directory), tuple(tars), tuple(idxs), m["total"], m["classes"])

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _check_index_header(tar: str, idx: str, m: dict):
    """Cheap start-up check that an index belongs to its tar (count and last offset within the file);
    `python -m sslkit.shard verify` does the full comparison."""
    shard = next(s for s in m["shards"] if os.path.basename(s["path"]) == os.path.basename(tar))
    with open(idx) as f:
        header = f.readline().split()
        last = None
        for line in f:
            last = line
    if len(header) != 2 or int(header[1]) != shard["count"]:
        raise mf.ManifestError(f"{idx}: index holds {header[1:] or '?'} samples but the manifest says "
                               f"{shard['count']} for {os.path.basename(tar)}; regenerate it (sslkit.shard verify)")
    if last is not None:
        fields = last.split()
        end = max(int(fields[i + 1]) + int(fields[i + 2]) for i in range(0, len(fields), 4))
        if end > shard["bytes"]:
            raise mf.ManifestError(f"{idx}: points past the end of {os.path.basename(tar)}; it does not "
                                   "belong to this tar (sslkit.shard verify)")


def parse_decimal(raw):
    """Fixed-width ASCII decimal (uint8[10]) -> int64 scalar, inside the graph."""
    digits = fn.cast(raw, dtype=types.INT64) - 48
    return fn.reductions.sum(digits * types.Constant(_POW10), axes=0)


def jpeg_is_intact(jpg):
    """Per-sample bool: starts with SOI (FF D8) and ends with EOI (FF D9). Truncated or overwritten
    files fail this; bit flips inside the entropy-coded data decode (with artefacts) and pass."""
    long_enough = fn.cast(jpg.shape()[0] >= 4, dtype=types.BOOL)
    # Indexing needs >= 4 bytes; short samples are padded first so the expression is always defined.
    padded = fn.pad(jpg, shape=[4], fill_value=0)
    soi = (padded[0] == 255) & (padded[1] == 216)
    eoi = (padded[-2] == 255) & (padded[-1] == 217)
    return long_enough & soi & eoi


def read(shards: ShardSet, *, rank: int, world_size: int, shuffle_buffer: int, want_label: bool, seed: int,
         use_mmap: bool = True):
    """Reader + index parsing + integrity check. Returns (jpg, index, label or None, intact).

    The reader has its own explicit seed, so a reader-only pipeline with the same arguments replays
    exactly the same sample order (the loader uses that to locate a sample that fails to decode)."""
    exts = ["jpg", "index"] + (["cls"] if want_label else [])
    outs = fn.readers.webdataset(
        paths=list(shards.tars), index_paths=list(shards.indexes), ext=exts,
        missing_component_behavior="error", name=READER_NAME,
        shard_id=rank, num_shards=world_size,
        # Every rank pads its slice to the same size, so all ranks run the same number of batches.
        pad_last_batch=True,
        random_shuffle=shuffle_buffer > 1, initial_fill=max(shuffle_buffer, 1), seed=seed,
        # mmap is faster on local disks; network file systems (NFS, Lustre, FUSE mounts of object
        # stores) usually prefer plain reads
        dont_use_mmap=not use_mmap,
    )
    jpg, index = outs[0], parse_decimal(outs[1])
    label = parse_decimal(outs[2]) if want_label else None
    intact = jpeg_is_intact(jpg)
    return jpg, index, label, intact


def replace_broken(jpg, intact):
    """Swap samples that fail the integrity check for the placeholder JPEG (conditionals must be on:
    only the broken samples take the `else` branch)."""
    if intact:
        out = jpg
    else:
        out = fn.constant(idata=PLACEHOLDER_JPEG.astype(np.int32).tolist(), shape=[len(PLACEHOLDER_JPEG)],
                          dtype=types.UINT8)
    return out
