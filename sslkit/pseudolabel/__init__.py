"""Billion-scale semi-supervised learning (Yalniz et al. 2019): teacher over unlabelled shards ->
class-balanced pseudo-labelled shards for the student.

    python -m sslkit.pseudolabel --teacher RUN --data UNLABELLED --top-p 10 --top-k K --out DIR
    python -m sslkit.pseudolabel evaluate --ckpt RUN --data LABELLED
    python -m sslkit.pseudolabel random-labels DIR --out DIR2

Modules: `teacher` (a supervised checkpoint as a classifier, with its class names), `scores` (the
resumable, per-rank teacher pass), `select` (top-P per image, bounded top-K per class), `write`
(student shards by byte copy; the random-label control), `run` (the job), `evaluate` (a classifier's
top-1), `cli`. The walkthrough is docs/SEMI_SUPERVISED.md.

The names below are imported on first use, so that `python -m sslkit.pseudolabel --help` (which
imports this package) does not pay for torch and DALI.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_EXPORTS = {"evaluate": "evaluate", "Options": "run", "pseudolabel": "run", "TopKSelector": "select",
            "select_topk": "select", "top_p": "select", "PseudolabelError": "teacher", "load_teacher": "teacher",
            "random_labels": "write"}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
