"""Evaluation of frozen features: kNN, linear probe, per-class SVMs, low-shot.

    python -m sslkit.eval knn|linear|svm|lowshot --ckpt RUN_OR_CKPT --train DIR --val DIR [...]

Modules: `features` (DALI extraction in stored order + resumable on-disk cache), `encoders` (trunk
layer or raw pixels -> features), `layers` (which layer, pooled how), the metrics as pure functions
in `knn`, `linear`, `svm`, `lowshot`, the orchestration in `runner`, printing in `report`, the
protocols' defaults in `defaults`, and the command line in `cli`.

The names below are imported on first use, so that `python -m sslkit.eval --help` (which imports
this package) does not pay for torch and DALI.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_EXPORTS = {
    "EvalError": "errors", "FeatureSet": "features", "extract": "features", "knn_eval": "knn",
    "knn_scores": "knn", "topk_accuracy": "knn", "lowshot_eval": "lowshot", "sample_lowshot": "lowshot",
    "EvalOptions": "runner", "run": "runner", "choose_cost": "svm", "svm_eval": "svm", "voc_ap": "svm",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
