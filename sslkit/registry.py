"""One registry for everything built by name: `register(kind, name)`, `create(kind, name, **opts)`.

Kinds and the package whose import fills them (this module imports none of them: it sits below them;
each package's front door -- `sslkit.models.create`, `sslkit.methods.method_entry`,
`pipelines.make_loader` -- is what callers import, and importing it registers its entries):
    model     sslkit.models      a trunk factory, e.g. create("model", "resnet50", num_classes=0)
    method    sslkit.methods     an SSL method class, built by the trainer from (cfg, ctx); declared, with
                                 its options and presets, in sslkit.recipes (no torch)
    pipeline  pipelines          a DALI view family, built by pipelines.make_loader

Registration happens once, at import, through the decorator; a name registered twice is an error
(otherwise `create` would depend on import order). `create` checks the options against the
factory's signature and lists the accepted ones, so a typo is a one-line error, never a TypeError
from deep inside a constructor.

A declared kind (DECLARED_IN) is filed in two steps, so that what needs only an entry's facts does
not wait for its factory's imports: resolving or printing a run's config needs a method's options
and presets, not torch. The light package `declare`s each name with its facts (`meta`); the package
of KINDS registers the factory under a declared name once it is imported. There is one table and one
entry per name: the link is the name, no module path is stored and nothing is imported by name.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from .errors import SslkitError, UnknownNameError

# The package that registers the entries of each kind (for messages: callers import it, see above).
KINDS = {"model": "sslkit.models", "method": "sslkit.methods", "pipeline": "pipelines"}
# The light package that declares the entries of a declared kind, with their facts.
DECLARED_IN = {"method": "sslkit.recipes"}


class Entry:
    """A registered name: its `kind`, its facts `meta` (a method's options and presets, ...) and its
    `factory`; a declared entry's factory is registered later, by the package of KINDS[kind]."""
    __slots__ = ("kind", "name", "meta", "_factory")

    def __init__(self, kind: str, name: str, meta: dict, factory: Callable | None = None):
        self.kind, self.name, self.meta, self._factory = kind, name, meta, factory

    @property
    def factory(self) -> Callable:
        if self._factory is None:     # declared only, so far: the package that registers it has not run
            raise LookupError(f"{self.kind} {self.name!r} is declared in {DECLARED_IN[self.kind]} but has no "
                              f"class: import {KINDS[self.kind]} (which registers them) before building one")
        return self._factory

    def __repr__(self):
        return f"Entry({self.kind!r}, {self.name!r}, factory={self._factory!r}, meta={self.meta!r})"


_ENTRIES: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def _check_name(kind: str, name: str):
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")


def declare(kind: str, name: str, **meta) -> Entry:
    """File `name` of a declared kind with its facts; its factory is registered later (`register`)."""
    _check_name(kind, name)
    if kind not in DECLARED_IN:
        raise ValueError(f"{kind} entries are registered with their factory, not declared")
    if name in _ENTRIES[kind]:
        raise ValueError(f"{kind} {name!r} is already declared")
    entry = _ENTRIES[kind][name] = Entry(kind, name, dict(meta))
    return entry


def register(kind: str, name: str, **meta) -> Callable:
    """Decorator filing `factory` under (kind, name); for a declared kind, under a declared name, whose
    facts are its declaration's (so `meta` must be empty)."""
    _check_name(kind, name)

    def deco(factory):
        if not callable(factory):
            raise TypeError(f"register({kind!r}, {name!r}) needs a callable, got {type(factory).__name__}")
        table = _table(kind) if kind in DECLARED_IN else _ENTRIES[kind]   # the declarations first
        if kind in DECLARED_IN and name not in table:
            raise ValueError(f"{kind} {name!r} is not declared: declare it, with its facts, in {DECLARED_IN[kind]}")
        if kind in DECLARED_IN and meta:
            raise ValueError(f"register({kind!r}, {name!r}): {', '.join(sorted(meta))} belong in its declaration "
                             f"in {DECLARED_IN[kind]}")
        old = table[name]._factory if name in table else None
        if old is not None:
            raise ValueError(f"{kind} {name!r} is already registered (by {old.__module__}.{old.__qualname__})")
        if kind in DECLARED_IN:
            table[name]._factory = factory
        else:
            table[name] = Entry(kind, name, dict(meta), factory)
        return factory

    return deco


def _table(kind: str) -> dict[str, Entry]:
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")
    if not _ENTRIES[kind]:
        raise LookupError(f"no {kind} is registered: import {DECLARED_IN.get(kind, KINDS[kind])} first")
    return _ENTRIES[kind]


def names(kind: str) -> list[str]:
    """Registered (or declared) names of `kind`, sorted."""
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
