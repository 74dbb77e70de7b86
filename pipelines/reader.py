"""The reader stage every graph shares: manifest -> `fn.readers.webdataset` -> (jpg, index, label, intact).

Contract with `sslkit.shard build`: keys and the `index` component are 10-digit zero-padded decimal
sample indices; `cls` is zero-padded decimal too. Fixed widths make them dense [10] uint8 outputs that
the loader parses in torch (`parse_decimal`, one batched op), so indices are never invented by the
loader and cost no DALI operator. The image check and the placeholder swap are one numba operator
(`pipelines.kernels.check_jpeg`): the whole stage is 3 operators (reader, check, header shape).

Adopted folders (`sslkit.shard index`) have no such members: the same stage adds one CPU operator,
DALI's source info of the image (tar path and offset), which `ShardSet.locate` maps to the index
through the manifest's offsets table (4 operators).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn

from sslkit.shard import manifest as mf

from .kernels import check_jpeg

READER_NAME = "Reader"
_POW10 = torch.tensor([10 ** k for k in range(mf.KEY_DIGITS - 1, -1, -1)], dtype=torch.int64)


@dataclass(frozen=True)
class ShardSet:
    """A shard folder as the reader needs it, checked against its manifest.

    Built folders carry each sample's index and class id as tar members (`index`, `cls`). Adopted
    folders (`sslkit.shard index`: tars written by other tools, never rewritten) carry them beside the
    tars: the reader hands over DALI's source info (tar path and image offset) and `locate` turns it into
    the sample index through `offsets.npy`; `label_table` (`labels.npy`) gives the class ids."""
    directory: str
    tars: tuple[str, ...]
    indexes: tuple[str, ...]
    total: int
    classes: dict | None
    identity: str            # sslkit.shard.manifest.identity: the same dataset wherever it lies
    image_component: str = "jpg"
    first_index: tuple[int, ...] = ()
    offsets: np.ndarray | None = None       # adopted: int64 [total], memory-mapped
    label_table: np.ndarray | None = None   # adopted and labelled: int32 [total], memory-mapped

    @classmethod
    def open(cls, directory: str) -> "ShardSet":
        m = mf.load(directory)  # raises ManifestError: missing/inconsistent manifest, missing files
        if m.get("part", [0, 1])[1] > 1:
            raise mf.ManifestError(f"{directory} is part {m['part'][0]}/{m['part'][1]} of a build; "
                                   "merge the parts (python -m sslkit.shard merge) before training")
        tars, idxs = mf.shard_paths(directory, m)
        for shard, tar, idx in zip(m["shards"], tars, idxs):
            _check_index_header(shard, tar, idx)
        extra = {}
        if mf.is_adopted(m):
            extra = dict(image_component=m["components"][0], offsets=_table(directory, m["offsets"], m["total"]),
                         label_table=_table(directory, m["labels"]["file"], m["total"]) if m.get("labels") else None)
        return cls(os.path.abspath(directory), tuple(tars), tuple(idxs), m["total"], m["classes"], mf.identity(m),
                   first_index=tuple(s["first_index"] for s in m["shards"]), **extra)

    @property
    def adopted(self) -> bool:
        return self.offsets is not None

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    def sample_name(self, index: int) -> str:
        """`<tar>:<image member>` of sample `index`, for messages (reads one line of one index file)."""
        k = int(np.searchsorted(np.asarray(self.first_index), index, side="right")) - 1
        with open(self.indexes[k]) as f:
            for j, line in enumerate(f):
                if j == index - self.first_index[k] + 1:
                    fields = line.split()
                    names = {fields[i]: fields[i + 3] for i in range(0, len(fields) - 3, 4)}
                    return f"{self.tars[k]}:{names.get(self.image_component, '?')}"
        return f"{self.tars[k]}:sample {index}"

    def locate(self, sources: list[bytes]) -> np.ndarray:
        """Sample indices of DALI source infos (`<tar>:<offset of the image>:<member name>`)."""
        by_path = self.__dict__.get("_by_path")
        if by_path is None:
            by_path = {t.encode(): k for k, t in enumerate(self.tars)}
            object.__setattr__(self, "_by_path", by_path)
        out = np.empty(len(sources), np.int64)
        for i, src in enumerate(sources):
            k, offset = _split_source(src, by_path)
            if k is None:
                raise mf.ManifestError(f"{self.directory}: DALI read a sample this manifest does not list "
                                       f"({src[:200]!r}); re-run `python -m sslkit.shard index`")
            lo = self.first_index[k]
            hi = self.first_index[k + 1] if k + 1 < len(self.first_index) else self.total
            pos = lo + int(np.searchsorted(self.offsets[lo:hi], offset))
            if pos >= hi or self.offsets[pos] != offset:
                raise mf.ManifestError(f"{self.tars[k]}: no indexed sample at byte {offset}; the index "
                                       "does not belong to this tar (python -m sslkit.shard verify)")
            out[i] = pos
        return out


def _split_source(src: bytes, by_path: dict) -> tuple[int | None, int]:
    """(shard number, offset) of `<path>:<offset>:<name>`; tried at each ':' so paths may hold ':' too."""
    colon = src.find(b":")
    while colon >= 0:
        k = by_path.get(src[:colon])
        end = src.find(b":", colon + 1)
        if k is not None and end > colon + 1 and src[colon + 1:end].isdigit():
            return k, int(src[colon + 1:end])
        colon = src.find(b":", colon + 1)
    return None, 0


def _table(directory: str, name: str, total: int) -> np.ndarray:
    path = os.path.join(directory, name)
    try:
        table = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise mf.ManifestError(f"{path}: not a readable table ({e})") from None
    if table.shape != (total,):
        raise mf.ManifestError(f"{path}: holds {table.shape} entries, the manifest says {total} samples")
    return table


def _check_index_header(shard: dict, tar: str, idx: str):
    """Cheap start-up check that an index belongs to its tar (count and last offset within the file);
    `python -m sslkit.shard verify` does the full comparison."""
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
         use_mmap: bool = True, extra_keys: tuple[str, ...] = ()):
    """Reader + image check. Returns (jpg, index, label or None, intact, extras): jpg with the placeholder
    JPEG in place of every sample that fails the check (`pipelines.kernels.image_ok`); index / label the
    raw 10-byte ASCII fields (`parse_decimal`) of a built folder, or for an adopted one index the DALI
    source info (`ShardSet.locate`) and label None (the loader reads `ShardSet.label_table`); intact [1]
    uint8 (0: replaced); extras the raw bytes of each `extra_keys` member (empty where a sample has none)."""
    member_fields = [] if shards.adopted else ["index"] + (["cls"] if want_label else [])
    exts = [shards.image_component] + member_fields + list(extra_keys)
    outs = fn.readers.webdataset(
        paths=list(shards.tars), index_paths=list(shards.indexes), ext=exts,
        missing_component_behavior="empty" if extra_keys else "error", name=READER_NAME,
        shard_id=rank, num_shards=world_size,
        # Every rank pads its slice to the same size, so all ranks run the same number of batches.
        pad_last_batch=True,
        random_shuffle=shuffle_buffer > 1, initial_fill=max(shuffle_buffer, 1), seed=seed,
        # mmap is faster on local disks; network file systems (NFS, Lustre, FUSE mounts of object
        # stores) usually prefer plain reads
        dont_use_mmap=not use_mmap,
    )
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]   # one ext: DALI returns a bare node
    if shards.adopted:   # one CPU operator: the tar and offset DALI read the image from
        index, label = fn.get_property(outs[0], key="source_info"), None
    else:
        index, label = outs[1], outs[2] if want_label else None
    jpg, intact = check_jpeg(outs[0])
    return jpg, index, label, intact, list(outs[1 + len(member_fields):])
