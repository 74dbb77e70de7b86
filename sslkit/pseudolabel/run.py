"""The pseudo-labelling job: teacher pass (every rank) -> top-K selection -> student shards (rank 0)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..progress import DEFAULT_EVERY
from ..shard import manifest as mf
from . import scores as sc
from .select import SelectionError, TopKSelector, records
from .teacher import PseudolabelError, default_resize, load_teacher
from .write import check_out, write_student

log = logging.getLogger("sslkit.pseudolabel")


@dataclass(frozen=True)
class Options:
    teacher: str                    # run folder, checkpoint folder or global.pt of a `supervised` run
    data: str                       # the unlabelled shard folder (labels, if any, are not used)
    out: str                        # the student shard folder
    top_p: int = 10
    top_k: int = 16_000
    size: int | None = None         # eval crop; default: the teacher's training crop
    resize: int | None = None       # shorter side before the crop; default: size / 0.875
    batch_size: int = 256
    chunk: int = 50_000             # images per committed chunk of the teacher pass
    device: str = "auto"            # auto | cpu | cuda
    precision: str = "auto"         # auto (bf16 autocast on cuda, fp32 on cpu) | bf16 | fp32
    work: str | None = None         # teacher scores and journals; default <out>/.pseudolabel
    shuffle: bool = True            # write the student set in a seeded random order (DALI shuffles only in a buffer)
    seed: int = 0
    prefix: str = "shard"
    max_count: int = 10_000         # samples per output shard
    max_size: int = 1_000_000_000   # bytes per output shard
    io_threads: int = 8             # parallel source-shard reads when copying images
    loader_threads: int = 0
    progress: bool = True
    progress_every: float = DEFAULT_EVERY   # seconds between progress lines off a terminal
    stop_after_chunks: int | None = None   # time-boxed runs and tests: stop after N new chunks per rank
    stop_after_shards: int | None = None   # ... or after N new output shards

    def output_fingerprint(self, teacher_identity: str, data_identity: str, size: int, resize: int,
                           precision: str) -> str:
        d = {"teacher": teacher_identity, "data": data_identity, "size": size, "resize": resize,
             "precision": precision, **{k: getattr(self, k) for k in ("top_p", "top_k", "shuffle", "seed", "prefix",
                                                                     "max_count", "max_size")}}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def pseudolabel(o: Options, rank: int | None = None, world_size: int | None = None,
                local_rank: int | None = None) -> dict | None:
    """Run (or resume) the job on this rank. Rank and world size come from torchrun's environment
    unless given. Returns rank 0's summary (also `<out>/pseudolabel.json`), this rank's DONE record on
    other ranks, or None when a `stop_after_*` limit stopped the run first."""
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    local_rank = _env_int("LOCAL_RANK", 0) if local_rank is None else local_rank
    t_start = time.perf_counter()
    device = _check_options(o, local_rank)
    data_m = _load_pool(o.data)
    teacher = load_teacher(o.teacher, torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu"))
    if o.top_p > teacher.num_classes:
        raise PseudolabelError(f"--top-p {o.top_p}: the teacher has only {teacher.num_classes} classes")
    size = o.size or teacher.size
    resize = o.resize or default_resize(size)
    po = sc.PassOptions(size=size, resize=resize, top_p=o.top_p, batch_size=o.batch_size, chunk=o.chunk,
                        device=device, loader_threads=o.loader_threads, progress=o.progress, amp=o.precision,
                        progress_every=o.progress_every)
    data_identity = mf.identity(data_m)
    fp = o.output_fingerprint(teacher.identity, data_identity, size, resize, po.precision)
    os.makedirs(o.out, exist_ok=True)
    existing = check_out(o.out, fp)
    if existing is not None:
        if rank == 0:
            print(f"{o.out}: already complete ({existing['total']} samples); nothing to do", file=sys.stderr)
        return _read_summary(o.out) or {"total": existing["total"]}
    work = o.work or os.path.join(o.out, ".pseudolabel")
    scores_dir = os.path.join(work, f"scores-{sc.scores_key(teacher, data_identity, po)}")

    # 1. teacher pass: every rank its slice, unless some earlier run completed these scores
    layout = sc.find_complete(scores_dir)
    rank_rec = None
    if layout is None:
        layout = os.path.join(scores_dir, sc.layout_name(world_size, po))
        if rank == 0:
            _start_pass(o, teacher, data_m, po, scores_dir, layout, data_identity, world_size)
        rank_rec = sc.run_rank(teacher, o.data, po, layout, rank, world_size, local_rank, o.stop_after_chunks)
        if rank_rec is None:
            if rank == 0:
                log.info("stopped after %d new chunk(s) (stop_after_chunks); re-run the same command to continue",
                         o.stop_after_chunks)
            return None
        if rank != 0:
            return rank_rec
        complete = sc.mark_complete(layout, sc.wait_for_ranks(layout, world_size))
    elif rank != 0:
        return {"rank": rank, "scores": layout}   # the scores exist: rank 0 alone selects and writes
    else:
        with open(os.path.join(layout, "COMPLETE")) as f:
            complete = json.loads(f.read())
        log.info("teacher scores found in %s: no teacher pass needed", layout)

    # 2. selection; 3. the student dataset
    t_sel = time.perf_counter()
    selection, selector, corrupt = _select(layout, teacher.num_classes, o.top_k, data_m["total"])
    t_write = time.perf_counter()
    short = _short_classes(selection, teacher, o, data_m["total"])
    build = {"fingerprint": fp, "prefix": o.prefix, "pseudolabel": _provenance(o, teacher, data_identity, po)}
    manifest = write_student(o.out, o.data, data_m, selection, teacher.classes, build, shuffle=o.shuffle,
                             seed=o.seed, prefix=o.prefix, max_count=o.max_count, max_size=o.max_size,
                             io_threads=o.io_threads, progress=o.progress, progress_every=o.progress_every,
                             max_shards=o.stop_after_shards)
    if manifest is None:
        log.info("stopped after %d new output shard(s) (stop_after_shards); re-run the same command to continue",
                 o.stop_after_shards)
        return None
    t_end = time.perf_counter()
    unique = int(np.unique(selection[2]).size)
    summary = {
        "out": os.path.abspath(o.out), "total": manifest["total"], "unique_images": unique,
        "pool": data_m["total"], "classes": teacher.num_classes, "classes_from": teacher.classes_from,
        "class_counts": manifest["class_counts"], "classes_below_k": short, "corrupt_skipped": complete["corrupt"],
        "corrupt_examples": corrupt[:20], "teacher_pass": complete, "teacher_pass_this_run": rank_rec,
        "selection_s": t_write - t_sel, "selection_peak_records": selector.peak_records, "write_s": t_end - t_write,
        "total_s": t_end - t_start, "options": {k: v for k, v in asdict(o).items() if not k.startswith("stop_")},
        "scores": layout,
    }
    _report(o, summary, manifest, teacher)
    return summary


def _provenance(o: Options, teacher, data_identity: str, po: sc.PassOptions) -> dict:
    """The student manifest's `build.pseudolabel`: where its labels came from and how."""
    return {"teacher": teacher.checkpoint, "teacher_identity": teacher.identity, "teacher_step": teacher.step,
            "classes_from": teacher.classes_from, "data": os.path.abspath(o.data), "data_identity": data_identity,
            "top_p": o.top_p, "top_k": o.top_k, "size": po.size, "resize": po.resize, "device": po.device,
            "precision": po.precision, "shuffle": o.shuffle, "seed": o.seed, "max_count": o.max_count,
            "max_size": o.max_size}


def _check_options(o: Options, local_rank: int) -> str:
    """One-line errors for options out of range; the device ("cpu" or "cuda"), selected on CUDA."""
    if o.top_p < 1 or o.top_k < 1:
        raise PseudolabelError(f"--top-p {o.top_p} / --top-k {o.top_k}: must be positive")
    if o.batch_size < 1 or o.chunk < 1 or o.max_count < 1 or o.max_size < 1:
        raise PseudolabelError("--batch-size, --chunk, --max-count and --max-size must be positive")
    if o.prefix in ("", ".") or "." in o.prefix or "/" in o.prefix:
        raise PseudolabelError(f"--prefix {o.prefix!r}: use a plain name without dots or slashes")
    device = o.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise PseudolabelError(f"--device {o.device!r}: expected auto, cpu or cuda")
    if o.precision not in ("auto", "bf16", "fp32"):
        raise PseudolabelError(f"--precision {o.precision!r}: expected auto, bf16 or fp32")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise PseudolabelError("--device cuda but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
    return device


def _load_pool(data: str) -> dict:
    """The unlabelled pool's manifest: a whole dataset, not one part of a multi-machine build."""
    try:
        data_m = mf.load(data)
    except mf.ManifestError as e:
        raise PseudolabelError(str(e)) from None
    if data_m.get("part", [0, 1])[1] > 1:
        i, n = data_m["part"]
        raise PseudolabelError(f"{data} is part {i}/{n} of a build; merge the parts first")
    return data_m


def _start_pass(o: Options, teacher, data_m: dict, po: sc.PassOptions, scores_dir: str, layout: str,
                data_identity: str, world_size: int):
    """Rank 0, before a teacher pass: the scores folder's meta.json, and what the pass will do."""
    os.makedirs(scores_dir, exist_ok=True)
    mf.atomic_write(os.path.join(scores_dir, "meta.json"), json.dumps({
        "teacher": teacher.checkpoint, "teacher_identity": teacher.identity, "data": os.path.abspath(o.data),
        "data_identity": data_identity, "top_p": o.top_p, "size": po.size, "resize": po.resize, "device": po.device,
        "precision": po.precision, "classes": teacher.classes}, indent=1))
    others = [n for n in os.listdir(scores_dir) if n.startswith("w") and n != os.path.basename(layout)]
    if others:
        log.warning("%s holds unfinished teacher passes of other layouts (%s); this run (%s) does not reuse "
                    "their chunks: resume with the same world size, --batch-size and --chunk to do so",
                    scores_dir, ", ".join(others), os.path.basename(layout))
    log.info("teacher %s (%d classes, %s), %d images of %s at %d px (resize %d), %d rank(s), %s %s",
             teacher.checkpoint, teacher.num_classes, teacher.classes_from, data_m["total"], o.data, po.size,
             po.resize, world_size, po.device, po.precision)


def _select(layout: str, num_classes: int, top_k: int, total: int) -> tuple[tuple, TopKSelector, list[int]]:
    """Per-class bounded top-K over every rank's chunks, checking that each sample was scored exactly
    once: (selection, the selector, the first corrupt samples skipped)."""
    selector = TopKSelector(num_classes, top_k)
    seen = np.zeros(total, bool)
    corrupt: list[int] = []
    for path, a in sc.iter_chunks(layout):
        idx = a["index"]
        if idx.size and (idx.min() < 0 or idx.max() >= seen.size):
            raise PseudolabelError(f"{path}: sample index {int(idx.max())} outside 0..{seen.size - 1}")
        if seen[idx].any() or np.unique(idx).size != idx.size:
            s = np.sort(idx)
            dup = int(idx[seen[idx]][0]) if seen[idx].any() else int(s[np.flatnonzero(np.diff(s) == 0)[0]])
            raise PseudolabelError(f"{path}: sample {dup} scored twice; the teacher pass did not read the shards once")
        seen[idx] = True
        ok = a["intact"].astype(bool)
        if not ok.all() and len(corrupt) < 20:
            corrupt += idx[~ok][:20 - len(corrupt)].tolist()
        try:
            selector.add(*records(a["classes"][ok], a["scores"][ok], idx[ok]))
        except SelectionError as e:
            raise PseudolabelError(f"{path}: {e}") from None
    if not seen.all():
        first = int(np.flatnonzero(~seen)[0])
        raise PseudolabelError(f"{layout}: {int((~seen).sum())} sample(s) have no score (first: {first}); delete "
                               f"{layout} and re-run")
    return selector.result(), selector, corrupt


def _short_classes(selection: tuple, teacher, o: Options, pool: int) -> int:
    """How many classes got fewer than K images (logged with the fewest)."""
    counts = np.bincount(selection[0], minlength=teacher.num_classes)
    short = int((counts < o.top_k).sum())
    if short:
        log.warning("%d of %d classes have fewer than K=%d images among the top-%d of the %d images "
                    "(fewest: %s with %d)", short, teacher.num_classes, o.top_k, o.top_p, pool,
                    teacher.classes[int(np.argmin(counts))], int(counts.min()))
    return short


def _report(o: Options, summary: dict, manifest: dict, teacher):
    """Add the pool-label agreement to `summary`, write it as `<out>/pseudolabel.json`, say it in a line."""
    summary.update({k: v for k, v in manifest["build"]["pseudolabel"].items()
                    if k.startswith(("source_label", "with_"))})
    mf.atomic_write(os.path.join(o.out, "pseudolabel.json"), json.dumps(summary, indent=1) + "\n")
    agree = summary.get("source_label_agreement")
    complete = summary["teacher_pass"]
    print(f"{o.out}: {manifest['total']} samples ({summary['unique_images']} distinct images of {summary['pool']}) "
          f"in {len(manifest['shards'])} shard(s), top-{o.top_k} of {teacher.num_classes} classes from "
          f"top-{o.top_p}; teacher {complete['img_per_s']:.0f} img/s over {complete['ranks']} rank(s)"
          + (f"; teacher labels agree with the pool's own labels on {100 * agree:.1f}%" if agree is not None else ""),
          file=sys.stderr)


def _read_summary(out: str) -> dict | None:
    try:
        with open(os.path.join(out, "pseudolabel.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
