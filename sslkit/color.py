"""Colour utilities for the colorization pretext task (Zhang et al. 2016; Goyal et al. 2019), in torch:
the same code runs on the loader's device (the trainer's GPU) and on the CPU in CI.

* `rgb_to_lab_nchw` / `rgb_to_L_nchw` / `lab_to_rgb_nchw`: CIE Lab (D65, exact sRGB transfer function)
  of [N, 3, H, W] batches. L is in [0, 100], a and b are unshifted (roughly -128..127).
* `ab_bins`: Zhang's 313 in-gamut ab bin centres (grid step 10), in the standard order.
* `NearestBins`: the soft targets (the k nearest bins, Gaussian weights), exact and the same on every
  device; `soft_encode_topk` / `quantize_ab` are its functional forms, `expand_topk` makes them dense.
* `rebalance_weights`, `pixel_weights`, `nongray_mask`: Zhang's class rebalancing and gray-image mask.
* `ab_prior` and the CLI ``python -m sslkit.color prior --data DIR --out prior.npy``: the empirical
  prior over the 313 bins of a shard folder.

The bins file lives at ``sslkit/data/ab_bins_313.npy`` (a copy of Zhang's ``pts_in_hull.npy``). Numpy
versions of the conversions, and the exhaustive 313-bin encoder, live in tests/reference.py.
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
RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423],
                    [0.212671, 0.715160, 0.072169],
                    [0.019334, 0.119193, 0.950227]], dtype=np.float64)
# The D65 white is taken as the XYZ of RGB (1, 1, 1) (the row sums: 0.950456, 1, 1.088754, as in
# OpenCV) so that white maps to exactly a = b = 0 instead of a ~1e-4 residue. The matrices below have
# the white-point normalisation folded in: rgb_lin @ M_FWD.T = XYZ / white.
M_FWD = RGB2XYZ / RGB2XYZ.sum(axis=1)[:, None]
M_INV = np.linalg.inv(RGB2XYZ) * RGB2XYZ.sum(axis=1)[None, :]

DELTA = 6.0 / 29.0              # CIE f(t) switches from the cube root to a line at t = delta^3
_DELTA3 = DELTA ** 3
_LIN_SLOPE = 1.0 / (3.0 * DELTA ** 2)
_LIN_OFFSET = 4.0 / 29.0

# Float inputs above this are almost surely 0..255 data passed as float: refuse rather than clip.
_RANGE_TOL = 1e-3


# == RGB <-> Lab ===================================================================================

def _check_nchw(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected [N, 3, H, W], got shape {tuple(x.shape)}")


def _srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    """Exact piecewise sRGB decoding (IEC 61966-2-1)."""
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    """Exact piecewise sRGB encoding; input must already be clipped to >= 0 (pow of negatives is NaN)."""
    return torch.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1.0 / 2.4) - 0.055)


def _f(t: torch.Tensor) -> torch.Tensor:
    """CIE Lab companding: cube root above (6/29)^3, the tangent line below it."""
    # clamp_min keeps the discarded branch finite (cube root of tiny negatives from rounding).
    return torch.where(t > _DELTA3, t.clamp_min(_DELTA3) ** (1.0 / 3.0), t * _LIN_SLOPE + _LIN_OFFSET)


def _f_inv(f: torch.Tensor) -> torch.Tensor:
    return torch.where(f > DELTA, f ** 3, (f - _LIN_OFFSET) / _LIN_SLOPE)


@functools.lru_cache(maxsize=8)
def _srgb_lut(device: torch.device) -> torch.Tensor:
    """Linear value of each of the 256 uint8 sRGB codes (float32, computed in float64)."""
    return _srgb_to_linear(torch.arange(256, dtype=torch.float64) / 255.0).float().to(device)


def _linear_rgb(rgb: torch.Tensor, validate: bool) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] RGB -> linear RGB (float32; float64 stays float64). uint8 goes
    through a 256-entry table: a gather instead of a pow per value, the bulk of the cost on a CPU."""
    if rgb.dtype == torch.uint8:
        return _srgb_lut(rgb.device)[rgb.long()]
    if not rgb.is_floating_point():
        raise TypeError(f"rgb_to_lab: expected uint8 or float RGB, got dtype {rgb.dtype}")
    x = rgb if rgb.dtype == torch.float64 else rgb.to(torch.float32)
    if validate and x.numel():
        # One device sync; callers in a hot GPU loop pass validate=False.
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(f"rgb_to_lab: float RGB must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}] "
                             "(0..255 data? pass uint8 or divide by 255)")
    return _srgb_to_linear(x.clamp(0.0, 1.0))


def _mix(m: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """m (3x3) applied to the channels of x [N, 3, H, W]: elementwise sums, not a matmul, so a GPU
    computes what a CPU does (no TF32, no FMA reordering in a GEMM)."""
    c = x.unbind(1)
    return torch.stack([float(m[i, 0]) * c[0] + float(m[i, 1]) * c[1] + float(m[i, 2]) * c[2] for i in range(3)], 1)


def rgb_to_lab_nchw(x: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Batched sRGB -> Lab on channels-first tensors (any device): [N, 3, H, W] uint8 or float
    in [0, 1] -> [N, 3, H, W] float32 (float64 stays float64), L in [0, 100], a/b unshifted.
    `validate=False` skips the float range check and its device sync."""
    _check_nchw(x, "rgb_to_lab_nchw")
    lin = _linear_rgb(x, validate)
    fx, fy, fz = _f(_mix(M_FWD, lin)).unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def rgb_to_L_nchw(x: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Only the lightness of `rgb_to_lab_nchw`: [N, 3, H, W] -> [N, 1, H, W], L in [0, 100]. L depends
    on the luminance Y alone, so this skips two of the three companding passes."""
    _check_nchw(x, "rgb_to_L_nchw")
    lin = _linear_rgb(x, validate)
    c = lin.unbind(1)
    y = float(M_FWD[1, 0]) * c[0] + float(M_FWD[1, 1]) * c[1] + float(M_FWD[1, 2]) * c[2]
    return 116.0 * _f(y.unsqueeze(1)) - 16.0


def lab_to_rgb_nchw(lab: torch.Tensor) -> torch.Tensor:
    """Batched Lab -> sRGB in [0, 1] (out-of-gamut colours clipped): [N, 3, H, W] -> [N, 3, H, W]."""
    _check_nchw(lab, "lab_to_rgb_nchw")
    if not lab.is_floating_point():
        raise TypeError(f"lab_to_rgb_nchw: expected a float tensor, got dtype {lab.dtype}")
    lab = lab if lab.dtype == torch.float64 else lab.to(torch.float32)
    L, a, b = lab.unbind(1)
    fy = (L + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=1)
    return _linear_to_srgb(_mix(M_INV, _f_inv(f)).clamp(0.0, 1.0))


# == Bins and soft encoding ========================================================================

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


SNAP = 1024.0  # ab is snapped to multiples of 1/SNAP before the bins are searched (see NearestBins)


class NearestBins:
    """The k nearest of Zhang's 313 ab bins and their Gaussian weights exp(-d^2 / (2 sigma^2)),
    normalised to sum 1, nearest first -- exactly, from a short list of candidate bins per pixel.

    The ab plane is cut into 10 x 10 cells (the bins' grid step). For a point x in a cell with
    centre c, the k-th nearest bin is at most d_k(c) + 5 sqrt(2) away (triangle inequality), so
    only bins whose distance to the cell is within that bound can be among x's k nearest: for
    k = 10 that is at most 37 bins. Cells cover a and b in [-125, 125), which holds every sRGB colour
    (a in [-86.2, 98.3], b in [-107.9, 94.5]); a point outside is searched in the nearest border
    cell's list, which is not guaranteed exact.

    The same bins on every device: ab is first snapped to multiples of 1/1024 (far below the bins'
    spacing of 10, far above the ~3e-5 by which float32 Lab differs between a CPU and a GPU), so points
    on a tie stay exactly on it -- gray pixels, a = b = 0 up to rounding, are equally far from four
    bins -- and exact ties go to the lower bin index (a stable sort over the candidates in bin order).
    Distances are exact differences in float32, never |x|^2 + |y|^2 - 2xy.
    """

    LO, STEP, CELLS = -125.0, 10.0, 25

    def __init__(self, k: int = 10):
        if not 1 <= k <= N_BINS:
            raise ValueError(f"NearestBins: k must be in 1..{N_BINS}, got {k}")
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
        if device not in self._on_device:   # candidates in bin order: the stable sort breaks ties by it
            self._on_device[device] = (self.candidates.sort(dim=1).values.to(device), self.coords.to(device))
        return self._on_device[device]

    def __call__(self, ab: torch.Tensor, sigma: float, chunk: int = 1 << 16):
        """ab [..., 2] float tensor -> (indices [..., k] int64, nearest first; weights [..., k] float32)."""
        cand_all, coords = self._tables(ab.device)
        flat = torch.round(ab.reshape(-1, 2).float() * SNAP) / SNAP
        idx = torch.empty(flat.shape[0], self.k, dtype=torch.int64, device=ab.device)
        w = torch.empty(flat.shape[0], self.k, dtype=torch.float32, device=ab.device)
        for start in range(0, flat.shape[0], chunk):  # bounds the [rows, M] temporaries
            x = flat[start:start + chunk]
            cell = ((x - self.LO) / self.STEP).floor().long().clamp_(0, self.CELLS - 1)
            cand = cand_all[cell[:, 0] * self.CELLS + cell[:, 1]]                    # [rows, M]
            d2 = (x[:, :1] - coords[:, 0][cand]) ** 2 + (x[:, 1:] - coords[:, 1][cand]) ** 2
            d2k, j = (t[:, :self.k] for t in torch.sort(d2, dim=1, stable=True))
            # Relative to the nearest distance: no 0/0 far from every bin.
            e = torch.exp(-(d2k - d2k[:, :1]) / (2.0 * sigma * sigma))
            idx[start:start + chunk] = cand.gather(1, j)
            w[start:start + chunk] = e / e.sum(dim=1, keepdim=True)
        return idx.reshape(*ab.shape[:-1], self.k), w.reshape(*ab.shape[:-1], self.k)


@functools.lru_cache(maxsize=8)
def _encoder(k: int) -> NearestBins:
    return NearestBins(k)


def soft_encode_topk(ab: Array, k: int = 10, sigma: float = 5.0) -> tuple[Array, Array]:
    """`NearestBins(k)(ab, sigma)` for numpy or torch ab [..., 2]: (indices [..., k] int64, weights
    [..., k] float32), numpy in -> numpy out, tensors stay on their device."""
    if not sigma > 0:
        raise ValueError(f"soft_encode_topk: sigma must be > 0, got {sigma}")
    was_numpy = isinstance(ab, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(ab)) if was_numpy else ab
    if t.ndim < 1 or t.shape[-1] != 2:
        raise ValueError(f"soft_encode_topk: expected ab with last dimension 2, got shape {tuple(t.shape)}")
    idx, w = _encoder(k)(t, sigma)
    return (idx.numpy(), w.numpy()) if was_numpy else (idx, w)


def quantize_ab(ab: Array) -> Array:
    """Index of the nearest of the 313 bins for each ab pair: [..., 2] -> [...] int64 (numpy or torch)."""
    return soft_encode_topk(ab, k=1)[0][..., 0]


def expand_topk(indices: Array, weights: Array, n_bins: int = N_BINS) -> Array:
    """Scatter compact soft targets into dense ones: ([..., k], [..., k]) -> [..., n_bins]."""
    was_numpy = isinstance(indices, np.ndarray)
    i = torch.from_numpy(np.ascontiguousarray(indices)) if was_numpy else indices
    w = torch.from_numpy(np.ascontiguousarray(weights)) if isinstance(weights, np.ndarray) else weights
    if i.shape != w.shape:
        raise ValueError(f"expand_topk: indices {tuple(i.shape)} and weights {tuple(w.shape)} differ in shape")
    dense = torch.zeros(*i.shape[:-1], n_bins, dtype=w.dtype, device=w.device)
    dense.scatter_(-1, i.to(device=w.device, dtype=torch.int64), w)
    return dense.numpy() if was_numpy else dense


def soft_encode(ab: Array, k: int = 10, sigma: float = 5.0) -> Array:
    """Zhang's dense soft targets: [..., 2] -> [..., 313] (313 floats a pixel; prefer the compact form)."""
    return expand_topk(*soft_encode_topk(ab, k, sigma))


# == Class rebalancing and gray mask ===============================================================

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


# == Empirical prior ===============================================================================

def ab_prior(images: Iterable[np.ndarray], size: int | None = 64) -> np.ndarray:
    """Empirical prior over the 313 bins: normalised histogram of the nearest-bin index of every
    pixel of every image. float64 [313], sums to 1.

    `images`: HxWx3 uint8 RGB arrays. Each image is first shrunk to at most `size` pixels on its longer
    side (INTER_AREA; `None` or 0 keeps full resolution) for speed; area averaging slightly desaturates
    edges, comparable to Goyal's 256x256 global resize. Every image counts per pixel, so large images
    weigh more, as in Zhang's and Goyal's scripts.
    """
    import cv2

    counts = np.zeros(N_BINS, dtype=np.int64)
    for n, rgb in enumerate(images):
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"ab_prior: image {n} is {rgb.dtype} {rgb.shape}, expected HxWx3 uint8 RGB")
        (h, w), s = rgb.shape[:2], (size or 0) / max(rgb.shape[:2])
        if 0 < s < 1:  # shrink: longer side `size`, area averaging, aspect kept
            rgb = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
        ab = rgb_to_lab_nchw(x)[0, 1:].permute(1, 2, 0)
        counts += np.bincount(quantize_ab(ab).flatten().numpy(), minlength=N_BINS)
    total = counts.sum()
    if total == 0:
        raise ValueError("ab_prior: no pixels (empty image iterable?)")
    return counts / total


def shard_images(directory: str, limit: int | None = None) -> Iterator[np.ndarray]:
    """The `jpg` of the first `limit` samples of a shard folder (by index), decoded to HxWx3 uint8 RGB."""
    import cv2

    from .shard.access import SampleReader

    reader = SampleReader(directory)
    total = reader.manifest["total"]
    for i in range(total if limit is None else min(limit, total)):
        bgr = cv2.imdecode(np.frombuffer(reader.component(i, "jpg"), dtype=np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{directory}: sample {i} does not decode (python -m sslkit.shard verify --full)")
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _prior_cli(args: argparse.Namespace) -> int:
    from .progress import Progress
    from .shard import load

    total = load(args.data)["total"]
    n = total if args.limit is None else min(args.limit, total)
    if n == 0:
        raise ValueError(f"{args.data}: no samples")

    def counted(images, bar):
        for image in images:
            yield image
            bar.update(1)

    with Progress(n, "ab prior", unit="img") as bar:
        prior = ab_prior(counted(shard_images(args.data, args.limit), bar), size=args.size or None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.save(args.out, prior)
    p = prior[prior > 0]
    print(f"{args.out}: prior over {N_BINS} ab bins from {n} images; {len(p)} non-zero bins, "
          f"max {prior.max():.4f} (bin {int(prior.argmax())}), entropy {float(-(p * np.log2(p)).sum()):.2f} bits")
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
