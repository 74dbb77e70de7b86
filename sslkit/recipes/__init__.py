"""Every method's options and presets, apart from its torch code.

One module per method, named as its module in `sslkit.methods`, holds the method's frozen options
dataclass (`cfg.method_options`) and its presets, and declares the method under its name in
`sslkit.registry` (`declare_method`); `sslkit.methods.NAME` imports its options from here and registers
its nn.Module class under the same name. This file imports every module, so adding a method is adding a
module here and one there (nothing here names one).

Why apart: resolving, printing and documenting a run's config (`sslkit.config`; `sslkit-train
--print-config`, `--list-presets`, `--config run/config.json`) needs the options and presets only, and
answers in a fraction of a second because nothing here imports torch, DALI or numba (tests check).

    from sslkit.recipes import method_entry, list_methods       # sslkit.methods re-exports both
    entry = method_entry("swav")    # entry.meta["options" | "presets" | "default_preset"]: no torch
    entry.factory                   # the nn.Module class, once sslkit.methods (torch) is imported
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass

from .. import registry
from ..errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class Preset:
    """A named recipe: a one-line description and overrides of the run config (top-level fields and
    `method_options.*`)."""
    description: str
    overrides: dict


def declare_method(name: str, options: type, presets: dict[str, Preset], default_preset: str | None = None):
    """File method `name` in the registry with its options class and presets (`default_preset`: the one
    applied when a run names none; None: the options' and TrainConfig's defaults)."""
    if not (dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen):
        raise TypeError(f"method {name!r}: options must be a frozen dataclass, got {options!r}")
    bad = sorted(k for k, p in presets.items() if not isinstance(p, Preset) or "\n" in p.description)
    if bad:
        raise TypeError(f"method {name!r}: presets {bad} must be Presets with a one-line description")
    if default_preset is not None and default_preset not in presets:
        raise ValueError(f"method {name!r}: default preset {default_preset!r} is not one of its presets")
    registry.declare("method", name, options=options, presets=dict(presets), default_preset=default_preset)


def method_entry(name: str) -> registry.Entry:
    """The registry's entry of method `name` (an unknown name is a ConfigError listing the known ones)."""
    try:
        return registry.entry("method", name)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None


def list_methods() -> list[str]:
    return registry.names("method")


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Preset", "declare_method", "list_methods", "method_entry"]
