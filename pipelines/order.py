"""The sample order of an epoch, owned by sslkit (not by DALI's reader), so any rank can compute it
from a few integers: the seed, the epoch, the shards' sizes, the world size and batch size -- and, after
a resume on another world size, where the interrupted epoch stood.

Why: a rank must open only the shards it reads (DALI's reader indexes the whole dataset in every
process: ~320 bytes per sample, ~32 GB per rank at 100M samples), and a run resumed on M ranks
instead of N must know exactly which samples of the interrupted epoch are left.

An epoch, for shards of sizes c_0..c_{S-1} (n samples) on W ranks with batch B:
1. the shards are permuted (seeded by seed and epoch; stored order when shuffling is off), and the
   epoch's sequence is their samples one shard after the other;
2. training pads the sequence to a multiple of W*B by repeating its start (at most W*B-1 samples),
   so every rank runs the same number of full batches and every sample is seen; evaluation does
   not pad (each sample once, the last batch partial);
3. rank r takes the r-th of W contiguous slices, so it touches about S/W shards (+1);
4. its slice is shuffled within windows of `window` consecutive samples (seeded by seed, epoch and
   rank): a window spans several shards, so batches mix shards.
A resume on another world size or batch size continues the same epoch as a new *stage*: the samples
the old ranks had not reached yet, old rank by old rank, are split afresh over the new ranks (padded the
same way), in the order the old ranks would have read them. The next epoch starts a plain stage 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stage:
    """How one part of an epoch was read: `world_size` ranks of `batch_size`, and `consumed` batches
    per rank when the next stage took over (None: the stage being read)."""
    world_size: int
    batch_size: int
    consumed: int | None = None


@dataclass(frozen=True)
class EpochOrder:
    """The sample order of one epoch on every rank (see the module docstring)."""
    counts: tuple[int, ...]          # samples per shard, in manifest order
    first_index: tuple[int, ...]     # each shard's first sample index
    seed: int
    epoch: int
    window: int                      # shuffle window in samples; <= 1: stored order, shards not permuted
    pad: bool                        # training: pad to full batches on every rank
    stages: tuple[Stage, ...]        # the last one is being read (consumed None)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def _shard_order(self) -> np.ndarray:
        if self.window <= 1:
            return np.arange(len(self.counts))
        return np.random.default_rng([self.seed, self.epoch, 17]).permutation(len(self.counts))

    def _sequence(self, lo: int, hi: int) -> np.ndarray:
        """Positions lo..hi-1 of the epoch's (unpadded, wrapped) sequence: shards in permuted order."""
        order = self._shard_order()
        counts = np.asarray(self.counts, np.int64)[order]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(lo, hi, dtype=np.int64) % self.total
        k = np.searchsorted(starts, pos, side="right") - 1
        return np.asarray(self.first_index, np.int64)[order][k] + (pos - starts[k])

    def rank_length(self, stage: int = -1) -> int:
        """Samples each rank reads in stage `stage` (padded; for evaluation, rank 0's slice)."""
        stage = stage % len(self.stages)
        st = self.stages[stage]
        n = self.total if stage == 0 else self._remaining(stage)
        if not self.pad:
            return -(-n // st.world_size)
        return -(-n // (st.world_size * st.batch_size)) * st.batch_size

    def _remaining(self, stage: int) -> int:
        """Samples the ranks of stage `stage - 1` had not reached when stage `stage` took over."""
        prev = self.stages[stage - 1]
        return prev.world_size * (self.rank_length(stage - 1) - prev.consumed * prev.batch_size)

    def rank_sequence(self, rank: int, stage: int = -1) -> np.ndarray:
        """The sample indices rank `rank` reads in stage `stage`, in order (int64)."""
        stage = stage % len(self.stages)
        st = self.stages[stage]
        if not 0 <= rank < st.world_size:
            raise ValueError(f"rank {rank} outside world size {st.world_size}")
        if stage == 0:
            if self.pad:
                length = self.rank_length(0)
                seq = self._sequence(rank * length, (rank + 1) * length)
            else:
                n, w = self.total, st.world_size
                seq = self._sequence(rank * n // w, (rank + 1) * n // w)
            return _shuffle_windows(seq, self.window, [self.seed, self.epoch, rank, 29])
        # a later stage: old rank q's unread tail is positions q*m..(q+1)*m-1 of the remainder
        prev = self.stages[stage - 1]
        skip = prev.consumed * prev.batch_size
        m = self.rank_length(stage - 1) - skip
        length, remainder = self.rank_length(stage), self._remaining(stage)
        pos = np.arange(rank * length, (rank + 1) * length, dtype=np.int64) % remainder
        out = np.empty(len(pos), np.int64)
        for q in np.unique(pos // m):
            take = pos // m == q
            out[take] = self.rank_sequence(int(q), stage - 1)[skip + pos[take] % m]
        return out


def _shuffle_windows(seq: np.ndarray, window: int, seed: list[int]) -> np.ndarray:
    """`seq` with each run of `window` consecutive entries permuted (one argsort for all windows)."""
    if window <= 1 or len(seq) < 2:
        return seq
    keys = np.random.default_rng(seed).random(len(seq))
    return seq[np.lexsort((keys, np.arange(len(seq)) // window))]
