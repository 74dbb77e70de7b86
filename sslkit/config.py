"""Run configuration: frozen dataclasses, named presets, strict `--set key=value` overrides.

A run's config is `TrainConfig` plus the method's own options dataclass (`method_options`). Every
value can be overridden from the command line; an unknown key or a value of the wrong type is a
one-line error before any work starts. The resolved config is saved, as a plain dict, in every
checkpoint and in `<out>/config.json`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from .errors import SslkitError


class ConfigError(SslkitError, ValueError):
    """A configuration that cannot run (one-line reason)."""


@dataclass(frozen=True)
class TrainConfig:
    method: str = "deepclusterv2"
    preset: str | None = None
    data: str = "shards/sample"
    arch: str = "resnet50"
    epochs: int = 100
    batch_size: int = 64             # per rank
    out: str = "runs/default"
    device: str = "auto"             # auto | cpu | cuda
    seed: int = 0
    init_from: str | None = None     # run folder or checkpoint whose weights start a fresh run (fine-tuning)
    # optimisation (lr is per 256 images and scaled linearly with the global batch)
    optimizer: str = "lars"          # lars | sgd
    lr: float = 0.3
    schedule: str = "cosine"         # cosine (to lr * final_lr_ratio) | multistep (x gamma at milestones)
    final_lr_ratio: float = 0.001
    milestones: tuple[int, ...] = ()  # epochs, for schedule=multistep
    gamma: float = 0.1
    warmup_epochs: int = 10
    warmup_start_lr: float | None = None  # absolute; default: lr (the per-256 value, as swav does)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-6
    exclude_norm_bias_wd: bool = False
    # system
    precision: str = "auto"          # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True       # on GPU
    sync_bn: bool = False
    compile: bool = False
    loader_threads: int = 0          # DALI threads per rank (0: the rank's share of the cores)
    shuffle_buffer: int = 4096
    dist_timeout_s: int = 600        # a collective waiting longer than this means a hung rank: fail loudly
    # bookkeeping
    log_every: int = 10              # steps between log records (the loss is read and the stop flag agreed then)
    ckpt_every: int = 10             # epochs between periodic checkpoints that are never pruned (0: none)
    keep_ckpts: int = 2              # newest checkpoints kept besides the periodic ones (>= 2: a fallback)
    tensorboard: bool = False
    method_options: Any = None       # the method's own frozen dataclass


def _coerce(value: Any, annotation, where: str):
    """Type-check/convert a parsed override against a field's annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a tuple/list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(obj, overrides: dict[str, Any], where: str = ""):
    """Return `obj` (a frozen dataclass) with dotted overrides applied; strict on names and types."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    direct, nested = {}, {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"unknown option {where}{head!r}; known: {', '.join(sorted(names))}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    changes = {}
    for name, value in direct.items():
        if isinstance(value, str) and hints[name] is not str:
            if not _is_str_union(hints[name]):
                value = _parse_value(value)
            elif value.lower() in ("none", "null"):   # str | None: the one non-string spelling
                value = None
        changes[name] = _coerce(value, hints[name], f"{where}{name}")
    for name, sub in nested.items():
        current = changes.get(name, getattr(obj, name))
        if not is_dataclass(current):
            raise ConfigError(f"{where}{name} has no sub-options")
        changes[name] = apply_overrides(current, sub, f"{where}{name}.")
    return replace(obj, **changes)


def _is_str_union(annotation) -> bool:
    return str in typing.get_args(annotation) and all(a in (str, type(None)) for a in typing.get_args(annotation))


def parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. method_options.temperature=0.2")
        out[key.strip()] = value.strip()
    return out


def parse_size(text: str) -> int:
    """A byte or pixel count for the command line: 1000000, 1e9, 500M, 1G, 1.5GB."""
    import argparse
    t = text.strip().upper().rstrip("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1G, 500M, 1e9)") from None


def to_dict(cfg) -> dict:
    def conv(v):
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def dumps(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=1, sort_keys=True)


__all__ = ["ConfigError", "TrainConfig", "apply_overrides", "dumps", "field", "parse_set", "parse_size", "to_dict",
           "dataclasses"]
