"""A tiny name -> model-factory registry: `register`, `create`, `list_models`."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch.nn as nn

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

# The only global mutable state of the package: filled once, at import, by the decorators below.
_MODELS: dict[str, Factory] = {}


def register(name: str) -> Callable[[F], F]:
    """Decorator that files a model factory under `name`; a name can be registered only once."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def deco(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"register({name!r}) needs a callable, got {type(fn).__name__}")
        if name in _MODELS:
            # Silently replacing a model would make `create` depend on import order.
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__}."
                             f"{_MODELS[name].__qualname__})")
        _MODELS[name] = fn
        return fn

    return deco


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as `name`, passing `kwargs` to its factory."""
    try:
        factory = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return factory(**kwargs)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)
