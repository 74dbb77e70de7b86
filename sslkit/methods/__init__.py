"""Method registry: `create_method(name, cfg, ctx)`; the trainer only ever calls this.

Each method module registers itself with its options dataclass and named presets. A preset is a
dict of overrides applied to the run config (top-level fields and `method_options.*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import ConfigError


@dataclass(frozen=True)
class MethodEntry:
    name: str
    factory: Callable          # (cfg: TrainConfig, ctx: RunContext) -> Method
    options: type              # frozen dataclass of method options
    presets: dict              # name -> overrides
    default_preset: str | None


_METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, options: type, presets: dict, default_preset: str | None = None):
    def deco(factory):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = MethodEntry(name, factory, options, presets, default_preset)
        return factory
    return deco


def method_entry(name: str) -> MethodEntry:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)


def create_method(cfg, ctx):
    return method_entry(cfg.method).factory(cfg, ctx)


from . import deepclusterv2  # noqa: E402,F401  (registers itself)
