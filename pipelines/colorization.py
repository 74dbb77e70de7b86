"""Colorization (Zhang et al. 2016; Goyal et al. 2019): the L channel in, 313-bin soft ab targets out.

    loader = make_loader("colorization", "shards/x", batch_size=64, size=224, prior="prior.npy")
    batch["L"]        # [B, 1, H, W] float32, L - 50 (so roughly [-50, 50]), H = W = size
    batch["ab_idx"]   # [B, H/4, W/4, k] int64: the k nearest of the 313 ab bins, nearest first
    batch["ab_w"]     # [B, H/4, W/4, k] float32: their Gaussian weights (sigma), summing to 1
    batch["nongray"]  # [B] bool: some |a| or |b| > 5 in the target (Zhang's NonGrayMaskLayer)
    batch["weight"]   # [B, H/4, W/4] float32, only with a prior: rebalancing factor of the nearest bin
    sslkit.color.expand_topk(batch["ab_idx"], batch["ab_w"])   # -> dense [B, H/4, W/4, 313] targets

Crop: resize the shorter side to `resize` (default size * 256 / 224: 256 for
Goyal's 224, the transform VISSL uses on colorization models), take a uniformly placed size x size
crop, flip with p = 0.5. Zhang's own recipe is a random 176 crop of a 256 image: size=176,
resize=256. The target is the crop's ab decimated by 4 by plain subsampling (pixels (4i, 4j)), as
Zhang's stride-4 constant convolution does; the weights are NOT multiplied by `nongray` (Zhang
applies rebalance x nongray to the gradient only; the method combines them).

Where the work runs: DALI decodes and makes the uint8 RGB crop (the window of a `ViewRule(square=
size / resize)`, pipelines/spec.py, by one ROI resize from the source, flip folded in; the same graph
on both devices); `postprocess` then converts the whole batch to Lab with
`sslkit.color.rgb_to_lab_nchw` and soft-encodes it, vectorised torch on the loader's device -- the
trainer GPU with device="gpu". DALI has no Lab conversion and no nearest-bin search, and doing both
per batch on the GPU keeps the CPU free for decoding. The soft encoding is `sslkit.color.NearestBins`
(exact k nearest of the 313 bins from ~37 candidates per pixel, ties broken by bin order, so CPU and
GPU pick the same bins). With `with_params=True` the batch keeps the crop as params.rgb ([B, H, W, 3]
uint8) and has params.window ([y0, x0, h, w] in source pixels) and params.flip.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from sslkit import color
from sslkit.registry import register

from . import augment as A
from .family import GraphInputs
from .spec import SpecError, ViewRule

DECIMATION = 4           # the target is at 1/4 resolution (Zhang's conv8 output)
NONGRAY_THRESHOLD = 5.0  # Zhang's NonGrayMaskLayer: |a| or |b| above this somewhere


@register("pipeline", "colorization")
class Colorization:
    name = "colorization"

    def __init__(self, size: int = 224, resize: int | None = None, k: int = 10, sigma: float = 5.0,
                 prior=None, gamma: float = 0.5):
        resize = round(size * 256 / 224) if resize is None else resize
        if size < 8 or size % DECIMATION:
            raise SpecError(f"size={size}: must be >= 8 and divisible by {DECIMATION} (the target is size/4)")
        if resize < size:
            raise SpecError(f"resize={resize}: must be >= size {size}")
        if not 1 <= k <= color.N_BINS:
            raise SpecError(f"k={k}: expected 1..{color.N_BINS} nearest bins")
        if not sigma > 0:
            raise SpecError(f"sigma={sigma}: must be > 0")
        self.size, self.resize, self.k, self.sigma, self.gamma = size, resize, k, float(sigma), gamma
        self.rule = ViewRule(square=size / resize, flip_p=0.5).validate()
        self.prior_path = None if prior is None else os.fspath(prior)
        self.factor = None if prior is None else _rebalance_factor(self.prior_path, gamma)
        self.encoder = color.NearestBins(k)

    def describe(self) -> dict:
        return {"pipeline": self.name, "size": self.size, "resize": self.resize, "k": self.k, "sigma": self.sigma,
                "prior": self.prior_path, "gamma": self.gamma}

    def graph(self, g: GraphInputs) -> dict:
        img = A.decode(g.jpg, g.device, g.hw_decoder_load)
        (start,), (end,) = A.view_windows(g.shape, A.uniforms(1), [self.rule])
        rgb = A.resized_crop(img, start, end, self.size, g.device)                     # [S, S, 3] uint8
        return {"rgb": rgb, "params.roi.start": start, "params.roi.end": end} if g.with_params else {"rgb": rgb}

    def postprocess(self, batch: dict) -> dict:
        """uint8 RGB crops -> L input and soft ab targets, for the whole batch at once."""
        rgb = batch.pop("rgb")
        if "params.roi.start" in batch:
            batch["params.rgb"] = rgb
            batch["params.window"], batch["params.flip"] = A.windows(batch.pop("params.roi.start"),
                                                                     batch.pop("params.roi.end"))
        x = rgb.permute(0, 3, 1, 2)
        # L at full resolution, a/b only at the 1/16 of the pixels the target keeps
        L = color.rgb_to_L_nchw(x, validate=False)                                      # [B, 1, S, S]
        ab = color.rgb_to_lab_nchw(x[:, :, ::DECIMATION, ::DECIMATION], validate=False)[:, 1:]
        idx, w = self.encoder(ab.permute(0, 2, 3, 1), self.sigma)
        batch["L"] = L - 50.0
        batch["ab_idx"], batch["ab_w"] = idx, w
        batch["nongray"] = color.nongray_mask(ab, NONGRAY_THRESHOLD)
        if self.factor is not None:
            if self.factor.device != idx.device:   # once: a copy per batch would wait for the GPU's queue
                self.factor = self.factor.to(idx.device)
            batch["weight"] = color.pixel_weights(idx[..., 0], self.factor)
        return batch


def _rebalance_factor(path: str, gamma: float) -> torch.Tensor:
    """Zhang's per-bin rebalancing factors from a prior file (python -m sslkit.color prior)."""
    if not os.path.isfile(path):
        raise SpecError(f"prior={path!r}: no such file (make one with `python -m sslkit.color prior`)")
    try:
        prior = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SpecError(f"prior={path!r}: not a readable .npy array ({e})") from None
    try:
        return torch.from_numpy(color.rebalance_weights(prior, gamma=gamma))
    except (ValueError, AttributeError) as e:
        raise SpecError(f"prior={path!r}: {e}") from None
