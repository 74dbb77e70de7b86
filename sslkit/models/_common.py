"""Helpers shared by the model files."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

# A named step of a trunk: (feature name, function from the previous output to this one).
Stage = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def check_num_classes(num_classes: int | None) -> int:
    """None -> 0; negative or non-integer -> error."""
    if num_classes is None:
        return 0
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 or None, got {num_classes!r}")
    return num_classes


def run_stages(stages: list[Stage], x: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """Run `stages` in order up to the deepest requested name; return the requested outputs."""
    if isinstance(layers, str):  # a bare "res5" would otherwise be read as five one-letter names
        layers = (layers,)
    wanted = list(layers)
    names = [n for n, _ in stages]
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise ValueError(f"unknown or no feature layers {unknown or wanted}; choose from {names}")
    last = max(names.index(n) for n in wanted)
    out: dict[str, torch.Tensor] = {}
    for name, step in stages[: last + 1]:
        x = step(x)
        out[name] = x
    return {n: out[n] for n in wanted}
