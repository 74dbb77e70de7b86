"""Optimisers and learning-rate schedules of the recipes (VISSL's jigsaw, swav's DeepClusterV2).

- `param_groups`: split a model's trainable parameters into a decayed group and a group of biases
  and normalisation parameters (no weight decay, flagged so LARS can leave them unadapted).
- `LARS` (alias `LARC`): SGD with apex-LARC layer-wise trust ratios, as SwAV / DCv2 train.
- `build_optimizer`: "sgd" or "lars" from plain arguments.
- Schedules are numpy arrays with one value per global iteration (STYLE 13.7), so the loop does
  `group["lr"] = schedule[it]` and resuming only needs the global step.
- Gradient accumulation and clipping: `accumulate` splits the loader's epoch into optimiser steps of
  `accum_steps` micro-batches (`optimizer_steps` counts them), `no_grad_sync` keeps DDP from
  all-reducing in all but a step's last backward, `clip_gradients` returns the pre-clip total norm.

The DCv2 recipe (swav scripts, VISSL `deepclusterv2_2crops_resnet.yaml`) in these terms:

    lr = scaled_lr(0.3, 4096)                                      # 4.8
    groups = param_groups(model, 1e-6, exclude_norm_and_bias=False)  # VISSL regularize_bn/bias True
    opt = LARS(groups, lr, momentum=0.9)                           # trust 0.001, clip=False, adapts all
    schedule = warmup_cosine(lr, 0.0048, epochs, iters_per_epoch, warmup_epochs=10, start_warmup_lr=0.3)
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

# The param-group key that marks the biases-and-norms group built by `param_groups`.
NORM_OR_BIAS = "norm_or_bias"
# Modules whose every parameter is a normalisation parameter. _NormBase covers BatchNorm1d/2d/3d,
# SyncBatchNorm, the lazy variants and InstanceNorm; 1-D parameters of other (custom, apex) norm
# layers are caught by the ndim rule in `param_groups`.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
OPTIMIZERS = ("sgd", "lars")


def _check_number(value: Any, name: str, low: float = 0.0) -> float:
    """A finite real >= low, as float; anything else is a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
    return float(value)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


# ---- parameter groups --------------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float, exclude_norm_and_bias: bool = True) -> list[dict[str, Any]]:
    """Two param groups of the model's trainable parameters, in `model.parameters()` order.

    Group 0 ("decay") gets `weight_decay`; group 1 ("no_decay", `NORM_OR_BIAS: True`) gets 0 and holds
    every parameter of a normalisation module (NORM_TYPES), every parameter named `bias`, and every
    parameter with ndim <= 1. With `exclude_norm_and_bias=False` group 1 stays empty and everything
    decays (DCv2 / VISSL regularize_bn and regularize_bias True). The two groups are always there,
    so optimizer state dicts keep one layout whatever the flag. Frozen parameters
    (`requires_grad=False`) are left out.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"param_groups needs an nn.Module, got {type(model).__name__}")
    weight_decay = _check_number(weight_decay, "weight_decay")
    excluded: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_TYPES)
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name == "bias" or p.ndim <= 1:
                excluded.add(id(p))
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicates shared parameters
        if p.requires_grad:
            (no_decay if exclude_norm_and_bias and id(p) in excluded else decay).append(p)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return [
        {"params": decay, "weight_decay": weight_decay, NORM_OR_BIAS: False, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, NORM_OR_BIAS: True, "name": "no_decay"},
    ]


# ---- LARS / LARC -------------------------------------------------------------------------------

class LARS(torch.optim.SGD):
    """SGD with layer-wise adaptive rate scaling, with the semantics of apex's LARC (SwAV, DCv2).

    Before the SGD step, each parameter p of an adapted group, with g = p.grad and the group's
    weight decay wd, gets

        ratio = trust_coefficient * ||p|| / (||g|| + wd * ||p|| + eps)
        g <- (g + wd * p) * s,   s = ratio               (clip=False: effective lr = ratio * lr)
                                  s = min(ratio / lr, 1)  (clip=True:  effective lr = min(ratio, lr))

    and the inner SGD step (momentum, nesterov) then runs with weight decay 0, since the decay is
    already folded into g. As in apex, a parameter whose norm or gradient norm is 0 (e.g. a
    zero-initialised bias at step 0) is left alone by the adaptation: no decay, no scaling, so it
    moves by lr * g. Gradients are overwritten in place by `step`.

    Which groups are adapted: all of them by default (swav's LARC wraps every group, VISSL's DCv2
    uses LARC on all parameters). With `exclude_norm_and_bias=True`, groups marked
    `NORM_OR_BIAS` by `param_groups` take a plain SGD step with their own weight decay instead.

    It is an ordinary torch optimizer: state_dict / load_state_dict (momentum buffers and the
    per-group hyper-parameters, trust ones included), `zero_grad(set_to_none=True)`, closures, and
    `torch.amp.GradScaler.step` (which unscales the gradients before `step` sees them).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                 momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False, *,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, clip: bool = False,
                 exclude_norm_and_bias: bool = False, foreach: bool | None = None) -> None:
        _check_number(lr, "lr")
        if _check_number(trust_coefficient, "trust_coefficient") == 0:
            raise ValueError("trust_coefficient must be > 0 (0 would freeze every adapted parameter)")
        _check_number(eps, "eps")
        self._lars_defaults = {"trust_coefficient": float(trust_coefficient), "eps": float(eps), "clip": bool(clip)}
        self.exclude_norm_and_bias = bool(exclude_norm_and_bias)
        # fused=False: a fused SGD would receive still-scaled gradients from GradScaler, and the
        # trust ratio (with its wd * ||p|| term) is not invariant to that scale.
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                         foreach=foreach, fused=False)
        self.defaults.update(self._lars_defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As SGD's, plus the trust_coefficient / eps / clip defaults."""
        for key, value in self._lars_defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As SGD's; groups saved by a plain SGD get this optimizer's trust defaults."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self._lars_defaults.items():
                group.setdefault(key, value)

    def _adapted(self, group: dict[str, Any]) -> bool:
        return not (self.exclude_norm_and_bias and group.get(NORM_OR_BIAS, False))

    @torch.no_grad()
    def _adapt_gradients(self, group: dict[str, Any], weight_decay: float) -> None:
        """Fold the weight decay into each gradient and scale it by its trust ratio, in place."""
        tc, eps, clip, lr = group["trust_coefficient"], group["eps"], group["clip"], group["lr"]
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise ValueError("LARS does not support sparse gradients")
            p_norm = torch.linalg.vector_norm(p, dtype=torch.float32)
            g_norm = torch.linalg.vector_norm(g, dtype=torch.float32)
            scale = tc * p_norm / (g_norm + weight_decay * p_norm + eps)
            if clip:
                scale = torch.clamp(scale / lr, max=1.0)  # lr == 0 gives inf -> 1: the step is 0 anyway
            # Tensors, not Python bools: no host sync per parameter on the GPU.
            active = (p_norm > 0) & (g_norm > 0)
            g.copy_(torch.where(active, (g + weight_decay * p) * scale, g))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Adapt the gradients of the adapted groups, then take SGD's step with their decay set to 0."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved = [group["weight_decay"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                if self._adapted(group):
                    self._adapt_gradients(group, group["weight_decay"])
                    group["weight_decay"] = 0.0
            super().step()
        finally:
            for group, wd in zip(self.param_groups, saved):
                group["weight_decay"] = wd
        return loss


LARC = LARS


def build_optimizer(name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                    momentum: float, weight_decay: float, nesterov: bool = False,
                    **lars_options: Any) -> torch.optim.Optimizer:
    """`torch.optim.SGD` ("sgd") or `LARS` ("lars"); `lars_options` go to LARS (trust_coefficient,
    eps, clip, exclude_norm_and_bias). A group's own "weight_decay" overrides `weight_decay`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        if lars_options:
            raise ValueError(f"options {sorted(lars_options)} apply to 'lars' only, not 'sgd'")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    return LARS(params, lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **lars_options)


# ---- schedules: one value per global iteration -------------------------------------------------

def scaled_lr(base_per_256: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): base_per_256 * global_batch / 256; 0.3 at 4096 -> 4.8."""
    return _check_number(base_per_256, "base_per_256") * _check_int(global_batch, "global_batch", 1) / 256


def _check_schedule(epochs: int, iters_per_epoch: int, warmup_epochs: int) -> tuple[int, int, int]:
    epochs = _check_int(epochs, "epochs", 1)
    iters_per_epoch = _check_int(iters_per_epoch, "iters_per_epoch", 1)
    warmup_epochs = _check_int(warmup_epochs, "warmup_epochs", 0)
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) exceeds epochs ({epochs})")
    return epochs, iters_per_epoch, warmup_epochs


def warmup_cosine(base_lr: float, final_lr: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0,
                  start_warmup_lr: float = 0.0) -> np.ndarray:
    """Per-iteration lr [epochs * iters_per_epoch] float64, as swav's main_deepclusterv2.py builds it.

    Warm-up: W = warmup_epochs * iters_per_epoch values evenly spaced from start_warmup_lr to
    base_lr, both ends included. Then T = the remaining iterations follow
    final_lr + (base_lr - final_lr) * (1 + cos(pi * t / T)) / 2 for t = 0 .. T-1. So base_lr occurs
    twice (last warm-up step and first cosine step), and the last value sits a hair above final_lr
    (t never reaches T); both are kept for parity with swav.
    """
    epochs, iters_per_epoch, warmup_epochs = _check_schedule(epochs, iters_per_epoch, warmup_epochs)
    base_lr = _check_number(base_lr, "base_lr")
    final_lr = _check_number(final_lr, "final_lr")
    start_warmup_lr = _check_number(start_warmup_lr, "start_warmup_lr")
    n_warm = warmup_epochs * iters_per_epoch
    n_cos = (epochs - warmup_epochs) * iters_per_epoch
    warm = np.linspace(start_warmup_lr, base_lr, n_warm)
    t = np.arange(n_cos)
    cosine = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * t / max(n_cos, 1)))
    return np.concatenate([warm, cosine])


def multistep(base_lr: float, milestones: Sequence[int], epochs: int, iters_per_epoch: int, gamma: float = 0.1,
              warmup_epochs: int = 0, start_warmup_lr: float = 0.0, per_epoch: bool = False) -> np.ndarray:
    """Per-iteration lr [epochs * iters_per_epoch] float64 for the jigsaw recipe (VISSL jigsaw_8gpu_resnet.yaml).

    In epoch e the lr is base_lr * gamma ** (number of milestones <= e), e.g. 0.1, 0.01, ... 1e-5 for
    base 0.1 and milestones [30, 60, 90, 100]. An optional linear warm-up replaces the first
    warmup_epochs: at step t < W it is start_warmup_lr + (base_lr - start_warmup_lr) * t / W (VISSL's
    linear scheduler, which reaches base_lr on the first step after warm-up), and must end by the
    first milestone. `per_epoch=True` holds each epoch at its first step's value (VISSL
    update_interval "epoch", as the 8-GPU jigsaw config uses).
    """
    epochs, iters_per_epoch, warmup_epochs = _check_schedule(epochs, iters_per_epoch, warmup_epochs)
    base_lr = _check_number(base_lr, "base_lr")
    start_warmup_lr = _check_number(start_warmup_lr, "start_warmup_lr")
    if _check_number(gamma, "gamma") == 0:
        raise ValueError("gamma must be > 0")
    steps = [_check_int(m, "each milestone", 1) for m in milestones]
    if any(b <= a for a, b in zip(steps, steps[1:])) or (steps and steps[-1] > epochs):
        raise ValueError(f"milestones must increase strictly and lie in [1, epochs={epochs}], got {list(milestones)}")
    if steps and warmup_epochs > steps[0]:
        raise ValueError(f"warm-up ({warmup_epochs} epochs) must end by the first milestone ({steps[0]})")
    total = epochs * iters_per_epoch
    epoch = np.arange(total) // iters_per_epoch
    lr = base_lr * float(gamma) ** np.searchsorted(np.asarray(steps, dtype=np.int64), epoch, side="right")
    n_warm = warmup_epochs * iters_per_epoch
    lr[:n_warm] = start_warmup_lr + (base_lr - start_warmup_lr) * np.arange(n_warm) / max(n_warm, 1)
    if per_epoch:
        lr = np.repeat(lr[::iters_per_epoch], iters_per_epoch)
    return lr


# ---- gradient accumulation and clipping --------------------------------------------------------

def optimizer_steps(micro_batches: int, accum_steps: int) -> int:
    """Optimiser steps of an epoch of `micro_batches` loader batches: one per `accum_steps` of them,
    the epoch's last step taking what is left."""
    return -(-_check_int(micro_batches, "micro_batches", 0) // _check_int(accum_steps, "accum_steps", 1))


class MicroBatches:
    """The micro-batches of one optimiser step, read from the loader's iterator only as the step
    consumes them: one is held at a time and the loader keeps prefetching meanwhile. `wait_s`: the
    seconds spent waiting for them."""

    def __init__(self, batches: Iterator, count: int):
        self.batches, self.count, self.wait_s = batches, count, 0.0

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for _ in range(self.count):
            t = time.perf_counter()
            batch = next(self.batches)
            self.wait_s += time.perf_counter() - t
            yield batch


def accumulate(loader, accum_steps: int) -> Iterator[MicroBatches]:
    """The rest of `loader`'s epoch (an iterable with `len` and `position`, the batches already yielded
    in this epoch, as pipelines' DaliLoader) as optimiser steps of `accum_steps` micro-batches each.
    Steps are aligned to the epoch's start (a run stopped after a step resumes at the next one) and
    never cross an epoch: the last one takes the epoch's remaining micro-batches. Consume each step's
    micro-batches before asking for the next step."""
    batches = iter(loader)
    while loader.position < len(loader):
        yield MicroBatches(batches, min(accum_steps - loader.position % accum_steps, len(loader) - loader.position))
    next(batches, None)  # the loader's own end of epoch runs when its iterator is exhausted


def no_grad_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's `no_sync()` (also when torch.compile wraps the DDP module): backward passes inside it
    accumulate gradients locally without the all-reduce, which the next backward outside it then
    does for all of them. Anything else needs no such context."""
    ddp = getattr(model, "_orig_mod", model)
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return contextlib.nullcontext()


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients before clipping (a 0-dim tensor on their device,
    not read here: no host sync), having scaled them down to `max_norm` when > 0 and exceeded. Call
    it on unscaled gradients (`GradScaler.unscale_` first)."""
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])
