"""DeepClusterV2 (Caron et al. 2020, swav's main_deepclusterv2.py).

Per step: every multi-crop view -> backbone -> projection (2048-2048-BN-ReLU-128, L2-normalised);
for each of H prototype heads, scores = z . centroids_h / T and the loss is the cross-entropy of
EVERY crop against its image's current cluster assignment, averaged over heads. The embeddings of
the two large crops are written into this rank's memory bank, keyed by the stable sample index.

At each epoch start: distributed spherical k-means (10 iterations, init broadcast from rank 0,
empty clusters keep their centroid) on the memory bank -- heads cycle banks 0, 1, 0 -- then the
centroids become the (frozen) prototypes and the assignments are gathered into one global table
indexed by sample index. The bank is filled by one no-grad pass before epoch 0.

Gradient accumulation (accum_steps > 1): the loss, the memory bank (filled per micro-batch, keyed by
sample index) and the k-means are unaffected; only BatchNorm differs from a true large batch, as it
normalises each micro-batch with its own statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..kmeans import gather_assignments, spherical_kmeans
from ..recipes.deepclusterv2 import DCv2Options
from ..registry import register
from .base import MultiCropMethod, RunContext, l2_normalize

IGNORE = -100


def dcv2_loss(z: torch.Tensor, prototypes: list[torch.Tensor], targets: torch.Tensor, n_views: int,
              temperature: float) -> torch.Tensor:
    """Cross-entropy of every crop's scores against its image's assignment, averaged over heads.
    z: [V*B, D] normalised (views stacked view-major); prototypes[h]: [K_h, D]; targets: [H, B]."""
    loss = z.new_zeros(())
    for h, protos in enumerate(prototypes):
        scores = z @ protos.t() / temperature
        loss = loss + F.cross_entropy(scores, targets[h].repeat(n_views), ignore_index=IGNORE)
    return loss / len(prototypes)


@register("method", "deepclusterv2")
class DeepClusterV2(MultiCropMethod):
    def __init__(self, cfg, ctx: RunContext):
        super().__init__(cfg, ctx)
        o: DCv2Options = cfg.method_options
        if not o.crops_for_assign or min(o.crops_for_assign) < 0:
            raise ConfigError(f"crops_for_assign {o.crops_for_assign}: need view numbers >= 0")
        if o.temperature <= 0 or not o.n_prototypes or any(k < 2 for k in o.n_prototypes):
            raise ConfigError("need temperature > 0 and at least 2 prototypes per head")
        if max(o.n_prototypes) > ctx.dataset_size:
            raise ConfigError(f"{max(o.n_prototypes)} prototypes for {ctx.dataset_size} samples: "
                              "use fewer (e.g. --set method_options.n_prototypes=[100,100,100])")
        self.o = o
        self.make_embedding(cfg.arch)
        # Prototypes are the k-means centroids and are never trained (swav freezes them for more
        # iterations than a run has), so they are buffers: saved, not optimised.
        for h, k in enumerate(o.n_prototypes):
            self.register_buffer(f"prototypes{h}", l2_normalize(torch.randn(k, o.feat_dim)))
        # Cluster of every sample of the dataset (by its stable index), per head; IGNORE until the
        # first k-means. Identical on every rank (gathered), so a buffer (saved with the model) that DDP
        # must not re-send from rank 0 before every forward: at 100M samples that is 2.4 GB per step.
        self.register_buffer("assignments", torch.full((len(o.n_prototypes), ctx.dataset_size), IGNORE,
                                                       dtype=torch.long))
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ["assignments"])
        # This rank's memory bank: an epoch's embeddings of the assignment crops (plain tensors, not
        # buffers: DDP must not broadcast them), with their sample indices.
        size = ctx.steps_per_epoch * ctx.batch_size
        self.bank = torch.zeros(len(o.crops_for_assign), size, o.feat_dim, device=ctx.device)
        self.bank_index = torch.full((size,), -1, dtype=torch.long, device=ctx.device)
        self.bank_ptr = 0

    @property
    def prototypes(self) -> list[torch.Tensor]:
        return [getattr(self, f"prototypes{h}") for h in range(len(self.o.n_prototypes))]

    def forward(self, batch: dict) -> dict:
        views, index = batch["views"], batch["index"]
        n = index.shape[0]
        z = self.embed(views)
        targets = self.assignments[:, index]
        loss = dcv2_loss(z, self.prototypes, targets, len(views), self.o.temperature)
        self._remember(z.detach(), index, n)
        return {"loss": loss, "assigned": (targets[0] != IGNORE).float().mean()}

    def _remember(self, z: torch.Tensor, index: torch.Tensor, n: int):
        lo, hi = self.bank_ptr, self.bank_ptr + n
        if hi > self.bank.shape[1]:
            raise RuntimeError(f"memory bank overflow: {hi} > {self.bank.shape[1]} (an epoch longer than "
                               "steps_per_epoch, or on_epoch_start not called at the epoch boundary)")
        for j, crop in enumerate(self.o.crops_for_assign):
            self.bank[j, lo:hi] = z[crop * n:(crop + 1) * n]
        self.bank_index[lo:hi] = index
        self.bank_ptr = hi

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_start(self, loader):
        """Fill the memory bank with one no-grad pass over the data (swav's init_memory)."""
        ctx = self.ctx
        self.bank_ptr = 0
        if ctx.log:
            ctx.log.info("filling the memory bank: one pass of %d batches before epoch 0", ctx.steps_per_epoch)
        with torch.no_grad(), ctx.autocast(), ctx.progress_bar(ctx.steps_per_epoch * ctx.batch_size,
                                                                "memory bank", "img") as bar:
            for i, batch in enumerate(loader):
                z = self.embed(batch["views"][:max(self.o.crops_for_assign) + 1])
                # embed() saw only the first views, so crop c sits at rows c*n..(c+1)*n as in forward
                self._remember(z, batch["index"], batch["index"].shape[0])
                bar.update(batch["index"].shape[0])
                if i % 20 == 19:
                    ctx.check_stop()
        if ctx.log:
            ctx.log.info("memory bank filled: %d embeddings per crop on rank %d", self.bank_ptr, ctx.rank)

    @torch.no_grad()
    def prepare_benchmark(self):
        """Random assignments instead of a memory-bank pass and k-means: same cost per step."""
        g = torch.Generator(device="cpu").manual_seed(self.ctx.seed)
        for h, k in enumerate(self.o.n_prototypes):
            self.assignments[h] = torch.randint(k, (self.assignments.shape[1],), generator=g).to(self.assignments.device)
        self.bank_ptr = 0

    @torch.no_grad()
    def on_epoch_start(self, epoch: int):
        ctx = self.ctx
        filled = self.bank_ptr
        banks = self.bank[:, :filled]
        index = self.bank_index[:filled]
        heads = len(self.o.n_prototypes)
        with ctx.progress_bar(heads * self.o.kmeans_iters, f"k-means epoch {epoch} ({heads} heads)", "round") as bar:
            for h, k in enumerate(self.o.n_prototypes):
                # a generator per (seed, epoch, head): identical on every rank and after a resume
                g = torch.Generator(device="cpu").manual_seed(ctx.seed * 1_000_003 + epoch * 101 + h)
                j = h % len(self.o.crops_for_assign)
                bar.set_postfix(head=f"{h + 1}/{heads}", k=k)
                centroids, local = spherical_kmeans(banks[j], k, iters=self.o.kmeans_iters, generator=g,
                                                    group=ctx.group, on_iteration=ctx.check_stop,
                                                    on_round_done=bar.update)
                getattr(self, f"prototypes{h}").copy_(centroids)
                self.assignments[h] = gather_assignments(local, index, self.assignments.shape[1], group=ctx.group)
        self.bank_ptr = 0  # this epoch's embeddings overwrite the bank from the start

    def rank_state_dict(self) -> dict:
        return {"bank": self.bank.cpu(), "bank_index": self.bank_index.cpu(), "bank_ptr": self.bank_ptr}

    def load_rank_state_dict(self, state: dict):
        device = self.bank.device
        self.bank = state["bank"].to(device)
        self.bank_index = state["bank_index"].to(device)
        self.bank_ptr = int(state["bank_ptr"])

    def load_rank_states(self, states, old_world_size: int) -> str:
        """Another world size: the old banks' embeddings are re-keyed by sample index (this rank keeps
        index % world_size == rank), so the k-means at the next epoch start sees each of them once; the
        bank grows to hold them and this rank's share of the epoch's unread samples."""
        ctx, kept, index, total = self.ctx, [], [], 0
        for state in states:
            n = int(state["bank_ptr"])
            old_index = state["bank_index"][:n]
            mine = old_index % ctx.world_size == ctx.rank
            kept.append(state["bank"][:, :n][:, mine])
            index.append(old_index[mine])
            total += n
        bank, index = torch.cat(kept, 1), torch.cat(index)
        size = max(self.bank.shape[1], len(index) + ctx.steps_per_epoch * ctx.batch_size)
        self.bank = torch.zeros(self.bank.shape[0], size, self.bank.shape[2], device=ctx.device)
        self.bank_index = torch.full((size,), -1, dtype=torch.long, device=ctx.device)
        self.bank[:, :len(index)] = bank.to(ctx.device)
        self.bank_index[:len(index)] = index.to(ctx.device)
        self.bank_ptr = len(index)
        return (f"memory bank: the {total} embeddings of {old_world_size} rank(s) re-keyed by sample index over "
                f"{ctx.world_size} rank(s)")
