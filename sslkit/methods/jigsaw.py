"""Jigsaw puzzles (Noroozi & Favaro 2016; Goyal et al. 2019 as VISSL trains it).

Per step: the 9 tiles of each image (already shuffled by the pipeline, `batch["tiles"]` [B, 9, 3, t, t])
go through ONE siamese trunk pass as [B*9, 3, t, t] (shared weights; the 9 tiles of an image stay
contiguous) -> per-tile head Linear(D, 1000) + BatchNorm1d + ReLU (VISSL's `mlp [D, 1000]` with BN and
ReLU) -> the 9 tile vectors concatenated in TILE ORDER (position k of the shuffled input, VISSL's
`siamese_concat_view`) to [B, 9000] -> Linear(9000, |P|) -> cross-entropy against `batch["perm"]`.

|P| is never set by hand: it is the size of the set the pipeline actually draws from
(`ctx.pipeline["num_permutations"]`), or, without a pipeline description, of the set the same spec
resolves to (`sslkit.permutations.resolve`). The tile order convention lives in
`sslkit.permutations` (module docstring, `permute_tiles` / `unpermute_tiles`).

Trunks: any ResNet (pooled res5, D = 2048 for ResNet-50) or Goyal's `alexnet_jigsaw` (flattened pool5
of a 64x64 tile, D = 1024).

Gradient accumulation (accum_steps > 1): the loss is per sample, so only BatchNorm differs from a true
large batch (each micro-batch is normalised with its own statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..registry import register
from .base import Method, Preset, RunContext

N_TILES = 9


@dataclass(frozen=True)
class JigsawOptions:
    permutations: int | str = 2000     # |P| of a generated max-Hamming set (max_avg, seed 0), or a .npy set
    geometry: str = "goyal"            # pipelines/jigsaw.py GEOMETRIES: goyal (255/85/64) | noroozi (225/75/64)
    tile_dim: int = 1000               # width of the per-tile head (VISSL: 1000); the concat is 9 x this


def num_permutations(ctx: RunContext, options: JigsawOptions) -> int:
    """|P| of the set the pipeline uses: from its description, else from the same spec."""
    described = ctx.pipeline.get("pipeline", ctx.pipeline) if isinstance(ctx.pipeline, dict) else {}
    n = described.get("num_permutations") if isinstance(described, dict) else None
    if n is not None:
        return int(n)
    from .. import permutations as perm_sets  # numba: only when there is no pipeline description
    try:
        return len(perm_sets.resolve(options.permutations, n_tiles=N_TILES))
    except (ValueError, OSError) as e:
        raise ConfigError(f"method_options.permutations: {e}") from None


# VISSL jigsaw_8gpu_resnet.yaml: 8 GPUs x 32, SGD lr 0.1 per 256, momentum 0.9, wd 1e-4,
# no decay on BN (exclude_norm_bias_wd also spares the biases, which VISSL decays), 105 epochs,
# x0.1 at epochs 30/60/90/100; VISSL's single-node warm-up collapses to none (its resolve_linear_schedule).
SEED = dict(arch="resnet50", optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
            exclude_norm_bias_wd=True, epochs=105, schedule="multistep", milestones=(30, 60, 90, 100), gamma=0.1,
            warmup_epochs=0, batch_size=32)
CPU = dict(optimizer="sgd", momentum=0.9, weight_decay=1e-4, exclude_norm_bias_wd=True, schedule="cosine",
           final_lr_ratio=0.01, warmup_epochs=0)
PRESETS = {
    "rn50_perm100": Preset("VISSL/Goyal'19 jigsaw, ResNet-50, |P| 100, 105 epochs SGD multistep, 8 GPUs x 32 "
                           "(48.57 IN-1k linear)", {**SEED, "method_options.permutations": 100}),
    "rn50_perm2000": Preset("VISSL/Goyal'19 jigsaw, ResNet-50, |P| 2000 (VISSL's default), 105 epochs SGD "
                            "multistep, 8 GPUs x 32 (46.73 IN-1k linear)",
                            {**SEED, "method_options.permutations": 2000}),
    "rn50_perm10000": Preset("VISSL/Goyal'19 jigsaw, ResNet-50, |P| 10000, 105 epochs SGD multistep, 8 GPUs x 32 "
                             "(48.11 IN-1k linear)", {**SEED, "method_options.permutations": 10000}),
    "alexnet_perm2000": Preset("Goyal'19 AlexNet jigsaw trunk (1024-d pool5 per 64 px tile), |P| 2000, the RN50 "
                               "SGD recipe (no public AlexNet pretext config; 34.82 IN-1k for Goyal's model)",
                               {**SEED, "arch": "alexnet_jigsaw", "method_options.permutations": 2000}),
    "small": Preset("a few thousand images on CPU: ResNet-18, |P| 100, 256-d tile head, 30 epochs",
                    {**CPU, "arch": "resnet18", "epochs": 30, "batch_size": 32, "lr": 0.1,
                     "method_options.permutations": 100, "method_options.tile_dim": 256}),
    # bench/ssl_quality.py: 5,000 Fashion-MNIST images. The `small` geometry cuts 16 px tiles from a 63 px
    # crop of the image resized to 64, so the trunk sees parts at the scale the 64 px evaluation shows;
    # Goyal's 64 px tiles of a 255 px crop are 9x upsampled 28 px images and did not learn (0.755 vs 0.769).
    # Learning rate per 256 from a sweep of this protocol (kNN res5avg / res4 / res3, random 0.769 / 0.770 /
    # 0.779): 0.4 -> 0.756 / 0.787 / 0.809, 0.1 -> 0.781 / 0.796 / 0.814, 0.03 -> 0.790 / 0.795 / 0.808;
    # 0.1 is best on five of the six kNN and linear cells.
    "fmnist": Preset("learning check on 28x28 grey images (bench/ssl_quality.py, Fashion-MNIST) on CPU: resnet_tiny, "
                     "`small` geometry (16 px tiles of a 63 px crop), |P| 100, 128-d tile head, SGD 0.1 per 256, "
                     "20 epochs at batch 32",
                     {**CPU, "arch": "resnet_tiny", "epochs": 20, "batch_size": 32, "lr": 0.1,
                      "method_options.permutations": 100, "method_options.tile_dim": 128,
                      "method_options.geometry": "small"}),
    "tiny": Preset("smoke runs and tests: resnet_tiny, |P| 100, 64-d tile head; an epoch of 200 images in ~5 s "
                   "on 2 CPU ranks",
                   {**CPU, "arch": "resnet_tiny", "epochs": 2, "batch_size": 8, "lr": 0.1,
                    "method_options.permutations": 100, "method_options.tile_dim": 64}),
}


@register("method", "jigsaw", options=JigsawOptions, presets=PRESETS, default_preset=None)
class Jigsaw(Method):
    pipeline = "jigsaw"

    @classmethod
    def loader_options(cls, options: JigsawOptions) -> dict:
        return {"permutations": options.permutations, "geometry": options.geometry}

    def __init__(self, cfg, ctx: RunContext):
        super().__init__(cfg, ctx)
        o: JigsawOptions = cfg.method_options
        if o.tile_dim < 1:
            raise ConfigError(f"method_options.tile_dim={o.tile_dim}: must be >= 1")
        self.num_permutations = num_permutations(ctx, o)
        if self.num_permutations < 2:
            raise ConfigError(f"{self.num_permutations} permutation(s): a jigsaw needs at least 2 classes")
        self.backbone = self.make_backbone(cfg.arch, input="rgb")
        d = self.backbone.num_features
        self.tile_head = nn.Sequential(nn.Linear(d, o.tile_dim), nn.BatchNorm1d(o.tile_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(N_TILES * o.tile_dim, self.num_permutations)

    def logits(self, tiles: torch.Tensor) -> torch.Tensor:
        """[B, 9, C, t, t] shuffled tiles -> [B, |P|] permutation logits."""
        b, n = tiles.shape[:2]
        if n != N_TILES:
            raise ValueError(f"expected {N_TILES} tiles per image, got tiles of shape {tuple(tiles.shape)}")
        x = tiles.reshape(b * n, *tiles.shape[2:])       # image-major: rows 9i..9i+8 are image i's tiles
        if self.ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        per_tile = self.tile_head(self.backbone(x))     # [B*9, tile_dim]
        return self.classifier(per_tile.reshape(b, n * per_tile.shape[1]))   # concat in tile order

    def forward(self, batch: dict) -> dict:
        logits = self.logits(batch["tiles"]).float()
        target = batch["perm"]
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == target).float().mean()
        return {"loss": loss, "acc": acc}
