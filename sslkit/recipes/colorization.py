"""Colorization: the options and presets (the method itself: sslkit.methods.colorization). No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from . import Preset, declare_method


@dataclass(frozen=True)
class ColorizationOptions:
    size: int = 224                    # crop side S (divisible by 4); targets are S/4 x S/4
    resize: int | None = None          # shorter side before cropping (None: S * 256 / 224)
    k: int = 10                        # nearest bins of the soft encoding (Zhang: 10; the complexity axis)
    sigma: float = 5.0                 # Gaussian width of the soft encoding, ab units
    rebalance: bool = True             # Zhang's class rebalancing: needs `prior`
    prior: str | None = None           # .npy from `python -m sslkit.color prior --data DIR --out prior.npy`
    gamma: float = 0.5                 # weight of the uniform in the rebalancing mix (Zhang's lambda)
    last_stride: int | None = None     # ResNets: res5 stride (None: 1, Goyal's colorization ResNet-50)


# Goyal'19's colorization pretext optimisation is not public: the seed recipes reuse the
# jigsaw one (SGD 0.1 per 256, momentum 0.9, wd 1e-4, no BN decay, 105 epochs, x0.1 at 30/60/90/100)
# on 224 px crops (56 x 56 targets), with Zhang's rebalancing (a prior is required: add
# --set method_options.prior=prior.npy, made by `python -m sslkit.color prior --data DIR --out prior.npy`).
SEED = dict(arch="resnet50", optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
            exclude_norm_bias_wd=True, epochs=105, schedule="multistep", milestones=(30, 60, 90, 100), gamma=0.1,
            warmup_epochs=0, batch_size=32, **{"method_options.size": 224, "method_options.rebalance": True})
CPU = dict(optimizer="sgd", momentum=0.9, weight_decay=1e-4, exclude_norm_bias_wd=True, schedule="cosine",
           final_lr_ratio=0.01, warmup_epochs=0)
NEEDS_PRIOR = "needs --set method_options.prior=FILE"
PRESETS = {
    "rn50_k10": Preset(f"Goyal'19 colorization ResNet-50 (L in, res5 stride 1), K=10 (Zhang), 224 crops, "
                       f"jigsaw's SGD schedule, rebalanced ({NEEDS_PRIOR})", {**SEED, "method_options.k": 10}),
    "rn50_k2": Preset(f"as rn50_k10 with K=2 nearest bins (easier targets; Goyal's complexity axis) ({NEEDS_PRIOR})",
                      {**SEED, "method_options.k": 2}),
    "rn50_k40": Preset(f"as rn50_k10 with K=40 nearest bins (softer targets; Goyal's complexity axis) "
                       f"({NEEDS_PRIOR})", {**SEED, "method_options.k": 40}),
    "alexnet_k10": Preset(f"Goyal'19 colorization AlexNet trunk (conv5 map, 12x12 at 224), K=10, rebalanced "
                          f"({NEEDS_PRIOR})", {**SEED, "arch": "alexnet_colorization", "method_options.k": 10}),
    "small": Preset("a few thousand images on CPU: ResNet-18 (res5 stride 1), 96 px crops, K=10, no rebalancing",
                    {**CPU, "arch": "resnet18", "epochs": 30, "batch_size": 32, "lr": 0.1,
                     "method_options.size": 96, "method_options.rebalance": False}),
    "sample": Preset("learning check on colour photos (the embedded sample corpus, e.g. sample:600) on CPU: "
                     "resnet_tiny, 64 px crops, batch 32, 8 epochs, no rebalancing",
                     {**CPU, "arch": "resnet_tiny", "epochs": 8, "batch_size": 32, "lr": 0.4,
                      "method_options.size": 64, "method_options.rebalance": False}),
    "tiny": Preset("smoke runs and tests: resnet_tiny (res5 stride 1), 64 px crops, K=10, no rebalancing; "
                   "an epoch of 200 images in ~4 s on 2 CPU ranks",
                   {**CPU, "arch": "resnet_tiny", "epochs": 2, "batch_size": 8, "lr": 0.1,
                    "method_options.size": 64, "method_options.rebalance": False}),
}

declare_method("colorization", ColorizationOptions, PRESETS)
