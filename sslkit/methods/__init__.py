"""SSL methods, one module each, registered in `sslkit.registry` under kind "method".

    from sslkit.methods import method_entry, list_methods
    entry = method_entry("deepclusterv2")      # entry.factory (the class), entry.meta["options"|"presets"]

Each method's options and presets live apart, in `sslkit.recipes` (no torch), which declares the
method; its module here registers the nn.Module class under the declared name. `method_entry` and
`list_methods` are sslkit.recipes' (one lookup; importing them from there needs no torch). Every
module of this package registers itself when imported; this file imports them all, so adding a
method is adding a module here and its recipe module there (nothing here names one).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..recipes import Preset, list_methods, method_entry
from .base import Method, RunContext

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Method", "Preset", "RunContext", "list_methods", "method_entry"]
