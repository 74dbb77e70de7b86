"""Encoders: a normalised eval crop batch [B, 3, S, S] -> features [B, D].

- `TrunkEncoder`: a frozen trunk in eval mode, one layer, pooled as `layers.py` says. Trunks with
  `input == "L"` (colorization) are fed L - 50 of Lab, computed from the crop's un-normalised RGB.
- `PixelEncoder`: the un-normalised crop itself (RGB in [0, 1], flattened): the raw-pixel baseline.

Every encoder has an `identity` (part of the feature-cache key) and reports `channels`, the number of
channels of the pooled map, which the linear probe's BatchNorm needs (D = channels x s x s).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD
from ..color import rgb_to_L_nchw
from ..trunk import TrunkSpec
from . import layers
from .errors import EvalError

FEATURE_VERSION = 1   # bump when the way features are computed changes: old caches are then ignored


def unnormalise(views: torch.Tensor) -> torch.Tensor:
    """Undo the pipeline's ImageNet normalisation: RGB in [0, 1] (resampling overshoot clipped)."""
    mean = torch.tensor(IMAGENET_MEAN, device=views.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=views.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (views.float() * std + mean).clamp_(0.0, 1.0)


def to_trunk_input(views: torch.Tensor, input: str) -> torch.Tensor:
    """The tensor a trunk of this input kind expects from a normalised RGB batch."""
    if input == "L":
        return rgb_to_L_nchw(unnormalise(views), validate=False) - 50.0
    return views.float()


class TrunkEncoder:
    def __init__(self, model: nn.Module, spec: TrunkSpec, layer: str | None = None, size: int | None = None):
        self.model, self.spec = model.eval(), spec
        self.layer = layers.check_layer(model, layer or layers.default_layer(model))
        self.channels: int | None = None
        self.pool: layers.Pool | None = None
        self.device = next(model.parameters()).device
        if size:   # one dummy batch fixes the pool and width now (errors early, reports describe them)
            try:
                self(torch.zeros(2, 3, size, size, device=self.device))
            except RuntimeError as e:
                raise EvalError(f"{spec.arch} cannot take {size}x{size} crops up to {self.layer} "
                                f"({str(e).splitlines()[0][:120]}); use a larger --size") from None

    @property
    def identity(self) -> str:
        return f"trunk-{self.spec.identity}-{self.layer}"

    def describe(self) -> dict:
        return {"kind": "trunk", "layer": self.layer, "pool": self.pool.describe() if self.pool else None,
                "channels": self.channels, **self.spec.to_dict()}

    @torch.no_grad()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        x = to_trunk_input(views.to(self.device, non_blocking=True), self.spec.input)
        fmap = self.model.feature_maps(x, [self.layer])[self.layer]
        if self.pool is None:
            self.pool = layers.choose_pool(self.model, self.layer, fmap.shape[-1] if fmap.ndim == 4 else 0)
        pooled = layers.pool_map(fmap, self.pool)
        self.channels = pooled.shape[1]
        return pooled.flatten(1).float()


class PixelEncoder:
    """Raw pixels of the eval crop (kNN on L2-normalised pixels is the no-learning baseline)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.channels = 3

    identity = "pixels-rgb01"

    def describe(self) -> dict:
        return {"kind": "pixels", "layer": "rgb01", "channels": 3}

    @torch.no_grad()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        return unnormalise(views.to(self.device)).flatten(1)
