"""The augmentation vocabulary: every step written once, used by every pipeline on both devices.

Two halves, following where the work is cheapest (see pipelines/spec.py for the semantics):
- in the DALI graph, the irregular per-sample work on images of every size: decode, the crop windows
  of all views from the sample's uniforms (numba, pipelines/kernels.py), one antialiased resize per
  view straight from the decoded image (flip folded in);
- on the batch, in torch on the loader's device (the trainer's GPU, or the CPU in CI), the work on
  dense, equal-size uint8 crops: colour map, grayscale, blur, normalisation, layout -- vectorised over
  the whole batch, never per sample. `photometric` is that stage for the multi-view pipelines.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from nvidia.dali import fn, types

from . import kernels
from .spec import N_VIEW_U, VIEW_U, ColorRecipe, ViewRule

# == DALI graph ======================================================================================


def decode(jpg, device: str, hw_decoder_load: float | None = 0.65):
    """JPEG bytes -> HWC uint8 RGB; nvJPEG (`mixed`, with the hardware decoder share) on GPU."""
    if device == "gpu":
        # Padding sized so nvJPEG buffers do not reallocate for ImageNet-sized images.
        return fn.decoders.image(jpg, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                 device_memory_padding=211025920, host_memory_padding=140544512)
    return fn.decoders.image(jpg, device="cpu", output_type=types.RGB)


def image_shape(jpg):
    """(H, W, C) of each encoded image from its header: a CPU node usable as an argument input."""
    return fn.peek_image_shape(jpg)


def uniforms(views: int, extra: int = 0):
    """All random draws of a sample in one op: [views, N_VIEW_U] (+ `extra` more per view) in [0, 1)."""
    return fn.random.uniform(range=[0.0, 1.0], shape=[views, N_VIEW_U + extra])


def view_windows(shape, u, rules: list[ViewRule]):
    """Every view's (roi_start, roi_end) nodes: the crop window of spec.py, flip folded in."""
    return kernels.view_rois(shape, u, [rule.row(k) for k, rule in enumerate(rules)])


def resized_crop(img, roi_start, roi_end, size: int, device: str):
    """The window resized to size x size by ONE antialiased linear resize (a window whose x start is
    beyond its x end comes out flipped)."""
    return fn.resize(img, size=[size, size], roi_start=roi_start, roi_end=roi_end, antialias=True,
                     interp_type=types.INTERP_LINEAR, device=device)


def resize_shorter(img, side: int, device: str):
    return fn.resize(img, resize_shorter=float(side), antialias=True, interp_type=types.INTERP_LINEAR, device=device)


def center_crop(img, size: int, device: str):
    return fn.crop(img, crop=[size, size], device=device)


def center_crop_normalize(img, size: int, mean, std, device: str):
    """The centre crop, normalised ((x / 255 - mean) / std) and laid out CHW float32 by one operator, in
    DALI's thread pool: on a CPU this keeps the per-pixel work off the main thread."""
    return fn.crop_mirror_normalize(img, crop=[size, size], mean=[255.0 * m for m in mean],
                                    std=[255.0 * v for v in std], output_layout="CHW", dtype=types.FLOAT,
                                    device=device)


def stack(nodes):
    """[F, ...] from F equal-shape nodes."""
    return fn.stack(*nodes) if len(nodes) > 1 else fn.expand_dims(nodes[0], axes=[0])


# == batch stage (torch) =============================================================================

LUMA = (0.299, 0.587, 0.114)
# Constants are made once per device: copying them from pageable host memory at every batch would make
# the host wait for the GPU's queue (the training step) each time.


@functools.lru_cache(maxsize=16)
def _yiq(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(kernels.YIQ2RGB.tolist(), dtype=torch.float64, device=device),
            torch.tensor(kernels.RGB2YIQ.tolist(), dtype=torch.float64, device=device))


@functools.lru_cache(maxsize=64)
def _affine(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([1.0 / (255.0 * v) for v in std], device=device).view(3, 1, 1)
    shift = torch.tensor([m / v for m, v in zip(mean, std)], device=device).view(3, 1, 1)
    return scale, shift


def colour_map(u: torch.Tensor, r: ColorRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Per view the 3x3 colour matrix and offset of spec.py from its uniforms u [N, >= 9]: ([N, 3, 3], [N])."""
    u = u.double()
    applied = u[:, VIEW_U["apply"]] < r.p

    def jitter(name: str, strength: float):
        return 1.0 + torch.where(applied, strength * (2.0 * u[:, VIEW_U[name]] - 1.0), 0.0)

    b, c, s = jitter("brightness", r.brightness), jitter("contrast", r.contrast), jitter("saturation", r.saturation)
    s = torch.where(u[:, VIEW_U["gray"]] < r.gray_p, 0.0, s)
    hue = torch.where(applied, 2.0 * math.pi * r.hue * (2.0 * u[:, VIEW_U["hue"]] - 1.0), 0.0)
    cos, sin, one, zero = torch.cos(hue), torch.sin(hue), torch.ones_like(hue), torch.zeros_like(hue)
    rot_sat = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, s * cos, s * sin], -1),
                           torch.stack([zero, -s * sin, s * cos], -1)], -2)                 # Rot(h) . diag(1, s, s)
    yiq2rgb, rgb2yiq = _yiq(u.device)
    m = (b * c)[:, None, None] * (yiq2rgb @ rot_sat @ rgb2yiq)
    return m.float(), (b * (128.0 - 128.0 * c)).float()


def apply_colour(x: torch.Tensor, m: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """out = clamp(m . x + offset, 0, 255) per pixel, x [N, 3, H, W] float32. Elementwise (no matmul, so
    no TF32 on a GPU): every device computes the same float32 sums."""
    out = torch.empty_like(x)
    for i in range(3):
        o = out[:, i]
        torch.mul(x[:, 0], m[:, i, 0, None, None], out=o)
        o.addcmul_(x[:, 1], m[:, i, 1, None, None]).addcmul_(x[:, 2], m[:, i, 2, None, None])
        o.add_(offset[:, None, None])
    return out.clamp_(0.0, 255.0)


def blur_sigma(u: torch.Tensor, r: ColorRecipe) -> torch.Tensor:
    """Per view the blur sigma of spec.py, 0 for views that are not blurred: [N]."""
    lo, hi = r.blur_sigma
    sigma = lo + (hi - lo) * u[:, VIEW_U["sigma"]].double()
    return torch.where(u[:, VIEW_U["blur"]] < r.blur_p, sigma, 0.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian per view (x [N, C, H, W], sigma [N], 0: unchanged), kernel radius ceil(3 sigma) <=
    `radius`, reflect-101 borders. On a GPU every view goes through (a view that is not blurred gets
    the identity kernel), so nothing waits for the device; on a CPU only the blurred ones do."""
    if radius == 0:
        return x
    if x.device.type == "cpu":
        idx = (sigma > 0).nonzero().squeeze(1)
        out = x.clone()
        if len(idx):
            out[idx] = _blur(x[idx], sigma[idx], radius)
        return out
    return _blur(x, sigma, radius)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    d = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    s = sigma.double().clamp_min(1e-6)[:, None]
    k = torch.exp(-d * d / (2.0 * s * s)) * (d.abs() <= torch.ceil(3.0 * s))   # taps beyond ceil(3 sigma): 0
    k = torch.where(sigma[:, None] > 0, k, (d == 0).double())
    k = (k / k.sum(1, keepdim=True)).float()[:, :, None, None, None]           # [N, taps, 1, 1, 1]
    h, w = x.shape[-2:]
    xp = F.pad(x, (radius, radius, 0, 0), mode="reflect")                      # torch's reflect is reflect-101
    acc = xp[..., 0:w] * k[:, 0]
    for t in range(1, 2 * radius + 1):
        acc.addcmul_(xp[..., t:t + w], k[:, t])
    yp = F.pad(acc, (0, 0, radius, radius), mode="reflect")
    out = yp[..., 0:h, :] * k[:, 0]
    for t in range(1, 2 * radius + 1):
        out.addcmul_(yp[..., t:t + h, :], k[:, t])
    return out


def grayscale(x: torch.Tensor, hwc: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """x [N, ..., 3, H, W] float = channels_first(hwc), hwc [N, ..., H, W, 3] uint8: the samples where `which`
    [N] is True become hwc's luma in all three channels. Luma comes from the contiguous HWC source (one
    matmul instead of three strided channel reads). On a CPU only the chosen samples are computed, into
    x in place (4x faster for jigsaw's 9 tiles); on a GPU the choice stays on the device (no host sync)."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device)
    if x.is_cuda:
        return torch.where(which.view(-1, *([1] * (x.dim() - 1))), (hwc.to(x.dtype) @ weights).unsqueeze(-3), x)
    chosen = which.nonzero().view(-1)
    if chosen.numel():
        x[chosen] = (hwc[chosen].to(x.dtype) @ weights).unsqueeze(-3).expand(-1, *x.shape[1:])
    return x


def normalize(x: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(x / 255 - mean) / std over the channel axis -3, cast to `dtype`."""
    scale, shift = _affine(x.device, tuple(mean), tuple(std))
    return torch.addcmul(-shift, x, scale).to(dtype)     # one pass over x (x * scale - shift: two)


def channels_first(crops: torch.Tensor) -> torch.Tensor:
    """[..., H, W, 3] uint8 -> [..., 3, H, W] float32, contiguous."""
    return crops.movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format)


def photometric(crops: torch.Tensor, u: torch.Tensor, recipe: ColorRecipe, mean, std,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The colour stage of spec.py on a batch of views: crops [N, S, S, 3] uint8 and their uniforms
    u [N, N_VIEW_U] -> [N, 3, S, S] normalised views. Colour map + clamp, blur, normalise."""
    x = channels_first(crops)
    if recipe.p > 0 or recipe.gray_p > 0:
        x = apply_colour(x, *colour_map(u, recipe))
    if recipe.blur_p > 0:
        x = gaussian_blur(x, blur_sigma(u, recipe), recipe.blur_radius)
    return normalize(x, mean, std, dtype)


def windows(roi_start: torch.Tensor, roi_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ROIs [..., 2] -> crop windows [..., 4] (y, x, h, w in source pixels) and flips [...] bool."""
    flip = roi_start[..., 1] > roi_end[..., 1]
    x0 = torch.minimum(roi_start[..., 1], roi_end[..., 1])
    win = torch.stack([roi_start[..., 0], x0, roi_end[..., 0] - roi_start[..., 0],
                       (roi_end[..., 1] - roi_start[..., 1]).abs()], -1)
    return win, flip
