"""Jigsaw Clustering (Chen, Liu, Jia, CVPR'21): 4 overlapping patches per image.

    loader = make_loader("jigclu", "shards/x", batch_size=64)
    batch["patches"]                       # [B, 4, 3, 112, 112] float32, locations TL, BL, TR, BR

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

The cross-image montages are the method's work (they gather patches across ranks on the trainer's
device): `sslkit.methods.jigclu.make_montages`.
"""

from __future__ import annotations

from dataclasses import asdict

from sslkit.registry import register

from .family import GraphInputs
from .spec import ColorRecipe, SpecError, ViewRule
from .views import Views

LOCATIONS = ("TL", "BL", "TR", "BR")      # patch order in `patches`, = JigClu's location labels 0..3
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
