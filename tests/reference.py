"""Independent implementations of pipelines/spec.py and of sslkit.color, used only by tests for parity.

Written apart from the DALI graphs, the numba kernels and the torch batch stage: colour matrices are
composed with numpy, the blur is OpenCV's separable filter, the crop rule is re-implemented from its
description, Lab is numpy float64, and the soft encoder searches all 313 bins.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from pipelines.spec import CROP_ATTEMPTS, VIEW_U, ColorRecipe, CropGroup, ViewRule
from sslkit import color

RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
YIQ2RGB = np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]])


# -- crop windows --------------------------------------------------------------------------------

def crop_window(h: int, w: int, g: CropGroup, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(y, x, height, width) by torchvision's RandomResizedCrop rule, with numpy's random draws."""
    area = h * w
    lo, hi = math.log(g.ratio[0]), math.log(g.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*g.scale)
        aspect = math.exp(rng.uniform(lo, hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1), ch, cw
    return _fallback(h, w, g.ratio[0], g.ratio[1])


def _fallback(h, w, r0, r1):
    ratio = w / h
    if ratio < r0:
        cw, ch = w, round(w / r0)
    elif ratio > r1:
        cw, ch = round(h * r1), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def window_from_uniforms(h: int, w: int, rule: ViewRule, u: np.ndarray) -> tuple[tuple, bool]:
    """((y, x, height, width), flip) of one view from its uniforms, as spec.py words it. Rule
    parameters go through float32, as they do in the graph."""
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    u = [float(v) for v in u]
    flip = u[VIEW_U["flip"]] < f32(rule.flip_p)
    if rule.square > 0:
        side = min(h, w) * f32(rule.square)
        return (u[VIEW_U["y"]] * (h - side), u[VIEW_U["x"]] * (w - side), side, side), flip
    box = f32(rule.box)
    bh, bw = (h, w) if box >= 1 else (math.floor(h * box + 0.5), math.floor(w * box + 0.5))
    (s0, s1), (r0, r1) = (f32(v) for v in rule.scale), (f32(v) for v in rule.ratio)
    for a in range(CROP_ATTEMPTS):
        target = bh * bw * (s0 + (s1 - s0) * u[VIEW_U["area"] + 2 * a])
        aspect = math.exp(math.log(r0) + (math.log(r1) - math.log(r0)) * u[VIEW_U["area"] + 2 * a + 1])
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= bw and 0 < ch <= bh:
            y = min(math.floor(u[VIEW_U["y"]] * (bh - ch + 1)), bh - ch)
            x = min(math.floor(u[VIEW_U["x"]] * (bw - cw + 1)), bw - cw)
            break
    else:
        y, x, ch, cw = _fallback(bh, bw, r0, r1)
    return (y + (h - bh) * rule.box_y, x + (w - bw) * rule.box_x, ch, cw), flip


# -- colour stage ----------------------------------------------------------------------------------

def view_params(u: np.ndarray, r: ColorRecipe) -> dict:
    """The colour/blur/flip parameters of one view, from its uniforms."""
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
    """uint8 HWC crop (already resized and flipped) + uniforms -> normalised float CHW view: colour
    map + clamp, blur, normalise (the flip belongs to the window, see window_from_uniforms)."""
    p = view_params(u, r)
    m, off = colour_matrix(p["b"], p["c"], p["s"], p["hue"])
    x = np.clip(crop.astype(np.float64) @ m.T + off, 0, 255)
    if p["sigma"] > 0:
        radius = math.ceil(3 * p["sigma"])
        k = cv2.getGaussianKernel(2 * radius + 1, p["sigma"], cv2.CV_64F)
        x = cv2.sepFilter2D(x, cv2.CV_64F, k, k, borderType=cv2.BORDER_REFLECT_101)
    x = (x / 255.0 - np.asarray(mean)) / np.asarray(std)
    return x.transpose(2, 0, 1).astype(np.float32)


# -- Lab and the soft encoding (sslkit.color) ------------------------------------------------------

def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """numpy float64 sRGB (uint8, or float in [0, 1]) -> Lab float32, channels last."""
    x = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else np.clip(rgb.astype(np.float64), 0, 1)
    lin = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    t = lin @ color.M_FWD.T
    f = np.where(t > color.DELTA ** 3, np.cbrt(t), t / (3 * color.DELTA ** 2) + 4 / 29)
    fx, fy, fz = np.moveaxis(f, -1, 0)
    return np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -1).astype(np.float32)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """numpy Lab -> sRGB float32 in [0, 1] (clipped), channels last."""
    L, a, b = np.moveaxis(lab.astype(np.float64), -1, 0)
    fy = (L + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], -1)
    t = np.where(f > color.DELTA, f ** 3, (f - 4 / 29) * 3 * color.DELTA ** 2)
    lin = np.clip(t @ color.M_INV.T, 0, 1)
    return np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055).astype(np.float32)


def soft_encode_exhaustive(ab: torch.Tensor, k: int, sigma: float):
    """sslkit.color.NearestBins' targets by brute force over all 313 bins: ab snapped to 1/SNAP, the
    same float32 distance expression, a stable sort over the bins in index order."""
    x = torch.round(ab.reshape(-1, 2).float() * color.SNAP) / color.SNAP
    bins = torch.from_numpy(color.ab_bins())
    d2 = (x[:, :1] - bins[:, 0]) ** 2 + (x[:, 1:] - bins[:, 1]) ** 2
    d2k, idx = (t[:, :k] for t in torch.sort(d2, dim=1, stable=True))
    e = torch.exp(-(d2k - d2k[:, :1]) / (2.0 * sigma * sigma))
    w = e / e.sum(dim=1, keepdim=True)
    return idx.reshape(*ab.shape[:-1], k), w.reshape(*ab.shape[:-1], k)


# -- jigsaw ----------------------------------------------------------------------------------------

def jigsaw_cells(batch: dict, i: int, cell: int, tile: int) -> tuple[np.ndarray, bool, np.ndarray]:
    """Sample i of a `with_params` jigsaw batch rebuilt from its parameters: the crop in grey levels
    (luma in all three channels when the sample drew grayscale), whether it did, and each cell's tile
    cut from it [9, 3, tile, tile] in the original (un-permuted) order, cell numbering as
    `sslkit.permutations.cell_position`."""
    from sslkit import permutations as perm_sets

    crop = batch["params.crop"][i].numpy().astype(np.float64)
    gray = bool(batch["params.gray"][i])
    if gray:
        crop = np.repeat((crop @ RGB2YIQ[0])[..., None], 3, axis=-1)
    off = batch["params.offsets"][i].numpy()
    cells = []
    for c in range(9):
        row, col = perm_sets.cell_position(c)
        y, x = row * cell + int(off[c, 0]), col * cell + int(off[c, 1])
        assert 0 <= y and y + tile <= 3 * cell and 0 <= x and x + tile <= 3 * cell  # inside its cell
        cells.append(crop[y:y + tile, x:x + tile].transpose(2, 0, 1))
    return crop, gray, np.stack(cells)
