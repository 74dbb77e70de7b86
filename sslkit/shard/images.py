"""Decode, validate and normalise one input image: the work each build worker does per item.

Every image is decoded exactly once. What comes out is always an 8-bit RGB JPEG: JPEGs that are
already RGB, upright and small enough pass through byte-for-byte; everything else (PNG, CMYK,
grayscale, palette, alpha, 16-bit, EXIF-rotated, oversized) is converted and re-encoded. Anything
that cannot be used becomes a one-line rejection reason instead of an exception.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .sample_corpus import SampleRenderer
from .sources import Item, read_idx

# Pillow's own bomb guard raises at 2x its limit; we check pixel counts ourselves with a clear reason.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode half-gray

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageOptions:
    resize_max: int | None = None   # longer side above this is downscaled (aspect kept)
    quality: int = 90
    min_size: int = 16              # shorter side below this is rejected
    max_pixels: int = 100_000_000   # decompression-bomb guard, checked from the header
    force_reencode: bool = False    # re-encode even JPEGs that could pass through (uniform quality)


@dataclass
class Accepted:
    jpg: bytes
    meta: dict


@dataclass
class Rejected:
    reason: str


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        # 16-bit data: keep the top 8 bits (Pillow's convert would clip everything above 255).
        arr = (arr.astype(np.uint32) >> 8) if arr.max(initial=0) > 255 else arr
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        # Transparent pixels often hold garbage colours: composite onto white like a viewer would.
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if mode != "RGB" else im


def convert(data: bytes, source: str, opts: ImageOptions) -> Accepted | Rejected:
    """Validate `data` (the bytes of one image file) and return a JPEG ready for a shard, or a reason."""
    if not data:
        return Rejected("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Rejected(f"not an image: unrecognised format ({len(data)} bytes, starts {data[:8]!r})")
    except Exception as e:  # noqa: BLE001 - any header parsing failure is a property of the file
        return Rejected(f"corrupt or truncated image header: {type(e).__name__}: {e}")
    w0, h0 = im.size
    if w0 * h0 > opts.max_pixels:
        return Rejected(f"decompression bomb: {w0}x{h0} = {w0 * h0 / 1e6:.0f} MP exceeds --max-pixels "
                        f"{opts.max_pixels / 1e6:.0f} MP")
    if min(w0, h0) < opts.min_size:
        return Rejected(f"too small: {w0}x{h0}, shorter side below --min-size {opts.min_size}")
    fmt, mode0 = im.format, im.mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the orientation tag is all we use
        try:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - unreadable EXIF means no orientation
            orientation = 1
    long0 = max(w0, h0)
    needs_resize = opts.resize_max is not None and long0 > opts.resize_max
    if needs_resize and fmt == "JPEG":
        # DCT-domain downscale while decoding: large photos decode several times faster.
        scale = opts.resize_max / long0
        im.draft(None, (max(1, int(w0 * scale)), max(1, int(h0 * scale))))
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data surfaces here
        return Rejected(f"corrupt or truncated image data: {type(e).__name__}: {e}")
    passthrough = (fmt == "JPEG" and mode0 == "RGB" and orientation in (1, None) and not needs_resize
                   and not opts.force_reencode)
    if passthrough:
        return Accepted(data, {"source": source, "format": fmt, "mode": mode0, "orig_size": [w0, h0],
                               "size": [w0, h0], "reencoded": False})
    rgb = _to_rgb(im)
    if orientation not in (1, None):
        rgb = _apply_orientation(rgb, orientation)
    if needs_resize:
        w, h = rgb.size
        scale = opts.resize_max / max(w, h)
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                         Image.Resampling.BICUBIC, reducing_gap=2.0)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=opts.quality, subsampling=2)  # baseline 4:2:0, nvJPEG HW friendly
    return Accepted(buf.getvalue(), {"source": source, "format": fmt, "mode": mode0, "orig_size": [w0, h0],
                                     "size": list(rgb.size), "reencoded": True})


_ORIENTATION_OPS = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    for op in _ORIENTATION_OPS.get(orientation, []):
        im = im.transpose(op)
    return im


class ItemReader:
    """Turns an Item into image bytes (or a rejection). One per worker process: it caches idx arrays
    and decoded sample photos so they are read once per process, not once per item."""

    def __init__(self):
        self._idx: dict[str, np.ndarray] = {}
        self._samples = SampleRenderer()

    def read(self, item: Item) -> bytes | Rejected:
        if item.kind == "file":
            try:
                with open(item.ref, "rb") as f:
                    return f.read()
            except OSError as e:
                return Rejected(f"cannot read: {e.strerror or e}")
        if item.kind == "idx":
            path, _, rec = item.ref.rpartition("#")
            if path not in self._idx:
                self._idx[path] = read_idx(path)
            arr = self._idx[path][int(rec)]
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")  # lossless hand-off
            return buf.getvalue()
        if item.kind == "sample":
            _, seed, i = item.ref.split("#")
            return self._samples.render(int(seed), int(i))
        raise ValueError(f"unknown item kind {item.kind!r}")

    def process(self, item: Item, opts: ImageOptions) -> Accepted | Rejected:
        if item.label == "":
            return Rejected("no class: with --labels dirs every image must sit inside a class subfolder")
        try:
            data = self.read(item)
            if isinstance(data, Rejected):
                return data
            return convert(data, item.ref, opts)
        except Exception as e:  # noqa: BLE001 - a build never dies on one input; the reason is kept
            return Rejected(f"unexpected error: {type(e).__name__}: {e}")
