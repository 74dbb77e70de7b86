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

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..recipes.jigsaw import JigsawOptions
from ..registry import register
from .base import Method, RunContext

N_TILES = 9


def num_permutations(ctx: RunContext, options: JigsawOptions) -> int:
    """|P| of the set the pipeline uses: from its description (the jigsaw pipeline's `describe()`, as
    the trainer passes it), else, in a context without one, from the same spec."""
    if ctx.pipeline:
        if "num_permutations" not in ctx.pipeline:
            raise ConfigError(f"jigsaw needs the jigsaw pipeline, not {ctx.pipeline.get('pipeline')!r}: its "
                              "description has no num_permutations")
        return int(ctx.pipeline["num_permutations"])
    from .. import permutations as perm_sets  # numba: only when there is no pipeline description
    try:
        return len(perm_sets.resolve(options.permutations, n_tiles=N_TILES))
    except (ValueError, OSError) as e:
        raise ConfigError(f"method_options.permutations: {e}") from None


@register("method", "jigsaw")
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
