"""Which trunk layer an evaluation reads, and how its map is pooled to about 9k dimensions.

Goyal'19 / VISSL average-pool each layer's map with a fixed (kernel, stride, pad)
chosen for the reference input (224 for ResNet, 227 for the AlexNets), giving a small s x s map:

    ResNet   conv1 12x12, res2 6x6, res3 4x4, res4 3x3, res5 2x2 (x channels ~ 9k); res5avg = global pool
    AlexNet  conv1 10x10, conv2 6x6, conv3 5x5, conv4 5x5, conv5 6x6

When the map has exactly the reference size (e.g. res4 is 14x14 at 224 input) the reference pool is
used verbatim. At any other input size (Fashion-MNIST at 32 or 64, say) the map is adaptively
average-pooled to the same s x s output, or kept as it is when it is already smaller than s: the
dimensions then match the protocol's wherever the map allows, and a small input never gets blown up.
The colorization ResNet's stride-1 res5 (14x14 at 224) has its own reference pool, (12, 2, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import EvalError

# layer -> (output side s, {reference map side: (kernel, stride, pad)})
RESNET_POOLS = {
    "conv1": (12, {112: (10, 10, 4)}),
    "res2": (6, {56: (16, 8, 0)}),
    "res3": (4, {28: (13, 5, 0)}),
    "res4": (3, {14: (8, 3, 0)}),
    "res5": (2, {7: (6, 1, 0), 14: (12, 2, 0)}),
}
# jigsaw AlexNet (conv1 stride 2, 227 input) and colorization AlexNet (stride 4) have different map
# sides at the reference input, so one table keyed by the map side serves both
ALEXNET_POOLS = {
    "conv1": (10, {109: (28, 9, 0), 55: (19, 4, 0)}),
    "conv2": (6, {54: (24, 6, 0), 27: (12, 3, 0)}),
    "conv3": (5, {26: (14, 3, 0), 13: (9, 1, 0)}),
    "conv4": (5, {26: (14, 3, 0), 13: (9, 1, 0)}),
    "conv5": (6, {26: (16, 2, 0), 13: (8, 1, 0)}),
}
GLOBAL_LAYERS = {"res5avg"}   # already [N, C]: no pooling


def family(model: torch.nn.Module) -> str:
    """"resnet" or "alexnet", from the model's feature names."""
    if hasattr(model, "_feature_blocks"):
        return "alexnet"
    if hasattr(model, "layer4"):
        return "resnet"
    raise EvalError(f"{type(model).__name__}: no known feature layers (need a ResNet or AlexNet trunk)")


def layer_names(model: torch.nn.Module) -> tuple[str, ...]:
    return tuple(RESNET_POOLS) + ("res5avg",) if family(model) == "resnet" else tuple(ALEXNET_POOLS)


def default_layer(model: torch.nn.Module) -> str:
    """res5avg (the global pool) for ResNets; conv5 (pooled to 6x6x256 = 9216) for the AlexNets."""
    return "res5avg" if family(model) == "resnet" else "conv5"


def check_layer(model: torch.nn.Module, layer: str) -> str:
    names = layer_names(model)
    if layer not in names:
        raise EvalError(f"layer {layer!r} is not a feature layer of {type(model).__name__}; choose from "
                        f"{', '.join(names)}")
    return layer


@dataclass(frozen=True)
class Pool:
    """How one map is pooled: a fixed (kernel, stride, pad), or adaptive to `side` (0: untouched)."""
    side: int
    fixed: tuple[int, int, int] | None = None

    def describe(self) -> str:
        if self.fixed:
            return "avgpool(k=%d, s=%d, p=%d)" % self.fixed
        return f"adaptive avgpool to {self.side}x{self.side}" if self.side else "global pool (given by the trunk)"


def choose_pool(model: torch.nn.Module, layer: str, map_side: int) -> Pool:
    """The pool for `layer`'s map of side `map_side` (see the module docstring)."""
    if layer in GLOBAL_LAYERS:
        return Pool(0)
    table = RESNET_POOLS if family(model) == "resnet" else ALEXNET_POOLS
    side, refs = table[layer]
    if map_side in refs:
        return Pool(side, refs[map_side])
    return Pool(min(side, map_side))


def pool_map(x: torch.Tensor, pool: Pool) -> torch.Tensor:
    """[N, C, H, W] -> pooled [N, C, s, s] (or [N, C] unchanged for a global layer)."""
    if x.ndim == 2:
        return x
    if pool.fixed:
        k, s, p = pool.fixed
        # count_include_pad=True, as torch's AvgPool2d default that VISSL's eval heads use
        return F.avg_pool2d(x, k, s, p)
    if pool.side == x.shape[-1] == x.shape[-2]:
        return x
    return F.adaptive_avg_pool2d(x, pool.side)
