"""Jigsaw Clustering (Chen, Liu, Jia, CVPR'21; JigsawClustering's JigClu/jigclu.py).

Per step, with n = the global batch (N images per rank x world):

1. montage (`make_montages`, JigClu `_batch_gather_ddp`): the 4 patches of every image of the global
   batch (all-gathered) are listed [all TL, all BL, all TR, all BR] (index = location x n + image),
   shuffled by one permutation of 4n and tiled 2x2: montage m gets shuffled[m] top-left, shuffled[n + m]
   top-right, shuffled[2n + m] bottom-left, shuffled[3n + m] bottom-right. Each rank keeps its own
   N montages (global numbers rank x N + i), so the compute is one 2x-patch view per image. The
   permutation is a function of (seed, step) (`montage_permutation`), computed alike on every rank:
   no broadcast, and a resumed run draws the same ones (the step count is a buffer);
2. trunk: res5 (ResNet layer4) of each montage, bilinearly upsampled to the next even size (7 -> 8
   at 224) and average-pooled to 2x2: one vector per quadrant, in the order TL, TR, BL, BR;
3. heads on each quadrant vector: clustering Linear(D, D)-ReLU-Linear(D, 128), L2-normalised, and
   location Linear(D, 4); their outputs are all-gathered so every rank holds the 4n rows of the
   global batch (row (m, q) is patch perm[q n + m]: image perm % n, location perm // n);
4. loss = loss_clu x SupClu + loss_loc x CE: SupClu is JigClu's SupCon-style loss over the 4n rows
   whose positives are the 3 other patches of the same image, scaled by T / 0.07 (T = 0.3); CE
   predicts each patch's original location (0 TL, 1 BL, 2 TR, 3 BR).

Every rank computes the same loss over the global set. JigClu's all-gather is differentiable
(diffdist), so each rank's rows receive the gradient of every rank's (identical) loss: world x this
rank's own, which DDP's averaging turns into the full gradient of the loss. `gather_rows` gives the
same gradient without a backward collective: the other ranks' rows are constants and this rank's
own rows carry their gradient multiplied by the world size.

Gradient accumulation (accum_steps > 1) is not a true large batch: montages are built per micro-batch
(from the ranks' micro-batches, one permutation per micro-batch: the step counter counts forward
passes), the clustering loss contrasts the quadrants of one micro-batch only, and BatchNorm
normalises each micro-batch with its own statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..dist import rank_world
from ..recipes.jigclu import JigCluOptions
from ..registry import register
from .base import Method, RunContext, l2_normalize

LOCATIONS = ("TL", "BL", "TR", "BR")      # patch order in batch["patches"], = JigClu's location labels 0..3
QUADRANTS = ("TL", "TR", "BL", "BR")      # a montage's quadrants: row-major 2x2, the pooled feature order


def montage_permutation(n: int, seed: int, step: int) -> torch.Tensor:
    """The shuffle of the 4n patches at a step: [4n] int64 on the CPU, a pure function of its
    arguments (the same on every rank and after a resume)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (1 << 63))
    return torch.randperm(4 * n, generator=g)


@torch.no_grad()
def make_montages(patches: torch.Tensor, perm: torch.Tensor, group=None) -> dict:
    """Tile the patches of the global batch, shuffled by `perm`, 2x2 into one montage per local image.

    patches: [N, 4, C, h, w], this rank's batch, locations TL, BL, TR, BR as the loader gives them,
    on the trainer's device. perm: [4n] the same on every rank (`montage_permutation`), n = N x world.
    group: the process group to all-gather over (None: the default group when torch.distributed is
    initialised, else this process alone). Every rank must pass the same N.

    Returns, for this rank's montages m = rank x N + i:
      montages  [N, C, 2h, 2w]  quadrants TL, TR / BL, BR
      image_id  [N, 4] int64    global image (rank' x N + i') of each quadrant, order TL, TR, BL, BR
      location  [N, 4] int64    where that patch was in its image: 0 TL, 1 BL, 2 TR, 3 BR
    """
    if patches.ndim != 5 or patches.shape[1] != len(LOCATIONS):
        raise ValueError(f"make_montages: expected patches [N, 4, C, h, w], got {tuple(patches.shape)}")
    n_local = patches.shape[0]
    rank, world = rank_world(group)
    n = n_local * world
    if perm.shape != (4 * n,):
        raise ValueError(f"make_montages: perm must be a permutation of 4n = {4 * n}, got shape {tuple(perm.shape)}")
    if world > 1:
        parts = [torch.empty_like(patches) for _ in range(world)]
        dist.all_gather(parts, patches.contiguous(), group=group)
        everything = torch.cat(parts)                                           # [n, 4, C, h, w], rank-major
    else:
        everything = patches
    perm = perm.to(patches.device)
    mine = rank * n_local + torch.arange(n_local, device=patches.device)
    src = perm.view(4, n)[:, mine].t()                                          # [N, 4], quadrants TL TR BL BR
    image_id, location = src % n, src // n
    quads = everything[image_id, location]                                      # [N, 4, C, h, w]
    c, h, w = patches.shape[2:]
    montages = quads.view(n_local, 2, 2, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n_local, c, 2 * h, 2 * w)
    return {"montages": montages, "image_id": image_id, "location": location}


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather along dim 0 (rank-major), with the gradient of a differentiable all-gather under
    DDP's averaging when every rank computes the same loss on the result (module docstring): other
    ranks' rows are constants, this rank's rows pass their gradient times the world size."""
    rank, world = rank_world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[rank] = _ScaleGrad.apply(x, float(world))
    return torch.cat(parts)


def quadrant_features(fmap: torch.Tensor) -> torch.Tensor:
    """[N, D, H, W] -> [N, 4, D]: bilinear upsampling to the next even size (JigClu: 7 -> 8), 2x2
    average pooling, quadrants in the order TL, TR, BL, BR."""
    h, w = fmap.shape[-2:]
    if min(h, w) < 2:
        raise ConfigError(f"a {h}x{w} res5 map has no quadrants: make the montages at least 64 px "
                          "(method_options.patch_size >= 32)")
    if h % 2 or w % 2:
        fmap = F.interpolate(fmap, size=(h + h % 2, w + w % 2), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)


def supclu_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float, base_temperature: float = 0.07
                ) -> torch.Tensor:
    """JigClu's SupCluLoss: z [M, d] L2-normalised, labels [M] (image ids). For every anchor, the mean
    over its positives (same label, not itself) of log softmax over all other rows of z . z' / T;
    the loss is -(T / base_T) times its mean over anchors."""
    m = z.shape[0]
    logits = (z @ z.t()) / temperature
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    mean_log_prob_pos = log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp(min=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


@register("method", "jigclu")
class JigClu(Method):
    pipeline = "jigclu"

    @classmethod
    def loader_options(cls, options: JigCluOptions) -> dict:
        return {"size": options.patch_size, "scale": tuple(options.patch_scale), "cross": options.cross,
                "kernel": options.kernel}

    def __init__(self, cfg, ctx: RunContext):
        super().__init__(cfg, ctx)
        o: JigCluOptions = cfg.method_options
        if o.temperature <= 0 or o.base_temperature <= 0:
            raise ConfigError("temperature and base_temperature must be > 0")
        if o.patch_size < 32:
            raise ConfigError(f"patch_size {o.patch_size}: need >= 32 (montages of >= 64 px give a res5 map "
                              "with 2x2 quadrants)")
        if o.loss_clu < 0 or o.loss_loc < 0 or o.loss_clu + o.loss_loc == 0:
            raise ConfigError("loss_clu and loss_loc must be >= 0, not both 0")
        self.o = o
        self.backbone = self.make_backbone(cfg.arch)
        if not hasattr(self.backbone, "layer4"):
            raise ConfigError(f"jigclu needs a ResNet trunk (its res5 map), not {cfg.arch}")
        d = self.backbone.num_features
        hidden = o.hidden_dim or d
        self.clu_head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, o.feat_dim))
        self.loc_head = nn.Linear(d, len(LOCATIONS))
        # Steps taken (forward calls in training mode): the montage permutation of step t is drawn
        # from (seed, t), so a resumed run continues exactly.
        self.count_steps()

    def forward(self, batch: dict) -> dict:
        patches = batch["patches"]
        n_local = patches.shape[0]
        n = n_local * self.ctx.world_size
        step = self.steps_taken
        if self.training:
            self.step_taken()
        perm = montage_permutation(n, self.ctx.seed, step).to(patches.device)
        x = make_montages(patches, perm, self.ctx.group)["montages"]
        if self.ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        quads = quadrant_features(self.backbone.feature_maps(x, ["res5"])["res5"]).flatten(0, 1)   # [N*4, D]
        z = l2_normalize(self.clu_head(quads).float())
        loc = self.loc_head(quads).float()
        rows = gather_rows(torch.cat([z, loc], dim=1).view(n_local, 4, -1), self.ctx.group)       # [n, 4, d + 4]
        src = perm.view(4, n).t()                                                                  # [n, 4]
        image, location = (src % n).reshape(-1), (src // n).reshape(-1)
        rows = rows.reshape(4 * n, -1)
        z_all, loc_all = rows[:, :-len(LOCATIONS)], rows[:, -len(LOCATIONS):]
        with torch.autocast(rows.device.type, enabled=False):   # the 4n x 4n similarities in float32
            loss_clu = supclu_loss(z_all, image, self.o.temperature, self.o.base_temperature)
            loss_loc = F.cross_entropy(loc_all, location)
        loss = self.o.loss_clu * loss_clu + self.o.loss_loc * loss_loc
        with torch.no_grad():
            loc_acc = (loc_all.argmax(1) == location).float().mean()
        return {"loss": loss, "loss_clu": loss_clu.detach(), "loss_loc": loss_loc.detach(), "loc_acc": loc_acc}
