"""The common way, as a peer for every DALI figure: PIL transforms + `webdataset` + torch DataLoader.

torchvision is not installable beside the CPU torch build here, so the transforms are written with
PIL exactly as torchvision's PIL backend does them (RandomResizedCrop = crop + bilinear resize with
antialiasing; ColorJitter = ImageEnhance brightness/contrast/colour + HSV hue shift, in random
order; RandomGrayscale = convert("L"); GaussianBlur = ImageFilter.GaussianBlur; ToTensor +
Normalize in torch). The crop-window rule and the probabilities come from the same spec objects
the DALI graphs read (pipelines/spec.py).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageEnhance, ImageFilter

from pipelines.spec import ColorRecipe, CropGroup, EvalSpec, MultiCropSpec


def crop_window(w: int, h: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, width, height)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _hue(img: Image.Image, shift: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    h = Image.fromarray((np.asarray(h, dtype=np.uint8) + np.uint8(int(shift * 255) % 256)).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(img: Image.Image, r: ColorRecipe, rng: random.Random) -> Image.Image:
    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - r.brightness, 1 + r.brightness)),
        lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - r.contrast, 1 + r.contrast)),
        lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - r.saturation, 1 + r.saturation)),
        lambda im: _hue(im, rng.uniform(-r.hue, r.hue)),
    ]
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


class MultiCropPIL:
    """One sample -> the spec's views, the torchvision way."""

    def __init__(self, spec: MultiCropSpec, seed: int = 0):
        self.spec, self.rng = spec, random.Random(seed)

    def view(self, img: Image.Image, g: CropGroup) -> torch.Tensor:
        r, rng = self.spec.color, self.rng
        x, y, w, h = crop_window(img.width, img.height, g.scale, g.ratio, rng)
        v = img.resize((g.size, g.size), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h))
        if rng.random() < r.flip_p:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < r.p:
            v = color_jitter(v, r, rng)
        if rng.random() < r.gray_p:
            v = v.convert("L").convert("RGB")
        if rng.random() < r.blur_p:
            v = v.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*r.blur_sigma)))
        return to_tensor(v, self.spec.mean, self.spec.std)

    def __call__(self, sample: dict) -> tuple:
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        views = [self.view(img, g) for g in self.spec.groups for _ in range(g.count)]
        return (int(sample["index"]), *views)


class EvalPIL:
    def __init__(self, spec: EvalSpec, train: bool, seed: int = 0):
        self.spec, self.train, self.rng = spec, train, random.Random(seed)

    def __call__(self, sample: dict) -> tuple:
        s = self.spec
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        if self.train:
            x, y, w, h = crop_window(img.width, img.height, s.scale, s.ratio, self.rng)
            img = img.resize((s.size, s.size), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h))
            if self.rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            k = s.resize / min(img.size)
            img = img.resize((round(img.width * k), round(img.height * k)), Image.Resampling.BILINEAR)
            left, top = (img.width - s.size) // 2, (img.height - s.size) // 2
            img = img.crop((left, top, left + s.size, top + s.size))
        return int(sample["index"]), to_tensor(img, s.mean, s.std)


def decode_only(sample: dict) -> tuple:
    img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    return int(sample["index"]), torch.from_numpy(np.asarray(img)).shape[0]


def make_loader(tars: list[str], transform, batch_size: int, workers: int, seed: int = 0):
    """webdataset + DataLoader, the usual way: shards split over workers, a sample shuffle buffer."""
    ds = (wds.WebDataset(tars, shardshuffle=len(tars), seed=seed, workersplitter=wds.split_by_worker,
                         empty_check=False)
          .shuffle(1000, seed=seed).map(transform).batched(batch_size, partial=False))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)
