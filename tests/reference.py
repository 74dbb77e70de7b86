"""A small numpy/OpenCV implementation of pipelines/spec.py, used only by tests for parity.

Written independently of the DALI graph and the numba kernel: matrices are composed with numpy,
the blur is OpenCV's separable filter, the crop rule is re-implemented from its description.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from pipelines.spec import VIEW_U, ColorRecipe, CropGroup

RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
YIQ2RGB = np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]])


def crop_window(h: int, w: int, g: CropGroup, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(y, x, height, width) by torchvision's RandomResizedCrop rule."""
    area = h * w
    lo, hi = math.log(g.ratio[0]), math.log(g.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*g.scale)
        aspect = math.exp(rng.uniform(lo, hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1), ch, cw
    ratio = w / h
    if ratio < g.ratio[0]:
        cw, ch = w, round(w / g.ratio[0])
    elif ratio > g.ratio[1]:
        cw, ch = round(h * g.ratio[1]), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def view_params(u: np.ndarray, r: ColorRecipe) -> dict:
    """The colour/blur/flip parameters of one view, from its 9 uniforms."""
    applied = u[VIEW_U["apply"]] < r.p

    def jitter(name, x):
        return 1.0 + x * (2 * u[VIEW_U[name]] - 1) if applied else 1.0

    b, c, s = jitter("brightness", r.brightness), jitter("contrast", r.contrast), jitter("saturation", r.saturation)
    hue = 360.0 * r.hue * (2 * u[VIEW_U["hue"]] - 1) if applied else 0.0
    gray = u[VIEW_U["gray"]] < r.gray_p
    if gray:
        s = 0.0
    lo, hi = r.blur_sigma
    blur = u[VIEW_U["blur"]] < r.blur_p
    return {"applied": applied, "b": b, "c": c, "s": s, "hue": hue, "gray": gray, "blur": blur,
            "sigma": lo + (hi - lo) * u[VIEW_U["sigma"]] if blur else 0.0, "flip": u[VIEW_U["flip"]] < r.flip_p}


def colour_matrix(b: float, c: float, s: float, hue_deg: float) -> tuple[np.ndarray, float]:
    t = math.radians(hue_deg)
    rot = np.array([[1, 0, 0], [0, math.cos(t), math.sin(t)], [0, -math.sin(t), math.cos(t)]])
    sat = np.diag([1.0, s, s])
    return b * c * YIQ2RGB @ rot @ sat @ RGB2YIQ, b * (128 - 128 * c)


def render(crop: np.ndarray, u: np.ndarray, r: ColorRecipe, mean, std) -> np.ndarray:
    """uint8 HWC crop (already resized) + uniforms -> normalised float CHW view."""
    p = view_params(u, r)
    m, off = colour_matrix(p["b"], p["c"], p["s"], p["hue"])
    x = np.clip(crop.astype(np.float64) @ m.T + off, 0, 255)
    if p["sigma"] > 0:
        radius = math.ceil(3 * p["sigma"])
        k = cv2.getGaussianKernel(2 * radius + 1, p["sigma"], cv2.CV_64F)
        x = cv2.sepFilter2D(x, cv2.CV_64F, k, k, borderType=cv2.BORDER_REFLECT_101)
    if p["flip"]:
        x = x[:, ::-1]
    x = (x / 255.0 - np.asarray(mean)) / np.asarray(std)
    return x.transpose(2, 0, 1).astype(np.float32)
