"""Augmentation specs: plain frozen dataclasses that the DALI graphs, the numpy reference
(tests/reference.py) and the PIL baseline (bench/) all read, so all of them implement one recipe.

Semantics every implementation follows (written down once, here):
- crop window: torchvision's RandomResizedCrop rule -- area fraction ~ U(scale), log aspect ratio
  ~ U(log ratio), up to 10 attempts, else the whole image clamped to the ratio range; the window is
  resized to size x size with an antialiased linear filter;
- per view, 9 uniforms u[0..8] in [0, 1) drive everything random after the crop (`VIEW_U`):
  jitter applied if u[0] < p; brightness b = 1 + B(2u[1]-1), contrast c = 1 + C(2u[2]-1),
  saturation s = 1 + S(2u[3]-1), hue h = 360 H (2u[4]-1) degrees (all identity when not applied);
  grayscale if u[5] < gray_p (s = 0); blur if u[6] < blur_p with sigma = lo + (hi-lo) u[7];
  horizontal flip if u[8] < flip_p;
- colour: ONE linear map in YIQ space on the uint8 crop x, then clamped to [0, 255]:
  out = b c YIQ->RGB . Rot(h) . diag(1, s, s) . RGB->YIQ . x + b (128 - 128 c)
  (grayscale is the same map with s = 0, i.e. luma 0.299/0.587/0.114: one pass for all four ops);
- blur: Gaussian, kernel radius ceil(3 sigma) (sized to sigma, not a fixed 23 taps), reflect-101
  borders, applied after the colour map -- SwAV's order;
- normalise: (x/255 - mean) / std, channels first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Indices into the per-view uniform vector (see the module docstring).
VIEW_U = {"apply": 0, "brightness": 1, "contrast": 2, "saturation": 3, "hue": 4, "gray": 5, "blur": 6,
          "sigma": 7, "flip": 8}
N_VIEW_U = len(VIEW_U)


class SpecError(ValueError):
    """An augmentation recipe that cannot be built (one-line reason)."""


def _check_range(name: str, lo_hi, lo: float, hi: float):
    a, b = lo_hi
    if not (lo <= a <= b <= hi):
        raise SpecError(f"{name}={tuple(lo_hi)}: expected {lo} <= min <= max <= {hi}")


def _check_p(name: str, p: float):
    if not 0.0 <= p <= 1.0:
        raise SpecError(f"{name}={p}: a probability must be in [0, 1]")


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
        _check_range("scale", self.scale, 1e-4, 1.0)
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise SpecError(f"ratio={self.ratio}: expected 0 < min <= max")


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

    def as_array(self):
        """The recipe as the float32 vector the CPU kernel reads (order fixed here)."""
        import numpy as np
        return np.array([self.p, self.brightness, self.contrast, self.saturation, self.hue, self.gray_p,
                         self.blur_p, self.blur_sigma[0], self.blur_sigma[1], self.flip_p], dtype=np.float32)


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
        return self

    @property
    def num_views(self) -> int:
        return sum(g.count for g in self.groups)

    def view_sizes(self) -> list[int]:
        return [g.size for g in self.groups for _ in range(g.count)]


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
