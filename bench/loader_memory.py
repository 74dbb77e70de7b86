"""Per-rank loader memory and start-up against dataset size and world size (issue 21 item 5).

    python bench/loader_memory.py --json bench/out/loader-memory.json            # the full simulation
    python bench/loader_memory.py --datasets 2,4 --samples-per-shard 5000 --worlds 1,4 --no-goal-point

What a rank does at start-up in the loader (pipelines/loader.py `DaliLoader._build`): `ShardSet.open`
(reads the manifest, stats every tar and index file), then a `SampleSource` with the loader's own
arguments and order (`DaliLoader.order`, i.e. `epoch_order`) and `SampleSource.prepare()` (the rank's
epoch-0 sequence and the parsing of the index files of the shards that sequence touches). Nothing is
decoded.

The data is synthetic (made once under --cache, reused): a pool of shards of --samples-per-shard samples
whose DALI v1.2 index files are real text (members jpg, index, cls, json at tar-plausible offsets, JPEG
sizes drawn around 110 KB) and whose tars are sparse files of the size the index implies (no bytes on
disk, nothing decodable). A dataset of S shards is a folder of hard links to the pool's first S shards
and a manifest (sslkit.shard.manifest.make) over them. The goal point (--goal samples on --goal-world
ranks, measured directly unless --no-goal-point) is a folder of --goal / --samples-per-shard shards
whose index files are real only for the shards rank 0 reads; the others hold a header and no samples,
so a rank that parsed one would fail (the point then fails loudly).

Each point (dataset, world size) runs rank 0 in a fresh process; after the imports (numpy, DALI, torch:
not counted) it measures wall time, CPU time (time.process_time, all the process' threads: wall time on
a shared machine grows with its load, CPU time much less) and RSS growth over the process' RSS after
the imports, current (/proc/self/statm) and peak (getrusage ru_maxrss after resetting the high-water
mark through /proc/self/clear_refs, so the imports' own peak does not hide it), for the manifest part
(ShardSet.open) and the rank part (SampleSource + prepare) apart, plus the bytes of the rank's tables
(its sequence and the parsed index tables). --baseline adds the old design for comparison: DALI's
`fn.readers.webdataset` over every index file, num_shards=--baseline-world, pipeline built (batch 1,
no shuffle, so it reads ~1 sample), nothing run.

The curve: the manifest part fitted linearly against the dataset's total samples, the rank part
against the rank's samples (least squares on relative residuals); their sum is extrapolated to the goal
and set beside the direct goal measurement. The table says which numbers are measured and which are
extrapolated.
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sslkit.shard import manifest as mf  # noqa: E402  (light: no DALI, no torch)

SCHEMA = "sslkit.bench.loader_memory/1"
MARKER = "loader-memory.json"        # what made the cache folder, written before anything else in it
CLASSES = 1000
JPEG_MEAN = 110_000                  # bytes: ImageNet's mean JPEG size, for plausible offsets
MB, GB = 1e6, 1e9


class BenchError(Exception):
    """A command line or setup problem, reported as one line."""


# == synthetic shards ==================================================================================

def _pad(n: np.ndarray) -> np.ndarray:
    return -(-n // 512) * 512


def shard_layout(k: int, count: int) -> tuple[np.ndarray, int]:
    """(per sample: jpg offset and size, index/cls/json offsets, json size; tar size) of synthetic shard
    `k`: members <key>.jpg/.index/.cls/.json, each a 512-byte header then its data padded to 512."""
    rng = np.random.default_rng([k, 7])
    jpg = np.clip(rng.lognormal(math.log(JPEG_MEAN) - 0.18, 0.6, count), 2_000, 5_000_000).astype(np.int64)
    js = rng.integers(120, 180, count)
    block = 512 + _pad(jpg) + 3 * 512 + 512 + 512 + _pad(js)   # jpg, index (10 B), cls (10 B), json
    start = np.concatenate([[0], np.cumsum(block)[:-1]])
    o_jpg = start + 512
    o_idx = o_jpg + _pad(jpg) + 512
    size = -(-(int(start[-1] + block[-1]) + 1024) // 10240) * 10240   # two zero blocks, 10 KiB records
    return np.stack([o_jpg, jpg, o_idx, o_idx + 1024, o_idx + 2048, js], axis=1), size


def index_text(k: int, count: int) -> str:
    """The DALI v1.2 index of synthetic shard `k` (keys: the sample indices, as a built folder's)."""
    rows, _ = shard_layout(k, count)
    first = k * count
    lines = [f"jpg {a} {b} {i:010d}.jpg index {c} 10 {i:010d}.index cls {d} 10 {i:010d}.cls json {e} {f} {i:010d}.json"
             for i, (a, b, c, d, e, f) in zip(range(first, first + count), rows.tolist())]
    return f"v1.2 {count}\n" + "\n".join(lines) + "\n"


def _atomic(path: str, text: str | None = None, size: int | None = None):
    """Write `text` (or a sparse file of `size` bytes) to `path` through a rename: a file is whole or absent."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        if text is not None:
            f.write(text)
        else:
            f.truncate(size)
    os.replace(tmp, path)


def _names(k: int) -> tuple[str, str]:
    return f"shard-{k:06d}.tar", f"shard-{k:06d}.idx"


def make_shard(folder: str, k: int, count: int, real_index: bool = True):
    """Shard k's sparse tar and its index (real, or a header with no samples: parsing it fails)."""
    tar, idx = (os.path.join(folder, n) for n in _names(k))
    if not os.path.exists(tar):
        _atomic(tar, size=shard_layout(k, count)[1])
    if real_index:
        if not os.path.exists(idx) or os.path.getsize(idx) < 64:   # absent, or a placeholder this bench wrote
            _atomic(idx, index_text(k, count))
    elif not os.path.exists(idx):
        _atomic(idx, f"v1.2 {count}\n")


def open_cache(cache: str, per_shard: int) -> str:
    """The cache folder, made or reused; refuses a folder this bench did not make or made otherwise."""
    marker = os.path.join(cache, MARKER)
    want = {"maker": "bench/loader_memory.py", "samples_per_shard": per_shard, "format": 1}
    if os.path.exists(marker):
        with open(marker) as f:
            have = json.load(f)
        if have != want:
            raise BenchError(f"{cache}: made with {have}, not {want}; pass another --cache")
    elif os.path.isdir(cache) and os.listdir(cache):
        raise BenchError(f"{cache}: not empty and not made by this bench ({MARKER} missing); pass another --cache")
    else:
        os.makedirs(os.path.join(cache, "pool"), exist_ok=True)
        _atomic(marker, json.dumps(want) + "\n")
    return os.path.join(cache, "pool")


def fill_pool(pool: str, shards: int, per_shard: int, progress):
    """The pool's first `shards` shards, made where missing (an interrupted run continues)."""
    missing = [k for k in range(shards) if not os.path.exists(os.path.join(pool, _names(k)[1]))]
    t0 = last = time.monotonic()
    for j, k in enumerate(missing):
        make_shard(pool, k, per_shard)
        if time.monotonic() - last > 10 or j + 1 == len(missing):
            last = time.monotonic()
            progress(f"synthetic shards: {shards - len(missing) + j + 1}/{shards} ({per_shard:,} samples each), "
                     f"{last - t0:.0f} s")


def write_dataset(folder: str, pool: str, shards: int, per_shard: int) -> str:
    """A shard folder of `shards` shards: hard links to the pool's for those `folder` lacks, then the
    manifest over them, written last (it marks the folder done)."""
    os.makedirs(folder, exist_ok=True)
    entries = []
    for k in range(shards):
        for name in _names(k):
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                os.link(os.path.join(pool, name), path)
        tar, idx = _names(k)
        entries.append({"path": tar, "index": idx, "count": per_shard, "bytes": os.path.getsize(os.path.join(folder, tar)),
                        "sha256": hashlib.sha256(f"synthetic shard {k} of {per_shard}".encode()).hexdigest(),
                        "first_index": k * per_shard})
    classes = {f"c{c:04d}": c for c in range(CLASSES)}
    m = mf.make(total=shards * per_shard, shards=entries, classes=classes, class_counts=None,
                components=["jpg", "index", "cls", "json"],
                build={"synthetic": "bench/loader_memory.py: sparse tars, nothing decodable"})
    mf.write(folder, m)
    return folder


def goal_folder(cache: str, pool: str, pool_shards: int, shards: int, per_shard: int, touched: set[int], progress) -> str:
    """The goal dataset: the pool's shards, then sparse tars up to `shards`; real index files for the
    shards in `touched` (the ones rank 0 reads), header-only ones for the rest."""
    folder = os.path.join(cache, f"goal-{shards}x{per_shard}")
    os.makedirs(folder, exist_ok=True)
    t0 = last = time.monotonic()
    for k in range(pool_shards, shards):
        make_shard(folder, k, per_shard, real_index=k in touched)
        if time.monotonic() - last > 10 or k + 1 == shards:
            last = time.monotonic()
            progress(f"goal folder: {k + 1}/{shards} shards ({len(touched)} with a real index), {last - t0:.0f} s")
    return write_dataset(folder, pool, shards, per_shard)


# == one rank's start-up, in a fresh process ===========================================================

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0), so ru_maxrss covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def loader_order(shards, config):
    """What the loader passes its SampleSource as `orders` at a fresh start (`DaliLoader.order`: epoch
    0, no earlier stages, training): `pipelines.loader.epoch_order` over `shards` (anything with
    `counts` and `first_index`), the loader's own function, not a copy of it."""
    from pipelines.loader import epoch_order
    return functools.partial(epoch_order, shards, config)


def _uniform(shards: int, per_shard: int):
    """The counts and first indices of `shards` shards of `per_shard` samples."""
    return SimpleNamespace(counts=(per_shard,) * shards, first_index=tuple(range(0, shards * per_shard, per_shard)))


def _config(spec: dict, world: int):
    from pipelines.loader import LoaderConfig
    return LoaderConfig(batch_size=spec["batch_size"], rank=spec["rank"], world_size=world, seed=spec["seed"],
                        shuffle_buffer=spec["shuffle_buffer"])


def measure_rank(spec: dict) -> dict:
    """Rank `spec['rank']`'s start-up over `spec['data']` as the loader does it (`DaliLoader._build`,
    before the DALI pipeline): time and RSS growth of ShardSet.open, then of SampleSource + prepare."""
    from pipelines.reader import SampleSource, ShardSet

    cfg = _config(spec, spec["world"])
    gc.collect()
    base, reset = _rss(), _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    shards = ShardSet.open(spec["data"])
    t1, c1 = time.perf_counter(), time.process_time()
    rss_open, peak_open = _rss(), _peak()
    reset = _reset_peak() and reset
    source = SampleSource(shards, loader_order(shards, cfg), cfg.rank, 0, 0, cfg.batch_size,
                          want_label=shards.labelled, extra_keys=tuple(cfg.extra_keys), use_mmap=cfg.use_mmap)
    source.prepare()
    t2, c2 = time.perf_counter(), time.process_time()
    rss_end, peak_end = _rss(), _peak()
    tables = source._sequence.nbytes + sum(t.nbytes for t in source._tables.values())
    goal_shards = -(-spec["goal"] // spec["per_shard"])
    goal_order = loader_order(_uniform(goal_shards, spec["per_shard"]), _config(spec, spec["goal_world"]))(0)
    return {"open_s": t1 - t0, "prepare_s": t2 - t1, "total_s": t2 - t0,
            "open_cpu_s": c1 - c0, "prepare_cpu_s": c2 - c1, "total_cpu_s": c2 - c0,
            "open_rss": rss_open - base, "open_peak": peak_open - base,
            "prepare_rss": rss_end - rss_open, "prepare_peak": peak_end - rss_open,
            "rss": rss_end - base, "peak": max(peak_open - base, peak_end - base),
            "tables": int(tables), "samples_per_rank": int(len(source._sequence)),
            "shards_read": len(source._tables), "shards": len(shards.tars), "total": shards.total,
            "peak_reset": reset, "rss_after_imports": base,
            "goal_samples_per_rank": goal_order.rank_length(), "goal_shards": goal_shards}


def measure_dali_reader(spec: dict) -> dict:
    """The old design's start-up: DALI's readers.webdataset over every index file of the dataset, one
    shard of `world`, pipeline built (batch 1, no shuffle: it reads ~1 sample), nothing run."""
    from nvidia.dali import fn, pipeline_def
    from pipelines.reader import ShardSet

    gc.collect()
    base, reset = _rss(), _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    shards = ShardSet.open(spec["data"])

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        return tuple(fn.readers.webdataset(paths=list(shards.tars), index_paths=list(shards.indexes), ext=["jpg", "cls"],
                                     num_shards=spec["world"], shard_id=spec["rank"], random_shuffle=False))
    p = pipe()
    p.build()
    t1, c1 = time.perf_counter(), time.process_time()
    return {"total_s": t1 - t0, "total_cpu_s": c1 - c0, "rss": _rss() - base, "peak": _peak() - base, "peak_reset": reset,
            "shards": len(shards.tars), "total": shards.total, "rss_after_imports": base}


def run_child(spec: dict) -> dict:
    """One point in a fresh process (its imports are not counted); a failure is a one-line BenchError."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = [s for s in proc.stderr.strip().splitlines() if s.strip()][-1:] or [f"exit status {proc.returncode}"]
        raise BenchError(f"point {spec['kind']} over {spec['data']} (world {spec['world']}) failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# == curve and extrapolation ===========================================================================

def fit(xs, ys) -> dict:
    """Line y = a + b x by least squares on relative residuals (the points span 1000x: a plain fit would
    follow the largest alone), and its worst relative residual over the points."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(set(xs.tolist())) < 2:
        return {"a": float(ys.mean()), "b": 0.0, "worst_residual": 0.0, "note": "one x only: a constant"}
    b, a = np.polyfit(xs, ys, 1, w=1 / np.maximum(np.abs(ys), 1e-9))
    resid = np.abs(a + b * xs - ys) / np.maximum(np.abs(ys), 1e-9)
    return {"a": float(a), "b": float(b), "worst_residual": float(resid.max())}


def extrapolate(points: list[dict], goal_total: int, goal_per_rank: int) -> dict:
    """Manifest part against total samples, rank part against the rank's samples; their sum at the goal."""
    fits = {"open_s": fit([p["total"] for p in points], [p["open_s"] for p in points]),
            "open_cpu_s": fit([p["total"] for p in points], [p["open_cpu_s"] for p in points]),
            "open_peak": fit([p["total"] for p in points], [p["open_peak"] for p in points]),
            "open_rss": fit([p["total"] for p in points], [p["open_rss"] for p in points])}
    for key in ("prepare_s", "prepare_cpu_s", "prepare_peak", "prepare_rss", "tables"):
        fits[key] = fit([p["samples_per_rank"] for p in points], [p[key] for p in points])

    def at(key, x):
        return fits[key]["a"] + fits[key]["b"] * x
    predicted = {"total_s": at("open_s", goal_total) + at("prepare_s", goal_per_rank),
                 "total_cpu_s": at("open_cpu_s", goal_total) + at("prepare_cpu_s", goal_per_rank),
                 "peak": at("open_rss", goal_total) + at("prepare_peak", goal_per_rank),
                 "rss": at("open_rss", goal_total) + at("prepare_rss", goal_per_rank),
                 "tables": at("tables", goal_per_rank), "open_rss": at("open_rss", goal_total),
                 "prepare_peak": at("prepare_peak", goal_per_rank),
                 "open_s": at("open_s", goal_total), "prepare_s": at("prepare_s", goal_per_rank)}
    return {"fits": fits, "goal_total": goal_total, "goal_samples_per_rank": goal_per_rank, "predicted": predicted}


# == report ============================================================================================

def _mb(x) -> str:
    return f"{x / MB:,.1f}"


COLUMNS = ("samples", "shards", "world", "samples/rank", "shards read", "open s", "open MB", "prepare s",
           "prepare peak MB", "start-up s", "start-up CPU s", "peak MB", "RSS MB", "tables MB")


def _row(p: dict, note: str = "") -> str:
    """One table row; a field a row lacks (the extrapolation, the old design) is left blank."""
    def num(key, fmt):
        return fmt(p[key]) if p.get(key) is not None else ""
    cells = [num("total", "{:,}".format), num("shards", "{:,}".format), num("world", str),
             num("samples_per_rank", "{:,}".format), num("shards_read", str), num("open_s", "{:.2f}".format),
             num("open_rss", _mb), num("prepare_s", "{:.2f}".format), num("prepare_peak", _mb),
             num("total_s", "{:.2f}".format), num("total_cpu_s", "{:.2f}".format), num("peak", _mb), num("rss", _mb),
             num("tables", _mb)]
    return "| " + " | ".join(cells) + " |" + (f" {note}" if note else "")


def format_table(points: list[dict], baseline: list[dict], ext: dict, goal: dict | None, limits: dict) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    rows += [_row(p) for p in points]
    if goal:
        rows.append(_row(goal, "(goal point, measured)"))
    pr = ext["predicted"]
    rows.append(_row({**pr, "total": ext["goal_total"], "world": limits["world"],
                      "samples_per_rank": ext["goal_samples_per_rank"]}, "(extrapolated from the curve)"))
    rows += [_row({**b, "shards_read": "all"}, "(old design: DALI readers.webdataset, pipeline built)") for b in baseline]
    f = ext["fits"]
    rows += ["", f"fits: rank part {f['prepare_peak']['b']:.1f} B peak, {f['prepare_s']['b'] * 1e6:.2f} us wall and "
             f"{f['prepare_cpu_s']['b'] * 1e6:.2f} us CPU per sample "
             f"of the rank (+{_mb(f['prepare_peak']['a'])} MB, {f['prepare_s']['a']:.2f} s); manifest part "
             f"{f['open_rss']['b']:.2f} B and {f['open_s']['b'] * 1e9:.1f} ns per sample of the dataset "
             f"(+{_mb(f['open_rss']['a'])} MB, {f['open_s']['a']:.3f} s); worst relative residual of the rank "
             f"part's fits: {f['prepare_peak']['worst_residual']:.0%} (peak), {f['prepare_s']['worst_residual']:.0%} (wall), "
             f"{f['prepare_cpu_s']['worst_residual']:.0%} (CPU)"]
    return "\n".join(rows)


def verdict(ext: dict, goal: dict | None, limits: dict) -> dict:
    pr = ext["predicted"]
    out = {"memory_limit_bytes": limits["memory"], "time_limit_s": limits["time"],
           "extrapolated_memory_ok": pr["peak"] <= limits["memory"], "extrapolated_time_ok": pr["total_s"] <= limits["time"]}
    if goal:
        out.update(measured_memory_ok=goal["peak"] <= limits["memory"], measured_time_ok=goal["total_s"] <= limits["time"])
    return out


# == command line ======================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/loader_memory.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.join(REPO, ".cache", "bench", "loader-memory"),
                   help="folder of the synthetic shards (made once, reused); default: %(default)s")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="default: %(default)s")
    p.add_argument("--datasets", default="100,1000", help="dataset sizes in shards (prefixes of the pool); default: %(default)s")
    p.add_argument("--worlds", default="1,8,64", help="world sizes; rank 0 is measured; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=256, help="per rank; default: %(default)s")
    p.add_argument("--shuffle-buffer", type=int, default=4096, help="the loader's default: %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goal", type=int, default=100_000_000, help="samples of the extrapolation target; default: %(default)s")
    p.add_argument("--goal-world", type=int, default=64, help="default: %(default)s")
    p.add_argument("--goal-memory-gb", type=float, default=1.0, help="per rank; default: %(default)s")
    p.add_argument("--goal-seconds", type=float, default=30.0, help="per rank; default: %(default)s")
    p.add_argument("--no-goal-point", action="store_true", help="extrapolate only: do not measure the goal directly")
    p.add_argument("--baseline", default="100",
                   help="dataset sizes (shards) for the old design's DALI reader, '' for none; default: %(default)s")
    p.add_argument("--baseline-world", type=int, default=64, help="default: %(default)s")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.datasets = sorted(int(x) for x in args.datasets.split(",") if x)
        args.worlds = sorted(int(x) for x in args.worlds.split(",") if x)
        args.baseline = sorted(int(x) for x in args.baseline.split(",") if x)
    except ValueError as e:
        raise BenchError(f"--datasets/--worlds/--baseline: comma-separated integers expected ({e})") from None
    if not args.datasets or not args.worlds or min(args.datasets + args.worlds + args.baseline + [args.samples_per_shard]) < 1:
        raise BenchError("--datasets, --worlds and --samples-per-shard must be positive integers")
    if len(args.datasets) * len(args.worlds) < 2:
        raise BenchError("the curve needs at least two (dataset, world) points: give more --datasets or --worlds")
    return args


def _progress(line: str):
    print(f"[loader_memory] {line}", file=sys.stderr, flush=True)


def run(args) -> dict:
    pool = open_cache(args.cache, args.samples_per_shard)
    pool_shards = max(args.datasets + args.baseline)
    fill_pool(pool, pool_shards, args.samples_per_shard, _progress)
    folders = {s: write_dataset(os.path.join(args.cache, f"d-{s}x{args.samples_per_shard}"), pool, s, args.samples_per_shard)
               for s in sorted(set(args.datasets + args.baseline))}
    common = dict(rank=0, batch_size=args.batch_size, seed=args.seed, shuffle_buffer=args.shuffle_buffer,
                  per_shard=args.samples_per_shard, goal=args.goal, goal_world=args.goal_world)
    points = []
    todo = [(s, w) for s in args.datasets for w in args.worlds]
    for j, (s, w) in enumerate(todo):
        _progress(f"point {j + 1}/{len(todo)}: {s * args.samples_per_shard:,} samples, world {w}, rank 0")
        points.append({"world": w, **run_child({"kind": "rank", "data": folders[s], "world": w, **common})})
    baseline = []
    for s in args.baseline:
        _progress(f"old design: DALI readers.webdataset over {s * args.samples_per_shard:,} samples, world {args.baseline_world}")
        baseline.append({"world": args.baseline_world,
                         **run_child({"kind": "dali", "data": folders[s], "world": args.baseline_world, **common})})
    goal_shards, goal_per_rank = points[0]["goal_shards"], points[0]["goal_samples_per_rank"]
    ext = extrapolate(points, goal_shards * args.samples_per_shard, goal_per_rank)
    goal = None
    if not args.no_goal_point:
        folder = goal_folder(args.cache, pool, pool_shards, goal_shards, args.samples_per_shard,
                             rank0_shards(common, goal_shards), _progress)
        _progress(f"goal point: {goal_shards * args.samples_per_shard:,} samples, world {args.goal_world}, rank 0")
        goal = {"world": args.goal_world, **run_child({"kind": "rank", "data": folder, "world": args.goal_world, **common})}
    limits = {"memory": args.goal_memory_gb * GB, "time": args.goal_seconds, "world": args.goal_world}
    return {"schema": SCHEMA, "points": points, "baseline": baseline, "extrapolation": ext, "goal_point": goal,
            "verdict": verdict(ext, goal, limits), "table": format_table(points, baseline, ext, goal, limits),
            "options": {k: v for k, v in vars(args).items() if k not in ("child", "json")},
            "env": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "kernel": platform.release()},
            "measured": "every row of `points`, `baseline` and `goal_point`: rank 0 in a fresh process, after imports",
            "extrapolated": "`extrapolation.predicted`: linear fits of the points (manifest part vs total samples, "
                            "rank part vs samples per rank) evaluated at the goal"}


def rank0_shards(spec: dict, shards: int) -> set[int]:
    """The shards rank 0 of the goal world reads in epoch 0, by the loader's own order."""
    order = loader_order(_uniform(shards, spec["per_shard"]), _config(spec, spec["goal_world"]))(0)
    return set(np.unique(order.rank_sequence(0) // spec["per_shard"]).tolist())


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.child:
            spec = json.loads(args.child)
            print(json.dumps((measure_rank if spec["kind"] == "rank" else measure_dali_reader)(spec)))
            return 0
        result = run(args)
    except (BenchError, mf.ManifestError, OSError) as e:
        print(f"bench/loader_memory.py: {e}", file=sys.stderr)
        return 2
    print(result["table"])
    v = result["verdict"]
    print(f"goal (<= {args.goal_memory_gb:g} GB peak, <= {args.goal_seconds:g} s per rank at {args.goal:,} samples on "
          f"{args.goal_world} ranks): extrapolated memory {'met' if v['extrapolated_memory_ok'] else 'MISSED'}, "
          f"time {'met' if v['extrapolated_time_ok'] else 'MISSED'}" + (
              f"; measured memory {'met' if v['measured_memory_ok'] else 'MISSED'}, "
              f"time {'met' if v['measured_time_ok'] else 'MISSED'}" if "measured_memory_ok" in v else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
