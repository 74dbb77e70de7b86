"""Jigsaw Clustering (Chen, Liu, Jia, CVPR'21): 4 overlapping patches per image, then cross-image montages.

    loader = make_loader("jigclu", "shards/x", batch_size=64)
    batch["patches"]                       # [B, 4, 3, 112, 112] float32, locations TL, BL, TR, BR
    m = make_montages(batch["patches"], generator, group=None)   # on the trainer's device
    m["montages"]                          # [B, 3, 224, 224]
    m["image_id"], m["location"]           # [B, 4] int64 per quadrant (TL, TR, BL, BR)

Patches (JigClu `JigCluTransform(cross=0.3)` + `main.py`, METHODS.md §4.1): the image is split into
4 overlapping boxes, each (0.5 + cross) = 0.8 of each side, in the order TL, BL, TR, BR (location
labels 0..3): TL at (0, 0), BL at (H - h, 0), TR at (0, W - w), BR at (H - h, W - w) as (y, x),
h = round(0.8 H), w = round(0.8 W). Each box independently gets MoCo v2's augmentation: a
RandomResizedCrop of the BOX to 112 at scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8,
grayscale p = 0.2, Gaussian blur sigma in [0.1, 2] with p = 0.5, horizontal flip, ImageNet normalise.

The augmentation is the multi-crop machinery with another crop rule: the 4 crops are a
`MultiCropSpec` group (4 x 112, scale (0.2, 1)) with the MoCo v2 `ColorRecipe`, every random draw
after the crop comes from the sample's uniforms `u` [4, 9] (pipelines/spec.py), and the colour /
blur / flip / normalise stage is the fused CPU kernel (`kernel="fused"`, CPU default) or DALI's own
ops (`kernel="native"`, GPU default) -- the two are pinned to one reference by tests/test_pipelines.
Only the windows differ: each one is drawn inside its box. With `with_params=True` the batch also
holds params.boxes ([4, 4] (y, x, h, w) in source pixels), params.{k}.anchor / params.{k}.extent
(patch k's window in source pixels), params.u and params.crops.0 (the uint8 crops).

Montages (`make_montages`, JigClu `_batch_gather_ddp`): the patches of the global batch (n images)
are listed as [all TL, all BL, all TR, all BR] (index = location * n + image), shuffled by one
permutation of 4n drawn on rank 0 and broadcast, and tiled 2x2: montage m gets shuffled[m] top-left,
shuffled[n + m] top-right, shuffled[2n + m] bottom-left, shuffled[3n + m] bottom-right. Each rank
keeps its own slice of n / world montages, so the compute is one 224 view per image.
"""

from __future__ import annotations

from dataclasses import asdict

import nvidia.dali.math as dmath
import torch
import torch.distributed as dist
from nvidia.dali import fn, types

from . import augment as A
from .family import DTYPES, GraphInputs
from .kernels import fused_views
from .multicrop import _native_view, _stack
from .spec import ColorRecipe, CropGroup, MultiCropSpec, SpecError

LOCATIONS = ("TL", "BL", "TR", "BR")      # patch order in `patches`, = JigClu's location labels 0..3
QUADRANTS = ("TL", "TR", "BL", "BR")      # label order of a montage (row-major 2x2, feature-map order)
# MoCo v2's augmentation (JigClu main.py): ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2,
# blur sigma [0.1, 2] p=0.5, flip 0.5.
MOCO_V2 = ColorRecipe(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, gray_p=0.2, blur_p=0.5,
                      blur_sigma=(0.1, 2.0), flip_p=0.5)


class JigClu:
    name = "jigclu"

    def __init__(self, size: int = 112, scale=(0.2, 1.0), cross: float = 0.3, color: ColorRecipe = MOCO_V2,
                 dtype: str = "float32", kernel: str | None = None):
        if not 0.0 <= cross < 0.5:
            raise SpecError(f"cross={cross}: expected 0 <= cross < 0.5 (each box covers 0.5 + cross of a side)")
        if dtype not in DTYPES:
            raise SpecError(f"dtype={dtype!r}: choose from {sorted(DTYPES)}")
        if kernel not in (None, "fused", "native"):
            raise SpecError(f"kernel={kernel!r}: choose 'fused' (CPU) or 'native' (DALI ops)")
        self.spec = MultiCropSpec((CropGroup(len(LOCATIONS), size, tuple(scale)),), color=color).validate()
        self.cross, self.dtype, self.kernel = cross, dtype, kernel

    def describe(self) -> dict:
        return {"family": self.name, "spec": asdict(self.spec), "cross": self.cross, "dtype": self.dtype,
                "kernel": self.kernel}

    def boxes(self, shape):
        """Per location (TL, BL, TR, BR): (origin [y, x], integer size [h, w]) nodes, source pixels."""
        h, w = fn.cast(shape[0], dtype=types.FLOAT), fn.cast(shape[1], dtype=types.FLOAT)
        # Box size rounded to whole pixels (floor(x + 0.5): DALI's float->int cast itself rounds).
        bh = fn.cast(dmath.floor(h * (0.5 + self.cross) + 0.5), dtype=types.INT32)
        bw = fn.cast(dmath.floor(w * (0.5 + self.cross) + 0.5), dtype=types.INT32)
        zero = h * 0.0
        far_y, far_x = h - fn.cast(bh, dtype=types.FLOAT), w - fn.cast(bw, dtype=types.FLOAT)
        origins = {"TL": (zero, zero), "BL": (far_y, zero), "TR": (zero, far_x), "BR": (far_y, far_x)}
        return [(fn.stack(*origins[loc]), fn.stack(bh, bw)) for loc in LOCATIONS]

    def graph(self, g: GraphInputs) -> dict:
        spec, group = self.spec, self.spec.groups[0]
        kernel = self.kernel or ("fused" if g.device == "cpu" else "native")
        if kernel == "fused" and g.device == "gpu":
            raise SpecError("kernel='fused' is the CPU kernel; GPU pipelines use kernel='native'")
        img = A.decode(g.jpg, g.device, g.hw_decoder_load)
        u = fn.random.uniform(range=[0.0, 1.0], shape=[spec.num_views, 9])
        out, crops, boxes = {}, [], []
        for k, (origin, size) in enumerate(self.boxes(g.shape)):
            # torchvision's RandomResizedCrop rule applied to the box, then moved into the image.
            anchor, extent = A.crop_window(size, group.scale, group.ratio)
            anchor = anchor + origin
            crops.append(fn.resize(img, size=[group.size, group.size], roi_start=anchor, roi_end=anchor + extent,
                                   antialias=True, interp_type=types.INTERP_LINEAR, device=g.device))
            if g.with_params:
                out[f"params.{k}.anchor"], out[f"params.{k}.extent"] = anchor, extent
                boxes.append(fn.cat(origin, fn.cast(size, dtype=types.FLOAT)))
        stack = _stack(crops)                                                   # [4, S, S, 3] uint8
        if kernel == "fused":
            patches = fused_views([stack], [group.count], u, spec.color.as_array(), spec.mean, spec.std)[0]
        else:
            patches = _stack([_native_view(c, u, k, spec, g.device) for k, c in enumerate(crops)])
        out["patches"] = fn.cast(patches, dtype=DTYPES[self.dtype]) if self.dtype != "float32" else patches
        if g.with_params:
            out["params.boxes"] = fn.stack(*boxes)
            out["params.u"], out["params.crops.0"] = u, stack
        return out


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
