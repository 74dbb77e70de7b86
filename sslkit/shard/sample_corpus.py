"""The embedded default corpus: ImageNet-like samples cut from photographs that pip packages ship.

scikit-image and scikit-learn carry a dozen real photographs inside their wheels, so a fresh
machine can build a realistic dataset offline. Each sample is a random crop (several scales and
aspect ratios) of one photo, resized so its longer side is ~500 px like ImageNet, randomly
mirrored, and encoded as a baseline JPEG at quality 90. Sample i depends only on (seed, i), so the
corpus is reproducible and can be generated in parallel. The class of a sample is its photo.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Photo:
    name: str
    package: str      # "skimage" | "sklearn"
    filename: str


PHOTOS = (
    Photo("astronaut", "skimage", "astronaut.png"),
    Photo("cat", "skimage", "chelsea.png"),
    Photo("coffee", "skimage", "coffee.png"),
    Photo("rocket", "skimage", "rocket.jpg"),
    Photo("motorcycle", "skimage", "motorcycle_left.png"),
    Photo("galaxies", "skimage", "hubble_deep_field.jpg"),
    Photo("tissue", "skimage", "ihc.png"),
    Photo("retina", "skimage", "retina.jpg"),
    Photo("temple", "sklearn", "china.jpg"),
    Photo("flower", "sklearn", "flower.jpg"),
    Photo("cameraman", "skimage", "camera.png"),   # grayscale photographs: real data has them too
    Photo("coins", "skimage", "coins.png"),
)

LONG_SIDE = 500
QUALITY = 90
SCALE = (0.05, 1.0)        # crop area as a fraction of the photo, log-uniform
ASPECT = (3 / 5, 5 / 3)    # crop width / height, log-uniform


def photo_path(photo: Photo) -> str:
    if photo.package == "skimage":
        import skimage.data
        base = os.path.dirname(skimage.data.__file__)
    else:
        import sklearn.datasets
        base = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    path = os.path.join(base, photo.filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: sample photo missing; is {photo.package} installed?")
    return path


class SampleRenderer:
    """Renders sample i of the corpus; keeps decoded photos so a worker decodes each only once."""

    def __init__(self):
        self._photos: dict[str, np.ndarray] = {}

    def _photo(self, photo: Photo) -> np.ndarray:
        if photo.name not in self._photos:
            with Image.open(photo_path(photo)) as im:
                self._photos[photo.name] = np.asarray(im.convert("RGB"))
        return self._photos[photo.name]

    def render(self, seed: int, i: int) -> bytes:
        photo = PHOTOS[i % len(PHOTOS)]
        return imagenet_like_crop(self._photo(photo), np.random.default_rng([seed, i]))


def imagenet_like_crop(img: np.ndarray, rng: np.random.Generator, long_side: int = LONG_SIDE,
                       quality: int = QUALITY) -> bytes:
    """A random crop of `img` (log-uniform area in SCALE, aspect in ASPECT), resized to `long_side`,
    randomly mirrored, as baseline JPEG bytes. Also builds the benchmark corpus from large photos."""
    h, w = img.shape[:2]
    area = h * w * math.exp(rng.uniform(math.log(SCALE[0]), math.log(SCALE[1])))
    aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
    cw = min(w, max(16, int(round(math.sqrt(area * aspect)))))
    ch = min(h, max(16, int(round(math.sqrt(area / aspect)))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    crop = Image.fromarray(img[y:y + ch, x:x + cw])
    scale = long_side / max(cw, ch)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    crop = crop.resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
