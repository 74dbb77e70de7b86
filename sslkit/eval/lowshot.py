"""Low-shot evaluation (Goyal'19): k training samples per class, several draws.

Each draw keeps exactly k samples of every class (for single-label data that is the VOC protocol's
k positives and (classes - 1) k negatives per one-vs-rest SVM), trains the SVM (or kNN) on them and
tests on the full val set. Reported: mean and std over draws. Draw d of shot k is a function of
(seed + d, k) only, so reruns and different trunks see the same samples.
"""

from __future__ import annotations

import numpy as np
import torch

from .defaults import DEFAULT_DRAWS, DEFAULT_SHOTS
from .knn import knn_eval
from .svm import DEFAULT_COSTS, FOLDS, svm_eval


def sample_lowshot(labels, k: int, seed: int, num_classes: int | None = None) -> np.ndarray:
    """Sorted row indices holding exactly `k` samples of each class 0..num_classes-1 (default: every
    class present), drawn without replacement, deterministic in (seed, k)."""
    labels = np.asarray(labels)
    classes = range(num_classes) if num_classes is not None else np.unique(labels)
    rng = np.random.default_rng([seed, k])
    rows = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if members.size < k:
            raise ValueError(f"class {c} has {members.size} samples, fewer than {k} shots")
        rows.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(rows))


def feasible_shots(train_y, num_classes: int, shots) -> list[int]:
    """The shot counts every class can supply (the others are skipped)."""
    train_y = np.asarray(train_y)
    smallest = min(int((train_y == c).sum()) for c in range(num_classes))
    return [k for k in shots if k <= smallest]


def lowshot_eval(train_x, train_y, val_x, val_y, num_classes: int, shots=DEFAULT_SHOTS, draws: int = DEFAULT_DRAWS,
                 seed: int = 0, classifier: str = "svm", costs=DEFAULT_COSTS, folds: int = FOLDS, knn_k: int = 20,
                 temperature: float = 0.07, jobs: int = 1, on_draw=None) -> dict:
    """{"classifier": ..., "shots": {"k": {metric: {"mean", "std", "draws": [...]}}}} for every shot
    count k that every class can supply; metrics: mAP and top1 (SVM) or top1 and top5 (kNN with
    min(knn_k, samples) neighbours)."""
    train_x, val_x = np.asarray(train_x, dtype=np.float32), np.asarray(val_x, dtype=np.float32)
    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    out = {}
    for k in feasible_shots(train_y, num_classes, shots):
        per_draw = []
        for d in range(draws):
            rows = sample_lowshot(train_y, k, seed + d, num_classes)
            if classifier == "svm":
                r = svm_eval(train_x[rows], train_y[rows], val_x, val_y, num_classes, costs, folds, jobs)
                per_draw.append({"mAP": r["mAP"], "top1": r["top1"]})
            else:
                nn_k = min(knn_k, len(rows))
                r = knn_eval(*map(torch.from_numpy, (train_x[rows], train_y[rows], val_x, val_y)), num_classes,
                             (nn_k,), temperature)
                per_draw.append({"top1": r["top1"][str(nn_k)], "top5": r["top5"][str(nn_k)]})
            if on_draw:
                on_draw()
        out[str(k)] = {m: {"mean": float(np.mean([p[m] for p in per_draw])),
                           "std": float(np.std([p[m] for p in per_draw])),
                           "draws": [p[m] for p in per_draw]} for m in per_draw[0]}
    return {"classifier": classifier, "shots": out}
