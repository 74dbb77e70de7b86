"""What the trainer needs from a method, and nothing more.

A method is an `nn.Module` registered as `@register("method", NAME)`, its options and presets
declared under NAME in `sslkit.recipes` (no torch, so configs resolve without it). It
names the pipeline it consumes (`pipeline`) and the options to pass to it (`loader_options`); the
trainer builds that loader first and then the method from `(cfg, ctx)`, where the run context holds
every fact a method may need (rank, world, device, dataset size, steps per epoch, ...): a method never
reaches into the loader or the environment. `forward(batch)` returns a dict with a scalar `loss`
(plus any scalar metrics). Its trunk is `self.backbone`, made by `make_backbone`, so evaluation and
export find it under the `backbone.` prefix of every checkpoint together with how to rebuild it.

Optional hooks: `on_train_start(loader)` (before the first epoch of a fresh run), `on_epoch_start(epoch)`
(not again when resuming inside an epoch), `after_backward()` (before each optimiser step),
`prepare_benchmark()` (steps without a real history), and
`rank_state_dict`/`load_rank_state_dict` for per-rank state (a memory bank) that the trainer saves in
per-rank checkpoint files without looking inside, and `load_rank_states` to re-split it when a run resumes
on another world size. Long hooks call `ctx.check_stop()` between their
steps: a collective that raises `sslkit.dist.Preempted` on every rank after a preemption signal, and
show their progress with `ctx.progress_bar(...)` (rank 0 only, display only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from ..config import ConfigError
from ..progress import DEFAULT_EVERY, Progress
from ..trunk import build_trunk


@dataclass(frozen=True)
class RunContext:
    """Read-only facts about the run, given to the method at construction."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    seed: int = 0
    group: Any = None                 # torch.distributed process group (None: single process)
    autocast: Callable = None         # a context-manager factory for mixed precision
    log: Any = None                   # logging.Logger
    dataset_size: int = 0             # samples in the shard folder (stable indices 0..dataset_size-1)
    num_classes: int | None = None    # labelled shards only
    steps_per_epoch: int = 0          # batches per epoch, identical on every rank
    batch_size: int = 0               # images per rank per step
    channels_last: bool = False       # feed the backbone channels_last tensors (GPU)
    pipeline: dict = field(default_factory=dict)   # the loader's description of its pipeline
    check_stop: Callable = lambda: None            # collective; raises Preempted after a stop signal
    progress: bool = True             # show long hooks' progress (rank 0 only; display, never a collective)
    progress_every: float = DEFAULT_EVERY          # seconds between progress lines off a terminal

    def __post_init__(self):
        if self.autocast is None:
            import contextlib
            object.__setattr__(self, "autocast", contextlib.nullcontext)

    def progress_bar(self, total: int | None, desc: str, unit: str) -> Progress:
        """A long hook's progress: a bar on rank 0's terminal, plain lines with rate and ETA off it,
        nothing on the other ranks. Display only: the same calls on every rank, no collective."""
        return Progress(total, desc, unit=unit, enabled=self.progress and self.rank == 0, every=self.progress_every)


class Method(nn.Module):
    pipeline: ClassVar[str] = ""

    @classmethod
    def loader_options(cls, options) -> dict:
        """Keyword options for `pipelines.make_loader(cls.pipeline, ...)` from the method's options."""
        return {}

    def __init__(self, cfg, ctx: RunContext):
        super().__init__()
        self.ctx = ctx
        self.trunk_spec: dict = {}

    def count_steps(self):
        """Count training steps (`step_taken()` at each training forward) in a buffer, so the count is
        saved in every checkpoint, identical on every rank and exact after a resume; `self.steps_taken`
        mirrors it as a Python int that can be read without waiting for the device."""
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.steps_taken = 0
        self.register_load_state_dict_post_hook(_read_steps)

    def step_taken(self):
        self.steps_taken += 1
        self.steps.fill_(self.steps_taken)

    def make_backbone(self, arch: str, input: str = "rgb", **kwargs) -> nn.Module:
        """The trunk (no classifier), remembered with how to rebuild it: {"arch", "kwargs", "input"},
        input "rgb" (normalised RGB) or "L" (the L channel of Lab minus 50)."""
        self.trunk_spec = {"arch": arch, "kwargs": dict(kwargs), "input": input}
        return build_trunk(arch, kwargs)

    def forward(self, batch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- hooks (all optional) ---------------------------------------------------------------------
    def on_train_start(self, loader):
        """Called once before the first epoch of a fresh run (not on resume)."""

    def on_epoch_start(self, epoch: int):
        """Called at the start of every epoch (not again when resuming in the middle of one)."""

    def after_backward(self):
        """Called between backward and the optimiser step (e.g. SwAV drops the prototypes' gradient
        during its first iterations, so neither the step nor weight decay moves them)."""

    def prepare_benchmark(self):
        """Make the method ready to take steps without a real history (bench/'s train mode)."""

    def rank_state_dict(self) -> dict:
        """State that differs between ranks; saved in per-rank files."""
        return {}

    def load_rank_state_dict(self, state: dict):
        pass

    def load_rank_states(self, states: Iterable[dict], old_world_size: int) -> str:
        """Resume on another world size: `states` yields every old rank's `rank_state_dict()` in rank
        order (each read from disk when asked for); take this rank's share of them. Returns one line
        saying what was carried over, or "" when the method has no per-rank state."""
        return ""


class MultiCropMethod(Method):
    """The front the multi-crop methods share (DeepClusterV2, SwAV): the multicrop pipeline, the trunk, a
    projection head Linear-BN-ReLU-Linear to `feat_dim`, and `embed`. Their options (`self.o`) hold
    multicrop, kernel, hidden_dim, feat_dim and crops_for_assign."""
    pipeline = "multicrop"

    @classmethod
    def loader_options(cls, options) -> dict:
        return {"preset": options.multicrop, "kernel": options.kernel}

    def make_embedding(self, arch: str):
        self.backbone = self.make_backbone(arch)
        d, o = self.backbone.num_features, self.o
        self.projection = nn.Sequential(nn.Linear(d, o.hidden_dim), nn.BatchNorm1d(o.hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(o.hidden_dim, o.feat_dim))

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised float32 embeddings of every view, [V*B, feat_dim] in view order."""
        if max(self.o.crops_for_assign) >= len(views):
            raise ConfigError(f"crops_for_assign {self.o.crops_for_assign} outside the {len(views)} views of "
                              f"multi-crop preset {self.o.multicrop!r}")
        feats = forward_by_resolution(self.backbone, views, self.ctx.channels_last)
        return l2_normalize(self.projection(feats).float())


def _read_steps(module, _incompatible_keys):
    module.steps_taken = int(module.steps)


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
