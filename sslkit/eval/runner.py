"""One evaluation run: the trunks to compare, their features, the metric, the report.

`run(opts)` evaluates the trunk named by `opts.ckpt` and, unless `opts.baseline` is False, the same
architecture at its seeded initialisation (`random`), so that every number is read beside what
the architecture gives without training. `--ckpt pixels` evaluates raw pixels instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import dali_device
from ..progress import DEFAULT_EVERY, Progress
from ..trunk import load_trunk, random_trunk
from . import features as feats
from . import knn, layers, linear, lowshot, svm
from .encoders import PixelEncoder, TrunkEncoder
from .errors import EvalError

@dataclass
class EvalOptions:
    kind: str
    ckpt: str
    train: str
    val: str
    arch: str | None = None
    arch_kwargs: dict | None = None
    input: str | None = None
    seed: int = 0
    layer: str | None = None
    size: int = 224
    resize: int = 256
    device: str = "cpu"
    batch_size: int = 256
    threads: int = 0
    cache_dir: str | None = feats.DEFAULT_CACHE
    baseline: bool = True
    progress: bool = True
    progress_every: float = DEFAULT_EVERY   # seconds between progress lines off a terminal
    # knn
    ks: tuple[int, ...] = knn.DEFAULT_KS
    temperature: float = knn.DEFAULT_TEMPERATURE
    # linear
    epochs: int = linear.PROTOCOL_EPOCHS
    lr: float = linear.BASE_LR
    weight_decay: float | None = None
    fast: bool = False
    train_scale: float = 0.08
    # svm / lowshot
    costs: tuple[float, ...] = svm.DEFAULT_COSTS
    folds: int = svm.FOLDS
    jobs: int = 1
    shots: tuple[int, ...] = lowshot.DEFAULT_SHOTS
    draws: int = lowshot.DEFAULT_DRAWS
    classifier: str = "svm"
    lowshot_k: int = 20
    extra: dict = field(default_factory=dict)   # recorded in the report as given (e.g. the command)


def subjects(o: EvalOptions) -> dict:
    """name -> encoder: the checkpoint (or pixels / a random trunk) and, by default, its random init."""
    if o.ckpt == "pixels":
        return {"pixels": PixelEncoder(o.device)}
    model, spec = load_trunk(o.ckpt, o.device, o.arch, o.arch_kwargs, o.input, o.seed)
    name = "random" if o.ckpt == "random" else "ckpt"
    out = {name: TrunkEncoder(model, spec, o.layer, o.size)}
    if o.baseline and name != "random":
        rmodel, rspec = random_trunk(spec.arch, spec.kwargs, spec.input, o.seed, o.device)
        out["random"] = TrunkEncoder(rmodel, rspec, o.layer, o.size)
    return out


def _features(o: EvalOptions, encoder, data_dir: str) -> feats.FeatureSet:
    return feats.extract(encoder, data_dir, size=o.size, resize=o.resize, device=o.device, batch_size=o.batch_size,
                         cache_dir=o.cache_dir, num_threads=o.threads, progress=o.progress,
                         progress_every=o.progress_every)


def _weight_decay(o: EvalOptions, encoder) -> float:
    if o.weight_decay is not None:
        return o.weight_decay
    fam = layers.family(encoder.model) if isinstance(encoder, TrunkEncoder) else "resnet"
    return linear.WEIGHT_DECAY[fam]


def _augmented_batches(o: EvalOptions, encoder):
    """(epoch -> batches, steps/epoch): the eval_train pipeline, the frozen trunk under no_grad."""
    from pipelines import make_loader
    loader = make_loader("eval_train", o.train, batch_size=o.batch_size, device=dali_device(o.device),
                         seed=o.seed, size=o.size, resize=o.resize, scale=(o.train_scale, 1.0), num_threads=o.threads)

    def batches(_epoch):
        for batch in loader:
            yield encoder(batch["views"][0]), batch["label"]

    return batches, len(loader)


def eval_linear(o: EvalOptions, encoder, train: feats.FeatureSet | None, val: feats.FeatureSet,
                name: str = "") -> dict:
    if o.fast:
        batches, steps = linear.cached_batches(train.x, train.labels, o.batch_size, o.seed)
    else:
        batches, steps = _augmented_batches(o, encoder)
    torch.manual_seed(o.seed)
    probe = linear.LinearProbe(val.x.shape[1], val.channels, val.num_classes).to(o.device)
    lr, wd = linear.scaled_lr(o.lr, o.batch_size), _weight_decay(o, encoder)
    with Progress(o.epochs * steps, f"linear probe {name} ({o.epochs} epochs)", unit="step", enabled=o.progress,
                  every=o.progress_every) as bar:
        def on_epoch(epoch, loss):
            bar.set_postfix(epoch=f"{epoch + 1}/{o.epochs}", loss=round(loss, 4))

        losses = linear.train_probe(probe, batches, o.epochs, steps, lr, wd, on_epoch=on_epoch,
                                    on_step=bar.update)
    mode = ("fast: cached centre-crop features, no augmentation (not the protocol)" if o.fast else
            f"protocol: eval_train RandomResizedCrop {o.size} (scale {o.train_scale}-1) + flip, trunk frozen")
    return {**linear.evaluate(probe, val.x, val.labels), "mode": mode, "epochs": o.epochs,
            "schedule": linear.epochs_note(o.epochs), "lr": lr, "weight_decay": wd, "batch_size": o.batch_size,
            "steps_per_epoch": steps, "train_loss": losses}


def _eval_knn(o: EvalOptions, encoder, train, val, name: str) -> dict:
    return knn.knn_eval(train.x, train.labels, val.x, val.labels, val.num_classes, o.ks, o.temperature, o.device)


def _eval_svm(o: EvalOptions, encoder, train, val, name: str) -> dict:
    with Progress(val.num_classes, f"SVMs {name}", unit="class", enabled=o.progress, every=o.progress_every) as bar:
        return svm.svm_eval(train.x.numpy(), train.labels.numpy(), val.x.numpy(), val.labels.numpy(),
                            val.num_classes, o.costs, o.folds, o.jobs, on_class=bar.update)


def _eval_lowshot(o: EvalOptions, encoder, train, val, name: str) -> dict:
    draws = o.draws * len(lowshot.feasible_shots(train.labels.numpy(), val.num_classes, o.shots))
    with Progress(draws, f"low-shot {name}", unit="draw", enabled=o.progress, every=o.progress_every) as bar:
        return lowshot.lowshot_eval(train.x.numpy(), train.labels.numpy(), val.x.numpy(), val.labels.numpy(),
                                    val.num_classes, o.shots, o.draws, o.seed, o.classifier, o.costs, o.folds,
                                    o.lowshot_k, o.temperature, o.jobs, on_draw=bar.update)


# evaluation kind -> its metric: (options, encoder, train features or None, val features, subject name) -> result
KINDS = {"knn": _eval_knn, "linear": eval_linear, "svm": _eval_svm, "lowshot": _eval_lowshot}


def evaluate(o: EvalOptions, encoder, timings: dict, name: str) -> dict:
    if o.kind not in KINDS:
        raise EvalError(f"unknown evaluation {o.kind!r}; choose from {', '.join(KINDS)}")
    t0 = time.perf_counter()
    need_train = not (o.kind == "linear" and not o.fast)   # the protocol's probe trains on augmented crops
    train = _features(o, encoder, o.train) if need_train else None
    val = _features(o, encoder, o.val)   # classes were compared before any extraction (check_classes)
    t1 = time.perf_counter()
    res = KINDS[o.kind](o, encoder, train, val, name)
    timings[name] = {"features": t1 - t0, "eval": time.perf_counter() - t1}
    res["dims"] = int(val.x.shape[1])
    res["caches"] = [fs.meta.get("cache") for fs in (train, val) if fs is not None]
    return res


def _names(names, limit: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_classes(train: dict, val: dict) -> None:
    """The train and val folders' class names by id (`features.data_info`) must be equal: checked from
    the manifests before any feature is extracted. One line saying how they differ."""
    a, b = train["classes"], val["classes"]
    if a == b:
        return
    only_a, only_b = [c for c in a if c not in set(b)], [c for c in b if c not in set(a)]
    if only_a or only_b:
        how = (f"{len(a)} vs {len(b)} classes; only in train: {_names(only_a) or '-'}; "
               f"only in val: {_names(only_b) or '-'}")
    else:
        moved = [f"{c} ({i} vs {b.index(c)})" for i, c in enumerate(a) if b[i] != c]
        how = f"the same {len(a)} names under other ids: {_names(moved)}"
    raise EvalError(f"{train['dir']} and {val['dir']} have different classes ({how}); evaluate on folders built "
                    "with the same labels")


def run(o: EvalOptions) -> dict:
    """Evaluate every subject; returns the report (also what `--out` writes)."""
    if o.kind not in KINDS:
        raise EvalError(f"unknown evaluation {o.kind!r}; choose from {', '.join(KINDS)}")
    if o.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda but torch sees no CUDA device; use --device cpu")
    t0 = time.perf_counter()
    train_info, val_info = feats.data_info(o.train), feats.data_info(o.val)
    check_classes(train_info, val_info)
    encs = subjects(o)
    timings: dict = {}
    results = {name: evaluate(o, enc, timings, name) for name, enc in encs.items()}
    opts = {k: v for k, v in asdict(o).items() if k not in ("extra",)}
    return {"eval": o.kind, "results": results, "subjects": {n: e.describe() for n, e in encs.items()},
            "train": {k: v for k, v in train_info.items() if k != "classes"},
            "val": {k: v for k, v in val_info.items() if k != "classes"}, "classes": val_info["classes"],
            "crop": {"size": o.size, "resize": o.resize, "pipeline": "eval_val (resize shorter side, centre crop)"},
            "options": opts, "seconds": {"total": time.perf_counter() - t0, **timings}, **o.extra}


def title(report: dict) -> str:
    o = report["options"]
    subj = next(iter(report["subjects"].values()))
    what = {"knn": f"kNN (weighted votes, T={o['temperature']})", "svm": "linear SVMs (one per class)",
            "lowshot": f"low-shot {o['classifier']} ({o['draws']} draws)", "linear": "linear probe"}[report["eval"]]
    first = next(iter(report["results"].values()))
    extra = f"; {first['mode']}" if report["eval"] == "linear" else ""
    return (f"{what}: train {report['train']['total']} / val {report['val']['total']} images, "
            f"layer {subj.get('layer')} ({first['dims']} dims), crop {o['size']} of {o['resize']}{extra}")
