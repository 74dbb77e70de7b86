"""Random access to single samples by their stable index (for the visualizer and tools, not training)."""

from __future__ import annotations

import bisect
import os

from . import manifest as mf
from .tarwriter import read_index


class SampleReader:
    """`reader.component(index, "jpg")` -> bytes of that sample's component. "jpg" names the sample's
    image in every folder: in an adopted one (`sslkit.shard index`) it is whichever image member the
    index chose (jpg, jpeg, png or webp)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.manifest = mf.load(directory)
        self._starts = [s["first_index"] for s in self.manifest["shards"]]
        self._index_cache: dict[int, list] = {}

    def component(self, index: int, ext: str) -> bytes:
        if not 0 <= index < self.manifest["total"]:
            raise IndexError(f"sample {index} outside 0..{self.manifest['total'] - 1}")
        k = bisect.bisect_right(self._starts, index) - 1
        shard = self.manifest["shards"][k]
        if k not in self._index_cache:
            self._index_cache[k] = read_index(os.path.join(self.directory, shard["index"]))
        if ext == "jpg" and mf.is_adopted(self.manifest):
            ext = self.manifest["components"][0]
        offset, size, _ = self._index_cache[k][index - shard["first_index"]][ext]
        with open(os.path.join(self.directory, shard["path"]), "rb") as f:
            f.seek(offset)
            return f.read(size)
