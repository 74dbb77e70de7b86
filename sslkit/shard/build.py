"""`sslkit.shard build`: plan -> (shuffle) -> parallel decode/validate/encode -> shards, resumably.

Stages, each restartable:
1. plan: sources are enumerated once into `.build/plan.jsonl` (+ byte offsets), streaming, so a
   100M-line list or a 14M-file tree costs ~16 bytes of RAM per item, never decoded pixels;
2. order: identity, or a permutation drawn from `--seed` (a global shuffle: DALI only shuffles
   inside a buffer, so the stored order is what decorrelates batches);
3. part: `--part I/N` keeps the I-th contiguous slice of that order, for multi-machine builds;
4. shards: workers decode/validate/encode items in order; the writer fills a shard, renames it into
   place when full, then appends one line to `.build/shards.jsonl`. A re-run replays that journal,
   checks the files, and continues from the first unfinished shard. Because shard boundaries depend
   only on the item sequence, the result is byte-identical to an uninterrupted build.
"""

from __future__ import annotations

import array
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from ..errors import SslkitError
from ..progress import Progress
from . import manifest as mf
from .images import Accepted, ImageOptions, ItemReader, Rejected
from .sources import Item, SourceOptions, parse_source
from ..runlock import LOCK_NAME, RunLock
from .journal import ShardJournal

STATE_DIR = ".build"
JOURNAL = "shards.jsonl"


class BuildError(SslkitError, RuntimeError):
    """A build cannot proceed (one-line reason)."""


@dataclass(frozen=True)
class BuildOptions:
    sources: tuple[str, ...]
    out: str
    prefix: str = "shard"
    max_count: int = 10_000
    max_size: int = 1_000_000_000
    shuffle: bool = False
    seed: int = 0
    part: tuple[int, int] = (0, 1)
    source: SourceOptions = field(default_factory=SourceOptions)
    image: ImageOptions = field(default_factory=ImageOptions)
    skip: int = 0             # leave out the first N items of the sources (in source order, before shuffling)
    limit: int | None = None  # then take at most N items
    workers: int = 0          # 0: one per CPU core; does not change the output
    progress: bool = True     # does not change the output
    overwrite: bool = False   # build into a folder that holds other files (replacing only its own names)

    def content(self) -> dict:
        """Everything that determines the bytes written (not workers/progress/out)."""
        d = asdict(self)
        for k in ("out", "workers", "progress", "overwrite"):
            d.pop(k)
        d["sources"] = [os.path.abspath(s) if os.path.exists(s) else s for s in self.sources]
        d["part"] = list(self.part)
        return d

    def fingerprint(self) -> str:
        blob = json.dumps({"format_version": mf.FORMAT_VERSION, **self.content()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self):
        i, n = self.part
        if not (n >= 1 and 0 <= i < n):
            raise BuildError(f"--part {i}/{n}: expected I/N with 0 <= I < N")
        if self.max_count < 1 or self.max_size < 1:
            raise BuildError("--max-count and --max-size must be positive")
        if self.limit is not None and self.limit < 1:
            raise BuildError(f"--limit {self.limit}: must be positive")
        if self.skip < 0:
            raise BuildError(f"--skip {self.skip}: must be >= 0")
        if not 1 <= self.image.quality <= 100:
            raise BuildError(f"--quality {self.image.quality}: expected 1..100")
        if self.image.resize_max is not None and self.image.resize_max < max(self.image.min_size, 1):
            raise BuildError("--resize-max must be at least --min-size")
        if "." in self.prefix or "/" in self.prefix or not self.prefix:
            raise BuildError(f"--prefix {self.prefix!r}: use a plain name without dots or slashes")


# ------------------------------------------------------------------------------------------------
# Stage 1: plan
# ------------------------------------------------------------------------------------------------

def make_plan(opts: BuildOptions, state: str) -> dict:
    """Enumerate every source into state/plan.jsonl; return the plan summary (cached by fingerprint)."""
    summary_path = os.path.join(state, "plan.json")
    key = BuildOptions(opts.sources, "", source=opts.source, seed=opts.seed, skip=opts.skip,
                       limit=opts.limit).fingerprint()
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("key") == key:
            return summary
    sources = [parse_source(s, opts.source) for s in opts.sources]  # raises SourceError up front
    labelled = {s.labelled for s in sources}
    if len(labelled) > 1:
        raise BuildError("some sources are labelled and some are not; build them separately or use --labels none")
    offsets = array.array("q")
    labels: set[str] = set()
    count = 0
    tmp = os.path.join(state, "plan.jsonl.tmp")
    with open(tmp, "w") as f, Progress(None, "planning", unit="items", enabled=opts.progress, every=30.0) as bar:
        pos = 0
        seen = 0
        for source in sources:
            for item in source.items():
                seen += 1
                if seen <= opts.skip:
                    continue
                if opts.limit is not None and count >= opts.limit:
                    break
                line = json.dumps([item.kind, item.ref, item.label]) + "\n"
                offsets.append(pos)
                pos += len(line.encode())
                f.write(line)
                if item.label:
                    labels.add(item.label)
                count += 1
                if count % 10_000 == 0:
                    bar.update(10_000)
        bar.update(count % 10_000)
    if count == 0:
        raise BuildError(f"no images found in {', '.join(opts.sources)}")
    os.replace(tmp, os.path.join(state, "plan.jsonl"))
    np.save(os.path.join(state, "plan.offsets.npy"), np.frombuffer(offsets, dtype=np.int64))
    summary = {
        "key": key,
        "count": count,
        "labelled": labelled.pop(),
        "classes": mf.class_order(labels),
        "ignored": sum(s.ignored for s in sources),
    }
    mf.atomic_write(summary_path, json.dumps(summary))
    return summary


class Plan:
    """Random access to planned items by position in the (shuffled) order."""

    def __init__(self, state: str, count: int, shuffle: bool, seed: int):
        self._f = open(os.path.join(state, "plan.jsonl"), "rb")
        self._offsets = np.load(os.path.join(state, "plan.offsets.npy"), mmap_mode="r")
        assert len(self._offsets) == count
        self.order = np.random.default_rng(seed).permutation(count) if shuffle else None

    def __getitem__(self, pos: int) -> Item:
        i = int(self.order[pos]) if self.order is not None else pos
        self._f.seek(int(self._offsets[i]))
        kind, ref, label = json.loads(self._f.readline())
        return Item(kind, ref, label)

    def close(self):
        self._f.close()


# ------------------------------------------------------------------------------------------------
# Stage 4 helpers: an ordered, memory-bounded parallel map over items
# ------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(image_opts: ImageOptions):
    _WORKER["reader"] = ItemReader()
    _WORKER["opts"] = image_opts


def _process_chunk(items: list[Item]) -> list:
    reader, opts = _WORKER["reader"], _WORKER["opts"]
    return [reader.process(item, opts) for item in items]


def ordered_map(items: Iterator[Item], image_opts: ImageOptions, workers: int,
                chunk: int = 8) -> Iterator[tuple[Item, Accepted | Rejected]]:
    """Yield (item, result) in input order, with at most ~4 chunks per worker in flight."""
    if workers <= 1:
        _init_worker(image_opts)
        for item in items:
            yield item, _process_chunk([item])[0]
        return
    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(image_opts,)) as pool:
        pending: deque = deque()

        def chunks():
            buf = []
            for item in items:
                buf.append(item)
                if len(buf) == chunk:
                    yield buf
                    buf = []
            if buf:
                yield buf

        for batch in chunks():
            pending.append((batch, pool.apply_async(_process_chunk, (batch,))))
            while len(pending) > 4 * workers:
                b, r = pending.popleft()
                yield from zip(b, r.get())
        while pending:
            b, r = pending.popleft()
            yield from zip(b, r.get())


# ------------------------------------------------------------------------------------------------
# Stage 4: the resumable shard loop
# ------------------------------------------------------------------------------------------------

def _sample_components(index: int, res: Accepted, label_id: int | None, label: str | None):
    meta = dict(res.meta)
    if label is not None:
        meta["label"] = label
    comps = [("jpg", res.jpg), ("index", mf.key_for(index).encode())]
    if label_id is not None:
        comps.append(("cls", f"{label_id:0{mf.CLS_DIGITS}d}".encode()))
    comps.append(("json", json.dumps(meta, sort_keys=True).encode()))
    return comps


def _claim(opts: BuildOptions, fp: str) -> dict | None:
    """May this build write into `opts.out`? Yes when it is new or empty, holds this build unfinished, or
    --overwrite says so; the finished manifest when this very build is already complete."""
    out = opts.out
    manifest_path = os.path.join(out, mf.MANIFEST)
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                existing = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            if opts.overwrite:
                return None
            raise BuildError(f"{manifest_path}: not a readable manifest ({str(e)[:80]}); {out} is not a finished "
                             "build of this command: use another --out, or --overwrite to build over it") from None
        if isinstance(existing, dict) and existing.get("build", {}).get("fingerprint") == fp:
            return existing
        if not opts.overwrite:
            raise BuildError(f"{out} already holds a different build ({manifest_path}); use another --out, or "
                             "--overwrite to build over it")
        return None
    if os.path.exists(os.path.join(out, STATE_DIR, "options.json")):
        return None     # an unfinished build of this command (its options are checked under the lock)
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if names and not opts.overwrite:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise BuildError(f"{out} is not empty (it holds {names[0]}{more}) and is not a build of this command; use a "
                         "new or empty --out, or --overwrite to build into it (files named like its shards are "
                         "replaced, nothing else is touched)")
    return None


def build(opts: BuildOptions) -> dict:
    """Build (or finish building) the shard folder `opts.out`; return its manifest. The build holds
    `OUT/.build/.lock` while it runs: a second build into the same folder is a one-line error."""
    opts.validate()
    fp = opts.fingerprint()
    existing = _claim(opts, fp)
    if existing is not None:
        print(f"{opts.out}: already complete ({existing['total']} samples); nothing to do", file=sys.stderr)
        return existing
    out_existed = os.path.isdir(opts.out)
    lock = RunLock.acquire(os.path.join(opts.out, STATE_DIR), lambda msg: print(f"warning: {msg}", file=sys.stderr))
    try:
        return _build_locked(opts, fp, out_existed)
    finally:
        lock.release()


def _build_locked(opts: BuildOptions, fp: str, out_existed: bool) -> dict:
    state = os.path.join(opts.out, STATE_DIR)
    _start_state(opts, fp, state)
    try:
        plan_summary = make_plan(opts, state)
    except BaseException:
        _discard_unstarted(opts.out, state, out_existed)
        raise
    n_items = plan_summary["count"]
    part_i, part_n = opts.part
    lo, hi = n_items * part_i // part_n, n_items * (part_i + 1) // part_n
    journal = ShardJournal(opts.out, os.path.join(state, JOURNAL), opts.prefix, opts.max_count, opts.max_size,
                           tally=lambda: {"rejected": [], "class_counts": {}})
    t0 = time.time()
    n_new = _write_shards(opts, state, plan_summary, journal, lo, hi)
    return _finish(opts, fp, plan_summary, journal, hi - lo, n_new, time.time() - t0)


def _start_state(opts: BuildOptions, fp: str, state: str):
    """Record this build's options in `state`, starting over when an earlier attempt with other options
    finished nothing (refused when it did), and remove the temporary files of a shard being written
    when a build was killed."""
    options_path = os.path.join(state, "options.json")
    if os.path.exists(options_path):
        with open(options_path) as f:
            previous = json.load(f)
        journal = os.path.join(state, JOURNAL)
        if previous.get("fingerprint") != fp:
            if os.path.exists(journal) and os.path.getsize(journal) > 0:
                raise BuildError(f"{opts.out} holds an unfinished build with other options; re-run that command, "
                                 f"or delete {state} to start over")
            for name in os.listdir(state):   # nothing was finished under the old options: start over
                if name != LOCK_NAME:
                    path = os.path.join(state, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    mf.atomic_write(options_path, json.dumps({"fingerprint": fp, **opts.content()}))
    own_tmp = re.compile(rf"{re.escape(opts.prefix)}-\d{{6}}\.(tar|idx)\.tmp")
    for name in os.listdir(opts.out):
        if own_tmp.fullmatch(name):
            os.remove(os.path.join(opts.out, name))


def _write_shards(opts: BuildOptions, state: str, plan_summary: dict, journal: ShardJournal, lo: int,
                  hi: int) -> int:
    """Decode, check and write the part's items [lo, hi), after the journalled shards; the number of
    items this run processed. Rejected inputs are tallied in the shard that follows them."""
    classes = {name: i for i, name in enumerate(plan_summary["classes"])} if plan_summary["labelled"] else None
    pos = journal.end if journal.done else lo
    if journal.done:
        print(f"{opts.out}: resuming after {len(journal.done)} complete shard(s), at item {pos - lo} of {hi - lo}",
              file=sys.stderr)
    plan = Plan(state, plan_summary["count"], opts.shuffle, opts.seed)
    bar = Progress(hi - lo, "build", unit="img", initial=pos - lo, enabled=opts.progress, every=30.0)
    journal.on_close = lambda j: bar.set_postfix(shards=len(j.done),
                                                  rejected=sum(len(r["rejected"]) for r in j.done))
    n_new = 0
    try:
        items = (plan[q] for q in range(pos, hi))
        for p, (item, res) in enumerate(ordered_map(items, opts.image, opts.workers or os.cpu_count() or 1),
                                        start=pos):
            bar.update(1)
            n_new += 1
            if isinstance(res, Rejected):
                journal.tally["rejected"].append([item.ref, res.reason])
                continue
            label_id = classes[item.label] if classes is not None else None
            counts = {"class_counts": {item.label: 1}} if item.label is not None else None
            journal.add(_sample_components(journal.next_index, res, label_id, item.label), p, counts)
        journal.close(end=hi)
    except BaseException:
        journal.abort()
        raise
    finally:
        bar.close()
        plan.close()
    return n_new


def _finish(opts: BuildOptions, fp: str, plan_summary: dict, journal: ShardJournal, inputs: int, n_new: int,
            seconds: float) -> dict:
    """Write rejected.tsv and the manifest, remove the build state, and say what was built."""
    out, state = opts.out, os.path.join(opts.out, STATE_DIR)
    done = journal.done
    all_rejects = [r for rec in done for r in rec["rejected"]] + journal.tally["rejected"]
    if not done:
        # Nothing was built: report every reason, and leave no build state that would make readers
        # think a build is still in progress.
        mf.atomic_write(os.path.join(out, mf.REJECTED), mf.format_rejects(all_rejects))
        shutil.rmtree(state, ignore_errors=True)
        first = f" (first: {all_rejects[0][0]}: {all_rejects[0][1]})" if all_rejects else ""
        raise BuildError(f"no valid images: all {inputs} inputs were rejected; every reason is in "
                         f"{os.path.join(out, mf.REJECTED)}{first}")
    classes = {name: i for i, name in enumerate(plan_summary["classes"])} if plan_summary["labelled"] else None
    totals: Counter = Counter()
    for rec in done:
        totals.update(rec["class_counts"])
    manifest = mf.make(total=journal.next_index, shards=journal.shard_entries(), classes=classes,
                       class_counts={c: totals.get(c, 0) for c in classes} if classes else None,
                       components=["jpg", "index"] + (["cls"] if classes else []) + ["json"],
                       build={"fingerprint": fp, **opts.content()}, rejected=len(all_rejects),
                       ignored=plan_summary["ignored"], inputs=inputs, part=opts.part)
    mf.finish(out, manifest, all_rejects)
    shutil.rmtree(state, ignore_errors=True)
    size_gb = sum(s["bytes"] for s in manifest["shards"]) / 1e9
    print(f"{out}: {manifest['total']} samples in {len(done)} shard(s), {size_gb:.2f} GB; "
          f"{len(all_rejects)} rejected (see {os.path.join(out, mf.REJECTED)}), "
          f"{plan_summary['ignored']} non-image files ignored; "
          f"{n_new / max(seconds, 1e-9):.0f} img/s this run", file=sys.stderr)
    return manifest


def _discard_unstarted(out: str, state: str, out_existed: bool):
    """A build that failed before finishing any shard leaves nothing behind (no `.build/`, and no
    output folder it created itself)."""
    journal = os.path.join(state, JOURNAL)
    if os.path.exists(journal) and os.path.getsize(journal) > 0:
        return
    shutil.rmtree(state, ignore_errors=True)
    if not out_existed and os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
