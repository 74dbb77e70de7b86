"""One registry for everything built by name: `register(kind, name)`, `create(kind, name, **opts)`.

Kinds and the package whose import fills them:
    model     sslkit.models      a trunk factory, e.g. create("model", "resnet50", num_classes=0)
    method    sslkit.methods     an SSL method class, built by the trainer from (cfg, ctx)
    pipeline  pipelines          a DALI view family, built by pipelines.make_loader
    renderer  sslkit.viz         a visualizer row renderer for one pipeline

Registration happens once, at import, through the decorator; a name registered twice is an error
(otherwise `create` would depend on import order). `create` checks the options against the
factory's signature and lists the accepted ones, so a typo is a one-line error, never a TypeError
from deep inside a constructor.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import SslkitError, UnknownNameError

# Where the entries of each kind are registered (imported on first lookup).
KINDS = {"model": "sslkit.models", "method": "sslkit.methods", "pipeline": "pipelines", "renderer": "sslkit.viz"}


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    factory: Callable
    meta: dict = field(default_factory=dict)   # kind-specific facts (a method's options and presets, ...)


_ENTRIES: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str, **meta) -> Callable:
    """Decorator filing `factory` under (kind, name)."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")

    def deco(factory):
        if not callable(factory):
            raise TypeError(f"register({kind!r}, {name!r}) needs a callable, got {type(factory).__name__}")
        table = _ENTRIES[kind]
        if name in table:
            old = table[name].factory
            raise ValueError(f"{kind} {name!r} is already registered (by {old.__module__}.{old.__qualname__})")
        table[name] = Entry(kind, name, factory, dict(meta))
        return factory

    return deco


def _table(kind: str) -> dict[str, Entry]:
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")
    importlib.import_module(KINDS[kind])
    return _ENTRIES[kind]


def names(kind: str) -> list[str]:
    """Registered names of `kind`, sorted."""
    return sorted(_table(kind))


def entry(kind: str, name: str) -> Entry:
    table = _table(kind)
    if name not in table:
        raise UnknownNameError(f"unknown {kind} {name!r}; choose from {', '.join(sorted(table))}")
    return table[name]


def accepted_options(factory: Callable, skip: int = 0) -> list[str] | None:
    """Keyword names `factory` accepts (after `skip` leading positionals), or None if it takes **kwargs."""
    params = list(inspect.signature(factory).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_options(kind: str, name: str, factory: Callable, options: dict, skip: int = 0) -> None:
    """One-line error listing the accepted keys when `options` holds keys `factory` does not take."""
    accepted = accepted_options(factory, skip)
    if accepted is None:
        return
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SslkitError(f"{kind} {name!r}: unknown option(s) {', '.join(unknown)}; "
                          f"accepted: {', '.join(accepted) or '(none)'}")


def create(kind: str, name: str, *args, **options) -> Any:
    """Build the `kind` registered as `name`; `options` are checked against its signature first."""
    e = entry(kind, name)
    check_options(kind, name, e.factory, options, skip=len(args))
    return e.factory(*args, **options)
