"""Class-balanced selection (Yalniz et al. 2019, step 2): every image keeps its top-P classes; every
class keeps its top-K images by that class's score.

A selection works on *records* (class, score, sample index): one per (image, one of its top-P
classes). The order within a class is score descending, then sample index ascending, so ties are
broken the same way whatever the order records arrive in.

- `select_topk`: all records in memory, one sort (the reference, and what `TopKSelector` compacts with);
- `TopKSelector`: streaming, memory bounded by about `2 * classes * K` records plus one incoming
  batch whatever the number of images (100M images x P=10 are 1e9 records; never held at once). After
  each compaction every full class has a threshold (its K-th score) and records below it are dropped
  on arrival, so in the steady state almost nothing is buffered.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SslkitError


class SelectionError(SslkitError, ValueError):
    """Scores that cannot be ranked (one line)."""


def top_p(probs: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [B, P] float32, classes [B, P] int64) of the P most probable classes of each row,
    highest first; equal probabilities in class-id order (deterministic)."""
    probs = probs.float()
    # torch.topk does not promise an order among equal values: sort on (prob desc, class asc) instead,
    # via a stable descending sort over the row.
    scores, classes = torch.sort(probs, dim=1, descending=True, stable=True)
    return scores[:, :p].contiguous(), classes[:, :p].contiguous()


def records(classes: np.ndarray, scores: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-P arrays ([N, P] classes and scores, [N] sample indices) -> flat records (class int32,
    score float32, index int64)."""
    n, p = scores.shape
    return (np.ascontiguousarray(classes, dtype=np.int32).reshape(-1),
            np.ascontiguousarray(scores, dtype=np.float32).reshape(-1),
            np.repeat(np.asarray(index, dtype=np.int64), p))


def _sort_key(cls: np.ndarray, score: np.ndarray) -> np.ndarray:
    """uint64 keys ordering records by class ascending, then score descending: the class in the high
    32 bits, the float32 score's bits mapped to an order-preserving uint32 and inverted in the low ones."""
    bits = (score.astype(np.float32) + np.float32(0.0)).view(np.uint32)   # + 0.0: -0.0 becomes 0.0
    mono = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))          # IEEE order as unsigned order
    return (cls.astype(np.uint64) << np.uint64(32)) | (np.uint32(0xFFFFFFFF) - mono).astype(np.uint64)


def canonical_order(cls: np.ndarray, score: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The permutation sorting records by class, then score descending, then sample index."""
    if score.size and not np.isfinite(score).all():
        bad = int(np.flatnonzero(~np.isfinite(score))[0])
        raise SelectionError(f"sample {int(index[bad])}: score {float(score[bad])} for class {int(cls[bad])} "
                             "is not finite (the teacher produced NaN/inf logits)")
    key = _sort_key(cls, score)
    order = np.argsort(key)            # one integer sort (3-4x faster than a 3-key lexsort) ...
    k = key[order]
    tied = np.flatnonzero(k[1:] == k[:-1])
    if tied.size:                      # ... then the runs of equal (class, score), by sample index
        pos = np.unique(np.concatenate([tied, tied + 1]))
        sub = order[pos]
        order[pos] = sub[np.lexsort((index[sub], key[sub]))]
    return order


def select_topk(cls: np.ndarray, score: np.ndarray, index: np.ndarray, k: int):
    """The top-`k` records of every class, all in memory. Returns (cls, score, index) sorted by class,
    score descending, index ascending."""
    cls, score, index = np.asarray(cls, np.int32), np.asarray(score, np.float32), np.asarray(index, np.int64)
    order = canonical_order(cls, score, index)
    c = cls[order]
    if c.size == 0:
        return c, score[order], index[order]
    # rank within each class group = position - first position of that class
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, c.size]))
    keep = order[(np.arange(c.size) - group_start) < k]
    return cls[keep], score[keep], index[keep]


class TopKSelector:
    """Streaming top-K per class with bounded memory: `add()` records in any order and any amount,
    `result()` gives exactly `select_topk` of everything added."""

    def __init__(self, num_classes: int, k: int, buffer: int | None = None):
        if k < 1:
            raise SelectionError(f"top-k {k}: must be positive")
        self.num_classes, self.k = num_classes, k
        # compact when this many records wait (at least the kept set, so compaction cost is amortised)
        self.buffer = buffer if buffer is not None else max(num_classes * k, 1 << 20)
        self._kept = (np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64))
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_n = 0
        self.threshold = np.full(num_classes, -np.inf, np.float32)   # K-th score of each full class
        self.seen = 0
        self.peak_records = 0      # the most records held at once (kept + waiting): the memory bound

    def add(self, cls: np.ndarray, score: np.ndarray, index: np.ndarray):
        cls, score, index = np.asarray(cls, np.int32), np.asarray(score, np.float32), np.asarray(index, np.int64)
        if cls.size and (cls.min() < 0 or cls.max() >= self.num_classes):
            bad = int(np.flatnonzero((cls < 0) | (cls >= self.num_classes))[0])
            raise SelectionError(f"sample {int(index[bad])}: class {int(cls[bad])} outside 0..{self.num_classes - 1}")
        if score.size and not np.isfinite(score).all():
            canonical_order(cls, score, index)   # raises, naming the sample
        self.seen += cls.size
        # A record below its class's K-th kept score can never enter the top K; equal scores stay (the
        # sample index decides at compaction).
        m = score >= self.threshold[cls]
        if not m.all():
            cls, score, index = cls[m], score[m], index[m]
        if cls.size:
            self._pending.append((cls, score, index))
            self._pending_n += cls.size
        self.peak_records = max(self.peak_records, self._kept[0].size + self._pending_n)
        if self._pending_n >= self.buffer:
            self._compact()

    def _compact(self):
        if not self._pending:
            return
        parts = [self._kept, *self._pending]
        cls, score, index = (np.concatenate([p[i] for p in parts]) for i in range(3))
        self._pending, self._pending_n = [], 0
        self._kept = select_topk(cls, score, index, self.k)
        c, s = self._kept[0], self._kept[1]
        counts = np.bincount(c, minlength=self.num_classes)
        full = np.flatnonzero(counts >= self.k)
        if full.size:
            # the kept set is sorted by class then score descending: the last of each class is its K-th
            ends = np.cumsum(counts)
            self.threshold[full] = s[ends[full] - 1]

    def result(self):
        """(cls, score, index) of the selection, sorted by class, score descending, index ascending."""
        self._compact()
        return self._kept
