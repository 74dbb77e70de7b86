"""Jigsaw Clustering (Chen, Liu, Jia, CVPR'21): 4 overlapping patches per image, then cross-image montages.

    loader = make_loader("jigclu", "shards/x", batch_size=64)
    batch["patches"]                       # [B, 4, 3, 112, 112] float32, locations TL, BL, TR, BR
    m = make_montages(batch["patches"], generator, group=None)   # on the trainer's device
    m["montages"]                          # [B, 3, 224, 224]
    m["image_id"], m["location"]           # [B, 4] int64 per quadrant (TL, TR, BL, BR)

Patches (the JigClu repository's `JigCluTransform(cross=0.3)` and training script): the image is
split into 4 overlapping boxes, each (0.5 + cross) = 0.8 of each side, in the order TL, BL, TR, BR
(location labels 0..3): TL at (0, 0), BL at (H - h, 0), TR at (0, W - w), BR at (H - h, W - w) as
(y, x), h = floor(0.8 H + 0.5), w = floor(0.8 W + 0.5). Each box independently gets MoCo v2's
augmentation: a RandomResizedCrop of the BOX to 112 at scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4,
0.1) with p = 0.8, grayscale p = 0.2, Gaussian blur sigma in [0.1, 2] with p = 0.5, horizontal flip,
ImageNet normalise.

The augmentation is the multi-view machinery (pipelines/views.py): one crop group of 4 x 112 whose
window rules are RandomResizedCrops of the four boxes (`ViewRule(box=0.8, box_y, box_x)`), the MoCo
v2 `ColorRecipe`, and the same colour stage as multi-crop (fused CPU kernel or torch batch stage).
With `with_params=True` the batch also holds params.windows ([B, 4, 4] (y, x, h, w) of each patch's
window in source pixels), params.flips, params.u and params.crops.0 (the uint8 crops).

Montages (`make_montages`, the JigClu repository's `_batch_gather_ddp`): the patches of the global batch (n images)
are listed as [all TL, all BL, all TR, all BR] (index = location * n + image), shuffled by one
permutation of 4n drawn on rank 0 and broadcast, and tiled 2x2: montage m gets shuffled[m] top-left,
shuffled[n + m] top-right, shuffled[2n + m] bottom-left, shuffled[3n + m] bottom-right. Each rank
keeps its own slice of n / world montages, so the compute is one 224 view per image.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.distributed as dist

from sslkit.registry import register

from .family import GraphInputs
from .spec import ColorRecipe, SpecError, ViewRule
from .views import Views

LOCATIONS = ("TL", "BL", "TR", "BR")      # patch order in `patches`, = JigClu's location labels 0..3
QUADRANTS = ("TL", "TR", "BL", "BR")      # label order of a montage (row-major 2x2, feature-map order)
# MoCo v2's augmentation, as the JigClu repository's training script sets it: ColorJitter(0.4, 0.4,
# 0.4, 0.1) p=0.8, grayscale 0.2, blur sigma [0.1, 2] p=0.5, flip 0.5.
MOCO_V2 = ColorRecipe(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, gray_p=0.2, blur_p=0.5,
                      blur_sigma=(0.1, 2.0), flip_p=0.5)


@register("pipeline", "jigclu")
class JigClu:
    name = "jigclu"

    def __init__(self, size: int = 112, scale=(0.2, 1.0), cross: float = 0.3, color: ColorRecipe = MOCO_V2,
                 dtype: str = "float32", kernel: str | None = None):
        if not 0.0 <= cross < 0.5:
            raise SpecError(f"cross={cross}: expected 0 <= cross < 0.5 (each box covers 0.5 + cross of a side)")
        rules = [ViewRule(tuple(scale), box=0.5 + cross, box_y=int(loc[0] == "B"), box_x=int(loc[1] == "R"),
                          flip_p=color.flip_p) for loc in LOCATIONS]
        self.views = Views([(len(LOCATIONS), size)], rules, color, dtype=dtype, kernel=kernel)
        self.size, self.scale, self.cross, self.color = size, tuple(scale), cross, color

    def describe(self) -> dict:
        return {"pipeline": self.name, "size": self.size, "scale": self.scale, "cross": self.cross,
                "color": asdict(self.color), "dtype": self.views.dtype, "kernel": self.views.kernel}

    def graph(self, g: GraphInputs) -> dict:
        return self.views.graph(g)

    def postprocess(self, batch: dict) -> dict:
        batch["patches"] = self.views.postprocess(batch)[0]                    # [B, 4, 3, S, S]
        return batch


def make_montages(patches: torch.Tensor, generator_or_seed, group=None) -> dict:
    """Shuffle the patches of the global batch and tile them 2x2 into one montage per local image.

    patches: [N, 4, C, h, w] (this rank's batch, locations TL, BL, TR, BR as the loader gives them),
    on any device. generator_or_seed: a CPU torch.Generator or an int seed for the permutation
    (drawn on rank 0 of `group` and broadcast, so every rank uses the same one). group: a
    torch.distributed process group (e.g. torch.distributed.group.WORLD) to all-gather the patches
    over; None is a single process. Every rank must pass the same N.

    Returns, with n = N * world the global batch and this rank's montages m = rank * N + i:
      montages  [N, C, 2h, 2w]  quadrants TL, TR / BL, BR
      image_id  [N, 4] int64    source image of each quadrant (order TL, TR, BL, BR, i.e. the order of
                                a [.., 2, 2] feature map flattened), a global index rank' * N + i'
      location  [N, 4] int64    where that patch was in its image: 0 TL, 1 BL, 2 TR, 3 BR
      perm      [4n] int64      the shuffle (shuffled[s] = patch perm[s] of the list location * n +
                                image), for a method that gathers features of every montage
    """
    if patches.ndim != 5 or patches.shape[1] != len(LOCATIONS):
        raise ValueError(f"make_montages: expected patches [N, 4, C, h, w], got {tuple(patches.shape)}")
    n_local = patches.shape[0]
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    if world > 1:
        parts = [torch.empty_like(patches) for _ in range(world)]
        dist.all_gather(parts, patches.contiguous(), group=group)
        everything = torch.cat(parts)                                           # [n, 4, C, h, w], rank-major
    else:
        everything = patches
    n = everything.shape[0]
    gen = generator_or_seed
    if not isinstance(gen, torch.Generator):
        gen = torch.Generator().manual_seed(int(generator_or_seed))
    perm = torch.randperm(4 * n, generator=gen).to(patches.device)
    if world > 1:
        dist.broadcast(perm, src=dist.get_global_rank(group, 0), group=group)
    mine = rank * n_local + torch.arange(n_local, device=patches.device)
    src = perm.view(4, n)[:, mine].t()                                          # [N, 4], quadrant order TL TR BL BR
    image_id, location = src % n, src // n
    quads = everything[image_id, location]                                      # [N, 4, C, h, w]
    c, h, w = patches.shape[2:]
    montages = quads.view(n_local, 2, 2, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n_local, c, 2 * h, 2 * w)
    return {"montages": montages, "image_id": image_id, "location": location, "perm": perm}
