"""Billion-scale semi-supervised learning (Yalniz et al. 2019): teacher over unlabelled shards ->
class-balanced pseudo-labelled shards for the student.

    python -m sslkit.pseudolabel --teacher RUN --data UNLABELLED --top-p 10 --top-k K --out DIR
    python -m sslkit.pseudolabel evaluate --ckpt RUN --data LABELLED
    python -m sslkit.pseudolabel random-labels DIR --out DIR2

Modules: `teacher` (a supervised checkpoint as a classifier, with its class names), `scores` (the
resumable, per-rank teacher pass), `select` (top-P per image, bounded top-K per class), `write`
(student shards by byte copy; the random-label control), `run` (the job), `evaluate` (a classifier's
top-1), `cli`. The walkthrough is docs/SEMI_SUPERVISED.md.
"""

from .evaluate import evaluate
from .run import Options, pseudolabel
from .select import TopKSelector, select_topk, top_p
from .teacher import PseudolabelError, load_teacher
from .write import random_labels

__all__ = ["Options", "PseudolabelError", "TopKSelector", "evaluate", "load_teacher", "pseudolabel",
           "random_labels", "select_topk", "top_p"]
