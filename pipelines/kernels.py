"""The CPU kernel of the multi-crop graph: colour map + clamp + blur + normalise + flip, fused.

On a CPU, DALI's per-view chain `color_twist -> clamp -> gaussian_blur -> crop_mirror_normalize`
costs ~10 ms per image for 2x224+6x96 (each op re-reads and re-writes every pixel, and the uint8
and blur kernels are not vectorised); this single pass over each crop costs ~2.5 ms and is what
takes the CPU graph past 2x the PIL baseline (docs/BENCHMARKS.md). It implements exactly the
semantics of pipelines/spec.py; on a GPU the same node is DALI's own ops (see multicrop.py), and
tests/test_multicrop.py pins both to the numpy reference.

The kernels are compiled by numba (cached on disk) and run inside DALI's thread pool through
`numba_function`, one call per sample for all of its crops, so no Python runs per sample.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from nvidia.dali import types
from nvidia.dali.pipeline import do_not_convert

# RGB <-> YIQ, the colour space in which hue is a rotation and saturation a scaling (as DALI does it).
RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], np.float32)
YIQ2RGB = np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]], np.float32)
MAX_GROUPS = 3


@njit(cache=True)
def view_params(u, r, m):
    """Fill the 3x3 colour matrix `m` from one view's uniforms `u` and the recipe vector `r`
    (ColorRecipe.as_array); return (offset, sigma, flip)."""
    applied = u[0] < r[0]
    b = np.float32(1.0) + (r[1] * (2 * u[1] - 1) if applied else 0)
    c = np.float32(1.0) + (r[2] * (2 * u[2] - 1) if applied else 0)
    s = np.float32(1.0) + (r[3] * (2 * u[3] - 1) if applied else 0)
    hue = (r[4] * (2 * u[4] - 1) * 2 * math.pi) if applied else 0.0
    if u[5] < r[5]:
        s = np.float32(0.0)
    ch, sh = math.cos(hue), math.sin(hue)
    # rows of Rot(h) . diag(1, s, s) . RGB2YIQ
    for j in range(3):
        yj = RGB2YIQ[0, j]
        ij = s * (ch * RGB2YIQ[1, j] + sh * RGB2YIQ[2, j])
        qj = s * (-sh * RGB2YIQ[1, j] + ch * RGB2YIQ[2, j])
        for i in range(3):
            m[i, j] = b * c * (YIQ2RGB[i, 0] * yj + YIQ2RGB[i, 1] * ij + YIQ2RGB[i, 2] * qj)
    offset = b * (np.float32(128.0) - np.float32(128.0) * c)
    sigma = (r[7] + (r[8] - r[7]) * u[7]) if u[6] < r[6] else 0.0
    return np.float32(offset), np.float32(sigma), u[8] < r[9]


@njit(cache=True, fastmath=True)
def colour_clamp(src, m, offset, flip, dst):
    """uint8 HWC `src` -> clamped float32 CHW `dst` = m . x + offset, mirrored if `flip`."""
    h, w = src.shape[0], src.shape[1]
    lo, hi = np.float32(0.0), np.float32(255.0)
    for y in range(h):
        for x in range(w):
            xs = w - 1 - x if flip else x
            r0 = np.float32(src[y, xs, 0])
            g0 = np.float32(src[y, xs, 1])
            b0 = np.float32(src[y, xs, 2])
            for ch in range(3):
                v = m[ch, 0] * r0 + m[ch, 1] * g0 + m[ch, 2] * b0 + offset
                dst[ch, y, x] = min(max(v, lo), hi)


@njit(cache=True, fastmath=True)
def blur_normalize(src, out, sigma, mean, istd, tmp, kernel):
    """Separable Gaussian (radius ceil(3 sigma), reflect-101 borders) then (x - mean) * istd."""
    c, h, w = src.shape
    rad = int(math.ceil(3.0 * sigma))
    n = 2 * rad + 1
    total = 0.0
    for i in range(n):
        d = i - rad
        kernel[i] = math.exp(-d * d / (2.0 * sigma * sigma))
        total += kernel[i]
    for i in range(n):
        kernel[i] /= total
    for ch in range(c):
        for y in range(h):  # horizontal pass: interior without branches, borders reflected
            row, acc = src[ch, y], tmp[ch, y]
            acc[:] = 0
            for i in range(n):
                k, sh = kernel[i], i - rad
                lo, hi = max(0, -sh), min(w, w - sh)
                for x in range(lo, hi):
                    acc[x] += k * row[x + sh]
                for x in range(0, lo):
                    acc[x] += k * row[-(x + sh)]
                for x in range(hi, w):
                    acc[x] += k * row[2 * w - 2 - (x + sh)]
        mu, inv = mean[ch], istd[ch]
        for y in range(h):  # vertical pass fused with the normalisation
            dst = out[ch, y]
            dst[:] = -mu
            for i in range(n):
                yy = y + i - rad
                yy = -yy if yy < 0 else (2 * h - 2 - yy if yy >= h else yy)
                k, row = kernel[i], tmp[ch, yy]
                for x in range(w):
                    dst[x] += k * row[x]
            for x in range(w):
                dst[x] *= inv


@njit(cache=True, fastmath=True)
def normalize(src, out, mean, istd):
    c, h, w = src.shape
    for ch in range(c):
        mu, inv = mean[ch], istd[ch]
        for y in range(h):
            for x in range(w):
                out[ch, y, x] = (src[ch, y, x] - mu) * inv


@njit(cache=True)
def render_group(out, crops, u, first, r, mean, istd):
    """All crops of one group of one sample: crops [F,S,S,3] uint8 -> out [F,3,S,S] float32,
    using rows first..first+F of the sample's uniforms u [V, 9]."""
    f, s = crops.shape[0], crops.shape[1]
    col = np.empty((3, s, s), np.float32)
    tmp = np.empty((3, s, s), np.float32)
    kernel = np.empty(64, np.float64)
    m = np.empty((3, 3), np.float32)
    for k in range(f):
        offset, sigma, flip = view_params(u[first + k], r, m)
        colour_clamp(crops[k], m, offset, flip, col)
        if sigma > 0:
            blur_normalize(col, out[k], sigma, mean, istd, tmp, kernel)
        else:
            normalize(col, out[k], mean, istd)


def _setup(outs, ins):
    # outputs [F, 3, S, S] from inputs [F, S, S, 3], output i from input i
    for o in range(len(outs)):
        for i in range(len(outs[o])):
            outs[o][i][0] = ins[o][i][0]
            outs[o][i][1] = 3
            outs[o][i][2] = ins[o][i][1]
            outs[o][i][3] = ins[o][i][2]


@do_not_convert
def _run_fn(counts, recipe, mean, std):
    """A DALI run function for len(counts) crop groups, with the recipe baked in as constants."""
    r = np.asarray(recipe, np.float32)
    mu = (np.asarray(mean, np.float32) * 255).astype(np.float32)
    inv = (1.0 / (np.asarray(std, np.float32) * 255)).astype(np.float32)
    s1 = int(counts[0])
    s2 = int(sum(counts[:2]))
    if len(counts) == 1:
        def run(o0, c0, u):
            render_group(o0, c0, u, 0, r, mu, inv)
    elif len(counts) == 2:
        def run(o0, o1, c0, c1, u):
            render_group(o0, c0, u, 0, r, mu, inv)
            render_group(o1, c1, u, s1, r, mu, inv)
    elif len(counts) == 3:
        def run(o0, o1, o2, c0, c1, c2, u):
            render_group(o0, c0, u, 0, r, mu, inv)
            render_group(o1, c1, u, s1, r, mu, inv)
            render_group(o2, c2, u, s2, r, mu, inv)
    else:
        raise ValueError(f"the CPU kernel handles at most {MAX_GROUPS} crop groups, got {len(counts)}")
    return run


def fused_views(crop_stacks, counts, u, recipe, mean, std):
    """DALI node: one call per sample renders every group's crops. crop_stacks: [F,S,S,3] uint8
    nodes (F = counts[g]); u: the sample's [V, 9] float32 uniforms. Returns [F,3,S,S] float32 nodes."""
    from nvidia.dali.plugin.numba.fn.experimental import numba_function
    n = len(crop_stacks)
    outs = numba_function(
        *crop_stacks, u, run_fn=_run_fn(counts, recipe, mean, std), setup_fn=_setup,
        out_types=[types.FLOAT] * n, in_types=[types.UINT8] * n + [types.FLOAT],
        outs_ndim=[4] * n, ins_ndim=[4] * n + [2], batch_processing=False)
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]
