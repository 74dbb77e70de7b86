"""Linear probe on a frozen trunk (Goyal'19 / VISSL eval_mlp).

Head: BatchNorm without affine parameters over the pooled map's channels, flatten, Linear(d,
classes) initialised N(0, 0.01) with zero bias. Optimiser: SGD, momentum 0.9, nesterov, lr 0.01
per 256 images (scaled linearly with the batch), weight decay 1e-4 (ResNet) / 5e-4 (AlexNet), as the
Caffe2 benchmark; VISSL's ImageNet config uses 5e-4 throughout. The lr drops x0.1 at 8/28, 16/28
and 24/28 of training: at epochs 8, 16, 24 of the protocol's 28, and at the same fractions (per
step) when fewer epochs are asked for.

The loop is independent of where batches come from: `train_probe` takes a function epoch ->
iterable of (features, labels), either the trunk run under no_grad on the augmented `eval_train`
pipeline (the protocol) or shuffled cached centre-crop features (`--fast`, no augmentation).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .knn import topk_accuracy

from .defaults import BASE_LR, PROTOCOL_EPOCHS   # lr per 256 images; epochs of the protocol
MILESTONES = (8 / 28, 16 / 28, 24 / 28)   # fractions of training
GAMMA = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = {"resnet": 1e-4, "alexnet": 5e-4}

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class LinearProbe(nn.Module):
    """BatchNorm (no affine) over `channels` of a [N, channels * spatial] feature, then Linear."""

    def __init__(self, dim: int, channels: int, num_classes: int):
        super().__init__()
        if dim % channels:
            raise ValueError(f"feature width {dim} is not a multiple of {channels} channels")
        self.channels = channels
        self.bn = nn.BatchNorm1d(channels, affine=False)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.bn(x.view(n, self.channels, -1))   # a pooled s x s map: statistics over N, s, s
        return self.fc(x.view(n, -1))


def scaled_lr(base_lr: float, batch_size: int) -> float:
    return base_lr * batch_size / 256


def lr_at(step: int, steps_per_epoch: int, epochs: int, peak: float, milestones=MILESTONES,
          gamma: float = GAMMA) -> float:
    """Multi-step lr: peak x gamma^(milestones passed), milestones as fractions of all steps."""
    total = epochs * steps_per_epoch
    passed = sum(step >= round(m * total) for m in milestones)
    return peak * gamma ** passed


def cached_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> tuple[Batches, int]:
    """(epoch -> shuffled (x, y) batches, steps per epoch) over cached features. The last partial batch
    is dropped (BatchNorm needs more than one sample), unless it is the only one."""
    n = x.shape[0]
    steps = max(1, n // batch_size)

    def batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        for i in range(steps):
            rows = order[i * batch_size:(i + 1) * batch_size]
            yield x[rows], y[rows]

    return batches, steps


def train_probe(probe: LinearProbe, batches: Batches, epochs: int, steps_per_epoch: int, lr: float,
                weight_decay: float, momentum: float = MOMENTUM, milestones=MILESTONES,
                on_epoch: Callable[[int, float], None] | None = None,
                on_step: Callable[[], None] | None = None) -> list[float]:
    """Train `probe` in place with the protocol's SGD and multi-step schedule; `lr` is the peak (already
    scaled to the batch). Returns the mean training loss of every epoch. `on_step()` after every step
    and `on_epoch(epoch, mean loss)` after every epoch report progress."""
    device = next(probe.parameters()).device
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    losses = []
    step = 0
    for epoch in range(epochs):
        probe.train()
        total, count = 0.0, 0
        for x, y in batches(epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps_per_epoch, epochs, lr, milestones)
            loss = F.cross_entropy(probe(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total, count = total + loss.item(), count + 1
            if on_step:
                on_step()
        losses.append(total / max(count, 1))
        if on_epoch:
            on_epoch(epoch, losses[-1])
    return losses


@torch.no_grad()
def predict(probe: LinearProbe, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Logits [N, classes] in eval mode (BatchNorm running statistics)."""
    probe.eval()
    device = next(probe.parameters()).device
    return torch.cat([probe(x[i:i + chunk].to(device)).cpu() for i in range(0, x.shape[0], chunk)])


def evaluate(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor) -> dict:
    acc = topk_accuracy(predict(probe, x), y)
    return {"top1": acc[1], "top5": acc[5]}


def epochs_note(epochs: int) -> str:
    if epochs == PROTOCOL_EPOCHS:
        return "protocol schedule (28 epochs, x0.1 at 8/16/24)"
    marks = ", ".join(f"{m * epochs:.3g}" for m in MILESTONES)
    return f"{epochs} epochs (protocol 28), x0.1 at epochs {marks}"

