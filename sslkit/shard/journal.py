"""The one resumable shard sequence: `prefix-NNNNNN.tar/.idx` written in order, one journal line per
finished shard (`sslkit.shard build`, the pseudo-label writer and its random-label control).

A shard is written under temporary names and renamed into place when full (`ShardWriter.commit`),
then recorded, fsync'd, in the journal. A re-run replays the journal, keeps the records whose files are
intact, cuts it at the first that is not, and continues with the next shard. Shard boundaries depend
only on the sample sequence, so the result is byte-identical to an uninterrupted run.

A record: the shard's manifest entry (`manifest.SHARD_FIELDS`), `end` (the caller's input position
after the shard's last sample: a builder that rejects inputs is ahead of the sample index), and the
shard's tallies (whatever the caller counts per shard: class counts, rejected inputs, ...).
"""

from __future__ import annotations

import json
import os
from typing import Callable

from ..files import json_lines
from . import manifest as mf
from .tarwriter import BLOCK, ShardWriter


def tar_bytes(components) -> int:
    """Bytes a sample's (ext, data) components take in a tar: a header block and the padded data each."""
    return sum(BLOCK + -(-len(data) // BLOCK) * BLOCK for _, data in components)


def read_journal(path: str, out: str) -> list[dict]:
    """Finished-shard records whose files in `out` are intact; the journal is rewritten, cut at the
    first bad record (a torn last line from a kill mid-write, or a shard file gone or cut short)."""
    if not os.path.exists(path):
        return []
    good = []
    for rec in json_lines(path):
        tar = os.path.join(out, rec["path"])
        if not (os.path.exists(tar) and os.path.getsize(tar) == rec["bytes"]
                and os.path.exists(os.path.join(out, rec["index"]))):
            break
        good.append(rec)
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in good))
    return good


def _add_counts(tally: dict, counts: dict):
    """Sum `counts` into `tally`: numbers add up, dicts add up key by key."""
    for key, value in counts.items():
        if isinstance(value, dict):
            inner = tally.setdefault(key, {})
            for k, v in value.items():
                inner[k] = inner.get(k, 0) + v
        else:
            tally[key] = tally.get(key, 0) + value


class ShardJournal:
    """Writes samples into `out/prefix-NNNNNN.tar/.idx`, a shard closed when `max_count` samples or
    `max_size` bytes are reached, journalled in `path`. Sample keys (and their position in the
    manifest) are `next_index`, which continues after the journalled shards."""

    def __init__(self, out: str, path: str, prefix: str, max_count: int, max_size: int,
                 tally: Callable[[], dict] = dict, on_close: Callable[["ShardJournal"], None] | None = None):
        self.out, self.path, self.prefix = out, path, prefix
        self.max_count, self.max_size = max_count, max_size
        self._fresh_tally, self.on_close = tally, on_close   # on_close(journal) after each shard
        self.done = read_journal(path, out)
        self.next_index = self.done[-1]["first_index"] + self.done[-1]["count"] if self.done else 0
        self.tally = tally()         # the open shard's counts (and anything counted before it opens)
        self.new_shards = 0          # shards closed by this run
        self._writer: ShardWriter | None = None
        self._first_index = self.next_index

    @property
    def end(self) -> int | None:
        """The input position after the last journalled shard (None before the first)."""
        return self.done[-1]["end"] if self.done else None

    def add(self, components: list[tuple[str, bytes]], position: int, counts: dict | None = None):
        """Append one sample, keyed `key_for(next_index)`; `position` is its place in the caller's
        input and `counts` are added to the shard's tally."""
        w = self._writer
        if w is not None and w.count and w.bytes_written + tar_bytes(components) > self.max_size:
            self.close(end=position)
        if self._writer is None:
            name = f"{self.prefix}-{len(self.done):06d}"
            self._writer = ShardWriter(os.path.join(self.out, name + ".tar"), os.path.join(self.out, name + ".idx"))
            self._first_index = self.next_index
        self._writer.add(mf.key_for(self.next_index), components)
        self.next_index += 1
        if counts:
            _add_counts(self.tally, counts)
        if self._writer.count >= self.max_count:
            self.close(end=position + 1)

    def close(self, end: int):
        """Finish the open shard (if any): rename it into place, then journal it with `end`."""
        if self._writer is None:
            return
        info = self._writer.commit()
        name = f"{self.prefix}-{len(self.done):06d}"
        rec = {"path": name + ".tar", "index": name + ".idx", "count": info["count"], "bytes": info["bytes"],
               "sha256": info["sha256"], "first_index": self._first_index, "end": end, **self.tally}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.append(rec)
        self._writer, self.tally = None, self._fresh_tally()
        self.new_shards += 1
        if self.on_close is not None:
            self.on_close(self)

    def abort(self):
        """Drop the open shard's temporary files (the journalled shards stay)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def shard_entries(self) -> list[dict]:
        """The manifest's `shards` list."""
        return [mf.shard_entry(r) for r in self.done]
