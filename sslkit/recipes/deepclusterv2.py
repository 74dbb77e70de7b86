"""DeepClusterV2: the options and presets (the method itself: sslkit.methods.deepclusterv2). No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from . import Preset, declare_method


@dataclass(frozen=True)
class DCv2Options:
    multicrop: str = "2x224+6x96"                      # pipelines.spec.MULTICROP_PRESETS
    n_prototypes: tuple[int, ...] = (3000, 3000, 3000)
    temperature: float = 0.1
    feat_dim: int = 128
    hidden_dim: int = 2048
    crops_for_assign: tuple[int, ...] = (0, 1)
    kmeans_iters: int = 10
    kernel: str | None = None                           # colour stage: None (fused on CPU, torch on GPU), fused, torch


SEED = dict(arch="resnet50", optimizer="lars", lr=0.3, final_lr_ratio=0.001, warmup_epochs=10, warmup_start_lr=0.3,
            momentum=0.9, weight_decay=1e-6, batch_size=64, sync_bn=True)
PRESETS = {
    # the three seed models of swav's scripts (64 GPUs x 64 = 4096, peak lr 4.8)
    "800ep_2x224+6x96": Preset("swav's DCv2 800 epochs, 2x224+6x96, ResNet-50, 64 GPUs x 64 (75.2 linear)",
                               {**SEED, "epochs": 800, "method_options.multicrop": "2x224+6x96"}),
    "400ep_2x160+4x96": Preset("swav's DCv2 400 epochs, 2x160+4x96, ResNet-50 (74.3 linear)",
                               {**SEED, "epochs": 400, "method_options.multicrop": "2x160+4x96"}),
    "400ep_2x224": Preset("swav's DCv2 400 epochs, two 224 crops, ResNet-50 (70.2 linear)",
                          {**SEED, "epochs": 400, "method_options.multicrop": "2x224"}),
    "small": Preset("a few thousand images on CPU: ResNet-18, 2x96+4x48, 3x100 prototypes",
                    dict(arch="resnet18", epochs=30, batch_size=64, optimizer="lars", lr=0.6, warmup_epochs=2,
                         weight_decay=1e-6, **{"method_options.multicrop": "small",
                                               "method_options.n_prototypes": (100, 100, 100),
                                               "method_options.hidden_dim": 512})),
    # bench/ssl_quality.py: 5,000 Fashion-MNIST images (28x28 grey, crops upsampled to 64 / 32). What made it
    # learn (docs/BENCHMARKS.md, "Does it learn?"): LARS at trust 0.001 moves each tensor by lr x 0.001 of
    # its norm per step, and swav's 0.6 per 256 is 7.5e-5 at batch 32: the trunk moved ~3% in 1,248 steps
    # and kNN stayed at the random trunk's. 9.6 per 256 (1.2 at batch 32) moves it ~35% in 20 epochs;
    # 19.2 overshoots. Crops of 0.3-1 / 0.08-0.3 of a 28 px image (not 0.14 / 0.05: 4-10 px) and 100
    # prototypes help less (about half a point each).
    "fmnist": Preset("Fashion-MNIST-sized data on CPU: resnet_tiny, 2x64+4x32 crops (0.3-1, 0.08-0.3) of 28x28 "
                     "images, 3x100 prototypes, LARS 9.6 per 256, 18 epochs at batch 32",
                     dict(arch="resnet_tiny", epochs=18, batch_size=32, optimizer="lars", lr=9.6, warmup_epochs=0,
                          weight_decay=1e-6, **{"method_options.multicrop": "fmnist",
                                                "method_options.n_prototypes": (100, 100, 100),
                                                "method_options.hidden_dim": 256, "method_options.feat_dim": 64})),
    "tiny": Preset("smoke runs and tests: resnet_tiny, 2x64+2x32, an epoch of a few hundred images in ~1 min",
                   dict(arch="resnet_tiny", epochs=2, batch_size=32, optimizer="lars", lr=0.6, warmup_epochs=0,
                        weight_decay=1e-6, **{"method_options.multicrop": "tiny",
                                              "method_options.n_prototypes": (16, 16, 16),
                                              "method_options.hidden_dim": 256, "method_options.feat_dim": 64})),
}

declare_method("deepclusterv2", DCv2Options, PRESETS)
