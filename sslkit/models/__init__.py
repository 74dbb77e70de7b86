"""Model zoo: torchvision-compatible ResNet/ResNeXt, Goyal'19 AlexNet trunks, and a tiny registry.

    from sslkit.models import create, list_models
    net = create("resnet50", num_classes=0)      # trunk only: net(x) -> [N, net.num_features]

Every model has `num_features`, `num_classes`, `in_channels`, `forward_features(x)` and
`feature_maps(x, layers)`. Add a model by decorating its factory with `@register("name")`.
"""

from ._registry import create, list_models, register
from .alexnet import ALEXNET_FEATURE_NAMES, AlexNetColorization, AlexNetJigsaw
from .resnet import (RESNET_FEATURE_NAMES, BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50,
                     resnet101, resnet_tiny, resnext50_32x4d, resnext101_32x4d, resnext101_32x8d,
                     resnext101_32x16d)

__all__ = [
    "ALEXNET_FEATURE_NAMES", "AlexNetColorization", "AlexNetJigsaw", "BasicBlock", "Bottleneck",
    "RESNET_FEATURE_NAMES", "ResNet", "create", "list_models", "register", "resnet101", "resnet18",
    "resnet34", "resnet50", "resnet_tiny", "resnext101_32x16d", "resnext101_32x4d", "resnext101_32x8d",
    "resnext50_32x4d",
]
