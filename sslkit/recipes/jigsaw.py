"""Jigsaw puzzles: the options and presets (the method itself: sslkit.methods.jigsaw). No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from . import Preset, declare_method


@dataclass(frozen=True)
class JigsawOptions:
    permutations: int | str = 2000     # |P| of a generated max-Hamming set (max_avg, seed 0), or a .npy set
    geometry: str = "goyal"            # pipelines/jigsaw.py GEOMETRIES: goyal (255/85/64) | noroozi (225/75/64)
    tile_dim: int = 1000               # width of the per-tile head (VISSL: 1000); the concat is 9 x this


# VISSL jigsaw_8gpu_resnet.yaml: 8 GPUs x 32, SGD lr 0.1 per 256, momentum 0.9, wd 1e-4,
# no decay on BN (exclude_norm_bias_wd also spares the biases, which VISSL decays), 105 epochs,
# x0.1 at epochs 30/60/90/100; VISSL's single-node warm-up collapses to none (its resolve_linear_schedule).
SEED = dict(arch="resnet50", optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
            exclude_norm_bias_wd=True, epochs=105, schedule="multistep", milestones=(30, 60, 90, 100), gamma=0.1,
            warmup_epochs=0, batch_size=32)
CPU = dict(optimizer="sgd", momentum=0.9, weight_decay=1e-4, exclude_norm_bias_wd=True, schedule="cosine",
           final_lr_ratio=0.01, warmup_epochs=0)
PRESETS = {
    "rn50_perm100": Preset("VISSL/Goyal'19 jigsaw, ResNet-50, |P| 100, 105 epochs SGD multistep, 8 GPUs x 32 "
                           "(48.57 IN-1k linear)", {**SEED, "method_options.permutations": 100}),
    "rn50_perm2000": Preset("VISSL/Goyal'19 jigsaw, ResNet-50, |P| 2000 (VISSL's default), 105 epochs SGD "
                            "multistep, 8 GPUs x 32 (46.73 IN-1k linear)",
                            {**SEED, "method_options.permutations": 2000}),
    "rn50_perm10000": Preset("VISSL/Goyal'19 jigsaw, ResNet-50, |P| 10000, 105 epochs SGD multistep, 8 GPUs x 32 "
                             "(48.11 IN-1k linear)", {**SEED, "method_options.permutations": 10000}),
    "alexnet_perm2000": Preset("Goyal'19 AlexNet jigsaw trunk (1024-d pool5 per 64 px tile), |P| 2000, the RN50 "
                               "SGD recipe (no public AlexNet pretext config; 34.82 IN-1k for Goyal's model)",
                               {**SEED, "arch": "alexnet_jigsaw", "method_options.permutations": 2000}),
    "small": Preset("a few thousand images on CPU: ResNet-18, |P| 100, 256-d tile head, 30 epochs",
                    {**CPU, "arch": "resnet18", "epochs": 30, "batch_size": 32, "lr": 0.1,
                     "method_options.permutations": 100, "method_options.tile_dim": 256}),
    # bench/ssl_quality.py: 5,000 Fashion-MNIST images. The `small` geometry cuts 16 px tiles from a 63 px
    # crop of the image resized to 64, so the trunk sees parts at the scale the 64 px evaluation shows;
    # Goyal's 64 px tiles of a 255 px crop are 9x upsampled 28 px images and did not learn (0.755 vs 0.769).
    # Learning rate per 256 from a sweep of this protocol (kNN res5avg / res4 / res3, random 0.769 / 0.770 /
    # 0.779): 0.4 -> 0.756 / 0.787 / 0.809, 0.1 -> 0.781 / 0.796 / 0.814, 0.03 -> 0.790 / 0.795 / 0.808;
    # 0.1 is best on five of the six kNN and linear cells.
    "fmnist": Preset("learning check on 28x28 grey images (bench/ssl_quality.py, Fashion-MNIST) on CPU: resnet_tiny, "
                     "`small` geometry (16 px tiles of a 63 px crop), |P| 100, 128-d tile head, SGD 0.1 per 256, "
                     "20 epochs at batch 32",
                     {**CPU, "arch": "resnet_tiny", "epochs": 20, "batch_size": 32, "lr": 0.1,
                      "method_options.permutations": 100, "method_options.tile_dim": 128,
                      "method_options.geometry": "small"}),
    "tiny": Preset("smoke runs and tests: resnet_tiny, |P| 100, 64-d tile head; an epoch of 200 images in ~5 s "
                   "on 2 CPU ranks",
                   {**CPU, "arch": "resnet_tiny", "epochs": 2, "batch_size": 8, "lr": 0.1,
                    "method_options.permutations": 100, "method_options.tile_dim": 64}),
}

declare_method("jigsaw", JigsawOptions, PRESETS)
