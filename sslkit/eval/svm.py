"""Per-class linear SVMs on frozen features (Goyal'19 / VISSL VOC07 protocol).

For each class c: labels +1 (class c) / -1 (the rest); features x / (||x|| + 1e-5); a LinearSVC
(squared hinge, L2, dual, tol 1e-4, max_iter 2000, class_weight {+1: 2, -1: 1}) per cost; the cost
with the best 3-fold cross-validated average precision (sklearn's `average_precision`, as VISSL's
`cross_val_score` uses; unshuffled stratified folds) is refit on all training samples.

Test metric: VOC-style AP of each class's decision values on the val set, i.e. the all-point
interpolated AP of VOC2010+ (precision made monotone from the right, summed over every recall step)
as VISSL's `svm_utils/evaluate.calculate_ap` computes it, not VOC2007's 11-point AP; mAP is its mean
over classes. For single-label data the argmax of the decision values also gives a top-1 accuracy.
"""

from __future__ import annotations

import warnings

import numpy as np

from .defaults import COST_LISTS, DEFAULT_COSTS, FOLDS, parse_costs  # noqa: F401 - re-exported

FALLBACK_COST = 1.0   # when a class has too few positives (or negatives) to cross-validate


def svm_normalize(x: np.ndarray) -> np.ndarray:
    """x / (||x|| + 1e-5) per row (VISSL's SVM feature normalisation)."""
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


def make_svm(cost: float):
    from sklearn.svm import LinearSVC
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, loss="squared_hinge", penalty="l2", dual=True,
                     tol=1e-4, max_iter=2000, intercept_scaling=1.0, random_state=0)


def voc_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """All-point interpolated AP. targets: 1 positive, 0 or -1 negative. Samples are ranked by score,
    highest first (ties in the order given); NaN when there is no positive."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0
    npos = int(targets.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(targets[order])
    fp = np.cumsum(~targets[order])
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]   # the monotone envelope, from the right
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def cv_scores(x: np.ndarray, y: np.ndarray, costs, folds: int = FOLDS) -> list[float]:
    """Mean `folds`-fold cross-validated average precision of the SVM at each cost (y in {+1, -1})."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    cv = StratifiedKFold(n_splits=folds, shuffle=False)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # ConvergenceWarning at max_iter, as in the reference runs
        for c in costs:
            out.append(float(cross_val_score(make_svm(c), x, y, cv=cv, scoring="average_precision").mean()))
    return out


def choose_cost(x: np.ndarray, y: np.ndarray, costs, folds: int = FOLDS,
                fallback: float = FALLBACK_COST) -> tuple[float, list[float] | None]:
    """(best cost, CV score of every cost). Ties go to the cost listed first. With fewer than 2
    positives or negatives nothing can be cross-validated: (fallback, None). Fewer samples of a side
    than `folds` lower the fold count to what the data allows."""
    n_pos, n_neg = int((y > 0).sum()), int((y <= 0).sum())
    k = min(folds, n_pos, n_neg)
    if k < 2 or len(costs) == 1:
        return (costs[0] if len(costs) == 1 else fallback), None
    scores = cv_scores(x, y, costs, k)
    return costs[int(np.argmax(scores))], scores


def _one_class(c: int, x, labels, val_x, costs, folds, fallback):
    y = np.where(labels == c, 1, -1)
    cost, scores = choose_cost(x, y, costs, folds, fallback)
    svm = make_svm(cost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svm.fit(x, y)
    return cost, scores, svm.decision_function(val_x)


def svm_eval(train_x, train_y, val_x, val_y, num_classes: int, costs=DEFAULT_COSTS, folds: int = FOLDS,
             jobs: int = 1, fallback: float = FALLBACK_COST, on_class=None) -> dict:
    """One-vs-rest SVMs for every class: {"mAP", "top1", "ap": [per class], "cost": [per class],
    "cv": [per class CV scores or None]}. Classes absent from the training set get AP NaN and are
    left out of the mAP. `on_class()` is called as each class's SVM is done (progress)."""
    from joblib import Parallel, delayed
    x, vx = svm_normalize(train_x), svm_normalize(val_x)
    ty, vy = np.asarray(train_y), np.asarray(val_y)
    present = [c for c in range(num_classes) if (ty == c).any()]
    fits = Parallel(n_jobs=jobs, return_as="generator")(delayed(_one_class)(c, x, ty, vx, costs, folds, fallback)
                                                         for c in present)
    decision = np.full((vx.shape[0], num_classes), -np.inf)
    ap, cost, cv = [float("nan")] * num_classes, [None] * num_classes, [None] * num_classes
    for c, (best, scores, d) in zip(present, fits):
        if on_class:
            on_class()
        decision[:, c] = d
        ap[c], cost[c], cv[c] = voc_ap(d, vy == c), best, scores
    valid = [a for a in ap if not np.isnan(a)]
    return {"mAP": float(np.mean(valid)) if valid else float("nan"),
            "top1": float((decision.argmax(1) == vy).mean()), "ap": ap, "cost": cost, "cv": cv}
