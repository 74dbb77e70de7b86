"""Supervised classification: the options and presets (the method itself: sslkit.methods.supervised). No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from . import Preset, declare_method


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

declare_method("supervised", SupervisedOptions, PRESETS)
