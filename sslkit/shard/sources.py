"""Where images come from: folder trees, file lists, MNIST-style idx files and the embedded sample corpus.

A source is parsed from its command-line spelling and enumerates `Item`s lazily and in a fixed
order (sorted walks, file order), so the same inputs always give the same plan. Items carry only a
reference (a path, `file#record` or `sample#i`); pixels are read later, inside the workers.
"""

from __future__ import annotations

import csv
import gzip
import os
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import SslkitError

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .png .bmp .gif .tif .tiff .webp .ppm .pgm .pnm .pbm .jfif".split()
)
_IDX_IMAGES = re.compile(r"images-idx3-ubyte(\.gz)?$")


class SourceError(SslkitError, ValueError):
    """A source cannot be used at all (missing file, bad column, ...): reported before any work."""


@dataclass(frozen=True)
class Item:
    kind: str            # "file" | "idx" | "sample"
    ref: str             # file path, "<idx file>#<record>", or "sample#<i>"
    label: str | None    # class name, None when unlabelled


@dataclass(frozen=True)
class SourceOptions:
    labels: str = "auto"          # auto | dirs | none
    path_column: str = "path"     # name (file has a header row) or 0-based number (no header)
    label_column: str | None = None
    root: str | None = None       # base for relative paths in file lists
    seed: int = 0                 # the sample corpus is deterministic by seed


class FolderSource:
    """A recursive tree of images; with `--labels dirs` the first-level subfolder is the class."""

    def __init__(self, root: str, opts: SourceOptions):
        self.root = os.path.abspath(root)
        self.labelled = opts.labels == "dirs"
        self.ignored = 0  # files skipped because their extension is not an image extension

    def items(self) -> Iterator[Item]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            label = None
            if self.labelled:
                # Files directly under the root have no class; the worker rejects them by name.
                label = "" if rel_dir == "." else rel_dir.split(os.sep)[0]
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    self.ignored += 1
                    continue
                yield Item("file", os.path.join(dirpath, name), label)


class ListSource:
    """A TSV/CSV file list (YFCC-style wide dumps welcome): one path column, optional label column."""

    def __init__(self, path: str, opts: SourceOptions):
        self.path = path
        self.delimiter = "," if path.lower().endswith(".csv") else "\t"
        self.root = os.path.abspath(opts.root) if opts.root else os.path.dirname(os.path.abspath(path))
        self.path_column, self.label_column = opts.path_column, opts.label_column
        if path.lower().endswith((".txt", ".lst")) and self.path_column == "path":
            self.path_column = "0"  # plain path lists have no header row
        self.labelled = opts.label_column is not None and opts.labels != "none"
        self.ignored = 0
        named = not self.path_column.isdigit()
        if self.label_column is not None and self.label_column.isdigit() == named:
            raise SourceError(
                f"{path}: --path-column and --label-column must both be names (header row) or both numbers")
        self.has_header = named

    def _column(self, header: list[str], col: str) -> int:
        if not self.has_header:
            return int(col)
        if col not in header:
            raise SourceError(f"{self.path}: no column {col!r} in header {header[:12]}")
        return header.index(col)

    def items(self) -> Iterator[Item]:
        try:
            yield from self._rows()
        except UnicodeDecodeError as e:
            raise SourceError(f"{self.path}: not UTF-8 text (it holds the byte 0x{e.object[e.start]:02x}); "
                              "save the list as UTF-8") from None

    def _rows(self) -> Iterator[Item]:
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            header = next(reader, []) if self.has_header else []
            pcol = self._column(header, self.path_column)
            lcol = self._column(header, self.label_column) if self.labelled else None
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                # A short row still becomes an item: the worker rejects it with the line number.
                path = row[pcol].strip() if pcol < len(row) else ""
                ref = os.path.join(self.root, path) if path else f"{self.path}:{reader.line_num}"
                label = None
                if lcol is not None:
                    label = row[lcol].strip() if lcol < len(row) else ""
                yield Item("file", ref, label)


def fashion_mnist_dir() -> str | None:
    """The folder of Debian's dataset-fashion-mnist (`t10k-images-idx3-ubyte.gz` and friends), or None:
    $SSLKIT_FASHION_MNIST, else where `make test` unpacks the package in this checkout (.cache/data), else
    the system install."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for d in (os.environ.get("SSLKIT_FASHION_MNIST", ""),
              os.path.join(checkout, ".cache", "data", "root", "usr", "share", "datasets", "fashion-mnist"),
              "/usr/share/datasets/fashion-mnist"):
        if d and os.path.exists(os.path.join(d, "t10k-images-idx3-ubyte.gz")):
            return d
    return None


def read_idx(path: str) -> np.ndarray:
    """Read an MNIST/Fashion-MNIST idx file (gzipped or not) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SourceError(f"{path}: not an idx file (bad magic)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(data[2])
    if dtype is None:
        raise SourceError(f"{path}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SourceError(f"{path}: idx header says {dims} but the file holds {body.size} elements")
    return body.reshape(dims)


class IdxSource:
    """MNIST-format images; the labels file beside it (`...-labels-idx1-ubyte[.gz]`) gives the classes."""

    def __init__(self, path: str, opts: SourceOptions):
        self.path = os.path.abspath(path)
        self.ignored = 0
        head = read_idx_header(self.path)
        if len(head) != 3:
            raise SourceError(f"{path}: expected a 3-D idx images file (N x H x W), got dims {head}")
        self.count = head[0]
        self.labels = None
        if opts.labels != "none":
            label_path = labels_path_for(self.path)
            if label_path is None:
                raise SourceError(
                    f"{path}: no labels file beside it (looked for "
                    f"{_IDX_IMAGES.sub('labels-idx1-ubyte[.gz]', os.path.basename(path))}); "
                    "pass --labels none to build without labels")
            self.labels = read_idx(label_path)
            if self.labels.shape != (self.count,):
                raise SourceError(f"{label_path}: {self.labels.shape[0]} labels for {self.count} images")
        self.labelled = self.labels is not None

    def items(self) -> Iterator[Item]:
        for i in range(self.count):
            label = str(int(self.labels[i])) if self.labels is not None else None
            yield Item("idx", f"{self.path}#{i}", label)


def read_idx_header(path: str) -> tuple[int, ...]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0":
            raise SourceError(f"{path}: not an idx file (bad magic)")
        return tuple(int.from_bytes(f.read(4), "big") for _ in range(head[3]))


def labels_path_for(images_path: str) -> str | None:
    for suffix in ("labels-idx1-ubyte.gz", "labels-idx1-ubyte"):
        candidate = _IDX_IMAGES.sub(suffix, images_path)
        if candidate != images_path and os.path.exists(candidate):
            return candidate
    return None


class SampleSource:
    """The embedded corpus: ImageNet-like crops of photographs shipped in pip packages (see sample_corpus)."""

    def __init__(self, count: int, opts: SourceOptions):
        from .sample_corpus import PHOTOS  # names only; pixels are loaded in the workers

        if count <= 0:
            raise SourceError(f"sample:{count}: the sample count must be positive")
        self.count, self.seed = count, opts.seed
        self.labelled = opts.labels != "none"
        self.photos = PHOTOS
        self.ignored = 0

    def items(self) -> Iterator[Item]:
        for i in range(self.count):
            # Round-robin over photos keeps the classes balanced for k-NN / linear-probe demos.
            label = self.photos[i % len(self.photos)].name if self.labelled else None
            yield Item("sample", f"sample#{self.seed}#{i}", label)


def parse_source(spec: str, opts: SourceOptions):
    """Turn one SOURCE argument into a source object, or raise SourceError with a one-line reason."""
    if spec == "sample" or spec.startswith("sample:"):
        count = spec.partition(":")[2] or "2000"
        if not count.isdigit():
            raise SourceError(f"{spec}: expected sample or sample:N")
        return SampleSource(int(count), opts)
    if not os.path.exists(spec):
        raise SourceError(f"{spec}: no such file or folder")
    if os.path.isdir(spec):
        return FolderSource(spec, opts)
    if _IDX_IMAGES.search(os.path.basename(spec)):
        return IdxSource(spec, opts)
    if spec.lower().endswith((".tsv", ".csv", ".txt", ".lst")):
        return ListSource(spec, opts)
    raise SourceError(
        f"{spec}: not a folder, a .tsv/.csv/.txt file list, an *-images-idx3-ubyte[.gz] file or 'sample[:N]'")
