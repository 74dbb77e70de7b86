"""Supervised classification: cross-entropy on labelled shards (the `eval_train` pipeline).

The teacher, student and fine-tuning stages of billion-scale semi-supervised learning (Yalniz et al.
2019, the SSL ResNeXt family) are this method on different data: the teacher on the labelled set, the
student from scratch on the teacher's pseudo-labelled shards (`python -m sslkit.pseudolabel`), the
fine-tuning on the labelled set again, started from the student (`--set init_from=RUN`). It is also
the upper reference of the evaluation protocols (the same trunk trained with labels).

The classifier is `classifier` (Linear on the trunk's pooled features), so an exported model is the
trunk in torchvision layout plus `fc` (`python -m sslkit.convert export --with-classifier`).

Gradient accumulation (accum_steps > 1): the loss is per sample, so only BatchNorm differs from a true
large batch (each micro-batch is normalised with its own statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..registry import register
from .base import Method, Preset, RunContext


@dataclass(frozen=True)
class SupervisedOptions:
    label_smoothing: float = 0.0
    size: int = 224                          # eval_train crop (RandomResizedCrop size)
    scale: tuple[float, float] = (0.08, 1.0)


def _recipe(arch: str, **kw) -> dict:
    return {"arch": arch, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "exclude_norm_bias_wd": True,
            "warmup_epochs": 0, "schedule": "cosine", "final_lr_ratio": 0.0, **kw}


# Yalniz et al. train on 64 GPUs x 24 images = 1536; fine-tuning at lr 0.0015 for batch 1536 is
# 0.00025 per 256 (the SSL ResNeXt model cards). The student's schedule is not in the released code: we use the
# usual ImageNet recipe (lr 0.1 per 256, 5 warm-up epochs, cosine); override epochs to the size of
# the pseudo-labelled set.
STUDENT = dict(lr=0.1, batch_size=24, epochs=30, warmup_epochs=5, warmup_start_lr=0.0)
FINETUNE = dict(lr=0.00025, batch_size=24, epochs=30, schedule="multistep", milestones=(10, 20))
PRESETS = {
    **{f"student_{a}": Preset(f"Yalniz'19 student from scratch on pseudo-labels: {a}, 64 GPUs x 24, lr 0.1/256 cosine",
                              _recipe(a, **STUDENT))
       for a in ("resnext101_32x16d", "resnext101_32x8d", "resnext101_32x4d", "resnext50_32x4d", "resnet50", "resnet18")},
    **{f"finetune_{a}": Preset(f"Yalniz'19 fine-tuning on the labelled set: {a}, batch 1536, lr 0.0015, 30 epochs, "
                               "wd 1e-4 (start with --set init_from=STUDENT_RUN)", _recipe(a, **FINETUNE))
       for a in ("resnext101_32x16d", "resnext101_32x8d", "resnext101_32x4d", "resnext50_32x4d", "resnet50", "resnet18")},
    "tiny": Preset("smoke runs and tests: resnet_tiny on 64 px crops, a few hundred images in seconds",
                   _recipe("resnet_tiny", lr=0.4, batch_size=32, epochs=2, **{"method_options.size": 64})),
    "small": Preset("a few thousand images on CPU: ResNet-18 on 96 px crops",
                    _recipe("resnet18", lr=0.2, batch_size=64, epochs=30, warmup_epochs=1,
                            **{"method_options.size": 96})),
}


@register("method", "supervised", options=SupervisedOptions, presets=PRESETS, default_preset=None)
class Supervised(Method):
    pipeline = "eval_train"

    @classmethod
    def loader_options(cls, options: SupervisedOptions) -> dict:
        return {"size": options.size, "resize": options.size, "scale": tuple(options.scale)}

    def __init__(self, cfg, ctx: RunContext):
        super().__init__(cfg, ctx)
        o: SupervisedOptions = cfg.method_options
        if not ctx.num_classes:
            raise ConfigError(f"supervised training needs labelled shards; {cfg.data} has no classes")
        if not 0.0 <= o.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={o.label_smoothing}: expected 0 <= x < 1")
        self.o = o
        self.backbone = self.make_backbone(cfg.arch)
        self.classifier = nn.Linear(self.backbone.num_features, ctx.num_classes)

    def logits(self, images):
        if self.ctx.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.classifier(self.backbone(images))

    def forward(self, batch: dict) -> dict:
        logits = self.logits(batch["views"][0])
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.o.label_smoothing)
        return {"loss": loss, "top1": (logits.argmax(1) == labels).float().mean()}
