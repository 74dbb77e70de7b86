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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..registry import register
from ..sinkhorn import sinkhorn
from .base import MultiCropMethod, Preset, RunContext, l2_normalize


@dataclass(frozen=True)
class SwAVOptions:
    multicrop: str = "2x224+6x96"                 # pipelines.spec.MULTICROP_PRESETS
    n_prototypes: int = 3000
    temperature: float = 0.1
    feat_dim: int = 128
    hidden_dim: int = 2048
    crops_for_assign: tuple[int, ...] = (0, 1)
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    freeze_prototypes_niters: int = 313            # swav: 313 at batch 4096, 5005 at batch 256
    queue_length: int = 0                          # rows over all ranks (0: no queue); swav: 3840 at batch 256
    epoch_queue_starts: int = 15
    kernel: str | None = None                      # multi-crop CPU kernel: None (auto), fused, native


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


SEED = dict(arch="resnet50", optimizer="lars", lr=0.3, final_lr_ratio=0.001, warmup_epochs=10, warmup_start_lr=0.3,
            momentum=0.9, weight_decay=1e-6, batch_size=64, sync_bn=True,
            **{"method_options.multicrop": "2x224+6x96", "method_options.freeze_prototypes_niters": 313,
               "method_options.queue_length": 0})
# swav_{200,400}ep_bs256: 4 GPUs x 64, base_lr 0.6 (at 256) -> 0.0006, no warm-up, queue 3840 from epoch 15
BS256 = dict(arch="resnet50", optimizer="lars", lr=0.6, final_lr_ratio=0.001, warmup_epochs=0, momentum=0.9,
             weight_decay=1e-6, batch_size=64, sync_bn=True,
             **{"method_options.multicrop": "2x224+6x96", "method_options.freeze_prototypes_niters": 5005,
                "method_options.queue_length": 3840, "method_options.epoch_queue_starts": 15})
PRESETS = {
    # swav's scripts: 64 GPUs x 64 = 4096, peak lr 4.8 after 10 warm-up epochs from 0.3, to 0.0048
    "800ep": Preset("swav's SwAV 800 epochs, 2x224+6x96, ResNet-50, 64 GPUs x 64 (75.3 linear)",
                    {**SEED, "epochs": 800}),
    "400ep": Preset("swav's SwAV 400 epochs, 2x224+6x96, ResNet-50, 64 GPUs x 64 (74.6 linear)",
                    {**SEED, "epochs": 400}),
    "200ep": Preset("swav's SwAV 200 epochs, 2x224+6x96, ResNet-50, 64 GPUs x 64 (73.9 linear)",
                    {**SEED, "epochs": 200}),
    "100ep": Preset("swav's SwAV 100 epochs, 2x224+6x96, ResNet-50, 64 GPUs x 64 (72.1 linear)",
                    {**SEED, "epochs": 100}),
    "400ep_bs256": Preset("swav's SwAV 400 epochs at batch 256 (4 GPUs x 64), queue 3840 from epoch 15 (74.3 linear)",
                          {**BS256, "epochs": 400}),
    "200ep_bs256": Preset("swav's SwAV 200 epochs at batch 256 (4 GPUs x 64), queue 3840 from epoch 15 (72.7 linear)",
                          {**BS256, "epochs": 200}),
    "small": Preset("a few thousand images on CPU: ResNet-18, 2x96+4x48, 100 prototypes",
                    dict(arch="resnet18", epochs=30, batch_size=64, optimizer="lars", lr=0.6, warmup_epochs=2,
                         weight_decay=1e-6, **{"method_options.multicrop": "small",
                                               "method_options.n_prototypes": 100,
                                               "method_options.hidden_dim": 512,
                                               "method_options.freeze_prototypes_niters": 50})),
    # bench/ssl_quality.py: 5,000 Fashion-MNIST images (28x28 grey, crops upsampled to 64 / 32). DCv2's
    # `fmnist` finding applies: at LARS 0.6 per 256 (trust 0.001) the trunk barely moves. A sweep of this
    # protocol (kNN res5avg / res4 / res3, random 0.769 / 0.770 / 0.779): 9.6 per 256 -> 0.778 / 0.818 /
    # 0.842, 4.8 -> 0.794 / 0.817 / 0.836, 2.4 -> 0.774 / 0.799 / 0.817; 4.8 for the global pool.
    # More prototypes than embedding dimensions (with 30 for 64 dims the loss settled at log K, uniform
    # predictions); batch 32 is far below swav's 256, hence a queue so that Sinkhorn spreads 100
    # prototypes over more than 32 rows.
    "fmnist": Preset("Fashion-MNIST-sized data on CPU: resnet_tiny, 2x64+4x32 crops (0.3-1, 0.08-0.3) of 28x28 "
                     "images, 100 prototypes, queue 512 from epoch 3, LARS 4.8 per 256, 18 epochs at batch 32",
                     dict(arch="resnet_tiny", epochs=18, batch_size=32, optimizer="lars", lr=4.8, warmup_epochs=0,
                          weight_decay=1e-6, **{"method_options.multicrop": "fmnist",
                                                "method_options.n_prototypes": 100,
                                                "method_options.hidden_dim": 256, "method_options.feat_dim": 64,
                                                "method_options.freeze_prototypes_niters": 156,
                                                "method_options.queue_length": 512,
                                                "method_options.epoch_queue_starts": 3})),
    "tiny": Preset("smoke runs and tests: resnet_tiny, 2x64+2x32, 32 prototypes, a 128-row queue from epoch 1",
                   dict(arch="resnet_tiny", epochs=2, batch_size=32, optimizer="lars", lr=0.6, warmup_epochs=0,
                        weight_decay=1e-6, **{"method_options.multicrop": "tiny",
                                              "method_options.n_prototypes": 32,
                                              "method_options.hidden_dim": 256, "method_options.feat_dim": 64,
                                              "method_options.freeze_prototypes_niters": 5,
                                              "method_options.queue_length": 128,
                                              "method_options.epoch_queue_starts": 1})),
}


@register("method", "swav", options=SwAVOptions, presets=PRESETS, default_preset=None)
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
