"""The reader stage every graph shares: manifest -> `fn.readers.webdataset` -> (jpg, index, label, intact).

Contract with `sslkit.shard`: keys and the `index` component are 10-digit zero-padded decimal sample
indices; `cls` is zero-padded decimal too. Fixed widths make them dense [10] uint8 outputs that the
loader parses in torch (`parse_decimal`, one batched op), so indices are never invented by the loader
and cost no DALI operator. The JPEG check and the placeholder swap are one numba operator
(`pipelines.kernels.check_jpeg`): the whole stage is 3 operators (reader, check, header shape).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from nvidia.dali import fn

from sslkit.shard import manifest as mf

from .kernels import check_jpeg

READER_NAME = "Reader"
_POW10 = torch.tensor([10 ** k for k in range(mf.KEY_DIGITS - 1, -1, -1)], dtype=torch.int64)


@dataclass(frozen=True)
class ShardSet:
    """A shard folder as the reader needs it, checked against its manifest."""
    directory: str
    tars: tuple[str, ...]
    indexes: tuple[str, ...]
    total: int
    classes: dict | None
    identity: str            # sslkit.shard.manifest.identity: the same dataset wherever it lies

    @classmethod
    def open(cls, directory: str) -> "ShardSet":
        m = mf.load(directory)  # raises ManifestError: missing/inconsistent manifest, missing files
        if m.get("part", [0, 1])[1] > 1:
            raise mf.ManifestError(f"{directory} is part {m['part'][0]}/{m['part'][1]} of a build; "
                                   "merge the parts (python -m sslkit.shard merge) before training")
        tars, idxs = mf.shard_paths(directory, m)
        for tar, idx in zip(tars, idxs):
            _check_index_header(tar, idx, m)
        return cls(os.path.abspath(directory), tuple(tars), tuple(idxs), m["total"], m["classes"], mf.identity(m))

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None


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


def parse_decimal(raw: torch.Tensor) -> torch.Tensor:
    """Fixed-width ASCII decimals [B, 10] uint8 -> int64 [B] (a torch op on the whole batch)."""
    return ((raw.to(torch.int64) - 48) * _POW10.to(raw.device)).sum(-1)


def read(shards: ShardSet, *, rank: int, world_size: int, shuffle_buffer: int, want_label: bool, seed: int,
         use_mmap: bool = True):
    """Reader + JPEG check. Returns (jpg, index, label or None, intact): jpg with the placeholder JPEG
    in place of every sample that fails the check (`pipelines.kernels.jpeg_ok`), index / label the raw
    10-byte ASCII fields (`parse_decimal`), intact [1] uint8 (0: replaced)."""
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
    jpg, intact = check_jpeg(outs[0])
    return jpg, outs[1], outs[2] if want_label else None, intact
