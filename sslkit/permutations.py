"""Jigsaw permutation sets: Noroozi's greedy maximal-Hamming-distance selection, stats, files.

A Jigsaw model classifies which of |P| permutations shuffled the tiles, so P should hold
permutations that are far apart. `generate` implements the greedy "Algorithm 1" of Noroozi &
Favaro (2016), with the same rules as VISSL's `extra_scripts/generate_jigsaw_permutations.py`:

- the pool is every permutation of range(n_tiles), in lexicographic order;
- the first pick is uniform over the pool (seeded); picked permutations leave the pool;
- each next pick is the candidate with the largest mean (`max_avg`, the default) or the largest
  minimum (`max_min`) Hamming distance to the picks so far; ties go to the lowest pool position.

For a 3x3 grid and 100 permutations, max_avg gives min/mean pairwise distance 2 / 8.08 and max_min
gives min 6. Files are 0-based; `load` also reads the published 1-based Noroozi files. `resolve`
turns a set's spec (a count, or a .npy path) into the table, as the jigsaw pipeline and method do.

Tile order convention -- stated here once; the jigsaw pipeline, the jigsaw method, the visualizer and
the tests follow it (VISSL's `ImgPatchesFromTensor` + `ShuffleImgPatches`):

- the crop is cut into a 3x3 grid; the ORIGINAL index of the cell in column i and row j is
  c = 3 * i + j (column-major: tile 1 is the middle-LEFT cell, tile 3 the top-middle one);
  `cell_position(c)` gives (row, column);
- with P the set (0-based rows) and p the label, position k of the shuffled tiles holds original
  tile P[p][k]:   tiles[k] = original[P[p][k]]        (`permute_tiles(original, P[p])`)
  and undoing it: original[P[p][k]] = tiles[k]        (`unpermute_tiles(tiles, P[p])`).

    python -m sslkit.permutations --n 2000 --out perms.npy
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np

from .files import atomic_file

METHODS = ("max_avg", "max_min")
# Up to 10 tiles the whole pool (10! = 3.6M rows of 10 bytes) fits easily; 11! does not.
MAX_ENUMERATED_TILES = 10
MAX_TILES = 255  # tiles are stored as uint8 inside the kernels
# A picked candidate's score is set to a value no unpicked score can reach, so it never wins again
# and the inner loops stay branch-free. Sums stay far below 2**30 (n_tiles * n <= 255 * 20M / 100).
_PICKED_SUM = -(1 << 30)
_PICKED_MIN = -1


def pool_size(n: int, n_tiles: int) -> int:
    """How many candidates `generate` chooses from: n_tiles! when enumerable, else a random pool."""
    if n_tiles <= MAX_ENUMERATED_TILES:
        return math.factorial(n_tiles)
    # Half of n_tiles! at most, so drawing unique random permutations never stalls.
    return min(max(100 * n, 100_000), math.factorial(n_tiles) // 2)


@numba.njit(cache=True)
def _all_permutations(k: int) -> np.ndarray:
    """Every permutation of range(k) in lexicographic order, as columns: shape [k, k!], uint8."""
    total = 1
    for i in range(2, k + 1):
        total *= i
    cols = np.empty((k, total), np.uint8)
    a = np.arange(k).astype(np.uint8)
    for p in range(total):
        for t in range(k):
            cols[t, p] = a[t]
        # Standard next-permutation step: find the last ascent, swap in its successor, reverse the tail.
        i = k - 2
        while i >= 0 and a[i] >= a[i + 1]:
            i -= 1
        if i < 0:
            break
        j = k - 1
        while a[j] <= a[i]:
            j -= 1
        a[i], a[j] = a[j], a[i]
        lo, hi = i + 1, k - 1
        while lo < hi:
            a[lo], a[hi] = a[hi], a[lo]
            lo += 1
            hi -= 1
    return cols


@numba.njit(cache=True)
def _greedy(cols: np.ndarray, first: int, n: int, use_min: bool) -> np.ndarray:
    """Pool indices of the n greedy picks. cols: the pool as columns, shape [n_tiles, pool].

    The score of every candidate (sum or min of its distances to the picks) is updated with the
    newest pick only, so a step costs O(pool * n_tiles) instead of O(pool * picks * n_tiles).
    The argmax of the sum equals the argmax of the mean (same divisor for all), and integer
    sums make ties exact.
    """
    k, size = cols.shape
    score = np.empty(size, np.int32)
    score[:] = k + 1 if use_min else 0
    dist = np.empty(size, np.uint8)
    picks = np.empty(n, np.int64)
    j = first
    for step in range(n):
        picks[step] = j
        score[j] = _PICKED_MIN if use_min else _PICKED_SUM
        if step == n - 1:
            break
        # Column-wise loops over contiguous uint8 vectorise well (the hot loop of the whole module).
        dist[:] = 0
        for t in range(k):
            v = cols[t, j]
            col = cols[t]
            for c in range(size):
                dist[c] += np.uint8(col[c] != v)
        best = _PICKED_SUM - 1
        if use_min:
            for c in range(size):
                s = min(score[c], np.int32(dist[c]))
                score[c] = s
                best = max(best, s)
        else:
            for c in range(size):
                s = score[c] + np.int32(dist[c])
                score[c] = s
                best = max(best, s)
        # First position holding the best score: the tie rule of the reference (first argmax).
        j = 0
        while score[j] != best:
            j += 1
    return picks


@numba.njit(cache=True)
def _pair_stats(cols: np.ndarray) -> tuple[int, int]:
    """(min, sum) of Hamming distances over all unordered pairs of columns. Memory O(rows)."""
    k, n = cols.shape
    dist = np.zeros(n, np.int32)
    lowest = k + 1
    total = 0
    for i in range(n - 1):
        dist[i + 1:] = 0
        for t in range(k):
            v = cols[t, i]
            col = cols[t]
            for c in range(i + 1, n):
                dist[c] += np.int32(col[c] != v)
        for c in range(i + 1, n):
            total += dist[c]
            lowest = min(lowest, dist[c])
    return lowest, total


def _random_pool(size: int, n_tiles: int, rng: np.random.Generator) -> np.ndarray:
    """`size` distinct uniformly random permutations of range(n_tiles), lexicographically sorted."""
    pool = np.empty((0, n_tiles), np.uint8)
    chunk = 1 << 20  # bounds the float64 scratch of argsort
    while len(pool) < size:
        need = size - len(pool)
        parts = [rng.random((min(chunk, need - s), n_tiles)).argsort(axis=1).astype(np.uint8)
                 for s in range(0, need, chunk)]
        pool = np.concatenate([pool, *parts])
        # Drop repeats keeping first occurrences, so the draw order (not the sort) decides who stays.
        _, first = np.unique(pool, axis=0, return_index=True)
        pool = pool[np.sort(first)]
    # Sorted, so that ties resolve as in the enumerated (lexicographic) pool.
    return np.unique(pool, axis=0)


def _check_args(n: int, method: str, seed: int, n_tiles: int) -> tuple[int, int, int]:
    try:
        n, seed, n_tiles = operator.index(n), operator.index(seed), operator.index(n_tiles)
    except TypeError:
        raise ValueError(f"n, seed and n_tiles must be integers, got {n!r}, {seed!r}, {n_tiles!r}") from None
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if not 2 <= n_tiles <= MAX_TILES:
        raise ValueError(f"n_tiles must be between 2 and {MAX_TILES}, got {n_tiles}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    available = pool_size(n, n_tiles)
    if n > available:
        what = f"{n_tiles}! = {available}" if n_tiles <= MAX_ENUMERATED_TILES else f"the pool of {available}"
        raise ValueError(f"n = {n} is larger than {what} permutations of {n_tiles} tiles")
    return n, seed, n_tiles


def generate(n: int, method: str = "max_avg", seed: int = 0, n_tiles: int = 9) -> np.ndarray:
    """n permutations of range(n_tiles) chosen greedily for large Hamming distance.

    Returns an int64 array of shape [n, n_tiles], 0-based, rows unique, in the order picked (the
    row index is the Jigsaw class label). Deterministic given (n, method, seed, n_tiles); a prefix
    of a set is the smaller set with the same seed and method (picks never depend on n).

    Up to n_tiles = 10 the pool is every permutation. Beyond that (4x4 grids: 16! ~ 2e13) the
    pool is `pool_size(n, n_tiles)` = max(100 * n, 100_000) distinct random permutations drawn from
    the seed, so the result is a greedy set over a random sample, not over all permutations, and
    its prefix property holds only between sizes that share a pool size.
    Time is O(n * pool * n_tiles): about 0.3 ms per pick for 9 tiles on one core.
    """
    n, seed, n_tiles = _check_args(n, method, seed, n_tiles)
    rng = np.random.default_rng(seed)
    if n_tiles <= MAX_ENUMERATED_TILES:
        cols = _all_permutations(n_tiles)
    else:
        cols = np.ascontiguousarray(_random_pool(pool_size(n, n_tiles), n_tiles, rng).T)
    first = int(rng.integers(cols.shape[1]))
    picks = _greedy(cols, first, n, method == "max_min")
    return cols[:, picks].T.astype(np.int64)


def hamming_stats(perms: np.ndarray) -> dict:
    """Min (int) and mean (float) Hamming distance over all unordered pairs of rows.

    Distances count differing positions (0..n_tiles). Memory is O(rows): 10,000 rows take well
    under a second. Needs at least 2 rows.
    """
    arr = np.asarray(perms)
    if arr.ndim != 2 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"expected a 2-D integer array, got shape {arr.shape} and dtype {arr.dtype}")
    if len(arr) < 2:
        raise ValueError(f"need at least 2 rows for pairwise distances, got {len(arr)}")
    # uint8 doubles the SIMD width over int16; values outside it (not tile ids) keep a wide type.
    small = arr.size and arr.min() >= 0 and arr.max() <= 255
    cols = np.ascontiguousarray(arr.T, dtype=np.uint8 if small else np.int64)
    lowest, total = _pair_stats(cols)
    pairs = len(arr) * (len(arr) - 1) // 2
    return {"min": int(lowest), "mean": float(total) / pairs}


def _validate(arr: np.ndarray, source: str) -> np.ndarray:
    """0-based int64 copy of a permutation set, or ValueError naming `source`."""
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
        raise ValueError(f"{source}: expected shape [n_perms, n_tiles] with n_tiles >= 2, got {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        # Some converted files store tile ids as floats; accept them only when exactly integral.
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{source}: values are not integers (dtype {arr.dtype})")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{source}: expected integer tile ids, got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    k = out.shape[1]
    if out.min() == 1:  # the published Noroozi files count tiles from 1
        out -= 1
    bad = np.flatnonzero(~np.all(np.sort(out, axis=1) == np.arange(k), axis=1))
    if len(bad):
        raise ValueError(f"{source}: row {bad[0]} is not a permutation of 0..{k - 1} "
                         f"(or 1..{k}): {arr[bad[0]].tolist()} ({len(bad)} bad rows)")
    _, first, counts = np.unique(out, axis=0, return_index=True, return_counts=True)
    if np.any(counts > 1):
        dup = out[first[np.argmax(counts > 1)]]
        rows = np.flatnonzero(np.all(out == dup, axis=1))
        raise ValueError(f"{source}: rows {rows.tolist()} are the same permutation {dup.tolist()}")
    return out


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save(path: str | os.PathLike, perms: np.ndarray, method: str | None = None,
         seed: int | None = None) -> Path:
    """Write perms (0-based int64) to `path` (.npy) and its metadata to the same name with .json.

    The JSON holds n, n_tiles, method, seed (null when not given) and the min/mean pairwise
    Hamming distance. Missing folders are created; files are written under a temporary name and
    renamed, so a reader never sees half a file. Returns the .npy path.
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"{path}: the permutation file must end in .npy")
    arr = _validate(np.asarray(perms), "perms to save")
    stats = hamming_stats(arr) if len(arr) > 1 else {"min": None, "mean": None}
    meta = {"n": int(arr.shape[0]), "n_tiles": int(arr.shape[1]), "method": method,
            "seed": None if seed is None else int(seed), "indexing": "0-based",
            "hamming_min": stats["min"], "hamming_mean": stats["mean"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, write in ((path, lambda f: np.save(f, arr)),
                          (_sidecar(path), lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"))):
        with atomic_file(str(target), "wb", tmp=str(target) + ".tmp", durable=False) as f:
            write(f)
    return path


def load(path: str | os.PathLike) -> np.ndarray:
    """A permutation set from a .npy file, 0-based int64 [n, n_tiles].

    Reads files from `save` and the published Noroozi / VISSL files: a set whose smallest value
    is 1 is shifted to 0-based, as VISSL does. Raises ValueError naming the file unless every
    row is a permutation of 0..k-1 and no row repeats.
    """
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # numpy raises several types for a file that is not an .npy array
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise ValueError(f"{path}: expected a single .npy array, got an archive")
    return _validate(arr, str(path))


def resolve(spec, n_tiles: int = 9) -> np.ndarray:
    """A permutation set from its spec: an int n -> `generate(n, "max_avg", seed=0, n_tiles)` (the
    sets every recipe here uses), a path -> `load(path)`. 0-based int64 [n, n_tiles]; ValueError if
    the spec is neither or the rows do not permute `n_tiles` tiles."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return generate(int(spec), "max_avg", seed=0, n_tiles=n_tiles)
    if isinstance(spec, (str, os.PathLike)):
        if not os.path.isfile(spec):
            raise ValueError(f"{os.fspath(spec)}: no such file")
        table = load(spec)
        if table.shape[1] != n_tiles:
            raise ValueError(f"{os.fspath(spec)}: rows permute {table.shape[1]} tiles, the puzzle needs {n_tiles}")
        return table
    raise ValueError(f"permutations={spec!r}: expected a number of permutations or a .npy path")


# ---- tile order convention (see the module docstring) -------------------------------------------

GRID = 3


def cell_position(c: int, grid: int = GRID) -> tuple[int, int]:
    """(row, column) of the cell whose ORIGINAL tile index is c: column-major, c = grid * column + row."""
    if not 0 <= c < grid * grid:
        raise ValueError(f"tile index {c} outside 0..{grid * grid - 1}")
    column, row = divmod(int(c), grid)
    return row, column


def _gather_tiles(tiles, index, what: str):
    """tiles[..., index[..., k], ...] along the tile axis (axis index.ndim - 1), numpy or torch alike."""
    if isinstance(tiles, np.ndarray):
        index = np.asarray(index)
    else:
        import torch
        index = torch.as_tensor(index, device=tiles.device).long()
    if tuple(tiles.shape[:index.ndim]) != tuple(index.shape) or index.ndim == 0:
        raise ValueError(f"{what}: tiles of shape {tuple(tiles.shape)} must start with the order's shape "
                         f"{tuple(index.shape)} (tiles [..., n, *tile], order [..., n])")
    idx = index.reshape(*index.shape, *([1] * (tiles.ndim - index.ndim)))
    if isinstance(tiles, np.ndarray):
        return np.take_along_axis(tiles, np.broadcast_to(idx, tiles.shape), axis=index.ndim - 1)
    return torch.gather(tiles, index.ndim - 1, idx.expand(tiles.shape))


def permute_tiles(original, order):
    """Shuffle tiles by a permutation row: out[..., k, ...] = original[..., order[..., k], ...].

    `original`: [..., n, *tile] tiles in ORIGINAL (column-major cell) order, numpy or torch;
    `order`: [..., n], a row of the set (P[p]) or rows for a batch (P[labels]), same leading shape.
    """
    return _gather_tiles(original, order, "permute_tiles")


def unpermute_tiles(tiles, order):
    """Undo `permute_tiles` (same arguments): out[..., order[..., k], ...] = tiles[..., k, ...], the
    tiles back in ORIGINAL cell order."""
    if isinstance(tiles, np.ndarray):
        inverse = np.argsort(np.asarray(order), axis=-1)
    else:
        import torch
        inverse = torch.argsort(torch.as_tensor(order), dim=-1)
    return _gather_tiles(tiles, inverse, "unpermute_tiles")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the meaningless "(default: None)" of required or derived options."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sslkit.permutations", formatter_class=_HelpFormatter,
        description="Generate a Jigsaw permutation set with Noroozi's greedy maximal-Hamming-distance "
                    "algorithm (as VISSL's generate_jigsaw_permutations.py) and save it as a 0-based "
                    ".npy plus a .json sidecar with its settings and Hamming distances.")
    p.add_argument("--n", type=int, required=True, help="number of permutations (= Jigsaw classes)")
    p.add_argument("--method", choices=METHODS, default="max_avg",
                   help="pick the candidate with the largest mean or the largest min distance to the set")
    p.add_argument("--seed", type=int, default=0, help="seed of the first pick (and of the pool beyond 10 tiles)")
    p.add_argument("--tiles", type=int, default=9, help="tiles per image: 9 for a 3x3 grid, 16 for 4x4")
    p.add_argument("--out", default=None,
                   help="output .npy (default: hamming_perms_{N}_patches_{TILES}_{METHOD}.npy, VISSL's name)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = args.out or f"hamming_perms_{args.n}_patches_{args.tiles}_{args.method}.npy"
    try:
        start = time.perf_counter()
        perms = generate(args.n, args.method, args.seed, args.tiles)
        took = time.perf_counter() - start
        path = save(out, perms, method=args.method, seed=args.seed)
        stats = json.loads(_sidecar(path).read_text())
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    distances = ("n/a (one permutation)" if stats["hamming_min"] is None
                 else f"min {stats['hamming_min']}, mean {stats['hamming_mean']:.3f}")
    print(f"{path}: {args.n} permutations of {args.tiles} tiles ({args.method}, seed {args.seed}); "
          f"Hamming distance {distances}; generated in {took:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
