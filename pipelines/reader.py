"""The reader stage every graph shares: manifest -> this rank's samples -> (jpg, index, label, intact).

sslkit reads the samples itself and hands them to DALI through one `fn.external_source`: the order is sslkit's (`pipelines.order`), so a rank opens only the shards its slice of the
epoch touches, parses only their index files, and a resumed run -- on any number of ranks -- knows
which samples are left. DALI's own `readers.webdataset` indexes the whole dataset in every process
(~320 bytes per sample whatever `num_shards` is: ~32 GB per rank at 100M samples), which is what this
replaces. Each sample costs one read of its image member (mmap or pread) in the Python thread that feeds
DALI: ~3-10 us, against the ~40-500 us per image that decoding and augmenting take.

Built folders (`sslkit.shard build`) and adopted ones (`sslkit.shard index`) are read alike: the index
of a sample is its shard's first index plus its position there, the label the `cls` member (built) or
`labels.npy` (adopted). The image check (`pipelines.kernels.image_ok`, a cached numba function) runs
here too, on the bytes just read: a damaged image becomes the placeholder JPEG and is flagged. The whole
stage is 2 DALI operators (the source's outputs: the images, and (index, intact, label)), plus one per
extra member: no numba operator, whose wrapper DALI compiles anew in every process (seconds each).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn

from sslkit.shard import manifest as mf
from sslkit.shard.tarwriter import index_lines, parse_index_line

from .kernels import PLACEHOLDER_JPEG, image_ok


@dataclass(frozen=True)
class ShardSet:
    """A shard folder as the reader needs it, checked against its manifest. Opening it reads only the
    manifest (and memory-maps an adopted folder's tables): index files are parsed when a rank first
    reads from their shard (`members`)."""
    directory: str
    tars: tuple[str, ...]
    indexes: tuple[str, ...]
    total: int
    classes: dict | None
    identity: str            # sslkit.shard.manifest.identity: the same dataset wherever it lies
    counts: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()              # bytes of each tar
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
        extra = {}
        if mf.is_adopted(m):
            extra = dict(image_component=m["components"][0], offsets=_table(directory, m["offsets"], m["total"]),
                         label_table=_table(directory, m["labels"]["file"], m["total"]) if m.get("labels") else None)
        shards = m["shards"]
        return cls(os.path.abspath(directory), tuple(tars), tuple(idxs), m["total"], m["classes"], mf.identity(m),
                   counts=tuple(s["count"] for s in shards), sizes=tuple(s["bytes"] for s in shards),
                   first_index=tuple(s["first_index"] for s in shards), **extra)

    @property
    def adopted(self) -> bool:
        return self.offsets is not None

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    def shard_of(self, index: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.first_index), index, side="right") - 1

    def members(self, k: int, components: tuple[str, ...]) -> np.ndarray:
        """Offset and size of each of `components` in every sample of shard `k` (int64 [count, C, 2];
        size -1 where a sample lacks one), from its index file, checked against the manifest."""
        idx, tar = self.indexes[k], self.tars[k]
        try:
            step, lines = index_lines(idx)
            table = _member_table(lines, step, components, idx)
            first, last = (parse_index_line(lines[j], step, idx) for j in (0, -1)) if lines else ({}, {})
        except (OSError, ValueError) as e:
            raise mf.ManifestError(f"{idx}: {e}; regenerate it (python -m sslkit.shard verify)") from None
        if len(lines) != self.counts[k]:
            raise mf.ManifestError(f"{idx}: index holds {len(lines)} samples but the manifest says "
                                   f"{self.counts[k]} for {os.path.basename(tar)}; regenerate it (sslkit.shard verify)")
        if len(lines) and (table[:, :, 0] + table[:, :, 1]).max() > self.sizes[k]:
            raise mf.ManifestError(f"{idx}: points past the end of {os.path.basename(tar)}; it does not "
                                   "belong to this tar (sslkit.shard verify)")
        if not self.adopted and lines:   # built: the keys are the sample indices
            keys = [int(s[self.image_component][2].split(".")[0]) for s in (first, last)]
            if keys != [self.first_index[k], self.first_index[k] + len(lines) - 1]:
                raise mf.ManifestError(f"{idx}: samples {keys[0]}..{keys[1]}, the manifest says {self.first_index[k]}.."
                                       f"{self.first_index[k] + len(lines) - 1}; regenerate it (sslkit.shard verify)")
        if self.adopted and lines:   # adopted: offsets.npy locates the same image members
            lo = self.first_index[k]
            if not np.array_equal(np.asarray(self.offsets[lo:lo + len(lines)]), table[:, 0, 0]):
                raise mf.ManifestError(f"{idx}: its image offsets differ from offsets.npy; re-run "
                                       "`python -m sslkit.shard index`")
        return table

    def sample_name(self, index: int) -> str:
        """`<tar>:<image member>` of sample `index`, for messages (reads one index file)."""
        k = int(self.shard_of(np.asarray([index]))[0])
        try:
            step, lines = index_lines(self.indexes[k])
            name = parse_index_line(lines[index - self.first_index[k]], step, self.indexes[k])[self.image_component][2]
        except (OSError, ValueError, IndexError, KeyError):
            return f"{self.tars[k]}:sample {index}"
        return f"{self.tars[k]}:{name}"


def _member_table(lines: list[str], step: int, components: tuple[str, ...], where: str) -> np.ndarray:
    """(offset, size) of each component per index line (size -1: absent). When every line lists the same
    members in the same order (what sslkit and wds2idx write) the fields are converted column by column;
    otherwise line by line (`parse_index_line`). ~1 us per sample instead of ~10: a rank parses its
    slice's index files at start-up and at every epoch."""
    table = np.full((len(lines), len(components), 2), -1, np.int64)
    if not lines:
        return table
    head, n = lines[0].split(), len(lines)
    fields, width = " ".join(lines).split(), len(head)
    exts = head[0::step]
    if width % step == 0 and len(fields) == n * width and \
            all(fields[j * step::width] == [ext] * n for j, ext in enumerate(exts)):
        for c, comp in enumerate(components):
            if comp in exts:
                j = exts.index(comp) * step
                table[:, c, 0] = list(map(int, fields[j + 1::width]))
                table[:, c, 1] = list(map(int, fields[j + 2::width]))
        return table
    for i, line in enumerate(lines):
        sample = parse_index_line(line, step, f"{where}:{i + 2}")
        for c, comp in enumerate(components):
            if comp in sample:
                table[i, c] = sample[comp][:2]
    return table


def _table(directory: str, name: str, total: int) -> np.ndarray:
    path = os.path.join(directory, name)
    try:
        table = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise mf.ManifestError(f"{path}: not a readable table ({e})") from None
    if table.shape != (total,):
        raise mf.ManifestError(f"{path}: holds {table.shape} entries, the manifest says {total} samples")
    return table


class SampleSource:
    """What `fn.external_source` calls for each batch: the next batch of this rank's sample order, as
    (image bytes, [index, intact, label] int64 ([index, intact] when unlabelled), extras' bytes). Walks the epochs on its
    own (DALI prefetches ahead of the loader): `orders(epoch)` gives each epoch's `EpochOrder`, whose
    last stage `rank` reads, starting at batch `position` of `first_epoch`. Holds open only the shards of the epochs it is
    reading."""

    def __init__(self, shards: ShardSet, orders, rank: int, first_epoch: int, position: int, batch_size: int,
                 want_label: bool, extra_keys: tuple[str, ...], use_mmap: bool):
        self.shards, self.orders, self.rank = shards, orders, rank
        self.epoch, self.position, self.batch_size = first_epoch, position, batch_size
        self.want_label, self.use_mmap = want_label, use_mmap
        self.components = (shards.image_component,) + (("cls",) if want_label and not shards.adopted else ()) \
            + tuple(extra_keys)
        self.n_extras = len(extra_keys)
        self._sequence: np.ndarray | None = None
        self._tables: dict[int, np.ndarray] = {}
        self._files: dict[int, tuple[int, mmap.mmap | None]] = {}
        self.failure: Exception | None = None

    def prepare(self):
        """Parse the index files of the shards the first epoch's slice reads (a bad one is a one-line
        ManifestError now, not in DALI's thread)."""
        self._start_epoch()
        for k in np.unique(self.shards.shard_of(self._sequence)).tolist():
            self._tables[k] = self.shards.members(k, self.components)

    def _start_epoch(self):
        self._sequence = self.orders(self.epoch).rank_sequence(self.rank)
        if self.position * self.batch_size >= len(self._sequence):   # saved after the epoch's last batch
            self.epoch, self.position = self.epoch + 1, 0
            self._sequence = self.orders(self.epoch).rank_sequence(self.rank)
        self._release(set(np.unique(self.shards.shard_of(self._sequence)).tolist()))

    def __call__(self, batch_info=None):
        try:
            return self._next()
        except Exception as e:   # DALI wraps it in a RuntimeError: the loader re-raises this one
            self.failure = e
            raise

    def _next(self):
        if self._sequence is None:
            self._start_epoch()
        seq, b = self._sequence, self.batch_size
        take = seq[np.arange(self.position * b, (self.position + 1) * b) % len(seq)]  # the last batch wraps
        self.position += 1
        if self.position * b >= len(seq):
            self.epoch, self.position, self._sequence = self.epoch + 1, 0, None
        return self._read(take)

    def _read(self, index: np.ndarray):
        shard = self.shards.shard_of(index)
        columns: list[list[np.ndarray]] = [[] for _ in self.components]
        for i, k in zip(index.tolist(), shard.tolist()):
            if k not in self._tables:
                self._tables[k] = self.shards.members(k, self.components)
            row = self._tables[k][i - self.shards.first_index[k]]
            for c in range(len(self.components)):
                columns[c].append(self._bytes(k, *row[c]))
        # the image check: a damaged image is swapped for the placeholder JPEG and flagged, never dropped
        intact = np.array([image_ok(b) for b in columns[0]], np.int64)
        images = [b if ok else PLACEHOLDER_JPEG for b, ok in zip(columns[0], intact)]
        meta = [index, intact]
        if self.want_label:
            if self.shards.adopted:
                meta.append(np.asarray(self.shards.label_table[index], np.int64))
            else:
                meta.append(np.array([int(bytes(c) or b"-1") for c in columns[1]], np.int64))
        return (images, list(np.stack(meta, axis=1)), *columns[len(self.components) - self.n_extras:])

    def _bytes(self, k: int, offset: int, size: int) -> np.ndarray:
        if size < 0:
            return np.zeros(0, np.uint8)   # a missing extra member: empty, as DALI's "empty" behaviour
        fd, mm = self._files.get(k) or self._open(k)
        if mm is not None:
            return np.frombuffer(mm, np.uint8, size, offset)
        return np.frombuffer(os.pread(fd, size, offset), np.uint8)

    def _open(self, k: int):
        try:
            fd = os.open(self.shards.tars[k], os.O_RDONLY)
        except OSError as e:
            raise mf.ManifestError(f"{self.shards.tars[k]}: cannot be read ({e.strerror})") from None
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if self.use_mmap and self.shards.sizes[k] else None
        self._files[k] = (fd, mm)
        return self._files[k]

    def _release(self, keep: set[int]):
        """Close the shards (and drop the index tables) no longer read: memory follows the slice."""
        for k in [k for k in self._files if k not in keep]:
            fd, mm = self._files.pop(k)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:   # a batch still views it; the mapping goes with the last view
                    pass
            os.close(fd)
        for k in [k for k in self._tables if k not in keep]:
            del self._tables[k]

    def close(self):
        self._release(set())


def read(source: SampleSource, *, extra_keys: tuple[str, ...] = ()):
    """The reader stage of every graph. Returns (jpg, meta, extras): jpg with the placeholder JPEG in
    place of every sample that fails the check (`pipelines.kernels.image_ok`); meta int64 [3] per sample
    (index, intact: 0 where replaced, label) or [2] when unlabelled -- one output, as each output of an
    external source is an operator; extras the raw bytes of each `extra_keys` member (empty where a
    sample has none)."""
    outs = fn.external_source(source=source, num_outputs=2 + len(extra_keys), batch=True, batch_info=True,
                              parallel=False)
    return outs[0], outs[1], list(outs[2:])
