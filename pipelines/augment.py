"""The augmentation vocabulary: each operation written once, for both devices.

Every function takes DALI nodes and a `device` ("cpu" or "gpu") and returns nodes; random
parameters are drawn per sample on the CPU side (argument inputs), so the same graph runs in
CPU-only CI and on a GPU. Colour, blur and normalisation of multi-crop views live in
multicrop.py (DALI ops) and kernels.py (the fused CPU kernel), which share one spec.
"""

from __future__ import annotations

import nvidia.dali.math as dmath
from nvidia.dali import fn, types


def decode(jpg, device: str, hw_decoder_load: float = 0.65):
    """JPEG bytes -> HWC uint8 RGB; nvJPEG (`mixed`, with the hardware decoder share) on GPU."""
    if device == "gpu":
        # Padding sized so nvJPEG buffers do not reallocate for ImageNet-sized images.
        return fn.decoders.image(jpg, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                 device_memory_padding=211025920, host_memory_padding=140544512)
    return fn.decoders.image(jpg, device="cpu", output_type=types.RGB)


def image_shape(jpg):
    """(H, W, C) of each encoded image from its header: a CPU node usable as an argument input."""
    return fn.peek_image_shape(jpg)


def crop_window(shape, scale, ratio):
    """torchvision's RandomResizedCrop window: (anchor [y, x], extent [h, w]) as float CPU nodes."""
    anchor, extent = fn.random_crop_generator(shape, random_area=list(scale), random_aspect_ratio=list(ratio))
    return fn.cast(anchor, dtype=types.FLOAT), fn.cast(extent, dtype=types.FLOAT)


def shorter_side_window(shape, resize: int, size: int):
    """A uniformly placed size x size crop of the image resized to shorter side `resize`, expressed in
    SOURCE pixels: (anchor [y, x], extent [h, w]) float nodes, for one ROI resize to size x size
    (VISSL's Resize + RandomCrop, with continuous rather than integer crop offsets)."""
    h = fn.cast(shape[0], dtype=types.FLOAT)
    w = fn.cast(shape[1], dtype=types.FLOAT)
    side = dmath.min(h, w) * (size / resize)
    u = fn.random.uniform(range=[0.0, 1.0], shape=[2])
    return fn.stack(u[0] * (h - side), u[1] * (w - side)), fn.stack(side, side)


def coin(p: float):
    """Per-sample 0/1 float with P(1) = p."""
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def resized_crop(img, anchor, extent, size: int, flip, device: str):
    """Crop the window and resize it to size x size in ONE antialiased resize; a horizontal flip is
    folded in by swapping the window's x ends (DALI flips a region whose start > end)."""
    y0, x0 = anchor[0], anchor[1]
    y1, x1 = y0 + extent[0], x0 + extent[1]
    xs = x0 + flip * (x1 - x0)
    xe = x1 - flip * (x1 - x0)
    return fn.resize(img, size=[size, size], roi_start=fn.stack(y0, xs), roi_end=fn.stack(y1, xe),
                     antialias=True, interp_type=types.INTERP_LINEAR, device=device)
