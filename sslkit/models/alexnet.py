"""The two AlexNet trunks of Goyal et al. (ICCV'19) as VISSL defines them: jigsaw and colorization.

Both keep VISSL's module layout, `_feature_blocks.{0..8}` with the feature names
conv1, pool1, conv2, pool2, conv3, conv4, conv5, pool5, flatten, so state_dict keys equal
VISSL's (`_feature_blocks.0.0.weight`, ...) once a checkpoint's `trunk.` prefix is stripped.
Pooling uses floor mode (PyTorch's default, as VISSL does), not Caffe's ceil mode.

`forward_features` returns the **flattened pool5 map** (not a global average), so its width
depends on the input size: `num_features = 256 * s * s`, where s is the pool5 side for the
`input_size` given at construction (jigsaw: 64x64 tiles -> 256x2x2 = 1024; colorization:
227 -> 256x6x6 = 9216). Other sizes raise in `forward_features`; `feature_maps` takes any size.
`num_classes > 0` adds a linear `fc` on those features.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ._registry import register
from ._common import check_num_classes, run_stages

ALEXNET_FEATURE_NAMES = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "flatten")


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1,
                  bn: bool = True) -> nn.Sequential:
    """Conv (with bias, as in the Caffe originals) -> optional BatchNorm -> ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _maxpool() -> nn.MaxPool2d:
    """3x3 max-pool, stride 2, floor mode."""
    return nn.MaxPool2d(kernel_size=3, stride=2)


def _lrn() -> nn.LocalResponseNorm:
    """Caffe AlexNet's local response normalisation: 5 channels, alpha 1e-4, beta 0.75, k 1."""
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)


def _pooled_side(blocks: nn.Module, size: int) -> int:
    """Spatial side after `blocks` for a size x size input (convs and max-pools, floor mode)."""
    for m in blocks.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding))
            size = (size + 2 * p - k) // s + 1
            if size < 1:
                raise ValueError(f"input too small: the map vanishes at {m}")
    return size


class _AlexNetTrunk(nn.Module):
    """Shared plumbing: named feature blocks, flattened-pool5 features, optional `fc`."""

    def __init__(self, blocks: list[nn.Module], in_channels: int, input_size: int, num_classes: int | None) -> None:
        super().__init__()
        if len(blocks) != len(ALEXNET_FEATURE_NAMES):
            raise ValueError(f"need {len(ALEXNET_FEATURE_NAMES)} blocks, got {len(blocks)}")
        self._feature_blocks = nn.ModuleList(blocks)
        self.in_channels = in_channels
        self.input_size = input_size
        self.num_classes = check_num_classes(num_classes)
        side = _pooled_side(self._feature_blocks, input_size)
        channels = [m.out_channels for m in self._feature_blocks.modules() if isinstance(m, nn.Conv2d)][-1]
        self.num_features = channels * side * side
        self.fc: nn.Linear | None = nn.Linear(self.num_features, self.num_classes) if self.num_classes else None

    def feature_maps(self, x: torch.Tensor, layers: Iterable[str] = ("conv1", "conv2", "conv3", "conv4", "conv5"),
                     ) -> dict[str, torch.Tensor]:
        """Intermediate outputs by name (ALEXNET_FEATURE_NAMES; convN = after its ReLU, before any
        pool). Works for any input size; runs only as deep as needed."""
        return run_stages(list(zip(ALEXNET_FEATURE_NAMES, self._feature_blocks)), x, layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened pool5 map, [N, num_features]; inputs must give the pool5 size of input_size."""
        for block in self._feature_blocks:
            x = block(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__} was built for {self.input_size}x{self.input_size} inputs "
                             f"({self.num_features} features) but got {x.shape[1]} features; "
                             "pass input_size= at construction")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes], or the features [N, num_features] when there is no `fc`."""
        x = self.forward_features(x)
        return x if self.fc is None else self.fc(x)


@register("alexnet_jigsaw")
class AlexNetJigsaw(_AlexNetTrunk):
    """Goyal'19 jigsaw AlexNet trunk (VISSL alexnet_jigsaw.py): conv1 at stride 2, LRN after pools 1-2, BN on conv3-5.

    Applied per 64x64 tile it gives a 256x2x2 pool5 map, i.e. 1024 features.
    """

    def __init__(self, num_classes: int | None = 0, in_channels: int = 3, input_size: int = 64) -> None:
        blocks = [
            _conv_bn_relu(in_channels, 96, 11, stride=2, bn=False),
            nn.Sequential(_maxpool(), _lrn()),
            _conv_bn_relu(96, 256, 5, padding=2, groups=2, bn=False),
            nn.Sequential(_maxpool(), _lrn()),
            _conv_bn_relu(256, 384, 3, padding=1),
            _conv_bn_relu(384, 384, 3, padding=1, groups=2),
            _conv_bn_relu(384, 256, 3, padding=1, groups=2),
            _maxpool(),
            nn.Flatten(),
        ]
        super().__init__(blocks, in_channels, input_size, num_classes)


@register("alexnet_colorization")
class AlexNetColorization(_AlexNetTrunk):
    """Goyal'19 colorization AlexNet trunk (VISSL alexnet_colorization.py): 1-channel input (the L of Lab; slice it off
    the Lab tensor before calling), conv1 at stride 4, BN + ReLU after every conv, no LRN.

    At 227x227 input it gives a 256x6x6 pool5 map, i.e. 9216 features.
    """

    def __init__(self, num_classes: int | None = 0, in_channels: int = 1, input_size: int = 227) -> None:
        blocks = [
            _conv_bn_relu(in_channels, 96, 11, stride=4),
            _maxpool(),
            _conv_bn_relu(96, 256, 5, padding=2, groups=2),
            _maxpool(),
            _conv_bn_relu(256, 384, 3, padding=1),
            _conv_bn_relu(384, 384, 3, padding=1, groups=2),
            _conv_bn_relu(384, 256, 3, padding=1, groups=2),
            _maxpool(),
            nn.Flatten(),
        ]
        super().__init__(blocks, in_channels, input_size, num_classes)
