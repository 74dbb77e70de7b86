"""Distributed spherical k-means as DeepClusterV2 runs it at the start of every epoch (swav's main_deepclusterv2.py).

Each rank holds its own slice of the memory bank: `x` [n_local, d], rows L2-normalised. Then:

1. init: k distinct rows of *rank 0's* `x`, broadcast to every rank;
2. `iters` times: E-step (each row goes to the centroid with the largest dot product), M-step
   (per-cluster sums and counts, all_reduced over ranks; a cluster nobody joined keeps its previous
   centroid; the others become the mean of their rows), then every centroid is L2-normalised;
3. a final E-step with the last centroids gives the returned assignments.

`gather_assignments` then builds the global `dataset index -> cluster` table (-100 = ignore_index
for samples no rank holds), and `spherical_kmeans_numpy` is a plain float64 reference for tests.

Without an initialised process group (or with a group of one) everything runs in-process, so the
same call works in a single-GPU run, in CPU tests and under torchrun.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dist import rank_world

# Cross-entropy's ignore_index: samples no rank holds get no k-means target.
IGNORE_INDEX = -100
# The E-step scores at most this many (row, centroid) pairs at once: 2**26 float32 = 256 MiB, i.e.
# ~22k rows per chunk at k=3000, so a 1M-row bank never needs its full 12 GB score matrix.
E_STEP_MAX_ELEMENTS = 1 << 26
# Rows whose norm is further than this from 1 mean the caller forgot to normalise the embeddings.
_NORM_TOLERANCE = 1e-3


def _process_group(group: dist.ProcessGroup | None) -> tuple[int, int, int]:
    """(rank in group, world size, global rank of the group's rank 0); (0, 1, 0) when not distributed."""
    rank, world = rank_world(group)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    return rank, world, src


def _unit_rows_problem(t: torch.Tensor, name: str) -> str | None:
    """Why `t` is not a 2-D float tensor of finite L2-normalised rows, or None when it is."""
    if t.ndim != 2:
        return f"{name} must be 2-D [n, d], got shape {tuple(t.shape)}"
    if not t.is_floating_point():
        return f"{name} must be a floating-point tensor, got {t.dtype}"
    if t.shape[0] == 0:
        return None
    worst = float((torch.linalg.vector_norm(t.float(), dim=1) - 1).abs().max())
    if not worst <= _NORM_TOLERANCE:  # also catches NaN
        return (f"{name} rows must be L2-normalised (spherical k-means); the worst row norm is off by "
                f"{worst:.3g} (use torch.nn.functional.normalize(x, dim=1))")
    return None


def _draw_seed(generator: torch.Generator | None) -> int:
    """One 62-bit draw from `generator` (torch's default generator when None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def init_indices(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The k distinct row indices (int64, CPU) that `spherical_kmeans` picks from rank 0's n rows.

    The generator is advanced by exactly one draw (the seed of a private generator that runs the
    permutation), whatever n is, and `spherical_kmeans` makes the same draw on every rank. So all
    ranks can pass identically seeded generators and they stay in lockstep although only rank 0's
    indices are used, and saving the generator's state resumes the same sequence of inits.
    `generator=None` draws from torch's default generator.
    """
    if k > n:
        raise ValueError(f"k-means init needs k={k} distinct rows but rank 0 holds only {n}")
    private = torch.Generator().manual_seed(_draw_seed(generator))
    return torch.randperm(n, generator=private)[:k]


def _validate(x: torch.Tensor, k: int, init_centroids: torch.Tensor | None, rank: int, world: int,
              group: dist.ProcessGroup | None) -> None:
    """Check the inputs and raise the same way on every rank.

    A problem seen by one rank only would otherwise raise there and leave the others hanging in the
    next collective, so the ranks first agree (one small all_reduce) on whether anyone failed, on d,
    and on rank 0's row count.
    """
    problem = _unit_rows_problem(x, "x")
    if problem is None and init_centroids is not None:
        if tuple(init_centroids.shape) != (k, x.shape[1]):
            problem = (f"init_centroids must have shape [k, d] = [{k}, {x.shape[1]}], "
                       f"got {tuple(init_centroids.shape)}")
        else:
            problem = _unit_rows_problem(init_centroids, "init_centroids")
    n0 = x.shape[0] if x.ndim == 2 else -1
    if world > 1:
        d = x.shape[1] if x.ndim == 2 else -1
        # MAX over [failed, d, -d, rank 0's n] gives: anyone failed, max d, -min d, n0.
        info = torch.tensor([problem is not None, d, -d, n0 if rank == 0 else -1], dtype=torch.int64,
                            device=x.device)
        dist.all_reduce(info, op=dist.ReduceOp.MAX, group=group)
        failed, d_max, d_min, n0 = int(info[0]), int(info[1]), -int(info[2]), int(info[3])
        if problem is None and failed:
            problem = "spherical_kmeans input rejected on another rank (see that rank's error)"
        elif problem is None and d_max != d_min:
            problem = f"embedding width differs across ranks: d ranges from {d_min} to {d_max}"
    if problem is not None:
        raise ValueError(problem)
    if k > n0:
        raise ValueError(f"k-means init needs k={k} distinct rows but rank 0 holds only {n0}")


def _initial_centroids(x: torch.Tensor, k: int, generator: torch.Generator | None,
                       init_centroids: torch.Tensor | None, rank: int, world: int, src: int,
                       group: dist.ProcessGroup | None) -> torch.Tensor:
    """[k, d] float32 starting centroids, identical on all ranks (rank 0's choice)."""
    if init_centroids is not None:
        centroids = init_centroids.detach().to(device=x.device, dtype=torch.float32).clone()
    elif rank == 0:
        centroids = x[init_indices(x.shape[0], k, generator).to(x.device)].clone()
    else:
        _draw_seed(generator)  # the draw rank 0 made, so identically seeded generators stay in step
        centroids = torch.empty(k, x.shape[1], device=x.device)
    if world > 1:
        dist.broadcast(centroids, src=src, group=group)
    return centroids


def _chunk_rows(n: int, k: int, chunk_size: int | None) -> int:
    """Rows per E-step chunk: the caller's choice, else what keeps a chunk's scores under the budget."""
    if chunk_size is None:
        return max(1, min(n, E_STEP_MAX_ELEMENTS // k))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """E-step: index of the centroid with the largest dot product for each row of x, [n] int64.

    Rows are scored in chunks so the [n, k] score matrix never exists at once. Exact ties go to the
    lowest centroid index (argmax returns the first maximum).
    """
    n, k = x.shape[0], centroids.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    rows = _chunk_rows(n, k, chunk_size)
    ct = centroids.t()
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        out[start:stop] = torch.mm(x[start:stop], ct).argmax(dim=1)
    return out


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None,
                     group: dist.ProcessGroup | None = None, init_centroids: torch.Tensor | None = None,
                     *, chunk_size: int | None = None, on_iteration=None,
                     on_round_done=None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepClusterV2's distributed spherical k-means on this rank's rows.

    Args:
        x: [n_local, d] float embeddings of this rank, rows L2-normalised (CPU or CUDA).
        k: number of clusters; rank 0 must hold at least k rows.
        iters: E-step + M-step rounds before the final E-step (DCv2 uses 10).
        generator: picks the init rows on rank 0 (see `init_indices`); None = torch's default.
        group: process group to reduce over; None = the default group when torch.distributed is
            initialised, otherwise a single process.
        init_centroids: [k, d] unit rows to start from instead of random rows (rank 0's are used
            on every rank; the generator is then left untouched).
        chunk_size: rows per E-step chunk; None sizes chunks to E_STEP_MAX_ELEMENTS scores.
        on_iteration: called before each round on every rank (e.g. a collective preemption check,
            so a long clustering stops within one round of a signal).
        on_round_done: called after each round on every rank (progress display; it must not run
            a collective on some ranks only).

    Returns:
        (centroids [k, d] float32 unit rows, identical on all ranks; assignments [n_local] int64).
        On CUDA the M-step sums use atomics (unless torch.use_deterministic_algorithms is on), so
        centroids can differ in the last bits between runs.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    _chunk_rows(1, k, chunk_size)  # validate before any collective
    rank, world, src = _process_group(group)
    _validate(x, k, init_centroids, rank, world, group)
    x = x.detach().float()  # a no-op for the float32 banks DCv2 keeps
    centroids = _initial_centroids(x, k, generator, init_centroids, rank, world, src, group)

    for _ in range(iters):
        if on_iteration is not None:
            on_iteration()
        labels = assign(x, centroids, chunk_size)
        # M-step. Sums and counts are additive, so reducing them gives exactly the global means.
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        if world > 1:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(counts, group=group)
        # An empty cluster keeps its previous centroid rather than collapsing to 0/0.
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(sums.dtype)
        centroids = F.normalize(centroids, dim=1)
        if on_round_done is not None:
            on_round_done()
    return centroids, assign(x, centroids, chunk_size)


@torch.no_grad()
def gather_assignments(local_assignments: torch.Tensor, local_indices: torch.Tensor, n_total: int,
                       group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The global table `table[dataset_index] = cluster`, [n_total] int64, identical on all ranks.

    Every rank passes its assignments and the dataset indices of the same rows (ranks may hold
    different numbers of rows). Indices no rank holds stay IGNORE_INDEX (-100). An index held more
    than once (e.g. a sampler that pads by repeating samples) takes the entry of the highest rank,
    and within a rank its last occurrence, so the result never depends on scatter order.
    The table lives on the device of `local_assignments`.
    """
    if local_assignments.ndim != 1 or local_indices.ndim != 1 or local_assignments.shape != local_indices.shape:
        raise ValueError("local_assignments and local_indices must be 1-D and of equal length, got shapes "
                         f"{tuple(local_assignments.shape)} and {tuple(local_indices.shape)}")
    if isinstance(n_total, bool) or not isinstance(n_total, int) or n_total < 0:
        raise ValueError(f"n_total must be an int >= 0, got {n_total!r}")
    device = local_assignments.device
    labels = local_assignments.to(torch.int64)
    idx = local_indices.to(device=device, dtype=torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_total):
        raise ValueError(f"local_indices must lie in [0, {n_total}), got range "
                         f"[{int(idx.min())}, {int(idx.max())}]")

    _, world, _ = _process_group(group)
    if world > 1:
        # all_gather needs equal shapes: share the sizes, pad to the largest, trim after.
        size = torch.tensor([labels.numel()], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        counts = [int(s) for s in sizes]
        pad = max(counts) - labels.numel()
        both = torch.stack([F.pad(labels, (0, pad)), F.pad(idx, (0, pad))])
        parts = [torch.empty_like(both) for _ in range(world)]
        dist.all_gather(parts, both, group=group)
        labels = torch.cat([p[0, :c] for p, c in zip(parts, counts)])
        idx = torch.cat([p[1, :c] for p, c in zip(parts, counts)])

    # Resolve duplicates deterministically: the largest position (highest rank, last row) wins.
    position = torch.arange(idx.numel(), device=device)
    winner = torch.full((n_total,), -1, dtype=torch.int64, device=device)
    winner.scatter_reduce_(0, idx, position, reduce="amax")
    table = torch.full((n_total,), IGNORE_INDEX, dtype=torch.int64, device=device)
    held = winner >= 0
    table[held] = labels[winner[held]]
    return table


def spherical_kmeans_numpy(x: np.ndarray, k: int, iters: int, init_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-process float64 reference of `spherical_kmeans`, for tests.

    Starts from the rows `x[init_idx]` and runs the same rounds with a one-hot matrix for the M-step
    (so it shares no code path with the torch version). Returns (centroids [k, d], assignments [n]).
    """
    x = np.asarray(x, dtype=np.float64)
    init_idx = np.asarray(init_idx)
    if init_idx.shape != (k,):
        raise ValueError(f"init_idx must hold k={k} indices, got shape {init_idx.shape}")
    centroids = x[init_idx].copy()
    for _ in range(iters):
        labels = np.argmax(x @ centroids.T, axis=1)
        onehot = np.zeros((x.shape[0], k))
        onehot[np.arange(x.shape[0]), labels] = 1.0
        counts = onehot.sum(axis=0)
        sums = onehot.T @ x
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return centroids, np.argmax(x @ centroids.T, axis=1)
