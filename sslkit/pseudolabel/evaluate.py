"""Top-1 / top-5 of a `supervised` checkpoint's own classifier on a labelled shard folder.

`python -m sslkit.eval` measures frozen features (kNN, linear probe, ...); the semi-supervised recipe
needs the accuracy of the trained classifier itself (teacher, student, fine-tuned student). Classes are
matched by name between the checkpoint's training data and the evaluated folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from ..config import dali_device
from ..progress import DEFAULT_EVERY, Progress
from ..shard import manifest as mf
from .teacher import PseudolabelError, default_resize, load_teacher

log = logging.getLogger("sslkit.pseudolabel")


def class_map(model_classes: list[str], classes_from: str, data_classes: dict, data_dir: str) -> torch.Tensor:
    """data class id -> model class id."""
    names = sorted(data_classes, key=data_classes.get)
    known = {c: i for i, c in enumerate(model_classes)}
    if not classes_from.endswith(mf.MANIFEST):
        # the checkpoint's class names are unknown: ids are all there is
        if len(names) != len(model_classes):
            raise PseudolabelError(f"{data_dir}: {len(names)} classes, the classifier has {len(model_classes)} and "
                                   "its class names are unknown")
        log.warning("%s: class names of the checkpoint unknown; assuming the same class ids", data_dir)
        return torch.arange(len(names))
    missing = [c for c in names if c not in known]
    if missing:
        raise PseudolabelError(f"{data_dir}: class(es) {missing[:5]} are not among the classifier's classes "
                               f"({classes_from})")
    return torch.tensor([known[c] for c in names])


def evaluate(ckpt: str, data: str, size: int | None = None, resize: int | None = None, batch_size: int = 256,
             device: str = "auto", loader_threads: int = 0, progress: bool = True,
             progress_every: float = DEFAULT_EVERY) -> dict:
    from pipelines import LoaderError, make_loader

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    teacher = load_teacher(ckpt, dev)
    try:
        m = mf.load(data)
    except mf.ManifestError as e:
        raise PseudolabelError(str(e)) from None
    if not m["classes"]:
        raise PseudolabelError(f"{data}: unlabelled; evaluation needs labelled shards")
    to_model = class_map(teacher.classes, teacher.classes_from, m["classes"], data).to(dev)
    size = size or teacher.size
    resize = resize or default_resize(size)
    on_gpu = dev.type == "cuda"
    try:
        loader = make_loader("eval_val", data, batch_size=batch_size, device=dali_device(dev),
                             shuffle_buffer=1, size=size, resize=resize, num_threads=loader_threads)
    except LoaderError as e:
        raise PseudolabelError(f"{data}: {e}") from None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext
    k = min(5, teacher.num_classes)
    n = top1 = topk = 0
    t0 = time.perf_counter()
    with torch.inference_mode(), Progress(m["total"], f"evaluate {os.path.basename(os.path.normpath(data))}",
                                          unit="img", enabled=progress, every=progress_every) as bar:
        for batch in loader:
            x = batch["views"][0].to(dev)
            with autocast():
                logits = teacher.model(x).float()
            target = to_model[batch["label"].to(dev)]
            pred = logits.topk(k, dim=1).indices
            top1 += int((pred[:, 0] == target).sum())
            topk += int((pred == target[:, None]).any(1).sum())
            n += x.shape[0]
            bar.update(x.shape[0], top1=f"{100 * top1 / n:.1f}%")
    if n != m["total"]:
        raise PseudolabelError(f"{data}: the loader gave {n} samples of {m['total']}")
    return {"checkpoint": teacher.checkpoint, "step": teacher.step, "data": os.path.abspath(data), "samples": n,
            "top1": top1 / n, f"top{k}": topk / n, "size": size, "resize": resize,
            "classes_from": teacher.classes_from, "seconds": time.perf_counter() - t0}
