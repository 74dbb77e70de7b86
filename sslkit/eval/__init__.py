"""Evaluation of frozen features: kNN, linear probe, per-class SVMs, low-shot.

    python -m sslkit.eval knn|linear|svm|lowshot --ckpt RUN_OR_CKPT --train DIR --val DIR [...]

Modules: `features` (DALI extraction in stored order + resumable on-disk cache), `encoders` (trunk
layer or raw pixels -> features), `layers` (which layer, pooled how), the metrics as pure functions
in `knn`, `linear`, `svm`, `lowshot`, the orchestration in `runner`, printing in `report`, and the
command line in `cli`.
"""

from .errors import EvalError
from .features import FeatureSet, extract
from .knn import knn_eval, knn_scores, topk_accuracy
from .lowshot import lowshot_eval, sample_lowshot
from .runner import EvalOptions, run
from .svm import choose_cost, svm_eval, voc_ap

__all__ = ["EvalError", "EvalOptions", "FeatureSet", "choose_cost", "extract", "knn_eval", "knn_scores",
           "lowshot_eval", "run", "sample_lowshot", "svm_eval", "topk_accuracy", "voc_ap"]
