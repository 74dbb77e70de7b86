"""Distributed Sinkhorn-Knopp as SwAV computes its codes (swav `main_swav.py::distributed_sinkhorn`).

Given the prototype scores of this rank's rows, `scores` [B_local, K] (cosines of L2-normalised
embeddings and prototypes), the codes are the transport plan between the B = B_local x world rows
of the GLOBAL batch and the K prototypes with uniform marginals, regularised by entropy (epsilon):

    Q = exp(scores / epsilon)^T                     [K, B_local], then divided by its global sum
    `iters` times:  rows    -> 1/K each  (row sums all-reduced over ranks: a row is a prototype)
                    columns -> 1/B each  (local: a column is one of this rank's samples)
    return (B Q)^T                                  [B_local, K], every sample's code sums to 1

So after the last iteration the columns are exactly uniform and the rows approximately (3 iterations
are not a fixed point). The global max is subtracted before the exponential: a constant factor,
removed by the first normalisation, that keeps exp finite for any epsilon. Every rank must call this
at the same point with the same B_local (the loader's batches are equal on every rank); without a
process group (group=None and torch.distributed not initialised) it runs in-process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .dist import rank_world

_TINY = torch.finfo(torch.float32).tiny


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iters: int = 3, group=None) -> torch.Tensor:
    """SwAV's codes for this rank's rows: [B_local, K] float32, rows summing to 1 (module docstring).

    scores: [B_local, K] prototype scores (any float dtype; computed in float32). group: the
    process group whose ranks hold the rest of the batch (None: the default group when
    torch.distributed is initialised, else this process alone)."""
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"sinkhorn: expected scores [B, K], got {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"sinkhorn: iters must be an int >= 0, got {iters!r}")
    world = rank_world(group)[1]
    x = scores.detach().float() / epsilon
    top = x.max() if x.numel() else x.new_zeros(())
    if world > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    q = torch.exp(x - top).t()                                   # [K, B_local]
    k, b = q.shape[0], q.shape[1] * world
    total = q.sum()
    if world > 1:
        dist.all_reduce(total, group=group)
    q /= total
    for _ in range(iters):
        rows = q.sum(dim=1, keepdim=True)                        # per prototype, over the global batch
        if world > 1:
            dist.all_reduce(rows, group=group)
        q /= rows.clamp_(min=_TINY)                              # (a prototype whose exp underflowed
        q /= k                                                   #  everywhere stays 0, not NaN)
        q /= q.sum(dim=0, keepdim=True).clamp_(min=_TINY)        # per sample: local
        q /= b
    q *= b
    return q.t()
