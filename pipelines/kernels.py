"""numba kernels of the pipelines: the image check, the crop windows, the fused CPU colour stage.

The image check (`image_ok`) runs in the reader's Python source on the bytes it has just read (a cached
njit function: microseconds per image, no operator). The others run as DALI `numba_function` operators,
called once per sample in DALI's thread pool, so no Python runs per sample and one operator does what
would otherwise take dozens of scalar DALI ops (every op costs ~0.25 ms per batch whatever it
computes). The numerics are `@njit(cache=True)` functions, compiled once and cached on disk; they take
plain scalars and arrays. The run functions that read the graph's tensors (and the uniform layout
`VIEW_U`) are compiled when their operator is first made, together with the C wrapper DALI compiles for
every NumbaFunction (seconds each, in every process): the operators are made once per process (`_op`)
and reused by every pipeline, so their parameters travel as constant inputs, never as closures.

The semantics are those of pipelines/spec.py; tests/reference.py re-implements them for the tests.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from numba import njit
from nvidia.dali import types
from nvidia.dali.pipeline import do_not_convert

from .spec import CROP_ATTEMPTS, VIEW_U

# Columns of a view's rule row (`ViewRule.row`): which row of u it reads, ratio bounds, scale bounds,
# the region (box fraction and corner), the square side and the flip probability.
RULE = {"view": 0, "ratio": 1, "scale": 3, "box": 5, "box_y": 6, "box_x": 7, "square": 8, "flip_p": 9}
RULE_LEN = 10
# The same layouts as plain ints: numba reads int globals as compile-time constants (not dicts).
_R_VIEW, _R_SCALE, _R_RATIO, _R_BOX, _R_BOX_Y, _R_BOX_X, _R_SQUARE, _R_FLIP = (RULE[k] for k in (
    "view", "scale", "ratio", "box", "box_y", "box_x", "square", "flip_p"))
_U_APPLY, _U_B, _U_C, _U_S, _U_H, _U_GRAY, _U_BLUR, _U_SIGMA, _U_FLIP, _U_Y, _U_X, _U_AREA = (VIEW_U[k] for k in (
    "apply", "brightness", "contrast", "saturation", "hue", "gray", "blur", "sigma", "flip", "y", "x", "area"))
VIEWS_PER_OP = 3          # numba_function has at most 6 outputs: (roi_start, roi_end) of 3 views
# RGB <-> YIQ, the colour space in which hue is a rotation and saturation a scaling (as DALI does it).
RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], np.float32)
YIQ2RGB = np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]], np.float32)


def _placeholder_jpeg() -> np.ndarray:
    """A small mid-gray JPEG that stands in for a corrupt sample (counted and reported by the loader):
    311 bytes with optimised Huffman tables, shorter than any real photograph's JPEG."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (124, 116, 104)).save(buf, format="JPEG", quality=90, optimize=True)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


PLACEHOLDER_JPEG = _placeholder_jpeg()


# == JPEG structure ==================================================================================

@njit(cache=True)
def jpeg_ok(b) -> bool:
    """SOI first, EOI last, and well-formed marker segments up to the first scan: quantisation and
    Huffman tables that libjpeg would accept (counts <= 256, a valid code space), one 8-bit frame with
    non-zero size, 1..4 components with sampling factors 1..4, and a scan whose components and (for
    sequential Huffman) tables exist. Truncated files and damaged headers fail; damage inside the
    entropy-coded data is not seen here (decoders show it as artefacts)."""
    n = b.shape[0]
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8 or b[n - 2] != 0xFF or b[n - 1] != 0xD9:
        return False
    qdef = np.zeros(4, np.bool_)
    hdef = np.zeros(8, np.bool_)            # DC tables 0..3, AC tables 4..7
    comp_id = np.zeros(4, np.int64)
    comp_q = np.zeros(4, np.int64)
    ncomp, sof, i = 0, -1, 2
    while i + 4 <= n:
        if b[i] != 0xFF:
            return False
        m = b[i + 1]
        if m == 0xFF:                       # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a length
            i += 2
            continue
        if m == 0xD8 or m == 0xD9:
            return False
        seg = b[i + 2] * 256 + b[i + 3]
        s, e = i + 4, i + 2 + seg
        if seg < 2 or e > n:
            return False
        if m == 0xDB:                       # DQT
            j = s
            while j < e:
                pq, tq = b[j] >> 4, b[j] & 15
                if pq > 1 or tq > 3:
                    return False
                qdef[tq] = True
                j += 1 + 64 * (pq + 1)
            if j != e:
                return False
        elif m == 0xC4:                     # DHT
            j = s
            while j < e:
                if j + 17 > e:
                    return False
                tc, th = b[j] >> 4, b[j] & 15
                if tc > 1 or th > 3:
                    return False
                total, code = 0, 0
                for length in range(1, 17):
                    total += b[j + length]
                    code += b[j + length]
                    if code >= (1 << length):
                        return False
                    code <<= 1
                if total > 256 or j + 17 + total > e:
                    return False
                if tc == 0:
                    for k in range(total):
                        if b[j + 17 + k] > 15:
                            return False
                hdef[4 * tc + th] = True
                j += 17 + total
            if j != e:
                return False
        elif 0xC0 <= m <= 0xCF and m != 0xC4 and m != 0xC8 and m != 0xCC:   # SOFn
            if sof >= 0 or seg < 8:
                return False
            height, width, ncomp = b[s + 1] * 256 + b[s + 2], b[s + 3] * 256 + b[s + 4], b[s + 5]
            if b[s] != 8 or height == 0 or width == 0 or ncomp < 1 or ncomp > 4 or seg != 8 + 3 * ncomp:
                return False
            for c in range(ncomp):
                hv, tq = b[s + 7 + 3 * c], b[s + 8 + 3 * c]
                if hv >> 4 < 1 or hv >> 4 > 4 or hv & 15 < 1 or hv & 15 > 4 or tq > 3:
                    return False
                comp_id[c], comp_q[c] = b[s + 6 + 3 * c], tq
            sof = m
        elif m == 0xDA:                     # SOS: the header ends here
            ns = b[s]
            if sof < 0 or ns < 1 or ns > 4 or seg != 6 + 2 * ns:
                return False
            for c in range(ncomp):
                if not qdef[comp_q[c]]:
                    return False
            for k in range(ns):
                cid, tables = b[s + 1 + 2 * k], b[s + 2 + 2 * k]
                found = False
                for c in range(ncomp):
                    found = found or comp_id[c] == cid
                if not found or tables >> 4 > 3 or tables & 15 > 3:
                    return False
                if (sof == 0xC0 or sof == 0xC1) and not (hdef[tables >> 4] and hdef[4 + (tables & 15)]):
                    return False
            return True
        i = e
    return False


@njit(cache=True)
def png_ok(b) -> bool:
    """PNG signature, an IHDR chunk first with a non-zero size, and the IEND chunk last (a cut file
    fails)."""
    n = b.shape[0]
    sig = (0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A)
    if n < 8 + 25 + 12:
        return False
    for i in range(8):
        if b[i] != sig[i]:
            return False
    if b[12] != 0x49 or b[13] != 0x48 or b[14] != 0x44 or b[15] != 0x52:       # IHDR
        return False
    width = (b[16] << 24) | (b[17] << 16) | (b[18] << 8) | b[19]
    height = (b[20] << 24) | (b[21] << 16) | (b[22] << 8) | b[23]
    if width == 0 or height == 0:
        return False
    e = n - 12                                                                    # IEND, length 0
    return b[e] == 0 and b[e + 1] == 0 and b[e + 2] == 0 and b[e + 3] == 0 and b[e + 4] == 0x49 \
        and b[e + 5] == 0x45 and b[e + 6] == 0x4E and b[e + 7] == 0x44


@njit(cache=True)
def webp_ok(b) -> bool:
    """RIFF....WEBP whose RIFF size matches the bytes present (a cut file fails)."""
    n = b.shape[0]
    if n < 20 or b[0] != 0x52 or b[1] != 0x49 or b[2] != 0x46 or b[3] != 0x46:
        return False
    if b[8] != 0x57 or b[9] != 0x45 or b[10] != 0x42 or b[11] != 0x50:
        return False
    size = b[4] | (b[5] << 8) | (b[6] << 16) | (b[7] << 24)
    return size + 8 <= n and size >= 12


@njit(cache=True)
def image_ok(b) -> bool:
    """`jpeg_ok`, `png_ok` or `webp_ok` by the file's signature (adopted shards hold all three)."""
    if b.shape[0] > 1 and b[0] == 0x89:
        return png_ok(b)
    if b.shape[0] > 1 and b[0] == 0x52:
        return webp_ok(b)
    return jpeg_ok(b)


# == crop windows ====================================================================================

@njit(cache=True)
def rrc_window(h, w, areas, ratios, uy, ux, s0, s1, r0, r1):
    """torchvision's RandomResizedCrop from uniforms: (y, x, height, width), integers, in an h x w region."""
    area = float(h * w)
    l0, l1 = math.log(r0), math.log(r1)
    for a in range(areas.shape[0]):
        target = area * (s0 + (s1 - s0) * float(areas[a]))
        aspect = math.exp(l0 + (l1 - l0) * float(ratios[a]))
        cw = int(np.rint(math.sqrt(target * aspect)))
        ch = int(np.rint(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return min(int(float(uy) * (h - ch + 1)), h - ch), min(int(float(ux) * (w - cw + 1)), w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < r0:
        cw, ch = w, int(np.rint(w / r0))
    elif in_ratio > r1:
        cw, ch = int(np.rint(h * r1)), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@njit(cache=True)
def window_roi(h, w, uy, ux, uflip, areas, ratios, r, start, end):
    """The resize ROI of one window rule `r` (RULE) from its uniforms: start = (y0, x0), end = (y1, x1)
    in source pixels, x ends swapped when the view is flipped."""
    if r[_R_SQUARE] > 0:
        side = min(h, w) * float(r[_R_SQUARE])
        y, x, ch, cw = float(uy) * (h - side), float(ux) * (w - side), side, side
    else:
        box = float(r[_R_BOX])
        bh, bw = (h, w) if box >= 1 else (int(math.floor(h * box + 0.5)), int(math.floor(w * box + 0.5)))
        iy, ix, ich, icw = rrc_window(bh, bw, areas, ratios, uy, ux, float(r[_R_SCALE]), float(r[_R_SCALE + 1]),
                                      float(r[_R_RATIO]), float(r[_R_RATIO + 1]))
        y, x = float(iy + (h - bh) * int(r[_R_BOX_Y])), float(ix + (w - bw) * int(r[_R_BOX_X]))
        ch, cw = float(ich), float(icw)
    flip = uflip < r[_R_FLIP]
    start[0], end[0] = y, y + ch
    start[1], end[1] = (x + cw, x) if flip else (x, x + cw)


@njit
def view_roi(h, w, u, r, start, end):
    """`window_roi` of one view's uniform row `u` (VIEW_U). Not cached: numba's disk cache would not see
    a change of VIEW_U, which lives in spec.py, so the layout is read only by functions compiled afresh."""
    window_roi(h, w, u[_U_Y], u[_U_X], u[_U_FLIP], u[_U_AREA:_U_AREA + 2 * CROP_ATTEMPTS:2],
               u[_U_AREA + 1:_U_AREA + 2 * CROP_ATTEMPTS:2], r, start, end)


@do_not_convert
def _roi_run(s0, e0, s1, e1, s2, e2, shape, u, rules):
    h, w = shape[0], shape[1]
    view_roi(h, w, u[int(rules[0, _R_VIEW])], rules[0], s0, e0)
    view_roi(h, w, u[int(rules[1, _R_VIEW])], rules[1], s1, e1)
    view_roi(h, w, u[int(rules[2, _R_VIEW])], rules[2], s2, e2)


@do_not_convert
def _roi_setup(outs, ins):
    for o in range(len(outs)):
        for i in range(len(outs[o])):
            outs[o][i][0] = 2


# == the fused CPU colour stage ======================================================================

@njit(cache=True)
def colour_matrix(apply, ub, uc, us, uh, ugray, r, m):
    """Fill the 3x3 colour map `m` from one view's colour uniforms and the recipe vector `r`
    (ColorRecipe.as_array); return its offset."""
    applied = apply < r[0]
    b = 1.0 + (r[1] * (2.0 * ub - 1.0) if applied else 0.0)
    c = 1.0 + (r[2] * (2.0 * uc - 1.0) if applied else 0.0)
    s = 1.0 + (r[3] * (2.0 * us - 1.0) if applied else 0.0)
    hue = r[4] * (2.0 * uh - 1.0) * 2.0 * math.pi if applied else 0.0
    if ugray < r[5]:
        s = 0.0
    ch, sh = math.cos(hue), math.sin(hue)
    for j in range(3):  # columns of Rot(h) . diag(1, s, s) . RGB2YIQ
        yj = RGB2YIQ[0, j]
        ij = s * (ch * RGB2YIQ[1, j] + sh * RGB2YIQ[2, j])
        qj = s * (-sh * RGB2YIQ[1, j] + ch * RGB2YIQ[2, j])
        for i in range(3):
            m[i, j] = b * c * (YIQ2RGB[i, 0] * yj + YIQ2RGB[i, 1] * ij + YIQ2RGB[i, 2] * qj)
    return np.float32(b * (128.0 - 128.0 * c))


@njit(cache=True, fastmath=True)
def colour_clamp(src, m, offset, dst):
    """uint8 HWC `src` -> clamped float32 CHW `dst` = m . x + offset."""
    h, w = src.shape[0], src.shape[1]
    lo, hi = np.float32(0.0), np.float32(255.0)
    for y in range(h):
        for x in range(w):
            r0, g0, b0 = np.float32(src[y, x, 0]), np.float32(src[y, x, 1]), np.float32(src[y, x, 2])
            for ch in range(3):
                v = m[ch, 0] * r0 + m[ch, 1] * g0 + m[ch, 2] * b0 + offset
                dst[ch, y, x] = min(max(v, lo), hi)


@njit(cache=True, fastmath=True)
def blur_normalize(src, out, sigma, mean, istd, tmp, kernel):
    """Separable Gaussian (radius ceil(3 sigma), reflect-101 borders) then (x - mean) * istd; sigma 0: none."""
    c, h, w = src.shape
    rad = int(math.ceil(3.0 * sigma)) if sigma > 0 else 0
    n = 2 * rad + 1
    total = 0.0
    for i in range(n):
        d = i - rad
        kernel[i] = math.exp(-d * d / (2.0 * sigma * sigma)) if sigma > 0 else 1.0
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


@njit(cache=True)
def render_group(out, crops, cu, table):
    """All crops of one group of one sample: crops [F,S,S,3] uint8 -> out [F,3,S,S] float32. cu [F, 8]:
    each view's apply, brightness, contrast, saturation, hue, gray, blur and sigma uniforms; table:
    first view, recipe (10), 255 mean (3), 1 / (255 std) (3)."""
    f, s = crops.shape[0], crops.shape[1]
    r, mu, inv = table[1:11], table[11:14], table[14:17]
    col = np.empty((3, s, s), np.float32)
    tmp = np.empty((3, s, s), np.float32)
    kernel = np.empty(2 * int(math.ceil(3.0 * r[8])) + 1, np.float64)
    m = np.empty((3, 3), np.float32)
    for k in range(f):
        c = cu[k]
        offset = colour_matrix(c[0], c[1], c[2], c[3], c[4], c[5], r, m)
        sigma = r[7] + (r[8] - r[7]) * c[7] if c[6] < r[6] else np.float32(0.0)
        colour_clamp(crops[k], m, offset, col)
        blur_normalize(col, out[k], sigma, mu, inv, tmp, kernel)


_COLOUR_U = (_U_APPLY, _U_B, _U_C, _U_S, _U_H, _U_GRAY, _U_BLUR, _U_SIGMA)


@do_not_convert
def _fused_run(out, crops, u, table):
    first = int(table[0])
    cu = np.empty((crops.shape[0], 8), np.float32)
    for k in range(crops.shape[0]):
        for j in range(8):
            cu[k, j] = u[first + k, _COLOUR_U[j]]
    render_group(out, crops, cu, table)


@do_not_convert
def _fused_setup(outs, ins):
    for i in range(len(outs[0])):   # [F, 3, S, S] from [F, S, S, 3]
        outs[0][i][0], outs[0][i][1] = ins[0][i][0], 3
        outs[0][i][2], outs[0][i][3] = ins[0][i][1], ins[0][i][2]


# == operators =======================================================================================

_KINDS = {
    # kind: (run, setup, out_types, in_types, outs_ndim, ins_ndim)
    "roi": (_roi_run, _roi_setup, [types.FLOAT] * 6, [types.INT64, types.FLOAT, types.FLOAT], [1] * 6, [1, 2, 2]),
    "fused": (_fused_run, _fused_setup, [types.FLOAT], [types.UINT8, types.FLOAT, types.FLOAT], [4], [4, 2, 1]),
}


@functools.lru_cache(maxsize=None)
def _op(kind: str):
    """The numba_function operator of `kind`, made (and compiled) once per process."""
    from nvidia.dali.plugin.numba import NumbaFunction
    run, setup, out_types, in_types, outs_ndim, ins_ndim = _KINDS[kind]
    return NumbaFunction(run_fn=run, setup_fn=setup, out_types=out_types, in_types=in_types, outs_ndim=outs_ndim,
                         ins_ndim=ins_ndim, batch_processing=False)


def register_op(kind: str, run, setup, out_types, in_types, outs_ndim, ins_ndim):
    """Another module's numba operator (e.g. the jigsaw tiles), made once per process through `_op`."""
    _KINDS.setdefault(kind, (run, setup, out_types, in_types, outs_ndim, ins_ndim))
    return functools.partial(_op, kind)


def view_rois(shape, u, rows: list[list[float]]):
    """roi_start and roi_end nodes of every view, from the sample's uniforms u [V, N_VIEW_U] and one
    rule row per view: ceil(V / 3) operators, each with its rows as a float32 constant."""
    starts, ends = [], []
    for first in range(0, len(rows), VIEWS_PER_OP):
        chunk = rows[first:first + VIEWS_PER_OP]
        chunk = chunk + [chunk[-1]] * (VIEWS_PER_OP - len(chunk))    # padded: the extra outputs go unused
        outs = _op("roi")(shape, u, types.Constant(np.array(chunk, np.float32), device="cpu"))
        for k in range(min(VIEWS_PER_OP, len(rows) - first)):
            starts.append(outs[2 * k])
            ends.append(outs[2 * k + 1])
    return starts, ends


def fused_views(crops, u, first: int, recipe, mean, std):
    """CPU only: the colour / blur / normalise stage of one crop group ([F,S,S,3] uint8 -> [F,3,S,S] float32)."""
    table = np.concatenate([[first], recipe.as_array(), 255.0 * np.asarray(mean),
                            1.0 / (255.0 * np.asarray(std))]).astype(np.float32)
    return _op("fused")(crops, u, types.Constant(table, device="cpu"))
