"""What the trainer needs from a method, and nothing more.

A method is an `nn.Module` whose `forward(batch)` returns a dict with a scalar `loss` (plus any
metrics). It names the pipeline family it consumes and the options to pass to it. Stateful
methods implement hooks; per-rank state (e.g. a memory bank) goes through `rank_state_dict`, which
the trainer saves in per-rank checkpoint files -- the trainer never looks inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class RunContext:
    """Read-only facts about the run that hooks may need."""
    rank: int
    world_size: int
    device: torch.device
    seed: int
    group: Any = None                # torch.distributed process group (None: single process)
    autocast: Any = None             # a context-manager factory for mixed precision
    log: Any = None                  # logging.Logger


class Method(nn.Module):
    pipeline: str = "multicrop"

    def loader_options(self) -> dict:
        """Keyword options for `pipelines.make_loader(self.pipeline, ...)`."""
        return {}

    def forward(self, batch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- hooks (all optional) ---------------------------------------------------------------------
    def on_train_start(self, loader, ctx: RunContext):
        """Called once before the first epoch of a fresh run (not on resume)."""

    def on_epoch_start(self, epoch: int, ctx: RunContext):
        """Called at the start of every epoch (not again when resuming in the middle of one)."""

    def prepare_benchmark(self, loader, ctx: RunContext):
        """Make the method ready to take steps without a real history (bench/throughput.py's train
        mode): by default the fresh-start hook; methods whose warm-up is a data pass fake it."""
        self.on_train_start(loader, ctx)

    def rank_state_dict(self) -> dict:
        """State that differs between ranks; saved in per-rank files."""
        return {}

    def load_rank_state_dict(self, state: dict):
        pass


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x, dim=1, p=2)


def forward_by_resolution(backbone: nn.Module, views: list[torch.Tensor], channels_last: bool = False):
    """One backbone pass per run of equal-resolution views (views come largest first), concatenated
    in view order: [V*B, D]. Batching views of one size keeps BN statistics and speed sane."""
    outputs, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
            end += 1
        x = torch.cat(views[start:end])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs.append(backbone(x))
        start = end
    return torch.cat(outputs)
