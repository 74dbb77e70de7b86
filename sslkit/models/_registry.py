"""Model names -> factories, through the project's one registry (`sslkit.registry`, kind "model")."""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from .. import registry


def register(name: str) -> Callable:
    """Decorator that files a model factory under `name`; a name can be registered only once."""
    return registry.register("model", name)


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as `name`, passing `kwargs` to its factory."""
    return registry.create("model", name, **kwargs)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return registry.names("model")
