"""The common way, as a peer for every DALI figure: PIL transforms + `webdataset` + torch DataLoader.

torchvision is not installable beside the CPU torch build here, so the transforms are written with
PIL exactly as torchvision's PIL backend does them (RandomResizedCrop = crop + bilinear resize with
antialiasing; ColorJitter = ImageEnhance brightness/contrast/colour + HSV hue shift, in random
order; RandomGrayscale = convert("L"); GaussianBlur = ImageFilter.GaussianBlur; ToTensor +
Normalize in torch). The crop-window rule and the probabilities come from the same spec objects
the DALI graphs read (pipelines/spec.py).

The pretext recipes (jigsaw, colorization, jigclu) are written from the reference code's recipes
(VISSL's jigsaw and colorization transforms, Jigsaw Clustering's loader.py) as the `*Recipe` dataclasses below; bench/throughput.py records them
next to the DALI family's own `describe()`, so a reader can check that both sides ran one recipe.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageEnhance, ImageFilter

from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, ColorRecipe, CropGroup, EvalSpec, MultiCropSpec


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
        img = open_rgb(sample)
        views = [self.view(img, g) for g in self.spec.groups for _ in range(g.count)]
        return (int(sample["index"]), *views)


class EvalPIL:
    def __init__(self, spec: EvalSpec, train: bool, seed: int = 0):
        self.spec, self.train, self.rng = spec, train, random.Random(seed)

    def __call__(self, sample: dict) -> tuple:
        s = self.spec
        img = open_rgb(sample)
        if self.train:
            x, y, w, h = crop_window(img.width, img.height, s.scale, s.ratio, self.rng)
            img = img.resize((s.size, s.size), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h))
            if self.rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = resize_shorter(img, s.resize)
            left, top = (img.width - s.size) // 2, (img.height - s.size) // 2
            img = img.crop((left, top, left + s.size, top + s.size))
        return int(sample["index"]), to_tensor(img, s.mean, s.std)


def open_rgb(sample: dict) -> Image.Image:
    return Image.open(io.BytesIO(sample["jpg"])).convert("RGB")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(int): shorter side to `size`, aspect kept, bilinear with antialiasing."""
    k = size / min(img.size)
    return img.resize((round(img.width * k), round(img.height * k)), Image.Resampling.BILINEAR)


def random_crop(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    x, y = rng.randint(0, img.width - size), rng.randint(0, img.height - size)
    return img.crop((x, y, x + size, y + size))


# -- jigsaw (VISSL jigsaw_8gpu_resnet / Goyal'19) ----------------------------------------------------

@dataclass(frozen=True)
class JigsawRecipe:
    resize: int = 256           # shorter side
    crop: int = 255             # random crop, split into grid x grid cells of crop // grid = 85 px
    gray_p: float = 0.66        # grayscale of the whole crop, not per tile
    flip_p: float = 0.5
    grid: int = 3
    patch: int = 64             # tile inside its cell at a random offset in [0, cell - patch)
    permutations: int = 2000    # |P|, a maximal-Hamming set (sslkit.permutations.generate)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class JigsawPIL:
    """One sample -> (index, tiles [9, 3, 64, 64] in permuted order, permutation label)."""

    def __init__(self, recipe: JigsawRecipe = JigsawRecipe(), seed: int = 0):
        from sslkit.permutations import generate
        self.recipe, self.rng = recipe, random.Random(seed)
        self.perms = generate(recipe.permutations, seed=seed, n_tiles=recipe.grid ** 2)

    def __call__(self, sample: dict) -> tuple:
        r, rng = self.recipe, self.rng
        img = resize_shorter(open_rgb(sample), r.resize)
        if rng.random() < r.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = random_crop(img, r.crop, rng)
        if rng.random() < r.gray_p:
            img = img.convert("L").convert("RGB")
        x = to_tensor(img, r.mean, r.std)  # VISSL normalises the whole crop once, then cuts tiles
        cell = r.crop // r.grid
        jitter = cell - r.patch
        tiles = []
        # Column-major like VISSL's ImgPatchesFromTensor: tile 3*i + j is column i, row j.
        for i in range(r.grid):
            for j in range(r.grid):
                x0, y0 = i * cell + rng.randrange(jitter), j * cell + rng.randrange(jitter)
                tiles.append(x[:, y0:y0 + r.patch, x0:x0 + r.patch])
        label = rng.randrange(len(self.perms))
        return int(sample["index"]), torch.stack([tiles[k] for k in self.perms[label]]), label


# -- colorization (VISSL ImgPil2LabTensor + Zhang's targets) ----------------------------------------

@dataclass(frozen=True)
class ColorizationRecipe:
    resize: int = 256           # shorter side, then a random crop (VISSL's colorization RN50 transforms)
    crop: int = 224
    flip_p: float = 0.5
    decimate: int = 4           # ab targets at 1/4 resolution (Zhang's stride-4 subsampling)
    k: int = 10                 # soft encoding over the k nearest of the 313 bins
    sigma: float = 5.0


class ColorizationPIL:
    """One sample -> (index, L [1, S, S], top-k bins [S/4, S/4, k], their weights)."""

    def __init__(self, recipe: ColorizationRecipe = ColorizationRecipe(), seed: int = 0):
        import cv2
        # One OpenCV thread per worker process: the peer of one DALI thread (OpenCV otherwise spreads
        # cvtColor over its own pool and the comparison would no longer be worker for thread).
        cv2.setNumThreads(1)
        self.cv2, self.recipe, self.rng = cv2, recipe, random.Random(seed)

    def __call__(self, sample: dict) -> tuple:
        from sslkit.color import soft_encode_topk
        r, rng = self.recipe, self.rng
        img = random_crop(resize_shorter(open_rgb(sample), r.resize), r.crop, rng)
        if rng.random() < r.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # As VISSL does: RGB -> BGR, 8-bit cv2 Lab; L8 * 100/255 - 50 and a8/b8 - 128.
        lab = self.cv2.cvtColor(np.ascontiguousarray(np.asarray(img)[:, :, ::-1]), self.cv2.COLOR_BGR2LAB)
        L = torch.from_numpy(lab[:, :, 0].astype(np.float32) * (100.0 / 255.0) - 50.0)[None]
        ab = lab[::r.decimate, ::r.decimate, 1:].astype(np.float32) - 128.0
        bins, weights = soft_encode_topk(ab, k=r.k, sigma=r.sigma)
        return int(sample["index"]), L, torch.from_numpy(bins), torch.from_numpy(weights)


# -- jigsaw clustering (JigsawClustering main.py / loader.py) ---------------------------------------

@dataclass(frozen=True)
class JigCluRecipe:
    cross: float = 0.3          # each of the 4 crops spans 1/2 + cross of each side (0.8)
    view: CropGroup = CropGroup(4, 112, (0.2, 1.0))
    # MoCo-v2 augmentation: jitter 0.4/0.4/0.4/0.1 with p=0.8, gray 0.2, blur p=0.5, flip
    color: ColorRecipe = field(default_factory=lambda: ColorRecipe(
        brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, gray_p=0.2, blur_p=0.5))
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class JigCluPIL:
    """One sample -> (index, TL, BL, TR, BR views [3, 112, 112]), the order of JigCluTransform."""

    def __init__(self, recipe: JigCluRecipe = JigCluRecipe(), seed: int = 0):
        self.recipe = recipe
        # Each quadrant view is a multi-crop view of the quadrant: reuse that transform.
        self.views = MultiCropPIL(MultiCropSpec((recipe.view,), recipe.color, recipe.mean, recipe.std), seed)

    def __call__(self, sample: dict) -> tuple:
        img = open_rgb(sample)
        w, h = img.size
        cw, ch = int(self.recipe.cross * w), int(self.recipe.cross * h)
        boxes = [(0, 0, w // 2 + cw, h // 2 + ch), (0, h // 2 - ch, w // 2 + cw, h),
                 (w // 2 - cw, 0, w, h // 2 + ch), (w // 2 - cw, h // 2 - ch, w, h)]
        return (int(sample["index"]), *(self.views.view(img.crop(b), self.recipe.view) for b in boxes))


def decode_only(sample: dict) -> tuple:
    # Only the height leaves the worker: shipping whole decoded images through the DataLoader's shared
    # memory would charge the baseline for a copy the DALI decode-only stage does not make.
    img = open_rgb(sample)
    return int(sample["index"]), np.asarray(img).shape[0]


PREFETCH_FACTOR = 4   # batches each DataLoader worker keeps ready
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _image_key(sample: dict) -> str | None:
    lower = {k.lower(): k for k in sample if not k.startswith("__")}
    return next((lower[e] for e in IMAGE_KEYS if e in lower), None)


def canonical(sample: dict) -> dict:
    """Samples of built folders as they are; samples of adopted ones (tars written by other tools) get
    `jpg` (their image, any format) and `index` -1 (a throughput baseline looks nothing up)."""
    if "index" in sample:
        return sample
    return {**sample, "jpg": sample[_image_key(sample)], "index": b"-1"}


def make_loader(tars: list[str], transform, batch_size: int, workers: int, seed: int = 0,
                resampled: bool = False, pin_memory: bool = False):
    """webdataset + DataLoader, the usual way: shards split over workers, a sample shuffle buffer.

    `resampled=True` is webdataset's way to train for a number of steps rather than epochs (each
    worker draws shards at random, forever): a throughput measurement then sees the steady state,
    not the tail of an epoch where workers whose shards ran out sit idle.
    """
    ds = (wds.WebDataset(tars, shardshuffle=False if resampled else len(tars), resampled=resampled, seed=seed,
                         workersplitter=wds.split_by_worker, empty_check=False)
          .select(lambda sample: _image_key(sample) is not None).map(canonical)
          .shuffle(1000, seed=seed).map(transform).batched(batch_size, partial=False))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                       prefetch_factor=PREFETCH_FACTOR if workers > 0 else None, pin_memory=pin_memory)
