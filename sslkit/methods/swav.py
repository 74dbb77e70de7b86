"""SwAV (Caron et al. 2020, swav's main_swav.py).

Per step: the prototypes are L2-normalised; every multi-crop view -> backbone -> projection
(2048-2048-BN-ReLU-128, L2-normalised) -> scores against the K prototypes (cosines; float32). For
each crop in `crops_for_assign` the codes q are Sinkhorn's equipartition of that crop's scores over
the GLOBAL batch (epsilon 0.05, 3 iterations, the sums all-reduced across ranks), optionally with
this rank's queue of earlier embeddings in front (scored against the current prototypes); the loss
is the cross-entropy of every OTHER crop's softmax(scores / T) against q (swapped prediction),
averaged over those crops and then over the assignment crops.

The prototypes are a parameter but get no update for the first `freeze_prototypes_niters` steps:
their gradient is dropped after backward (`after_backward`), so neither the step nor weight decay
moves them. The optimiser steps taken are counted in a buffer (in `after_backward`, which the trainer
calls once per optimiser step whatever accum_steps), so the freeze counts optimiser steps as swav's
iterations and survives a resume exactly.

Queue (small batches): `queue_length` rows over all ranks (trimmed to a multiple of the global batch,
as swav does), created at the start of epoch `epoch_queue_starts`, one per assignment crop and rank,
used once full; it is per-rank state (saved in the per-rank checkpoint files).

Gradient accumulation (accum_steps > 1) is not a true large batch here: Sinkhorn's equipartition runs
per micro-batch, over the ranks' micro-batches (plus the queue), not over the whole accumulated batch;
the queue takes every micro-batch and is trimmed to a multiple of the micro-batches' global batch; and
BatchNorm normalises each micro-batch with its own statistics. Prefer more ranks, or a queue, for
batches much smaller than swav's 4096.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..recipes.swav import SwAVOptions
from ..registry import register
from ..sinkhorn import sinkhorn
from .base import MultiCropMethod, RunContext, l2_normalize


def swav_loss(scores: torch.Tensor, codes: list[tuple[int, torch.Tensor]], n_views: int,
              temperature: float) -> torch.Tensor:
    """Swapped prediction. scores: [V*B, K] (views stacked view-major); codes: (crop, q [B, K]) per
    assignment crop. For each, the mean over the other V-1 views and the B images of
    -sum_k q log softmax(scores / T); then the mean over the assignment crops."""
    b = scores.shape[0] // n_views
    logp = F.log_softmax(scores.float() / temperature, dim=1).view(n_views, b, -1)
    loss = scores.new_zeros((), dtype=torch.float32)
    for crop, q in codes:
        others = [v for v in range(n_views) if v != crop]
        loss = loss - (q.unsqueeze(0) * logp[others]).sum(-1).mean()
    return loss / len(codes)


def queue_rows_per_rank(queue_length: int, global_batch: int, world_size: int) -> int:
    """swav: the queue is trimmed to a multiple of the global batch, then split evenly over ranks."""
    return (queue_length - queue_length % global_batch) // world_size


@register("method", "swav")
class SwAV(MultiCropMethod):
    def __init__(self, cfg, ctx: RunContext):
        super().__init__(cfg, ctx)
        o: SwAVOptions = cfg.method_options
        crops = o.crops_for_assign
        if not crops or min(crops) < 0 or len(set(crops)) != len(crops):
            raise ConfigError(f"crops_for_assign {o.crops_for_assign}: need distinct view numbers >= 0")
        if o.temperature <= 0 or o.epsilon <= 0 or o.n_prototypes < 2 or o.sinkhorn_iters < 1:
            raise ConfigError("need temperature > 0, epsilon > 0, n_prototypes >= 2 and sinkhorn_iters >= 1")
        if o.freeze_prototypes_niters < 0 or o.queue_length < 0 or o.epoch_queue_starts < 0:
            raise ConfigError("freeze_prototypes_niters, queue_length and epoch_queue_starts must be >= 0")
        self.o = o
        self.queue_rows = 0
        if o.queue_length:
            global_batch = ctx.batch_size * ctx.world_size
            self.queue_rows = queue_rows_per_rank(o.queue_length, global_batch, ctx.world_size)
            if self.queue_rows == 0:
                raise ConfigError(f"queue_length {o.queue_length} is shorter than the global batch {global_batch}: "
                                  "make it a multiple of it, or 0 for no queue")
            if self.queue_rows * ctx.world_size != o.queue_length and ctx.log and ctx.rank == 0:
                ctx.log.warning("queue_length %d trimmed to %d, a multiple of the global batch %d (as swav does)",
                                o.queue_length, self.queue_rows * ctx.world_size, global_batch)
        self.make_embedding(cfg.arch)
        self.prototypes = nn.Linear(o.feat_dim, o.n_prototypes, bias=False)
        # Optimiser steps taken (after_backward calls): the prototype freeze counts them.
        self.count_steps()
        # This rank's queue [len(crops_for_assign), rows, feat_dim] (None until epoch_queue_starts) and
        # how many rows of it hold embeddings: per-rank state, not buffers (DDP must not broadcast them).
        self.queue: torch.Tensor | None = None
        self.queue_filled = 0

    # -- the step ---------------------------------------------------------------------------------
    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """Cosines of the embeddings with the prototypes, in float32 whatever the autocast."""
        with torch.autocast(z.device.type, enabled=False):
            return F.linear(z.float(), self.prototypes.weight.float())

    @torch.no_grad()
    def normalize_prototypes(self):
        w = self.prototypes.weight
        w.copy_(l2_normalize(w))

    def forward(self, batch: dict) -> dict:
        views = batch["views"]
        if self.training:
            self.normalize_prototypes()
        n, n_views = views[0].shape[0], len(views)
        z = self.embed(views)
        scores = self.scores(z)
        codes, used_queue = [], False
        with torch.no_grad():
            for i, crop in enumerate(self.o.crops_for_assign):
                out = scores[crop * n:(crop + 1) * n].detach()
                if self.queue is not None:
                    if self.queue_filled >= self.queue.shape[1]:
                        used_queue = True
                        out = torch.cat([self.scores(self.queue[i]), out])
                    if self.training:
                        self.queue[i, n:] = self.queue[i, :-n].clone()
                        self.queue[i, :n] = z[crop * n:(crop + 1) * n].detach()
                q = sinkhorn(out, self.o.epsilon, self.o.sinkhorn_iters, self.ctx.group)[-n:]
                codes.append((crop, q))
            if self.queue is not None and self.training:
                self.queue_filled = min(self.queue_filled + n, self.queue.shape[1])
        loss = swav_loss(scores, codes, n_views, self.o.temperature)
        return {"loss": loss, "queue": scores.new_tensor(float(used_queue))}

    # -- hooks ------------------------------------------------------------------------------------
    def after_backward(self):
        """swav: the prototypes' gradient is cancelled while iteration < freeze_prototypes_niters (the
        step about to be taken is number steps - 1, counted here: once per optimiser step)."""
        self.step_taken()
        if self.steps_taken <= self.o.freeze_prototypes_niters:
            self.prototypes.weight.grad = None

    def on_epoch_start(self, epoch: int):
        if self.queue_rows and epoch >= self.o.epoch_queue_starts and self.queue is None:
            self.queue = torch.zeros(len(self.o.crops_for_assign), self.queue_rows, self.o.feat_dim,
                                     device=self.ctx.device)
            self.queue_filled = 0

    @torch.no_grad()
    def prepare_benchmark(self):
        """The steady state of a long run: the prototypes free, the queue (if any) full."""
        self.steps_taken = self.o.freeze_prototypes_niters + 1
        self.steps.fill_(self.steps_taken)
        if self.queue_rows:
            g = torch.Generator().manual_seed(0)
            q = torch.randn(len(self.o.crops_for_assign), self.queue_rows, self.o.feat_dim, generator=g)
            self.queue = F.normalize(q, dim=2).to(self.ctx.device)
            self.queue_filled = self.queue_rows

    def rank_state_dict(self) -> dict:
        return {"queue": None if self.queue is None else self.queue.cpu(), "queue_filled": self.queue_filled}

    def load_rank_state_dict(self, state: dict):
        queue = state["queue"]
        self.queue = None if queue is None else queue.to(self.ctx.device)
        self.queue_filled = int(state["queue_filled"])

    def load_rank_states(self, states, old_world_size: int) -> str:
        """Another world size: the old queues' rows are re-split, newest first (row j of old rank q has
        recency j * old_world_size + q; this rank keeps every world_size-th), up to this world's
        `queue_rows`; the queue is used again once full, as after its creation."""
        ctx, keys, rows, started = self.ctx, [], [], False
        for q, state in enumerate(states):
            if state["queue"] is None:
                continue
            started, filled = True, int(state["queue_filled"])
            recency = torch.arange(filled) * old_world_size + q
            mine = recency % ctx.world_size == ctx.rank
            keys.append(recency[mine])
            rows.append(state["queue"][:, :filled][:, mine])
        if not started or not self.queue_rows:
            self.queue, self.queue_filled = None, 0
            return "queue: none yet" if not started else "queue: not used at this global batch, dropped"
        order = torch.cat(keys).argsort()[:self.queue_rows]
        taken = torch.cat(rows, 1)[:, order]
        self.queue = torch.zeros(len(self.o.crops_for_assign), self.queue_rows, self.o.feat_dim, device=ctx.device)
        self.queue[:, :taken.shape[1]] = taken.to(ctx.device)
        self.queue_filled = taken.shape[1]
        return (f"queue: {self.queue_filled} of {self.queue_rows} rows per rank re-split from {old_world_size} "
                f"rank(s), newest first")
