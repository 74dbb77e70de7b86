"""Colour utilities for the colorization pretext task (Zhang et al. 2016; Goyal et al. 2019).

What is here (see docs METHODS.md §2.3-2.4 for the reference facts):

* `rgb_to_lab` / `lab_to_rgb` (numpy or torch, channels-last) and `rgb_to_lab_nchw` /
  `lab_to_rgb_nchw` (torch batches, channels-first): CIE Lab, D65, exact sRGB transfer function.
  L is in [0, 100], a and b are unshifted (roughly -128..127).
* `ab_bins`: Zhang's 313 in-gamut ab bin centres (grid step 10), in the standard order.
* `quantize_ab`, `soft_encode`, `soft_encode_topk`, `expand_topk`: hard and soft (k nearest
  bins, Gaussian weights) targets.
* `rebalance_weights`, `pixel_weights`, `nongray_mask`: Zhang's class rebalancing and gray-image mask.
* `ab_prior` and the CLI ``python -m sslkit.color prior --data DIR --out prior.npy``: the empirical
  prior over the 313 bins of a shard folder.

The bins file lives at ``sslkit/data/ab_bins_313.npy`` (a copy of Zhang's ``pts_in_hull.npy``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]

N_BINS = 313
BINS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ab_bins_313.npy")

# sRGB primaries -> CIE XYZ (D65), the matrix used by OpenCV and scikit-image.
_RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423],
                     [0.212671, 0.715160, 0.072169],
                     [0.019334, 0.119193, 0.950227]], dtype=np.float64)
# The D65 white is taken as the XYZ of RGB (1, 1, 1) (the row sums: 0.950456, 1, 1.088754, as in
# OpenCV) so that white maps to exactly a = b = 0 instead of a ~1e-4 residue.
_WHITE = _RGB2XYZ.sum(axis=1)
_XYZ2RGB = np.linalg.inv(_RGB2XYZ)
# Lab matrices with the white-point normalisation folded in: rgb_lin @ _M_FWD.T = XYZ / white.
_M_FWD = _RGB2XYZ / _WHITE[:, None]
_M_INV = _XYZ2RGB * _WHITE[None, :]

_DELTA = 6.0 / 29.0              # CIE f(t) switches from the cube root to a line at t = delta^3
_DELTA3 = _DELTA ** 3
_LIN_SLOPE = 1.0 / (3.0 * _DELTA ** 2)
_LIN_OFFSET = 4.0 / 29.0

# Float inputs above this are almost surely 0..255 data passed as float: refuse rather than clip.
_RANGE_TOL = 1e-3

# Rows per chunk when computing pixel-to-bin distances: bounds the [rows, 313] temporaries to ~80 MB.
_CHUNK = 1 << 16


# --------------------------------------------------------------------------------------------------
# RGB <-> Lab
# --------------------------------------------------------------------------------------------------

def _check_channels_last(x: Array, what: str) -> None:
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"{what}: expected HxWx3 or NxHxWx3 (channels last), got shape {tuple(x.shape)}")


def _rgb_unit_np(rgb: np.ndarray) -> np.ndarray:
    """uint8 0..255 or float 0..1 -> float64 in [0, 1] (tiny overshoot from resampling is clipped)."""
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float64) / 255.0
    if not np.issubdtype(rgb.dtype, np.floating):
        raise TypeError(f"rgb_to_lab: expected uint8 or float RGB, got dtype {rgb.dtype}")
    x = rgb.astype(np.float64)
    if x.size and (not np.isfinite(x).all() or x.min() < -_RANGE_TOL or x.max() > 1 + _RANGE_TOL):
        raise ValueError(f"rgb_to_lab: float RGB must lie in [0, 1], got range "
                         f"[{np.nanmin(x):.4g}, {np.nanmax(x):.4g}] (0..255 data? pass uint8 or divide by 255)")
    return np.clip(x, 0.0, 1.0)


def _rgb_unit_torch(rgb: torch.Tensor, validate: bool) -> torch.Tensor:
    """uint8 0..255 or float 0..1 tensor -> float (float32 unless float64) in [0, 1]."""
    if rgb.dtype == torch.uint8:
        return rgb.to(torch.float32) / 255.0
    if not rgb.is_floating_point():
        raise TypeError(f"rgb_to_lab: expected uint8 or float RGB, got dtype {rgb.dtype}")
    x = rgb if rgb.dtype == torch.float64 else rgb.to(torch.float32)
    if validate and x.numel():
        # One device sync; callers in a hot GPU loop can pass validate=False.
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(f"rgb_to_lab: float RGB must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}] "
                             "(0..255 data? pass uint8 or divide by 255)")
    return x.clamp(0.0, 1.0)


def _srgb_to_linear(c):
    """Exact piecewise sRGB decoding (IEC 61966-2-1); works on numpy arrays and tensors."""
    if isinstance(c, torch.Tensor):
        return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c):
    """Exact piecewise sRGB encoding; input must already be clipped to >= 0 (pow of negatives is NaN)."""
    if isinstance(c, torch.Tensor):
        return torch.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1.0 / 2.4) - 0.055)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1.0 / 2.4) - 0.055)


def _f(t):
    """CIE Lab companding: cube root above (6/29)^3, the tangent line below it."""
    if isinstance(t, torch.Tensor):
        # clamp_min keeps the discarded branch finite (cube root of tiny negatives from rounding).
        return torch.where(t > _DELTA3, t.clamp_min(_DELTA3) ** (1.0 / 3.0), t * _LIN_SLOPE + _LIN_OFFSET)
    return np.where(t > _DELTA3, np.cbrt(t), t * _LIN_SLOPE + _LIN_OFFSET)


def _f_inv(f):
    """Inverse of `_f`."""
    if isinstance(f, torch.Tensor):
        return torch.where(f > _DELTA, f ** 3, (f - _LIN_OFFSET) / _LIN_SLOPE)
    return np.where(f > _DELTA, f ** 3, (f - _LIN_OFFSET) / _LIN_SLOPE)


@functools.lru_cache(maxsize=8)
def _srgb_lut(device: torch.device) -> torch.Tensor:
    """Linear value of each of the 256 uint8 sRGB codes (float32, computed in float64)."""
    return torch.from_numpy(_srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)).to(device)


def _linear_rgb_torch(rgb: torch.Tensor, validate: bool) -> torch.Tensor:
    """uint8 or [0, 1] float RGB tensor -> linear RGB. uint8 goes through a 256-entry table: a
    gather instead of a pow per value, the bulk of the cost of Lab on a CPU."""
    if rgb.dtype == torch.uint8:
        return _srgb_lut(rgb.device)[rgb.long()]
    return _srgb_to_linear(_rgb_unit_torch(rgb, validate))


def _lab_from_unit_rgb(x, channel_dim: int, linear: bool = False):
    """RGB in [0, 1] (numpy float64 or a float tensor; already linear if `linear`) -> Lab, channels
    along `channel_dim`."""
    lin = x if linear else _srgb_to_linear(x)
    if isinstance(x, torch.Tensor):
        m = torch.as_tensor(_M_FWD, dtype=x.dtype, device=x.device)
        xyz = torch.movedim(torch.movedim(lin, channel_dim, -1) @ m.T, -1, channel_dim)
        fx, fy, fz = _f(xyz).unbind(channel_dim)
        return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=channel_dim)
    xyz = np.moveaxis(np.moveaxis(lin, channel_dim, -1) @ _M_FWD.T, -1, channel_dim)
    fx, fy, fz = np.moveaxis(_f(xyz), channel_dim, 0)
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=channel_dim)


def _rgb_from_lab(lab, channel_dim: int):
    """Lab (float64 numpy or float tensor) -> RGB in [0, 1], channels along `channel_dim`."""
    if isinstance(lab, torch.Tensor):
        L, a, b = lab.unbind(channel_dim)
        fy = (L + 16.0) / 116.0
        f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=channel_dim)
        m = torch.as_tensor(_M_INV, dtype=lab.dtype, device=lab.device)
        lin = torch.movedim(torch.movedim(_f_inv(f), channel_dim, -1) @ m.T, -1, channel_dim)
        return _linear_to_srgb(lin.clamp(0.0, 1.0))
    L, a, b = np.moveaxis(lab, channel_dim, 0)
    fy = (L + 16.0) / 116.0
    f = np.stack([fy + a / 500.0, fy, fy - b / 200.0], axis=channel_dim)
    lin = np.moveaxis(np.moveaxis(_f_inv(f), channel_dim, -1) @ _M_INV.T, -1, channel_dim)
    return _linear_to_srgb(np.clip(lin, 0.0, 1.0))


def rgb_to_lab(rgb: Array, validate: bool = True) -> Array:
    """sRGB -> CIE Lab (D65), channels last.

    `rgb`: HxWx3 or NxHxWx3 numpy array or torch tensor, uint8 in 0..255 or float in [0, 1].
    Returns the same container type (tensor on the same device), float32 (float64 tensors stay
    float64): L in [0, 100], a and b unshifted. `validate=False` skips the float range check
    (a device sync for CUDA tensors).
    """
    _check_channels_last(rgb, "rgb_to_lab")
    if isinstance(rgb, torch.Tensor):
        return _lab_from_unit_rgb(_linear_rgb_torch(rgb, validate), -1, linear=True)
    if not isinstance(rgb, np.ndarray):
        raise TypeError(f"rgb_to_lab: expected a numpy array or torch tensor, got {type(rgb).__name__}")
    x = _rgb_unit_np(rgb) if validate or rgb.dtype == np.uint8 else np.clip(rgb.astype(np.float64), 0, 1)
    return _lab_from_unit_rgb(x, -1).astype(np.float32)


def lab_to_rgb(lab: Array) -> Array:
    """CIE Lab (D65) -> sRGB float in [0, 1] (out-of-gamut colours clipped), channels last.

    `lab`: HxWx3 or NxHxWx3 numpy array or float tensor (L in [0, 100], a/b unshifted).
    Returns float32 (float64 tensors stay float64) of the same container type.
    """
    _check_channels_last(lab, "lab_to_rgb")
    if isinstance(lab, torch.Tensor):
        if not lab.is_floating_point():
            raise TypeError(f"lab_to_rgb: expected a float tensor, got dtype {lab.dtype}")
        x = lab if lab.dtype == torch.float64 else lab.to(torch.float32)
        return _rgb_from_lab(x, -1)
    if not isinstance(lab, np.ndarray):
        raise TypeError(f"lab_to_rgb: expected a numpy array or torch tensor, got {type(lab).__name__}")
    return _rgb_from_lab(lab.astype(np.float64), -1).astype(np.float32)


def _check_nchw(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected [N, 3, H, W], got shape {tuple(x.shape)}")


def rgb_to_lab_nchw(x: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Batched sRGB -> Lab on channels-first tensors (any device): [N, 3, H, W] uint8 or float
    in [0, 1] -> [N, 3, H, W] float32 (float64 stays float64), L in [0, 100], a/b unshifted.
    `validate=False` skips the float range check and its device sync."""
    _check_nchw(x, "rgb_to_lab_nchw")
    return _lab_from_unit_rgb(_linear_rgb_torch(x, validate), 1, linear=True)


def rgb_to_L_nchw(x: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Only the lightness of `rgb_to_lab_nchw`: [N, 3, H, W] -> [N, 1, H, W], L in [0, 100]. L depends
    on the luminance Y alone, so this skips two of the three companding passes."""
    _check_nchw(x, "rgb_to_L_nchw")
    lin = _linear_rgb_torch(x, validate)
    w = torch.as_tensor(_M_FWD[1], dtype=lin.dtype, device=lin.device).view(1, 3, 1, 1)
    return 116.0 * _f((lin * w).sum(dim=1, keepdim=True)) - 16.0


def lab_to_rgb_nchw(lab: torch.Tensor) -> torch.Tensor:
    """Batched Lab -> sRGB in [0, 1] (clipped) on channels-first tensors: [N, 3, H, W] -> [N, 3, H, W]."""
    _check_nchw(lab, "lab_to_rgb_nchw")
    if not lab.is_floating_point():
        raise TypeError(f"lab_to_rgb_nchw: expected a float tensor, got dtype {lab.dtype}")
    return _rgb_from_lab(lab if lab.dtype == torch.float64 else lab.to(torch.float32), 1)


# --------------------------------------------------------------------------------------------------
# Bins, quantisation, soft encoding
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _bins_cached() -> np.ndarray:
    try:
        bins = np.load(BINS_FILE)
    except FileNotFoundError:
        raise FileNotFoundError(f"{BINS_FILE}: ab bin file missing (is sslkit/data/*.npy packaged?)") from None
    if bins.shape != (N_BINS, 2):
        raise ValueError(f"{BINS_FILE}: expected shape ({N_BINS}, 2), got {bins.shape}")
    bins = bins.astype(np.float32)
    bins.flags.writeable = False          # shared by every caller through the cache
    return bins


def ab_bins() -> np.ndarray:
    """Zhang's 313 in-gamut ab bin centres, [313, 2] float32, standard order (first is (-90, 50))."""
    return _bins_cached().copy()


def _bins_like(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_bins_cached().copy()).to(device=x.device, dtype=x.dtype)


def _as_ab_tensor(ab: Array, what: str) -> tuple[torch.Tensor, bool]:
    """ab [..., 2] -> (float tensor, was_numpy). float64 stays float64, anything else -> float32."""
    was_numpy = isinstance(ab, np.ndarray)
    if was_numpy:
        t = torch.from_numpy(np.ascontiguousarray(ab))
    elif isinstance(ab, torch.Tensor):
        t = ab
    else:
        raise TypeError(f"{what}: expected a numpy array or torch tensor, got {type(ab).__name__}")
    if t.ndim < 1 or t.shape[-1] != 2:
        raise ValueError(f"{what}: expected ab with last dimension 2, got shape {tuple(t.shape)}")
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    return t, was_numpy


def _sq_dist_chunks(flat: torch.Tensor, bins: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Squared distances [rows, 313] from ab rows to the bins, in chunks.

    Computed as exact differences rather than |x|^2 + |y|^2 - 2xy (what torch.cdist does for big
    inputs): with ab values ~100 the expanded form loses ~1e-3 in float32, enough to flip near-ties.
    """
    for start in range(0, flat.shape[0], _CHUNK):
        rows = flat[start:start + _CHUNK]
        d2 = (rows[:, :1] - bins[:, 0]) ** 2 + (rows[:, 1:] - bins[:, 1]) ** 2
        yield slice(start, start + rows.shape[0]), d2


def quantize_ab(ab: Array) -> Array:
    """Index of the nearest of the 313 bins for each ab pair: [..., 2] -> [...] int64 (numpy or torch)."""
    t, was_numpy = _as_ab_tensor(ab, "quantize_ab")
    flat = t.reshape(-1, 2)
    out = torch.empty(flat.shape[0], dtype=torch.int64, device=t.device)
    bins = _bins_like(t)
    for sl, d2 in _sq_dist_chunks(flat, bins):
        out[sl] = d2.argmin(dim=1)
    out = out.reshape(t.shape[:-1])
    return out.numpy() if was_numpy else out


def soft_encode_topk(ab: Array, k: int = 10, sigma: float = 5.0) -> tuple[Array, Array]:
    """Zhang's soft targets in compact form: for each ab pair, the `k` nearest bins (nearest first)
    and Gaussian weights exp(-d^2 / (2 sigma^2)) normalised to sum 1.

    Returns (indices [..., k] int64, weights [..., k] float32; float64 for float64 input), numpy in
    -> numpy out, tensors stay on their device.
    """
    if not 1 <= k <= N_BINS:
        raise ValueError(f"soft_encode_topk: k must be in 1..{N_BINS}, got {k}")
    if not sigma > 0:
        raise ValueError(f"soft_encode_topk: sigma must be > 0, got {sigma}")
    t, was_numpy = _as_ab_tensor(ab, "soft_encode_topk")
    flat = t.reshape(-1, 2)
    idx = torch.empty(flat.shape[0], k, dtype=torch.int64, device=t.device)
    w = torch.empty(flat.shape[0], k, dtype=t.dtype, device=t.device)
    bins = _bins_like(t)
    for sl, d2 in _sq_dist_chunks(flat, bins):
        d2k, ik = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        # Subtracting the nearest distance cancels in the normalisation but keeps far
        # out-of-gamut pixels from underflowing to 0/0.
        e = torch.exp(-(d2k - d2k[:, :1]) / (2.0 * sigma * sigma))
        idx[sl] = ik
        w[sl] = e / e.sum(dim=1, keepdim=True)
    idx = idx.reshape(*t.shape[:-1], k)
    w = w.reshape(*t.shape[:-1], k)
    return (idx.numpy(), w.numpy()) if was_numpy else (idx, w)


class NearestBins:
    """The k nearest of Zhang's 313 ab bins and their Gaussian weights, exactly, from a short list
    of candidate bins per pixel.

    The ab plane is cut into 10 x 10 cells (the bins' grid step). For a point x in a cell with
    centre c, the k-th nearest bin is at most d_k(c) + 5 sqrt(2) away (triangle inequality), so
    only bins whose distance to the cell is within that bound can be among x's k nearest: for
    k = 10 that is at most 37 bins. Distances are computed as in `soft_encode_topk` (exact differences,
    float32), so the weights are bit-identical to `soft_encode_topk`'s. Cells cover a and b in
    [-125, 125), which holds every sRGB colour (a in [-86.2, 98.3], b in [-107.9, 94.5]); a point
    outside would be searched in the nearest border cell's list, which is not guaranteed exact.
    """

    LO, STEP, CELLS = -125.0, 10.0, 25

    def __init__(self, k: int = 10):
        bins = ab_bins().astype(np.float64)
        centres = self.LO + self.STEP * (np.arange(self.CELLS) + 0.5)
        c = np.stack(np.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 1, 2)
        d_k = np.sort(np.sqrt(((c - bins) ** 2).sum(-1)), axis=1)[:, k - 1]
        to_cell = np.sqrt((np.maximum(np.abs(bins - c) - self.STEP / 2, 0) ** 2).sum(-1))   # [cells, 313]
        keep = to_cell <= d_k[:, None] + self.STEP / np.sqrt(2) + 1e-6
        # Rows padded with a dummy bin far away: never among the k nearest (each row has >= k real ones).
        cand = np.full((len(keep), keep.sum(1).max()), N_BINS, np.int64)
        for i, row in enumerate(keep):
            cand[i, :row.sum()] = np.flatnonzero(row)
        self.k = k
        self.candidates = torch.from_numpy(cand)                                       # [625, M]
        self.coords = torch.from_numpy(np.concatenate([bins, [[1e4, 1e4]]]).astype(np.float32))
        self._on_device: dict[torch.device, tuple] = {}   # the two tables, copied once per device

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.candidates.to(device), self.coords.to(device))
        return self._on_device[device]

    def __call__(self, ab: torch.Tensor, sigma: float, chunk: int = 1 << 16):
        """ab [..., 2] float tensor -> (indices [..., k] int64, nearest first; weights [..., k] float32)."""
        cand_all, coords = self._tables(ab.device)
        flat = ab.reshape(-1, 2).float()
        idx = torch.empty(flat.shape[0], self.k, dtype=torch.int64, device=ab.device)
        w = torch.empty(flat.shape[0], self.k, dtype=torch.float32, device=ab.device)
        for start in range(0, flat.shape[0], chunk):  # bounds the [rows, M] temporaries
            x = flat[start:start + chunk]
            cell = ((x - self.LO) / self.STEP).floor().long().clamp_(0, self.CELLS - 1)
            cand = cand_all[cell[:, 0] * self.CELLS + cell[:, 1]]                    # [rows, M]
            d2 = (x[:, :1] - coords[:, 0][cand]) ** 2 + (x[:, 1:] - coords[:, 1][cand]) ** 2
            d2k, j = torch.topk(d2, self.k, dim=1, largest=False, sorted=True)
            # Relative to the nearest distance, as sslkit.color does: no 0/0 far from every bin.
            e = torch.exp(-(d2k - d2k[:, :1]) / (2.0 * sigma * sigma))
            idx[start:start + chunk] = cand.gather(1, j)
            w[start:start + chunk] = e / e.sum(dim=1, keepdim=True)
        return idx.reshape(*ab.shape[:-1], self.k), w.reshape(*ab.shape[:-1], self.k)


def expand_topk(indices: Array, weights: Array, n_bins: int = N_BINS) -> Array:
    """Scatter compact soft targets into dense ones: ([..., k], [..., k]) -> [..., n_bins]."""
    was_numpy = isinstance(indices, np.ndarray)
    i = torch.from_numpy(np.ascontiguousarray(indices)) if was_numpy else indices
    w = torch.from_numpy(np.ascontiguousarray(weights)) if isinstance(weights, np.ndarray) else weights
    if i.shape != w.shape:
        raise ValueError(f"expand_topk: indices {tuple(i.shape)} and weights {tuple(w.shape)} differ in shape")
    if i.dtype != torch.int64:
        i = i.to(torch.int64)
    dense = torch.zeros(*i.shape[:-1], n_bins, dtype=w.dtype, device=w.device)
    dense.scatter_(-1, i.to(w.device), w)
    return dense.numpy() if was_numpy else dense


def soft_encode(ab: Array, k: int = 10, sigma: float = 5.0) -> Array:
    """Zhang's dense soft targets: [..., 2] -> [..., 313], k non-zeros per row summing to 1
    (see `soft_encode_topk`; prefer that compact form for big batches: dense is 313 floats a pixel)."""
    return expand_topk(*soft_encode_topk(ab, k, sigma))


# --------------------------------------------------------------------------------------------------
# Class rebalancing and gray mask
# --------------------------------------------------------------------------------------------------

def rebalance_weights(prior: Array, gamma: float = 0.5, alpha: float = 1.0) -> np.ndarray:
    """Zhang's per-bin rebalancing factors (PriorBoostLayer), float64 [313].

    Names follow Zhang's code: `gamma` is the mixing weight of the uniform distribution and
    `alpha` the exponent. As in that code the uniform is over the bins with non-zero prior:
        prior_mix = (1 - gamma) * prior + gamma * uniform_nonzero
        factor = prior_mix ** -alpha, scaled so that sum(prior * factor) == 1.
    Bins with zero prior would get an infinite factor; they get the largest finite one instead (a
    bin unseen when the prior was computed is treated as the rarest seen), which leaves the
    normalisation unchanged since their prior mass is 0.
    """
    p = np.asarray(prior.detach().cpu() if isinstance(prior, torch.Tensor) else prior, dtype=np.float64)
    if p.shape != (N_BINS,):
        raise ValueError(f"rebalance_weights: prior must have shape ({N_BINS},), got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError("rebalance_weights: prior must be finite, non-negative and not all zero")
    if not 0 <= gamma <= 1:
        raise ValueError(f"rebalance_weights: gamma must be in [0, 1], got {gamma}")
    p = p / p.sum()
    nonzero = p > 0
    uniform = nonzero / nonzero.sum()
    mix = (1.0 - gamma) * p + gamma * uniform
    factor = np.zeros_like(p)
    factor[nonzero] = mix[nonzero] ** -alpha
    factor[~nonzero] = factor[nonzero].max()
    return factor / np.sum(p * factor)


def pixel_weights(soft_or_indices: Array, factor: Array) -> Array:
    """Per-pixel rebalancing weight = factor[most likely bin].

    `soft_or_indices`: dense soft targets [..., 313] (float; argmax taken) or hard bin indices [...]
    (integer, e.g. `quantize_ab` output or `soft_encode_topk(...)[0][..., 0]`).
    Returns [...] float32 (numpy or torch like the input; on the input's device).
    """
    was_numpy = isinstance(soft_or_indices, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(soft_or_indices)) if was_numpy else soft_or_indices
    if x.is_floating_point():
        if x.ndim < 1 or x.shape[-1] != N_BINS:
            raise ValueError(f"pixel_weights: float input must be soft targets [..., {N_BINS}], "
                             f"got shape {tuple(x.shape)}")
        idx = x.argmax(dim=-1)
    else:
        idx = x.to(torch.int64)
    f = factor.detach() if isinstance(factor, torch.Tensor) else torch.from_numpy(np.asarray(factor))
    if f.shape != (N_BINS,):
        raise ValueError(f"pixel_weights: factor must have shape ({N_BINS},), got {tuple(f.shape)}")
    out = f.to(device=idx.device, dtype=torch.float32)[idx]
    return out.numpy() if was_numpy else out


def nongray_mask(ab: Array, threshold: float = 5.0) -> Array:
    """Zhang's NonGrayMaskLayer: True for an image with some |a| or |b| > `threshold`, else False.

    Reduces over the last three axes, so both [..., H, W, 2] and [..., 2, H, W] work: one image
    gives a 0-d bool, a batch [N, ...] gives [N] bools. numpy in -> numpy out, tensors stay tensors.
    """
    if ab.ndim < 3 or 2 not in (ab.shape[-1], ab.shape[-3]):
        raise ValueError(f"nongray_mask: expected [..., H, W, 2] or [..., 2, H, W], got shape {tuple(ab.shape)}")
    big = abs(ab) > threshold
    if isinstance(big, torch.Tensor):
        return big.flatten(-3).any(dim=-1)
    return big.reshape(*big.shape[:-3], -1).any(axis=-1)


# --------------------------------------------------------------------------------------------------
# Empirical prior
# --------------------------------------------------------------------------------------------------

def _downscale(rgb: np.ndarray, size: int | None) -> np.ndarray:
    """Shrink so that the longer side is at most `size` (area averaging; aspect kept)."""
    import cv2

    h, w = rgb.shape[:2]
    if not size or max(h, w) <= size:
        return rgb
    s = size / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def ab_prior(images: Iterable[np.ndarray], size: int | None = 64) -> np.ndarray:
    """Empirical prior over the 313 bins: normalised histogram of the nearest-bin index of every
    pixel of every image. float64 [313], sums to 1.

    `images`: HxWx3 RGB arrays (uint8, or float in [0, 1]). Each image is first shrunk to at most
    `size` pixels on its longer side (INTER_AREA; `None` or 0 keeps full resolution) for speed;
    area averaging slightly desaturates edges, comparable to Goyal's 256x256 global resize.
    Every image counts per pixel, so large images weigh more, as in Zhang's and Goyal's scripts.
    """
    counts = np.zeros(N_BINS, dtype=np.int64)
    for n, rgb in enumerate(images):
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(f"ab_prior: image {n} has shape {rgb.shape}, expected HxWx3 RGB")
        lab = rgb_to_lab(_downscale(rgb, size))
        counts += np.bincount(quantize_ab(lab[..., 1:]).ravel(), minlength=N_BINS)
    total = counts.sum()
    if total == 0:
        raise ValueError("ab_prior: no pixels (empty image iterable?)")
    return counts / total


def iter_shard_images(directory: str, limit: int | None = None) -> Iterator[np.ndarray]:
    """Decode the `jpg` member of each sample of a shard folder, in order, as HxWx3 uint8 RGB."""
    import cv2

    from .shard import load, shard_paths
    from .shard.tarwriter import read_index

    m = load(directory)
    tars, idxs = shard_paths(directory, m)
    done = 0
    for tar, idx in zip(tars, idxs):
        with open(tar, "rb") as f:
            for sample in read_index(idx):
                if limit is not None and done >= limit:
                    return
                if "jpg" not in sample:
                    raise ValueError(f"{tar}: sample without a jpg member ({sorted(sample)})")
                offset, size, name = sample["jpg"]
                f.seek(offset)
                data = f.read(size)
                bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
                if bgr is None or len(data) != size:
                    raise ValueError(f"{tar}: cannot decode {name or 'jpg'} at offset {offset}")
                done += 1
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _prior_cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .shard import load

    total = load(args.data)["total"]
    n = total if args.limit is None else min(args.limit, total)
    if n == 0:
        raise ValueError(f"{args.data}: no samples")
    images = tqdm(iter_shard_images(args.data, args.limit), total=n, unit="img", desc="ab prior")
    prior = ab_prior(images, size=args.size or None)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    np.save(args.out, prior)
    p = prior[prior > 0]
    entropy = float(-(p * np.log2(p)).sum())
    print(f"{args.out}: prior over {N_BINS} ab bins from {n} images; {len(p)} non-zero bins, "
          f"max {prior.max():.4f} (bin {int(prior.argmax())}), entropy {entropy:.2f} bits")
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m sslkit.color prior --data DIR --out prior.npy [--limit N] [--size 64]"""
    p = argparse.ArgumentParser(prog="python -m sslkit.color", description="Colorization helpers.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prior", help="empirical prior over the 313 ab bins of a shard folder",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.add_argument("--data", required=True, help="shard folder (with manifest.json)")
    pr.add_argument("--out", required=True, help="output .npy (float64 [313], sums to 1)")
    pr.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    pr.add_argument("--size", type=int, default=64,
                    help="shrink each image to at most this longer side first (0: full resolution)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.size < 0:
        p.error("--size must be >= 0")
    try:
        return _prior_cli(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
