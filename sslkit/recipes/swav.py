"""SwAV: the options and presets (the method itself: sslkit.methods.swav). No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from . import Preset, declare_method


@dataclass(frozen=True)
class SwAVOptions:
    multicrop: str = "2x224+6x96"                 # pipelines.spec.MULTICROP_PRESETS
    n_prototypes: int = 3000
    temperature: float = 0.1
    feat_dim: int = 128
    hidden_dim: int = 2048
    crops_for_assign: tuple[int, ...] = (0, 1)
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    freeze_prototypes_niters: int = 313            # swav: 313 at batch 4096, 5005 at batch 256
    queue_length: int = 0                          # rows over all ranks (0: no queue); swav: 3840 at batch 256
    epoch_queue_starts: int = 15
    kernel: str | None = None                      # colour stage: None (fused on CPU, torch on GPU), fused, torch


SEED = dict(arch="resnet50", optimizer="lars", lr=0.3, final_lr_ratio=0.001, warmup_epochs=10, warmup_start_lr=0.3,
            momentum=0.9, weight_decay=1e-6, batch_size=64, sync_bn=True,
            **{"method_options.multicrop": "2x224+6x96", "method_options.freeze_prototypes_niters": 313,
               "method_options.queue_length": 0})
# swav_{200,400}ep_bs256: 4 GPUs x 64, base_lr 0.6 (at 256) -> 0.0006, no warm-up, queue 3840 from epoch 15
BS256 = dict(arch="resnet50", optimizer="lars", lr=0.6, final_lr_ratio=0.001, warmup_epochs=0, momentum=0.9,
             weight_decay=1e-6, batch_size=64, sync_bn=True,
             **{"method_options.multicrop": "2x224+6x96", "method_options.freeze_prototypes_niters": 5005,
                "method_options.queue_length": 3840, "method_options.epoch_queue_starts": 15})
PRESETS = {
    # swav's scripts: 64 GPUs x 64 = 4096, peak lr 4.8 after 10 warm-up epochs from 0.3, to 0.0048
    "800ep": Preset("swav's SwAV 800 epochs, 2x224+6x96, ResNet-50, 64 GPUs x 64 (75.3 linear)",
                    {**SEED, "epochs": 800}),
    "400ep": Preset("swav's SwAV 400 epochs, 2x224+6x96, ResNet-50, 64 GPUs x 64 (74.6 linear)",
                    {**SEED, "epochs": 400}),
    "200ep": Preset("swav's SwAV 200 epochs, 2x224+6x96, ResNet-50, 64 GPUs x 64 (73.9 linear)",
                    {**SEED, "epochs": 200}),
    "100ep": Preset("swav's SwAV 100 epochs, 2x224+6x96, ResNet-50, 64 GPUs x 64 (72.1 linear)",
                    {**SEED, "epochs": 100}),
    "400ep_bs256": Preset("swav's SwAV 400 epochs at batch 256 (4 GPUs x 64), queue 3840 from epoch 15 (74.3 linear)",
                          {**BS256, "epochs": 400}),
    "200ep_bs256": Preset("swav's SwAV 200 epochs at batch 256 (4 GPUs x 64), queue 3840 from epoch 15 (72.7 linear)",
                          {**BS256, "epochs": 200}),
    "small": Preset("a few thousand images on CPU: ResNet-18, 2x96+4x48, 100 prototypes",
                    dict(arch="resnet18", epochs=30, batch_size=64, optimizer="lars", lr=0.6, warmup_epochs=2,
                         weight_decay=1e-6, **{"method_options.multicrop": "small",
                                               "method_options.n_prototypes": 100,
                                               "method_options.hidden_dim": 512,
                                               "method_options.freeze_prototypes_niters": 50})),
    # bench/ssl_quality.py: 5,000 Fashion-MNIST images (28x28 grey, crops upsampled to 64 / 32). DCv2's
    # `fmnist` finding applies: at LARS 0.6 per 256 (trust 0.001) the trunk barely moves. A sweep of this
    # protocol (kNN res5avg / res4 / res3, random 0.769 / 0.770 / 0.779): 9.6 per 256 -> 0.778 / 0.818 /
    # 0.842, 4.8 -> 0.794 / 0.817 / 0.836, 2.4 -> 0.774 / 0.799 / 0.817; 4.8 for the global pool.
    # More prototypes than embedding dimensions (with 30 for 64 dims the loss settled at log K, uniform
    # predictions); batch 32 is far below swav's 256, hence a queue so that Sinkhorn spreads 100
    # prototypes over more than 32 rows.
    "fmnist": Preset("Fashion-MNIST-sized data on CPU: resnet_tiny, 2x64+4x32 crops (0.3-1, 0.08-0.3) of 28x28 "
                     "images, 100 prototypes, queue 512 from epoch 3, LARS 4.8 per 256, 18 epochs at batch 32",
                     dict(arch="resnet_tiny", epochs=18, batch_size=32, optimizer="lars", lr=4.8, warmup_epochs=0,
                          weight_decay=1e-6, **{"method_options.multicrop": "fmnist",
                                                "method_options.n_prototypes": 100,
                                                "method_options.hidden_dim": 256, "method_options.feat_dim": 64,
                                                "method_options.freeze_prototypes_niters": 156,
                                                "method_options.queue_length": 512,
                                                "method_options.epoch_queue_starts": 3})),
    "tiny": Preset("smoke runs and tests: resnet_tiny, 2x64+2x32, 32 prototypes, a 128-row queue from epoch 1",
                   dict(arch="resnet_tiny", epochs=2, batch_size=32, optimizer="lars", lr=0.6, warmup_epochs=0,
                        weight_decay=1e-6, **{"method_options.multicrop": "tiny",
                                              "method_options.n_prototypes": 32,
                                              "method_options.hidden_dim": 256, "method_options.feat_dim": 64,
                                              "method_options.freeze_prototypes_niters": 5,
                                              "method_options.queue_length": 128,
                                              "method_options.epoch_queue_starts": 1})),
}

declare_method("swav", SwAVOptions, PRESETS)
