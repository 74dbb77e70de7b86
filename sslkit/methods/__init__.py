"""SSL methods, one module each, registered in `sslkit.registry` under kind "method".

    from sslkit.methods import method_entry, list_methods
    entry = method_entry("deepclusterv2")      # entry.factory (the class), entry.meta["options"|"presets"]

Every module of this package registers itself when imported; this file imports them all, so adding
a method is adding a module (nothing here names one).
"""

from __future__ import annotations

import importlib
import pkgutil

from .. import registry
from ..config import ConfigError
from ..errors import UnknownNameError
from .base import Method, Preset, RunContext


def method_entry(name: str) -> registry.Entry:
    try:
        return registry.entry("method", name)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None


def list_methods() -> list[str]:
    return registry.names("method")


for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Method", "Preset", "RunContext", "list_methods", "method_entry"]
