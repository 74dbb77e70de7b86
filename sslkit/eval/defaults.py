"""The evaluation protocols' defaults, in a module that imports nothing heavy: the command line
shows them in `--help` without importing torch or DALI (the metric modules re-export them)."""

from __future__ import annotations

import os

# kNN (DINO's eval_knn): neighbour counts and the vote temperature, weights exp(sim / T)
DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
# linear probe (Goyal'19): lr per 256 images, epochs of the protocol
BASE_LR = 0.01
PROTOCOL_EPOCHS = 28
# SVMs (VISSL/Goyal'19): cost lists, cross-validation folds for the cost
DEFAULT_COSTS = (0.01, 0.1, 1.0, 10.0)   # short list for CPU runs
COST_LISTS = {
    "short": DEFAULT_COSTS,
    "vissl": (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0),
    "goyal": (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0),
}
FOLDS = 3
# low-shot: samples per class and independent draws per shot count
DEFAULT_SHOTS = (1, 2, 4, 8, 16, 32, 64, 96)
DEFAULT_DRAWS = 5
# feature cache folder
DEFAULT_CACHE = os.environ.get("SSLKIT_EVAL_CACHE", os.path.join(".cache", "eval-features"))
# what a trunk sees (the same tuple as sslkit.trunk.INPUTS, which imports torch)
INPUTS = ("rgb", "L")


def parse_costs(text: str) -> tuple[float, ...]:
    """A named list (short, vissl, goyal) or comma-separated numbers."""
    if text in COST_LISTS:
        return COST_LISTS[text]
    costs = tuple(float(v) for v in text.split(",") if v.strip())
    if not costs or any(c <= 0 for c in costs):
        raise ValueError(f"costs {text!r}: need positive numbers or one of {', '.join(COST_LISTS)}")
    return costs
