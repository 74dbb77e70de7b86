"""What a throughput row measures, and how: the DALI decode-only limit, a pipeline through the real
loader, its PIL + webdataset + DataLoader baseline; warm-up, timed rounds, one record per row.

Warm-up drains what the stage prefetched before the clock starts (DALI's prefetch queue; the
DataLoader's workers x prefetch_factor batches): otherwise a short timed round on many cores would
also count batches made during the warm-up, and read an inflated rate.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
import statistics
import sys
import time

import torch
from nvidia.dali import pipeline_def

import baseline_pil as B
from pipelines import LoaderConfig, ShardSet, make_loader
from pipelines.augment import decode
from pipelines.loader import epoch_order
from pipelines.reader import SampleSource, read
from report import cfg_label, new_record, progress

def _multicrop(opts, seed):
    from pipelines.multicrop import MultiCrop
    return B.MultiCropPIL(MultiCrop(**opts).spec, seed)


def _eval(train):
    def make(opts, seed):
        from pipelines.eval import EvalTrain, EvalVal
        return B.EvalPIL((EvalTrain if train else EvalVal)(**opts).spec, train=train, seed=seed)
    return make


BASELINES = {
    "decode": lambda opts, seed: B.decode_only,
    "multicrop": _multicrop,
    "eval_train": _eval(True),
    "eval_val": _eval(False),
    "jigsaw": lambda opts, seed: B.JigsawPIL(B.JigsawRecipe(), seed),
    "colorization": lambda opts, seed: B.ColorizationPIL(B.ColorizationRecipe(), seed),
    "jigclu": lambda opts, seed: B.JigCluPIL(B.JigCluRecipe(), seed),
}


def baseline_recipe(transform) -> dict:
    """What the baseline ran, as plain data for the JSON (spec/recipe dataclasses)."""
    from dataclasses import asdict, is_dataclass
    for attr in ("spec", "recipe"):
        value = getattr(transform, attr, None)
        if is_dataclass(value):
            return {"transform": type(transform).__name__, attr: asdict(value)}
    return {"transform": getattr(transform, "__name__", type(transform).__name__)}




@dataclass
class Stage:
    batches: Iterator              # endless
    count: Callable[[Any], int]    # source images in one batch
    recipe: dict                   # what ran (the pipeline's description or the baseline's spec)
    prefetched: int                # batches the stage may have made ahead of the consumer
    keep: list = field(default_factory=list)   # objects to keep alive while measuring


def timed_rounds(stage: Stage, args, sync) -> dict:
    """Warm-up (untimed; at least one batch more than the stage prefetches), then `rounds` x
    `batches`."""
    batches, count = stage.batches, stage.count
    warmup = max(args.warmup, stage.prefetched + 1)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(batches)
    sync()
    warmup_s = time.perf_counter() - t0
    rounds = []
    for _ in range(args.rounds):
        images = 0
        sync()
        t = time.perf_counter()
        for _ in range(args.batches):
            images += count(next(batches))
        sync()  # GPU work queued by the last batches belongs to this round
        seconds = time.perf_counter() - t
        rounds.append({"images": images, "seconds": seconds, "images_per_s": images / seconds})
    rates = [r["images_per_s"] for r in rounds]
    return {"warmup_batches": warmup, "warmup_s": warmup_s, "rounds": rounds,
            "images_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}}


def forever(loader):
    """Batches across epoch boundaries: a round may be longer than an epoch of a small shard folder."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError("the loader yielded no batch in a whole epoch")


def decode_stage(args, cfg):
    """The DALI decode-only pipeline: the shared reader stage and the decoder, nothing after it.
    Reader options are the loader's defaults, so it does exactly the reading a pipeline does."""
    shards = ShardSet.open(args.data)
    defaults = LoaderConfig(batch_size=cfg["batch_size"], seed=args.seed)
    hw = cfg["hw_decoder_load"]  # GPU rows always carry one (the loader's default unless swept)
    source = SampleSource(shards, lambda epoch: epoch_order(shards, defaults, epoch), 0, 0, 0, defaults.batch_size,
                          want_label=False, extra_keys=(), use_mmap=defaults.use_mmap)

    @pipeline_def
    def decode_only():
        jpg, _, _ = read(source)
        return decode(jpg, args.device, hw)  # read() already swapped damaged samples for the placeholder

    pipe = decode_only(batch_size=cfg["batch_size"], num_threads=cfg["threads"],
                       device_id=0 if args.device == "gpu" else None, seed=args.seed,
                       prefetch_queue_depth=defaults.prefetch)
    pipe.build()

    def batches():
        while True:
            (images,) = pipe.run()  # decoded images stay in DALI's buffers: no copy is charged
            yield len(images)

    return Stage(batches(), lambda n: n, {"graph": "pipelines.reader.read -> pipelines.augment.decode"},
                 defaults.prefetch, [pipe])


def loader_stage(args, cfg, name):
    kw = dict(args.options.get(name, {}))
    if cfg["hw_decoder_load"] is not None:
        kw["hw_decoder_load"] = cfg["hw_decoder_load"]
    loader = make_loader(name, args.data, batch_size=cfg["batch_size"], device=args.device, seed=args.seed,
                         num_threads=cfg["threads"], **kw)
    return Stage(forever(loader), lambda b: b["index"].numel(), loader.describe(), loader.config.prefetch, [loader])


# Baselines whose recipe follows --option (they read the DALI family's own spec).
FOLLOWS_OPTIONS = {"decode", "multicrop", "eval_train", "eval_val"}


def baseline_stage(args, cfg, name):
    if args.options.get(name) and name not in FOLLOWS_OPTIONS:
        print(f"throughput.py: note: --option {name}.* applies to the DALI family only; the {name} baseline "
              "runs its reference recipe (both recipes are in the JSON)", file=sys.stderr)
    transform = BASELINES[name](args.options.get(name, {}), args.seed)
    gpu = args.device == "gpu"
    dl = B.make_loader(list(ShardSet.open(args.data).tars), transform, cfg["batch_size"], workers=cfg["threads"],
                       seed=args.seed, resampled=True, pin_memory=gpu)

    def batches():
        for batch in dl:
            if gpu:  # the common way ends with the batch on the device, like the DALI loader's
                batch = [t.to("cuda", non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch]
            yield batch

    # Each worker keeps B.PREFETCH_FACTOR batches ready: that many per worker are drained in the warm-up.
    return Stage(batches(), lambda b: len(b[0]), baseline_recipe(transform), cfg["threads"] * B.PREFETCH_FACTOR,
                 [dl])


def measure(args, cfg, mode, pipeline, impl, stage) -> dict:
    """One record: build (untimed), warm up, time the rounds; a failure becomes a 'failed' row."""
    rec = new_record(mode, pipeline, impl, args, cfg)
    sync = torch.cuda.synchronize if args.device == "gpu" else (lambda: None)
    built = None
    t = time.perf_counter()
    try:
        built = stage()
        rec["recipe"] = built.recipe
        rec["build_s"] = time.perf_counter() - t
        rec.update(timed_rounds(built, args, sync))
        rec["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one pipeline failing must not hide the others' figures
        rec["status"], rec["note"] = "failed", _one_line(e)
        print(f"throughput.py: {pipeline} ({impl}, {cfg_label(cfg)}) failed: {rec['note']}", file=sys.stderr)
    finally:
        # Stop DALI threads / DataLoader workers before the next row, so rows never share the CPU.
        if built is not None:
            built.batches.close()
        del built
        gc.collect()
    progress(rec)
    return rec


def _one_line(e: BaseException) -> str:
    """The informative line of an exception: DALI's StagingError, for one, starts with 'in user
    code:' and ends with the actual error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    line = lines[-1] if lines[0].endswith(":") else lines[0]
    return f"{type(e).__name__}: {line}"[:300]
