"""ResNet / ResNeXt backbones whose module names and state_dict keys equal torchvision's.

Keys are `conv1, bn1, layer{1..4}.{i}.{conv1,bn1,conv2,bn2[,conv3,bn3],downsample.0,downsample.1}, fc`,
so a checkpoint saved from torchvision's ResNet class loads here with `strict=True`, and ours load
into torchvision. The bottleneck is torchvision's "v1.5" one: the stride sits
on the 3x3 conv, and ResNeXt is the same block with `groups` and `width_per_group`.

Extras over torchvision, none of which changes a key:
- `num_classes=0` (or None) builds no classifier at all: `model.fc is None` and `state_dict()` has
  no `fc.*` keys. Loading a full torchvision checkpoint then needs `strict=False` and reports exactly
  `fc.weight` and `fc.bias` as unexpected (and nothing missing). `forward` returns the features.
- `in_channels`: 1 for the colorization trunk (L channel of Lab).
- `last_stride=1`: layer4 (res5) runs at stride 1, so its map is 14x14 at 224 input, as in the
  Goyal'19 colorization ResNet-50. This is a plain stride change, *not* dilation.
- `norm_layer`: any `C -> nn.Module` callable (e.g. `nn.SyncBatchNorm`); models also convert with
  `nn.SyncBatchNorm.convert_sync_batchnorm`.
- `width`: channels of the stem and first stage (64 in torchvision); stages use 1x, 2x, 4x, 8x.
- `feature_maps` returns the named intermediate maps used by the linear-probe evaluations.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ._common import Stage, check_num_classes, run_stages
from ._registry import register

NormLayer = Callable[[int], nn.Module]

# Names of `ResNet.feature_maps`, in forward order (Goyal'19 / VISSL linear-probe names).
RESNET_FEATURE_NAMES = ("conv1", "res2", "res3", "res4", "res5", "res5avg")


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a norm layer follows)."""
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (a norm layer follows)."""
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64 "
                             f"(got groups={groups}, width_per_group={base_width}); use Bottleneck for ResNeXt")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def last_norm(self) -> nn.Module:
        """The norm layer right before the residual sum (zeroed by `zero_init_residual`)."""
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided, grouped) -> 1x1 expand, with a residual connection (ResNet-50+, ResNeXt)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        # ResNeXt "32x4d" at planes=64 gives 32 groups x 4 channels = 128 inner channels.
        inner = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, inner)
        self.bn1 = norm_layer(inner)
        # v1.5: the stride is on the 3x3 conv, not the first 1x1 (the original v1 paper layout).
        self.conv2 = _conv3x3(inner, inner, stride, groups)
        self.bn2 = norm_layer(inner)
        self.conv3 = _conv1x1(inner, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def last_norm(self) -> nn.Module:
        """The norm layer right before the residual sum (zeroed by `zero_init_residual`)."""
        return self.bn3


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """ResNet/ResNeXt trunk plus an optional linear classifier `fc` (see the module docstring).

    Attributes: `num_features` (width of `forward_features`), `num_classes` (0 = no `fc`),
    `in_channels`.
    """

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int | None = 1000, in_channels: int = 3,
                 groups: int = 1, width_per_group: int = 64, width: int = 64, zero_init_residual: bool = False,
                 last_stride: int = 2, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        num_classes = check_num_classes(num_classes)
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be >= 1, got {in_channels} and {width}")
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.in_channels = in_channels
        self.num_classes = num_classes

        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # Stage k has `width * 2**k` planes and outputs `expansion` times that many channels.
        kw = dict(groups=groups, base_width=width_per_group, norm_layer=norm_layer)
        e = block.expansion
        self.layer1 = _make_stage(block, width, width, layers[0], stride=1, **kw)
        self.layer2 = _make_stage(block, width * e, width * 2, layers[1], stride=2, **kw)
        self.layer3 = _make_stage(block, width * 2 * e, width * 4, layers[2], stride=2, **kw)
        self.layer4 = _make_stage(block, width * 4 * e, width * 8, layers[3], stride=last_stride, **kw)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = width * 8 * block.expansion
        # No `fc` module at all when num_classes == 0 (instead of nn.Identity), so that the keys stay a
        # strict subset of torchvision's: loading a full checkpoint reports only fc.* as unexpected.
        self.fc: nn.Linear | None = nn.Linear(self.num_features, num_classes) if num_classes else None
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """He (fan-out) init for convs, unit/zero affine norms, optionally zero last norm per block."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            # Other custom norm layers keep their own init.
            elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts at zero, so every block is the identity at init
            # (Goyal et al. 2017, "Accurate, large minibatch SGD").
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    norm = m.last_norm()
                    if getattr(norm, "weight", None) is None:
                        raise ValueError("zero_init_residual needs a norm layer with an affine weight, "
                                         f"got {type(norm).__name__}")
                    nn.init.zeros_(norm.weight)

    def _stages(self) -> list[Stage]:
        """The trunk as (feature name, step) pairs, in RESNET_FEATURE_NAMES order."""
        return [
            ("conv1", lambda x: self.relu(self.bn1(self.conv1(x)))),  # before the max-pool
            ("res2", lambda x: self.layer1(self.maxpool(x))),
            ("res3", self.layer2),
            ("res4", self.layer3),
            ("res5", self.layer4),
            ("res5avg", lambda x: torch.flatten(self.avgpool(x), 1)),
        ]

    def feature_maps(self, x: torch.Tensor, layers: Iterable[str] = ("conv1", "res2", "res3", "res4", "res5"),
                     ) -> dict[str, torch.Tensor]:
        """Intermediate outputs by name: conv1 (conv+bn+relu, before max-pool), res2..res5 (= layer1..4
        outputs, [N, C, H, W]), res5avg (pooled [N, num_features]). Runs only as deep as needed."""
        return run_stages(self._stages(), x, layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled res5 features, [N, num_features]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes], or the pooled features [N, num_features] when there is no `fc`."""
        x = self.forward_features(x)
        return x if self.fc is None else self.fc(x)


def _make_stage(block: Block, inplanes: int, planes: int, blocks: int, stride: int, groups: int, base_width: int,
                norm_layer: NormLayer) -> nn.Sequential:
    """One stage (`layerN`): the first block changes stride/width through a projection shortcut
    (`downsample` = 1x1 conv + norm), the others keep them."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(_conv1x1(inplanes, out, stride), norm_layer(out))
    kw = dict(groups=groups, base_width=base_width, norm_layer=norm_layer)
    seq = [block(inplanes, planes, stride, downsample, **kw)]
    seq += [block(out, planes, **kw) for _ in range(1, blocks)]
    return nn.Sequential(*seq)


# --- registered constructors: kwargs go to ResNet (num_classes, in_channels, zero_init_residual,
# --- last_stride, norm_layer, width).

@register("resnet18")
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlock [2, 2, 2, 2]); 11,689,512 parameters with 1000 classes."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register("resnet34")
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlock [3, 4, 6, 3]); 21,797,672 parameters with 1000 classes."""
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


@register("resnet50")
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (Bottleneck [3, 4, 6, 3]); 25,557,032 parameters with 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


@register("resnet101")
def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101 v1.5 (Bottleneck [3, 4, 23, 3]); 44,549,160 parameters with 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


@register("resnext50_32x4d")
def resnext50_32x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d; 25,028,904 parameters with 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


@register("resnext101_32x4d")
def resnext101_32x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-101 32x4d; 44,177,704 parameters with 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4, **kwargs)


@register("resnext101_32x8d")
def resnext101_32x8d(**kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d; 88,791,336 parameters with 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8, **kwargs)


@register("resnext101_32x16d")
def resnext101_32x16d(**kwargs: Any) -> ResNet:
    """ResNeXt-101 32x16d; 194,026,792 parameters with 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=16, **kwargs)


@register("resnet_tiny")
def resnet_tiny(width: int = 32, **kwargs: Any) -> ResNet:
    """A ResNet-10-style net for CPU smoke tests: BasicBlock [1, 1, 1, 1], stage widths
    width x (1, 2, 4, 8), so num_features = 8 * width (256 at the default 32). Same stem and key
    scheme as resnet18, hence the same `feature_maps` names and strides."""
    return ResNet(BasicBlock, [1, 1, 1, 1], width=width, **kwargs)
