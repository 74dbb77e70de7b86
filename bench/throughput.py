"""Images/s of every pipeline, beside its PIL baseline and its decode-only limit, in one run.

    python bench/throughput.py --data shards/bench --device cpu \\
        --pipelines multicrop,jigsaw,colorization,jigclu,eval --json bench/out/cpu.json --plot bench/out/cpu.png
    python bench/throughput.py --data shards/bench --threads 1,2 --batch-size 32,64     # one row per combination
    python bench/throughput.py --data shards/bench --device gpu --hw-decoder-load 0,0.65,1.0
    python bench/throughput.py --data shards/sample --smoke                              # < 2 minutes, CI

The benchmark corpus (ImageNet-like, longer side 500, quality 90; see bench/make_corpus.py):
    python bench/make_corpus.py --out .cache/bench/photos --count 5000
    python -m sslkit.shard build .cache/bench/photos --out shards/bench --shuffle --max-count 2000

Modes (--mode, comma-separated; default decode,loader,baseline):
  decode    DALI reader + JPEG decode only, the stage every graph starts with (pipelines.reader.read,
            pipelines.augment.decode): no pipeline can be faster, so it is the limit.
  loader    each pipeline through the real loader, make_loader(name, ...), i.e. exactly what training
            iterates, torch tensors included ("eval" means eval_train and eval_val). A pipeline that
            is not registered (yet) in pipelines.list_families() is reported as "not available".
  baseline  the same recipe the common way: PIL + webdataset + torch DataLoader with as many worker
            processes as DALI has threads (bench/baseline_pil.py); decode gets a PIL decode-only peer.
  train     the trainer step on real batches vs synthetic tensors on the device (data stall %):
            a hook, not wired to the trainer yet; it records a "not available" row.

Measurement: construction (DALI build, numba kernels, worker start) and --warmup batches are not
timed; then --rounds rounds of --batches batches each; images/s = source images / seconds of a
round, shown as median [min - max] over rounds; on GPU torch.cuda.synchronize() brackets every
round. MP/s = images/s x the shards' mean megapixels per image. Ratios are taken within this run,
per (threads, batch size[, hw decoder load]): "x decode" = a row over the decode-only row of the
same implementation (DALI over DALI decode, PIL over PIL decode), "x baseline" = DALI over PIL.
The JSON layout: see `write_json` in this file.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

import torch  # noqa: E402
from nvidia.dali import pipeline_def  # noqa: E402

import baseline_pil as B  # noqa: E402
from pipelines import LoaderConfig, ShardSet, list_families, make_loader  # noqa: E402
from pipelines.augment import decode  # noqa: E402
from pipelines.reader import read, replace_broken  # noqa: E402
from sslkit.shard import ManifestError, collect_info  # noqa: E402
from sslkit.shard.access import SampleReader  # noqa: E402

SCHEMA = "sslkit.bench.throughput/1"
MODES = ("decode", "loader", "baseline", "train")
# "eval" is a shorthand: the two evaluation families are always measured together.
GROUPS = {"eval": ("eval_train", "eval_val")}


class BenchError(Exception):
    """A command line or setup problem, reported as one line."""


# == baselines: the peer of each DALI pipeline (bench/baseline_pil.py) ===============================
# Multi-crop and eval read their recipe from the very family object the DALI loader builds (same
# options), so the two sides cannot drift apart; the pretext baselines follow the reference recipes.

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


# == command line ====================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/throughput.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard folder (sslkit.shard build); e.g. shards/bench")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="where DALI runs the pipelines (the baseline always decodes on the CPU)")
    p.add_argument("--pipelines", default="multicrop,jigsaw,colorization,jigclu,eval",
                   help="comma-separated pipeline names ('eval' = eval_train + eval_val); "
                        "default: %(default)s")
    p.add_argument("--mode", default="decode,loader,baseline",
                   help=f"comma-separated subset of {','.join(MODES)}; default: %(default)s")
    p.add_argument("--threads", default=str(_cpus()),
                   help="comma-separated DALI thread counts (= baseline worker processes); one row per value; "
                        "default: this machine's usable cores (%(default)s)")
    p.add_argument("--batch-size", default="64",
                   help="comma-separated batch sizes, one row per value; default: %(default)s")
    p.add_argument("--hw-decoder-load", default=None,
                   help="GPU only: comma-separated shares of JPEG decoding given to the hardware decoder "
                        "(0 = CUDA only), one row per value, e.g. 0,0.65,1.0; default: the loader's 0.65")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per row (median/min/max); default 3")
    p.add_argument("--batches", type=int, default=10, help="batches per timed round; default 10")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before the rounds; default 3")
    p.add_argument("--seed", type=int, default=0, help="seed of the readers and the augmentations; default 0")
    p.add_argument("--option", action="append", default=[], metavar="PIPELINE.KEY=VALUE",
                   help="a pipeline option, passed to make_loader and to multicrop/eval baselines, e.g. "
                        "multicrop.preset=2x160+4x96 (repeatable; VALUE is a Python literal or a string)")
    p.add_argument("--method", default=None, help="train mode: the SSL method of the trainer step")
    p.add_argument("--arch", default=None, help="train mode: the backbone (default: the preset's)")
    p.add_argument("--train-preset", default=None,
                   help="train mode: the method's preset (default: tiny on CPU, the method's default on GPU)")
    p.add_argument("--smoke", action="store_true",
                   help="quick check that everything runs: 1 round of 2 batches of 8 after 1 warm-up batch "
                        "(overrides --rounds/--batches/--warmup/--batch-size); the numbers mean little")
    p.add_argument("--json", default=None, metavar="FILE", help="write every record and the environment here")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a bar chart here")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.batches, args.warmup, args.batch_size = 1, 2, 1, "8"
    try:
        args.modes = _names(args.mode, MODES, "--mode")
        args.thread_list = _ints(args.threads, "--threads")
        args.batch_list = _ints(args.batch_size, "--batch-size")
        args.pipeline_list = _pipelines(args.pipelines)
        args.options = _options(args.option)
        if args.hw_decoder_load is not None and args.device != "gpu":
            raise BenchError("--hw-decoder-load applies to --device gpu only")
        args.hw_list = [None] if args.device == "cpu" else (
            [LoaderConfig(batch_size=1).hw_decoder_load] if args.hw_decoder_load is None
            else [_share(x) for x in args.hw_decoder_load.split(",")])
        if min(args.rounds, args.batches) < 1 or args.warmup < 0:
            raise BenchError("--rounds and --batches must be >= 1, --warmup >= 0")
        if args.device == "gpu" and not torch.cuda.is_available():
            raise BenchError("--device gpu: torch sees no CUDA device")
    except BenchError as e:
        p.error(str(e))
    return args


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _names(text, allowed, flag):
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise BenchError(f"{flag} {text!r}: choose from {', '.join(allowed)}")
    return names


def _ints(text, flag):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise BenchError(f"{flag} {text!r}: expected comma-separated integers") from None
    if min(values) < 1:
        raise BenchError(f"{flag} {text!r}: values must be >= 1")
    return values


def _share(text):
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0.0 <= x <= 1.0:
        raise BenchError(f"--hw-decoder-load {text!r}: expected numbers in [0, 1]")
    return x


def _pipelines(text):
    """Expand 'eval'; every name must be a registered family or have a baseline (a pretext family
    that is not registered yet still gets its baseline row and a 'not available' DALI row)."""
    known = set(list_families()) | set(BASELINES) | set(GROUPS)
    out = []
    for name in (x.strip() for x in text.split(",") if x.strip()):
        if name not in known or name == "decode":
            raise BenchError(f"--pipelines: unknown pipeline {name!r}; choose from "
                             f"{', '.join(sorted(known - {'decode'}))}")
        out += [n for n in GROUPS.get(name, (name,)) if n not in out]
    if not out:
        raise BenchError("--pipelines: empty list")
    return out


def _options(items):
    """['multicrop.preset=tiny', ...] -> {'multicrop': {'preset': 'tiny'}}; 'eval.X' goes to both evals."""
    out: dict[str, dict] = {}
    for item in items:
        name, dot, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if not (dot and eq and key):
            raise BenchError(f"--option {item!r}: expected PIPELINE.KEY=VALUE")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare string such as 2x160+4x96
        for target in GROUPS.get(name, (name,)):
            out.setdefault(target, {})[key] = value
    return out


# == environment and data ============================================================================

def environment(device: str) -> dict:
    def version(module):
        try:
            return importlib.import_module(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as null
            return None

    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                             cpu_model)
    except OSError:
        pass
    env = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "cpus_usable": _cpus(),
        "gpu": torch.cuda.get_device_name(0) if device == "gpu" else None,
        "cuda": torch.version.cuda if device == "gpu" else None,
        "versions": {m: version(m) for m in ("nvidia.dali", "torch", "numpy", "PIL", "webdataset", "cv2", "numba")},
    }
    env["versions"]["dali"] = env["versions"].pop("nvidia.dali")
    env.update(_git())
    # Other work on the machine skews absolute figures (ratios within the run much less): keep a trace.
    env["loadavg_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return env


def _git() -> dict:
    """Read-only git queries; --no-optional-locks keeps `status` from rewriting the index."""
    def git(*cmd):
        r = subprocess.run(["git", "-C", REPO, "--no-optional-locks", *cmd], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(changes) if changes is not None else None}


def data_info(directory: str) -> dict:
    """Size of the images the figures were measured on, so results on other data can be compared."""
    info = collect_info(directory)
    m = info["manifest"]
    # collect_info reports megapixel percentiles; MP/s needs the mean, taken from the same per-sample
    # metadata (stored size) over up to 2000 samples spread evenly.
    reader = SampleReader(directory)
    step = max(1, m["total"] // 2000)
    mpix = [w * h / 1e6 for w, h in (json.loads(reader.component(i, "json"))["size"]
                                     for i in range(0, m["total"], step))]
    return {"dir": os.path.abspath(directory), "images": m["total"], "shards": len(m["shards"]),
            "labelled": bool(m.get("classes")), "bytes_per_image": info["bytes_per_image"],
            "megapixels_per_image": statistics.fmean(mpix), "megapixels": info["megapixels"],
            "shorter_side": info["shorter_side"], "longer_side": info["longer_side"]}


# == timing ==========================================================================================

def timed_rounds(batches, count, args, sync) -> dict:
    """Warm-up (untimed), then `rounds` x `batches`; `count(batch)` = source images in a batch."""
    t0 = time.perf_counter()
    for _ in range(args.warmup):
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
    return {"warmup_s": warmup_s, "rounds": rounds,
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
    shards, defaults = ShardSet.open(args.data), LoaderConfig(batch_size=1)
    hw = cfg["hw_decoder_load"] if cfg["hw_decoder_load"] is not None else defaults.hw_decoder_load

    @pipeline_def(enable_conditionals=True)
    def decode_only():
        jpg, _, _, intact = read(shards, rank=0, world_size=1, shuffle_buffer=defaults.shuffle_buffer,
                                 want_label=False, seed=args.seed)
        return decode(replace_broken(jpg, intact), args.device, hw)

    pipe = decode_only(batch_size=cfg["batch_size"], num_threads=cfg["threads"],
                       device_id=0 if args.device == "gpu" else None, seed=args.seed,
                       prefetch_queue_depth=defaults.prefetch)
    pipe.build()

    def batches():
        while True:
            (images,) = pipe.run()  # decoded images stay in DALI's buffers: no copy is charged
            yield len(images)

    return batches(), (lambda n: n), {"graph": "pipelines.reader.read -> pipelines.augment.decode"}, [pipe]


def loader_stage(args, cfg, name):
    kw = dict(args.options.get(name, {}))
    if cfg["hw_decoder_load"] is not None:
        kw["hw_decoder_load"] = cfg["hw_decoder_load"]
    loader = make_loader(name, args.data, batch_size=cfg["batch_size"], device=args.device, seed=args.seed,
                         num_threads=cfg["threads"], **kw)
    return forever(loader), (lambda b: b["index"].numel()), loader.family.describe(), [loader]


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

    return batches(), (lambda b: len(b[0])), baseline_recipe(transform), [dl]


def measure(args, cfg, mode, pipeline, impl, stage) -> dict:
    """One record: build (untimed), warm up, time the rounds; a failure becomes a 'failed' row."""
    rec = new_record(mode, pipeline, impl, args, cfg)
    sync = torch.cuda.synchronize if args.device == "gpu" else (lambda: None)
    batches, keep = None, []
    t = time.perf_counter()
    try:
        batches, count, recipe, keep = stage()
        rec["recipe"] = recipe
        rec["build_s"] = time.perf_counter() - t
        rec.update(timed_rounds(batches, count, args, sync))
        rec["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one pipeline failing must not hide the others' figures
        rec["status"], rec["note"] = "failed", _one_line(e)
        print(f"throughput.py: {pipeline} ({impl}, {cfg_label(cfg)}) failed: {rec['note']}", file=sys.stderr)
    finally:
        # Stop DALI threads / DataLoader workers before the next row, so rows never share the CPU.
        if batches is not None:
            batches.close()
        del batches, keep
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


# == train mode (hook) ===============================================================================
# The end-to-end figure: trainer steps/s on batches from the real pipeline vs on synthetic tensors
# already on the device (nanoGPT bench.py's real_data switch), and the share of the step spent
# waiting for data: data_stall_pct = 100 * (1 - real / synthetic). It needs the trainer; until it is
# wired, every row is 'not available' with the fields it will fill.

def train_records(args, cfg) -> list[dict]:
    """The trainer's own step (train.build + train.train_step) fed by the real loader vs by one batch
    kept on the device: steps/s of both and the data stall, 100 * (1 - real / synthetic)."""
    import tempfile

    import train as trainer
    from sslkit import dist
    from sslkit.config import TrainConfig, apply_overrides
    from sslkit.log import get_logger
    from sslkit.methods import method_entry

    name = args.method or "deepclusterv2"
    entry = method_entry(name)
    preset = args.train_preset or ("tiny" if args.device == "cpu" and "tiny" in entry.presets else entry.default_preset)
    base = TrainConfig(method=name, method_options=entry.options())
    if preset:
        base = apply_overrides(base, entry.presets[preset])
    overrides = {"data": args.data, "batch_size": cfg["batch_size"], "loader_threads": cfg["threads"],
                 "device": "cuda" if args.device == "gpu" else "cpu", "seed": args.seed,
                 "out": tempfile.mkdtemp(prefix="bench-train-")}
    if args.arch:
        overrides["arch"] = args.arch
    tcfg = apply_overrides(base, overrides)
    rec = new_record("train", f"{name}:{preset or 'default'}", "trainer", args, cfg)
    rec.update(method=name, arch=tcfg.arch, preset=preset, steps_per_s={"real": None, "synthetic": None},
               data_stall_pct=None, recipe={"config": {k: str(v) for k, v in vars(tcfg).items()}})
    try:
        info = dist.init(tcfg.device)
        run = trainer.build(tcfg, info, get_logger(0))
        run.method.prepare_benchmark(run.loader, run.ctx)
        lr = float(run.schedule[0])
        it = iter(_forever(run.loader))
        for _ in range(args.warmup):
            batch = next(it)
            trainer.train_step(run, batch, lr)
        sync = torch.cuda.synchronize if args.device == "gpu" else (lambda: None)
        real, synth = [], []
        for _ in range(args.rounds):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.batches):
                trainer.train_step(run, next(it), lr)
            sync()
            real.append(args.batches / (time.perf_counter() - t0))
            fixed = next(it)  # one batch already on the device, reused: no data loading at all
            t0 = time.perf_counter()
            for _ in range(args.batches):
                trainer.train_step(run, fixed, lr)
            sync()
            synth.append(args.batches / (time.perf_counter() - t0))
        r, s = statistics.median(real), statistics.median(synth)
        images = run.global_batch
        rec.update(status="ok", steps_per_s={"real": r, "synthetic": s},
                   data_stall_pct=max(0.0, 100.0 * (1.0 - r / s)),
                   images_per_s={"median": r * images, "min": min(real) * images, "max": max(real) * images},
                   rounds=[{"images": args.batches * images, "seconds": args.batches / x, "images_per_s": x * images}
                           for x in real])
    except Exception as e:  # noqa: BLE001 - one failed row, the others still run
        rec.update(status="failed", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return [rec]


def _forever(loader):
    while True:
        yield from loader


# == records, ratios, table ==========================================================================

def new_record(mode, pipeline, impl, args, cfg) -> dict:
    return {"mode": mode, "pipeline": pipeline, "impl": impl, "device": args.device,
            "threads": cfg["threads"], "batch_size": cfg["batch_size"], "hw_decoder_load": cfg["hw_decoder_load"],
            "status": None, "note": None, "recipe": None, "build_s": None, "warmup_s": None, "rounds": [],
            "images_per_s": None, "megapixels_per_s": None, "x_decode": None, "x_baseline": None}


def cfg_label(cfg) -> str:
    hw = f", hw decoder {cfg['hw_decoder_load']:g}" if cfg["hw_decoder_load"] is not None else ""
    return f"threads {cfg['threads']}, batch {cfg['batch_size']}{hw}"


def progress(rec):
    if rec["status"] == "ok":
        r = rec["images_per_s"]
        print(f"  {rec['pipeline']:<13} {rec['impl']:<5} {cfg_label(rec)}: {r['median']:.1f} img/s "
              f"(build {rec['build_s']:.1f} s)", file=sys.stderr, flush=True)


def find(records, mode, pipeline, impl, cfg):
    """The record of (mode, pipeline, impl) under cfg's threads and batch size (and hardware-decoder
    share for DALI rows; PIL rows have none)."""
    key = (mode, pipeline, impl, cfg["threads"], cfg["batch_size"], cfg["hw_decoder_load"] if impl == "dali" else None)
    return next((r for r in records if (r["mode"], r["pipeline"], r["impl"], r["threads"], r["batch_size"],
                                        r["hw_decoder_load"]) == key), None)


def _median(rec):
    return rec["images_per_s"]["median"] if rec and rec["status"] == "ok" else None


def add_ratios(records, mp_per_image):
    """MP/s, and ratios against peers measured in this run under the same threads and batch size."""
    for rec in records:
        mine = _median(rec)
        if mine is None:
            continue
        rec["megapixels_per_s"] = mine * mp_per_image
        if rec["mode"] == "train":
            continue
        limit = _median(find(records, "decode", "decode", "dali", rec) if rec["impl"] == "dali"
                        else find(records, "baseline", "decode", "pil", rec))
        rec["x_decode"] = mine / limit if limit else None
        if rec["impl"] == "dali":
            peer = _median(find(records, "baseline", rec["pipeline"], "pil", rec))
            rec["x_baseline"] = mine / peer if peer else None


def configs(args):
    return [{"threads": t, "batch_size": b, "hw_decoder_load": h}
            for t in args.thread_list for b in args.batch_list for h in args.hw_list]


def format_table(records, env, data, args) -> str:
    lines = [f"sslkit throughput -- {args.device}; {env['cpu_model']} ({env['cpus_usable']} usable CPUs)"
             + (f"; {env['gpu']}" if env["gpu"] else "")
             + f"; DALI {env['versions']['dali']}, torch {env['versions']['torch']}; commit "
             + f"{(env['git_commit'] or '?')[:10]}{' (dirty)' if env['git_dirty'] else ''}",
             f"data {data['dir']}: {data['images']} images in {data['shards']} shard(s); per image "
             f"{data['bytes_per_image'] / 1e3:.1f} KB, {data['megapixels_per_image']:.3f} MP (mean)",
             f"load average before/after {_load(env.get('loadavg_start'))} / {_load(env.get('loadavg_end'))}; "
             f"{args.rounds} round(s) x {args.batches} batches after {args.warmup} warm-up batches; "
             "img/s = source images/s; x decode: over the decode-only row of the same implementation; "
             "x baseline: DALI over PIL"]
    seen = []
    for rec in records:
        key = (rec["threads"], rec["batch_size"])
        if key not in seen:
            seen.append(key)
    for threads, batch in seen:
        rows = [r for r in records if (r["threads"], r["batch_size"]) == (threads, batch)]
        lines += ["", f"threads {threads} (baseline: {_workers(threads)}), batch {batch}",
                  f"{'pipeline':<14}{'impl':<8}{'hw':>4}  {'img/s median [min - max]':<27}{'MP/s':>8}"
                  f"{'x decode':>10}{'x baseline':>12}"]
        train = [r for r in rows if r["mode"] == "train"]
        if train and all(r["status"] != "ok" and r["note"] == train[0]["note"] for r in train):
            rows = [r for r in rows if r["mode"] != "train"] + [dict(train[0], pipeline="(all)")]
        for r in rows:
            hw = f"{r['hw_decoder_load']:g}" if r["hw_decoder_load"] is not None else "-"
            name = r["pipeline"] if r["mode"] != "train" else f"train {r['pipeline']}"
            head = f"{name:<{max(14, len(name) + 1)}}{r['impl']:<8}{hw:>4}  "
            if r["status"] != "ok":
                lines.append(head + f"{r['status']}" + (f" ({r['note']})" if r["note"] else ""))
                continue
            s = r["images_per_s"]
            rate = f"{_num(s['median']):>7} [{_num(s['min'])} - {_num(s['max'])}]"
            if r["mode"] == "train":
                sps = r["steps_per_s"]
                lines.append(head + f"{rate:<27}{r['megapixels_per_s']:>8.1f}  data stall {r['data_stall_pct']:.1f}% "
                             f"(steps/s: real {sps['real']:.2f}, synthetic {sps['synthetic']:.2f}; {r['arch']})")
                continue
            lines.append(head + f"{rate:<27}{r['megapixels_per_s']:>8.1f}{_ratio(r['x_decode']):>10}"
                         f"{_ratio(r['x_baseline']):>12}")
    return "\n".join(lines)


def _workers(n: int) -> str:
    return f"{n} worker process{'es' if n != 1 else ''}"


def _load(avg) -> str:
    return f"{avg[0]:.1f}" if avg else "?"


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


# == outputs =========================================================================================

def write_json(path, records, env, data, args):
    """JSON layout (schema "sslkit.bench.throughput/1"):
    {"schema", "command": [argv], "settings": {device, pipelines, modes, threads, batch_sizes,
     hw_decoder_loads, rounds, batches, warmup, seed, options, smoke},
     "env": {time, host, platform, python, cpu_model, cpu_count, cpus_usable, gpu, cuda,
             versions: {dali, torch, numpy, PIL, webdataset, cv2, numba}, git_commit, git_dirty,
             loadavg_start, loadavg_end (1/5/15-minute load averages)},
     "data": {dir, images, shards, labelled, bytes_per_image, megapixels_per_image (mean),
              megapixels / shorter_side / longer_side: {percentile: value}},
     "results": [record, ...]}
    record: {"mode": "decode"|"loader"|"baseline"|"train", "pipeline": "decode"|family name,
             "impl": "dali"|"pil"|"trainer", "device" (where batches end up; PIL always decodes on the CPU),
             "threads" (DALI threads = baseline worker processes),
             "batch_size", "hw_decoder_load" (GPU DALI rows, else null),
             "status": "ok"|"not available"|"failed", "note" (why, when not ok),
             "recipe" (family.describe() or the baseline's spec), "build_s", "warmup_s",
             "rounds": [{"images", "seconds", "images_per_s"}], "images_per_s": {"median", "min", "max"},
             "megapixels_per_s" (median x mean MP), "x_decode", "x_baseline" (null where not defined)}
    train records add {"method", "arch", "steps_per_s": {"real", "synthetic"}, "data_stall_pct"} and put
    images/s of the real-data steps in "images_per_s".
    """
    doc = {"schema": SCHEMA, "command": [sys.executable, *sys.argv],
           "settings": {"device": args.device, "pipelines": args.pipeline_list, "modes": args.modes,
                        "threads": args.thread_list, "batch_sizes": args.batch_list, "hw_decoder_loads": args.hw_list,
                        "rounds": args.rounds, "batches": args.batches, "warmup": args.warmup, "seed": args.seed,
                        "options": args.options, "smoke": args.smoke},
           "env": env, "data": data, "results": records}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=_jsonable)


def _jsonable(x):
    """Numpy values in a family's describe() become lists/numbers; anything else its repr."""
    return x.tolist() if hasattr(x, "tolist") else repr(x)


def plot(path, records, env, data, args):
    """One panel per configuration: per pipeline a DALI bar and the PIL bar beside it (min-max
    whiskers), and the two decode-only limits as vertical lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = configs(args)
    names = [n for n in args.pipeline_list if any(r["pipeline"] == n and r["mode"] != "train" for r in records)]
    if not names:
        names = ["decode"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.2 + 0.75 * len(names) * len(panels) + 0.6 * len(panels)),
                             sharex=True, squeeze=False)
    top = max([r["images_per_s"]["max"] for r in records if r["status"] == "ok"] + [1.0])
    colors = {"dali": "#2b6cb0", "pil": "#a0aec0"}
    for ax, cfg in zip(axes[:, 0], panels):
        for i, name in enumerate(names):
            for impl, mode, dy in (("dali", "loader", -0.2), ("pil", "baseline", 0.2)):
                r = find(records, mode, name, impl, cfg)
                y = i + dy
                if r is None:
                    continue
                if r["status"] != "ok":
                    ax.text(top * 0.01, y, f"{'DALI' if impl == 'dali' else 'PIL'}: {r['status']}", va="center",
                            fontsize=8, color="#c53030" if r["status"] == "failed" else "#718096", style="italic")
                    continue
                s = r["images_per_s"]
                ax.barh(y, s["median"], height=0.38, color=colors[impl],
                        xerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]], capsize=2,
                        error_kw={"elinewidth": 0.8, "ecolor": "#2d3748"})
                label = f" {_num(s['median'])} img/s"
                if impl == "dali" and r["x_baseline"]:
                    label += f"  ({r['x_baseline']:.2f}x PIL)"
                ax.text(s["max"], y, label, va="center", fontsize=8,
                        bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 0.5})
        limits = {}
        for impl, mode in (("dali", "decode"), ("pil", "baseline")):
            if _median(find(records, mode, "decode", impl, cfg)):
                limits[impl] = _median(find(records, mode, "decode", impl, cfg))
        for row, (impl, x) in enumerate(limits.items()):
            color = "#c53030" if impl == "dali" else "#4a5568"
            text = "DALI decode-only (limit)" if impl == "dali" else "PIL decode-only"
            ax.axvline(x, color=color, linestyle="-" if impl == "dali" else "--", linewidth=1.5)
            # One text row each above the bars, so the two labels never overlap.
            ax.text(x, -0.98 + 0.22 * row, f" {text} {_num(x)} img/s", fontsize=8, va="top", color=color)
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(len(names) - 0.45, -1.05)
        ax.set_title(cfg_label(cfg) + f" (baseline: {_workers(cfg['threads'])})", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlim(0, top * 1.35)
    axes[-1, 0].set_xlabel(f"source images per second (median over {args.rounds} round(s); whiskers: min-max)")
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color=colors["dali"], label="DALI loader (make_loader)"),
                        Patch(color=colors["pil"], label="baseline: PIL + webdataset + DataLoader")],
               loc="upper right", fontsize=8, frameon=False)
    fig.suptitle(f"sslkit pipeline throughput, {args.device} -- {env['cpu_model']} ({env['cpus_usable']} CPUs)"
                 + (f", {env['gpu']}" if env["gpu"] else "")
                 + f"\n{data['images']} images, {data['megapixels_per_image']:.2f} MP and "
                   f"{data['bytes_per_image'] / 1e3:.0f} KB per image", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# == main ============================================================================================

def run(args) -> list[dict]:
    registered = set(list_families())
    records = []
    for cfg in configs(args):
        # The baseline does not depend on the hardware-decoder share: measure it once per (threads, batch).
        base_cfg = dict(cfg, hw_decoder_load=None)
        with_baseline = "baseline" in args.modes and cfg["hw_decoder_load"] == args.hw_list[0]
        print(f"[{cfg_label(cfg)}]", file=sys.stderr, flush=True)
        if "decode" in args.modes:
            records.append(measure(args, cfg, "decode", "decode", "dali", lambda: decode_stage(args, cfg)))
        if with_baseline:
            records.append(measure(args, base_cfg, "baseline", "decode", "pil",
                                   lambda: baseline_stage(args, base_cfg, "decode")))
        for name in args.pipeline_list:
            # Each pipeline right next to its baseline: the pair sees the same load on a shared machine.
            if "loader" in args.modes and name in registered:
                records.append(measure(args, cfg, "loader", name, "dali",
                                       lambda name=name: loader_stage(args, cfg, name)))
            elif "loader" in args.modes:
                rec = new_record("loader", name, "dali", args, cfg)
                rec.update(status="not available", note="not registered in pipelines.list_families()")
                records.append(rec)
            if with_baseline and name in BASELINES:
                records.append(measure(args, base_cfg, "baseline", name, "pil",
                                       lambda name=name: baseline_stage(args, base_cfg, name)))
        if "train" in args.modes and cfg["hw_decoder_load"] == args.hw_list[0]:
            records += train_records(args, base_cfg)
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        data = data_info(args.data)
        ShardSet.open(args.data)  # fails now, in one line, if the folder cannot be read by the loader
    except (ManifestError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        sys.exit(f"throughput.py: error: {first if args.data in first else f'{args.data}: {first}'}")
    env = environment(args.device)
    if env["loadavg_start"] and env["loadavg_start"][0] > 0.5 * env["cpus_usable"]:
        print(f"throughput.py: note: load average {env['loadavg_start'][0]:.1f} on {env['cpus_usable']} CPUs "
              "before starting; other work will lower the absolute figures", file=sys.stderr)
    args.data_info = data
    records = run(args)
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    add_ratios(records, data["megapixels_per_image"])
    print(format_table(records, env, data, args))
    if args.json:
        write_json(args.json, records, env, data, args)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(args.plot, records, env, data, args)
        print(f"wrote {args.plot}")
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
