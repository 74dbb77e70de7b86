"""A `supervised` checkpoint as a classifier: trunk from the checkpoint's `trunk` spec, `classifier`
Linear from its `classifier.*` weights, class names from the manifest of the data it was trained on."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from .. import ckpt, trunk
from ..errors import SslkitError
from ..shard import manifest as mf

log = logging.getLogger("sslkit.pseudolabel")

CLASSIFIER = "classifier."


class PseudolabelError(SslkitError):
    """A pseudo-labelling or evaluation job that cannot run as asked (one line naming the file/sample)."""


class Classifier(nn.Module):
    """trunk -> Linear; `forward` returns logits."""

    def __init__(self, backbone: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.backbone, self.classifier = backbone, classifier

    def forward(self, x):
        return self.classifier(self.backbone(x))


@dataclass(frozen=True)
class Teacher:
    model: Classifier
    classes: list[str]          # class id -> name
    classes_from: str           # the manifest the names came from, or a sentence saying they are ids
    checkpoint: str             # the global.pt read
    identity: str               # sha256 of the architecture and every weight (part of the work folder key)
    size: int                   # default crop: the size the checkpoint trained at
    step: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolve(path: str) -> str:
    """A run folder, a checkpoint folder or a global.pt -> the verified file to read (`sslkit.trunk`)."""
    try:
        return trunk.resolve_checkpoint(path)
    except trunk.TrunkError as e:
        raise PseudolabelError(str(e)) from None


def class_names(g: dict, n: int, what: str) -> tuple[list[str], str]:
    """Class names of the checkpoint's training data (its manifest's `classes`), or ids "0".."n-1" with
    the reason when that manifest is gone or does not fit."""
    cfg = g.get("config") or {}
    candidates = [p for p in ((g.get("data") or {}).get("path"), cfg.get("data")) if p]
    why = "the checkpoint records no training data"
    for path in candidates:
        try:
            m = mf.load(path, check_files=False)
        except mf.ManifestError as e:
            why = f"its training data manifest is unreadable ({e})"
            continue
        classes = m.get("classes")
        if not classes:
            why = f"{path} is unlabelled"
            continue
        names = sorted(classes, key=classes.get) if isinstance(classes, dict) else list(classes)
        if len(names) != n:
            why = f"{path} has {len(names)} classes but the classifier has {n}"
            continue
        return names, os.path.join(os.path.abspath(path), mf.MANIFEST)
    note = f"class ids 0..{n - 1} (no class names: {why})"
    log.warning("%s: using %s", what, note)
    return [str(i) for i in range(n)], note


def load_teacher(path: str, device: torch.device | str = "cpu") -> Teacher:
    """The classifier of a `supervised` checkpoint (run folder, checkpoint folder or global.pt). The
    trunk is found, built and checked by `sslkit.trunk`, as for evaluation and export."""
    g_path = resolve(path)
    try:
        if os.path.basename(g_path) != "global.pt":
            raise PseudolabelError(f"{g_path}: expected a checkpoint's global.pt")
        g = ckpt.read_global(os.path.dirname(g_path))
        entry = trunk.trunk_entry(g, g_path)
        if entry["input"] != "rgb":
            raise PseudolabelError(f"{g_path}: a trunk with input {entry['input']!r}; a teacher must take RGB images")
        state = g.get("model") or {}
        cw, cb = state.get(CLASSIFIER + "weight"), state.get(CLASSIFIER + "bias")
        if cw is None or cw.dim() != 2:
            method = (g.get("config") or {}).get("method")
            raise PseudolabelError(f"{g_path}: no classifier.weight in the model (method {method!r}); the teacher "
                                   "must be a `supervised` run (train.py --method supervised)")
        backbone = trunk.build_trunk(entry["arch"], entry["kwargs"])
        trunk.load_weights(backbone, trunk.backbone_state(state, g_path), g_path)
    except SslkitError as e:   # a checkpoint or trunk error, named as the teacher's
        raise PseudolabelError(str(e)) from None
    if cw.shape[1] != backbone.num_features:
        raise PseudolabelError(f"{g_path}: classifier takes {cw.shape[1]} features, {entry['arch']} gives "
                               f"{backbone.num_features}")
    classifier = nn.Linear(cw.shape[1], cw.shape[0], bias=cb is not None)
    classifier.load_state_dict({"weight": cw, **({"bias": cb} if cb is not None else {})})
    model = Classifier(backbone, classifier).to(device).eval()
    classes, classes_from = class_names(g, cw.shape[0], g_path)
    size = int(((g.get("config") or {}).get("method_options") or {}).get("size") or 224)
    # the identity covers the trunk and the classifier (its weights decide the labels)
    kept = {k: v for k, v in state.items() if k.startswith((trunk.BACKBONE_PREFIX, CLASSIFIER))}
    identity = trunk.weights_identity(entry["arch"], entry["kwargs"], entry["input"], kept)
    return Teacher(model, classes, classes_from, os.path.abspath(g_path), identity, size, g.get("step"))


def default_resize(size: int) -> int:
    """Shorter side before the centre crop: crop_pct 0.875 (224 of 256), the timm default of the SSL models."""
    return int(round(size / 0.875))
