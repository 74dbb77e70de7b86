"""Augmentation specs: plain frozen dataclasses that the DALI graphs, the torch batch stage, the numba
kernels, the numpy reference (tests/reference.py) and the PIL baseline (bench/) all read, so all of them
implement one recipe.

Semantics every implementation follows (written down once, here):
- random draws: every view of a sample has N_VIEW_U uniforms u[0..30] in [0, 1), drawn by ONE DALI op
  for all views of the sample (`VIEW_U` names them). Everything random about a view is a function of
  its row: the crop window, the flip, the colour, grayscale and blur;
- crop window (`ViewRule`): torchvision's RandomResizedCrop rule inside a region of the image -- the
  whole image, or (JigClu) a box of floor(box H + 0.5) by floor(box W + 0.5) pixels in a corner. With
  s0, s1 the scale bounds and l0, l1 the logs of the ratio bounds, for attempt a = 0..9: area = region
  area x (s0 + (s1 - s0) u[area + 2a]), aspect = exp(l0 + (l1 - l0) u[area + 2a + 1]), width =
  rint(sqrt(area x aspect)), height = rint(sqrt(area / aspect)) (rint: half to even, as Python's
  round); the first attempt that fits gives the window, at y = floor(u[y] (region H - height + 1)),
  x = floor(u[x] (region W - width + 1)) (integers, as torchvision's randint). If none fits: the whole
  region clamped to the ratio range, centred ((H - height) // 2). Or, with `square` > 0, a square of
  side square x min(H, W) at continuous offsets y = u[y] (H - side), x = u[x] (W - side) (VISSL's
  Resize(shorter side) + RandomCrop). Rule parameters are float32 (DALI has no float64 constants), the
  arithmetic float64. The window is resized to size x size by ONE antialiased linear resize straight
  from the decoded image;
- horizontal flip if u[flip] < flip_p, folded into that resize (the window's x ends are swapped), so
  the colour stage never flips (flip commutes with the per-pixel colour map and the symmetric blur);
- colour (`ColorRecipe`): jitter applied if u[apply] < p; brightness b = 1 + B(2u[brightness] - 1),
  contrast c = 1 + C(2u[contrast] - 1), saturation s = 1 + S(2u[saturation] - 1), hue h = 360 H
  (2u[hue] - 1) degrees (all identity when not applied); grayscale if u[gray] < gray_p (s = 0). ONE
  linear map in YIQ space on the uint8 crop x, then clamped to [0, 255]:
  out = b c YIQ->RGB . Rot(h) . diag(1, s, s) . RGB->YIQ . x + b (128 - 128 c)
  (grayscale is the same map with s = 0, i.e. luma 0.299/0.587/0.114: one pass for all four ops);
- blur if u[blur] < blur_p with sigma = lo + (hi - lo) u[sigma]: Gaussian, kernel radius ceil(3 sigma)
  (sized to sigma, not a fixed 23 taps), reflect-101 borders, applied after the colour map (SwAV's order);
- normalise: (x/255 - mean) / std, channels first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from sslkit.errors import SslkitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The per-view uniforms (see the module docstring): photometric draws, the window position, then one
# (area, log-ratio) pair per RandomResizedCrop attempt.
CROP_ATTEMPTS = 10
VIEW_U = {"apply": 0, "brightness": 1, "contrast": 2, "saturation": 3, "hue": 4, "gray": 5, "blur": 6,
          "sigma": 7, "flip": 8, "y": 9, "x": 10, "area": 11}   # u[area + 2a], u[area + 2a + 1]: attempt a
N_VIEW_U = VIEW_U["area"] + 2 * CROP_ATTEMPTS


class SpecError(SslkitError, ValueError):
    """An augmentation recipe or pipeline option that cannot be built (one-line reason)."""


def check_choice(name: str, value, choices) -> None:
    """One-line SpecError unless `value` is one of `choices` (the pipelines' option checks)."""
    if value not in choices:
        raise SpecError(f"{name}={value!r}: choose from {', '.join(repr(c) for c in choices)}")


def _check_range(name: str, lo_hi, lo: float, hi: float):
    a, b = lo_hi
    if not (lo <= a <= b <= hi):
        raise SpecError(f"{name}={tuple(lo_hi)}: expected {lo} <= min <= max <= {hi}")


def _check_p(name: str, p: float):
    if not 0.0 <= p <= 1.0:
        raise SpecError(f"{name}={p}: a probability must be in [0, 1]")


@dataclass(frozen=True)
class ViewRule:
    """How one view's crop window is drawn (module docstring): RandomResizedCrop at `scale` / `ratio`
    inside a region covering `box` of each side (box_y / box_x: 0 top / left, 1 bottom / right), or,
    with `square` > 0, a square of `square` x the shorter side; flipped with probability `flip_p`."""
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    box: float = 1.0
    box_y: int = 0
    box_x: int = 0
    square: float = 0.0
    flip_p: float = 0.5

    def validate(self) -> "ViewRule":
        _check_range("scale", self.scale, 1e-4, 1.0)
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise SpecError(f"ratio={self.ratio}: expected 0 < min <= max")
        if not 0 < self.box <= 1 or self.box_y not in (0, 1) or self.box_x not in (0, 1):
            raise SpecError(f"box={self.box} at ({self.box_y}, {self.box_x}): expected 0 < box <= 1 in a corner")
        if not 0 <= self.square <= 1:
            raise SpecError(f"square={self.square}: expected a fraction of the shorter side in (0, 1]")
        _check_p("flip_p", self.flip_p)
        return self

    def row(self, view: int) -> list[float]:
        """The rule as the window kernel reads it (`pipelines.kernels.RULE`)."""
        return [view, self.ratio[0], self.ratio[1], self.scale[0], self.scale[1], self.box, self.box_y, self.box_x,
                self.square, self.flip_p]


@dataclass(frozen=True)
class CropGroup:
    """`count` crops of `size` x `size` pixels, random-resized from `scale` of the image area."""
    count: int
    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def validate(self):
        if self.count < 1 or self.size < 8:
            raise SpecError(f"crop group {self}: need count >= 1 and size >= 8")
        ViewRule(self.scale, self.ratio).validate()


@dataclass(frozen=True)
class ColorRecipe:
    """SwAV's colour distortion at strength 1 plus grayscale, blur and flip, applied to every view."""
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2            # turns (x 360 degrees)
    p: float = 0.8              # probability that the jitter is applied
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5

    def validate(self):
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise SpecError(f"{name}={getattr(self, name)}: expected 0..1 (factor drawn from 1 +- x)")
        if not 0 <= self.hue <= 0.5:
            raise SpecError(f"hue={self.hue}: expected 0..0.5 turns")
        for name in ("p", "gray_p", "blur_p", "flip_p"):
            _check_p(name, getattr(self, name))
        _check_range("blur_sigma", self.blur_sigma, 0.0, 50.0)

    @property
    def blur_radius(self) -> int:
        """The largest blur kernel radius the recipe can draw (0: never blurs)."""
        return int(math.ceil(3 * self.blur_sigma[1])) if self.blur_p > 0 else 0

    def as_array(self):
        """The recipe as the float32 vector the fused CPU kernel reads (order fixed here)."""
        import numpy as np
        return np.array([self.p, self.brightness, self.contrast, self.saturation, self.hue, self.gray_p,
                         self.blur_p, self.blur_sigma[0], self.blur_sigma[1], self.flip_p], dtype=np.float32)


# No colour jitter, grayscale or blur; flip with p = 0.5 (evaluation crops).
FLIP_ONLY = ColorRecipe(p=0.0, gray_p=0.0, blur_p=0.0)


def check_blur_fits(color: ColorRecipe, smallest: int):
    """The reflect-101 border needs the blur radius below the crop side."""
    if color.blur_radius >= smallest:
        raise SpecError(f"blur_sigma={color.blur_sigma}: radius {color.blur_radius} does not fit a {smallest} px crop")


@dataclass(frozen=True)
class MultiCropSpec:
    """Crop groups (largest first in the output) sharing one colour recipe and normalisation."""
    groups: tuple[CropGroup, ...]
    color: ColorRecipe = field(default_factory=ColorRecipe)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def validate(self) -> "MultiCropSpec":
        if not self.groups:
            raise SpecError("a multi-crop spec needs at least one crop group")
        for g in self.groups:
            g.validate()
        self.color.validate()
        sizes = [g.size for g in self.groups]
        if sizes != sorted(sizes, reverse=True):
            raise SpecError(f"crop groups must be ordered largest first, got sizes {sizes}")
        check_blur_fits(self.color, sizes[-1])
        return self

    @property
    def num_views(self) -> int:
        return sum(g.count for g in self.groups)

    def view_sizes(self) -> list[int]:
        return [g.size for g in self.groups for _ in range(g.count)]

    def rules(self) -> list[ViewRule]:
        """One window rule per view, in output order."""
        return [ViewRule(g.scale, g.ratio, flip_p=self.color.flip_p) for g in self.groups for _ in range(g.count)]


MULTICROP_PRESETS: dict[str, MultiCropSpec] = {
    # SwAV and DeepClusterV2 800 ep (swav scripts): 2x224 (0.14, 1) + 6x96 (0.05, 0.14)
    "2x224+6x96": MultiCropSpec((CropGroup(2, 224, (0.14, 1.0)), CropGroup(6, 96, (0.05, 0.14)))),
    # DeepClusterV2 400 ep: 2x160 (0.08, 1) + 4x96 (0.05, 0.14)
    "2x160+4x96": MultiCropSpec((CropGroup(2, 160, (0.08, 1.0)), CropGroup(4, 96, (0.05, 0.14)))),
    # DeepClusterV2 400 ep 2x224: two global crops (0.08, 1)
    "2x224": MultiCropSpec((CropGroup(2, 224, (0.08, 1.0)),)),
    # small data on CPU: low resolution, same scales as 2x224+6x96
    "small": MultiCropSpec((CropGroup(2, 96, (0.14, 1.0)), CropGroup(4, 48, (0.05, 0.14)))),
    # CPU smoke runs and tests: the same recipe at toy resolution
    "tiny": MultiCropSpec((CropGroup(2, 64, (0.14, 1.0)), CropGroup(2, 32, (0.05, 0.14)))),
    # 28x28 images (Fashion-MNIST) upsampled: large crops of 0.3-1 of the image (not 0.14: a 10 px
    # fragment), four small ones of 0.08-0.3 (8-15 px of the 28)
    "fmnist": MultiCropSpec((CropGroup(2, 64, (0.3, 1.0)), CropGroup(4, 32, (0.08, 0.3)))),
}


def multicrop_spec(preset: str = "2x224+6x96", **overrides) -> MultiCropSpec:
    """A preset, optionally with `groups=` / `color=` / `mean=` / `std=` replaced; validated."""
    if preset not in MULTICROP_PRESETS:
        raise SpecError(f"unknown multi-crop preset {preset!r}; choose from {sorted(MULTICROP_PRESETS)}")
    unknown = set(overrides) - {"groups", "color", "mean", "std"}
    if unknown:
        raise SpecError(f"unknown multi-crop option(s) {sorted(unknown)}")
    return replace(MULTICROP_PRESETS[preset], **overrides).validate()


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation crops: `val` = resize shorter side to `resize` + centre crop `size`;
    `train` = RandomResizedCrop `size` at `scale` + flip (linear-probe training)."""
    size: int = 224
    resize: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def validate(self) -> "EvalSpec":
        if not 8 <= self.size <= self.resize:
            raise SpecError(f"eval crop {self.size} must be >= 8 and <= resize {self.resize}")
        _check_range("scale", self.scale, 1e-4, 1.0)
        return self
