"""Colorization (Zhang et al. 2016; Goyal et al. 2019): predict the colour of a grey image.

Per step: the L channel (`batch["L"]`, L - 50, [B, 1, S, S]) -> trunk (1 input channel; ResNets with
res5 at stride 1 as Goyal's colorization ResNet-50, or Goyal's `alexnet_colorization`) -> its last
spatial map -> head -> 313-way logits at the target resolution S/4 x S/4 -> soft-target cross-entropy
against the k-nearest-bin soft encoding of the true ab (`batch["ab_idx"]`, `batch["ab_w"]`, compact
[B, S/4, S/4, k]; `sslkit.color.expand_topk` would make them dense).

Head: a 1x1 convolution (D -> 313, i.e. a linear classifier at every position of the trunk's last map:
res5, S/16 for a stride-1 res5, or conv5 for AlexNet, S/16 - 2 after conv5's ReLU), then bilinear
upsampling of the LOGITS to S/4 x S/4 (exact size, so any trunk stride works). Why: every non-linear
computation then lives in the trunk, which is all that the evaluations keep (they probe conv1..res5 /
conv5, as Goyal'19's linear probes do): a deep decoder (Zhang's conv6-8 with a learned deconvolution) would learn part of
the colour model in layers that are thrown away. It costs almost nothing next to the trunk; the
price is blurrier colours at object edges than a decoder gives, which matters for the colorizations,
not for the representation. Goyal's own pretext head is not public.

Loss (Zhang's training code, caffe_traininglayers.py): per pixel the soft cross-entropy
-sum_q z_q log softmax(logits)_q, averaged over every target pixel of the batch -- that is the value
returned as "loss". Class rebalancing is applied as Zhang's ClassRebalanceMultLayer does, to the
GRADIENT only (the forward is the identity): the gradient reaching the logits of a pixel is scaled by
w = factor[most likely bin of its target] (`batch["weight"]`, when the pipeline was given a prior;
factors from `sslkit.color.rebalance_weights(prior, gamma)`) x the image's `nongray` mask (images with
no |a| or |b| > 5 teach nothing). `rebalance=False` drops the factor (w = nongray mask only).

Gradient accumulation (accum_steps > 1): the loss is per pixel, so only BatchNorm differs from a true
large batch (each micro-batch is normalised with its own statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import models, registry
from ..color import N_BINS
from ..config import ConfigError
from ..recipes.colorization import ColorizationOptions
from ..registry import register
from .base import Method, RunContext

DECIMATION = 4     # the target is at 1/4 of the input resolution (pipelines/colorization.py)
# the trunk's last spatial map, the one the head reads, per model family
LAST_MAP = ((models.ResNet, "res5"), (models.AlexNetColorization, "conv5"), (models.AlexNetJigsaw, "conv5"))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `weight` (Zhang's
    ClassRebalanceMultLayer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad * weight.to(grad.dtype), None


def scale_grad(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _ScaleGrad.apply(x, weight)


def soft_cross_entropy(logits: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-pixel -sum_q z_q log softmax(logits)_q from compact targets (z = w at bins idx, 0 elsewhere):
    logits [B, Q, H, W], idx / w [B, H, W, k] (w sums to 1) -> [B, H, W]. Equals the dense form
    because sum_k w_k = 1: logsumexp(logits) - sum_k w_k logits[idx_k]."""
    picked = logits.gather(1, idx.permute(0, 3, 1, 2))                         # [B, k, H, W]
    return torch.logsumexp(logits, dim=1) - (w.permute(0, 3, 1, 2).to(logits.dtype) * picked).sum(dim=1)


def rebalanced_loss(logits: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, pixel_weight: torch.Tensor
                    ) -> torch.Tensor:
    """Mean soft cross-entropy over every pixel (the plain value), whose gradient w.r.t. the logits is
    scaled per pixel by `pixel_weight` [B, H, W] (rebalancing factor x nongray mask)."""
    return soft_cross_entropy(scale_grad(logits, pixel_weight.unsqueeze(1)), idx, w).mean()


def check_options(o: ColorizationOptions):
    if o.rebalance and o.prior is None:
        raise ConfigError("colorization rebalances classes with the training data's ab prior: make one with "
                          "`python -m sslkit.color prior --data DIR --out prior.npy` and add --set "
                          "method_options.prior=prior.npy (or --set method_options.rebalance=false for none)")
    if not o.rebalance and o.prior is not None:
        raise ConfigError(f"method_options.prior={o.prior!r} with rebalance=false: drop one of the two")
    if o.size < 8 or o.size % DECIMATION:
        raise ConfigError(f"method_options.size={o.size}: must be >= 8 and divisible by {DECIMATION}")
    if not 1 <= o.k <= N_BINS:
        raise ConfigError(f"method_options.k={o.k}: expected 1..{N_BINS} nearest bins")


@register("method", "colorization")
class Colorization(Method):
    pipeline = "colorization"

    @classmethod
    def loader_options(cls, options: ColorizationOptions) -> dict:
        check_options(options)
        return {"size": options.size, "resize": options.resize, "k": options.k, "sigma": options.sigma,
                "prior": options.prior, "gamma": options.gamma}

    def __init__(self, cfg, ctx: RunContext):
        super().__init__(cfg, ctx)
        o: ColorizationOptions = cfg.method_options
        check_options(o)
        self.o = o
        kwargs = {"in_channels": 1}
        accepted = registry.accepted_options(registry.entry("model", cfg.arch).factory)
        takes_stride = accepted is None or "last_stride" in accepted
        if takes_stride:
            kwargs["last_stride"] = 1 if o.last_stride is None else o.last_stride
        elif o.last_stride is not None:
            raise ConfigError(f"method_options.last_stride: {cfg.arch} has no res5 stride (ResNets only)")
        self.backbone = self.make_backbone(cfg.arch, input="L", **kwargs)
        self.last_map = next((name for kind, name in LAST_MAP if isinstance(self.backbone, kind)), None)
        if self.last_map is None:
            raise ConfigError(f"colorization needs a trunk with a known last feature map "
                              f"({', '.join(k.__name__ for k, _ in LAST_MAP)}), got {cfg.arch}")
        # channels of that map: the last convolution's (res5's last block, AlexNet's conv5)
        channels = [m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.head = nn.Conv2d(channels, N_BINS, kernel_size=1)

    def logits(self, L: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] (L - 50) -> [B, 313, S/4, S/4] logits."""
        if self.ctx.channels_last:
            L = L.contiguous(memory_format=torch.channels_last)
        fmap = self.backbone.feature_maps(L, [self.last_map])[self.last_map]
        side = (L.shape[-2] // DECIMATION, L.shape[-1] // DECIMATION)
        return F.interpolate(self.head(fmap), size=side, mode="bilinear", align_corners=False)

    def forward(self, batch: dict) -> dict:
        idx, w = batch["ab_idx"], batch["ab_w"]
        logits = self.logits(batch["L"]).float()
        if logits.shape[-2:] != idx.shape[1:3]:
            raise ValueError(f"logits {tuple(logits.shape[-2:])} vs targets {tuple(idx.shape[1:3])}: the input "
                             f"must be {DECIMATION}x the target resolution")
        nongray = batch["nongray"].to(logits.dtype)[:, None, None]               # [B, 1, 1]
        if self.o.rebalance:
            if "weight" not in batch:
                raise ValueError("rebalance=True but the batch has no 'weight' (the pipeline needs prior=...)")
            pixel_weight = batch["weight"].to(logits.dtype) * nongray
        else:
            pixel_weight = nongray.expand(idx.shape[:3])
        loss = rebalanced_loss(logits, idx, w, pixel_weight)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == idx[..., 0]).float().mean()   # top-1 vs the nearest bin
        return {"loss": loss, "acc": acc, "nongray": nongray.mean()}
