"""JigClu: the options and presets (the method itself: sslkit.methods.jigclu). No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from . import Preset, declare_method


@dataclass(frozen=True)
class JigCluOptions:
    patch_size: int = 112                       # each patch; montages are twice as large
    patch_scale: tuple[float, float] = (0.2, 1.0)
    cross: float = 0.3                          # the 4 boxes overlap: each covers 0.5 + cross of a side
    temperature: float = 0.3                    # JigClu README --loss-t 0.3
    base_temperature: float = 0.07
    feat_dim: int = 128
    hidden_dim: int | None = None               # None: the trunk's width (2048 for ResNet-50), as JigClu
    loss_clu: float = 1.0
    loss_loc: float = 1.0
    kernel: str | None = None                   # colour stage: None (fused on CPU, torch on GPU), fused, torch


# JigClu README: 4 GPUs x 64 = 256, SGD lr 0.03 momentum 0.9, wd 1e-4 on every parameter, 200 epochs, cosine
# to 0 (per epoch there; per step here), apex SyncBN.
SEED = dict(arch="resnet50", epochs=200, batch_size=64, optimizer="sgd", lr=0.03, schedule="cosine",
            final_lr_ratio=0.0, warmup_epochs=0, momentum=0.9, weight_decay=1e-4, exclude_norm_bias_wd=False,
            sync_bn=True)
PRESETS = {
    "200ep": Preset("JigClu's recipe: ResNet-50, 200 epochs, batch 256 (4 GPUs x 64), SGD lr 0.03, wd 1e-4, "
                    "cosine (66.4 linear)", SEED),
    "small": Preset("a few thousand images on CPU: ResNet-18, 4 x 48 px patches (96 px montages)",
                    dict(arch="resnet18", epochs=30, batch_size=64, optimizer="sgd", lr=0.3, schedule="cosine",
                         final_lr_ratio=0.0, warmup_epochs=1, momentum=0.9, weight_decay=1e-4,
                         **{"method_options.patch_size": 48})),
    # bench/ssl_quality.py: 5,000 Fashion-MNIST images (28x28 grey). Patches are crops of the 22 px boxes
    # upsampled to 32 (1.5-3x, around the 2.3x of the 64 px evaluation). Learning rate per 256 from a sweep
    # of this protocol (global-pool kNN, random trunk 0.769): 0.4 -> 0.742, 0.1 -> 0.759, 0.03 (JigClu's own)
    # -> 0.772, 0.01 -> 0.783, 0.003 -> 0.783 with res4/res3 falling below 0.01's. At the higher rates res4/res3
    # still beat random while the global pool fell below it: the last block specialised to the montage task.
    # Temperature 0.1 instead of JigClu's 0.3 (bench/scaling.py recipe sweep, 2 seeds, 2026-12-06): global-pool
    # kNN 0.789 vs 0.780 (+0.9, ~3 std), linear +0.7, 8-shot +0.8; res3 kNN -0.6 (docs/BENCHMARKS.md).
    "fmnist": Preset("Fashion-MNIST-sized data on CPU: resnet_tiny, 4 x 32 px patches (64 px montages), SGD 0.01 "
                     "per 256, temperature 0.1, 20 epochs at batch 32",
                     dict(arch="resnet_tiny", epochs=20, batch_size=32, optimizer="sgd", lr=0.01, schedule="cosine",
                          final_lr_ratio=0.0, warmup_epochs=0, momentum=0.9, weight_decay=1e-4,
                          **{"method_options.patch_size": 32, "method_options.feat_dim": 64,
                             "method_options.temperature": 0.1})),
    "tiny": Preset("smoke runs and tests: resnet_tiny, 4 x 48 px patches (96 px montages, res5 3x3 -> 4x4)",
                   dict(arch="resnet_tiny", epochs=2, batch_size=32, optimizer="sgd", lr=0.3, schedule="cosine",
                        final_lr_ratio=0.0, warmup_epochs=0, momentum=0.9, weight_decay=1e-4,
                        **{"method_options.patch_size": 48, "method_options.feat_dim": 64})),
}

declare_method("jigclu", JigCluOptions, PRESETS)
