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

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..recipes.supervised import SupervisedOptions
from ..registry import register
from .base import Method, RunContext


@register("method", "supervised")
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
