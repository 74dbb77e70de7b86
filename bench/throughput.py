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
  train     the trainer's own step (train.build + train.train_step, the method's epoch hook at every
            epoch boundary) fed by the real loader vs by one batch kept on the device: data stall %
            (bench/train_probe.py). --method/--train-preset/--arch/--train-set choose the model.

Measurement: construction (DALI build, numba kernels, worker start) and the warm-up are not timed
(--warmup batches, at least one more than the stage prefetches: DALI's queue, the DataLoader's
workers x prefetch factor); then --rounds rounds of --batches batches each; images/s = source images / seconds of a
round, shown as median [min - max] over rounds; on GPU torch.cuda.synchronize() brackets every
round. MP/s = images/s x the shards' mean megapixels per image. Ratios are taken within this run,
per (threads, batch size[, hw decoder load]): "x decode" = a row over the decode-only row of the
same implementation (DALI over DALI decode, PIL over PIL decode), "x baseline" = DALI over PIL.
The JSON layout: see `write_json` in bench/report.py. Files: this CLI and runner; stages.py (what a
row measures and how); baseline_pil.py (the PIL peers); train_probe.py (train mode); report.py
(ratios, table, JSON, plot). `bench/gpu.sh OUT_DIR` runs the whole GPU protocol.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

import torch  # noqa: E402

from pipelines import ShardSet, list_families  # noqa: E402
from pipelines.loader import default_hw_decoder_load  # noqa: E402
from report import (add_ratios, cfg_label, configs, cpus, data_info, environment, format_table,  # noqa: E402
                    plot, write_json)
from sslkit.config import ConfigError, parse_set  # noqa: E402
from sslkit.shard import ManifestError  # noqa: E402
from stages import BASELINES, baseline_stage, decode_stage, loader_stage, measure  # noqa: E402
from train_probe import train_records  # noqa: E402

MODES = ("decode", "loader", "baseline", "train")
# "eval" is a shorthand: the two evaluation pipelines are always measured together.
GROUPS = {"eval": ("eval_train", "eval_val")}


class BenchError(Exception):
    """A command line or setup problem, reported as one line."""


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
    p.add_argument("--threads", default=str(cpus()),
                   help="comma-separated DALI thread counts (= baseline worker processes); one row per value; "
                        "default: this machine's usable cores (%(default)s)")
    p.add_argument("--batch-size", default="64",
                   help="comma-separated batch sizes, one row per value; default: %(default)s")
    p.add_argument("--hw-decoder-load", default=None,
                   help="GPU only: comma-separated shares of JPEG decoding given to the hardware decoder "
                        "(0 = CUDA only), one row per value, e.g. 0,0.65,1.0; default: the loader's (1.0 on Hopper and newer, 0.65 before)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per row (median/min/max); default 3")
    p.add_argument("--batches", type=int, default=10, help="batches per timed round; default 10")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before the rounds; default 3")
    p.add_argument("--seed", type=int, default=0, help="seed of the readers and the augmentations; default 0")
    p.add_argument("--option", action="append", default=[], metavar="PIPELINE.KEY=VALUE",
                   help="a pipeline option, passed to make_loader and to multicrop/eval baselines, e.g. "
                        "multicrop.preset=2x160+4x96 (repeatable; VALUE is a Python literal or a string)")
    p.add_argument("--method", default=None, help="train mode: the SSL method of the trainer step")
    p.add_argument("--arch", default=None, help="train mode: the backbone (default: the preset's)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="train mode: a config override as train.py's --set (repeatable)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="train mode: torch intra-op threads (0: OMP_NUM_THREADS when set, else the share of the cores "
                        "the row's DALI threads leave, as the CLIs set it; sslkit.threads)")
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
        if args.device == "gpu" and not torch.cuda.is_available():
            raise BenchError("--device gpu: torch sees no CUDA device")
        args.hw_list = [None] if args.device == "cpu" else (
            [default_hw_decoder_load(0)] if args.hw_decoder_load is None
            else [_share(x) for x in args.hw_decoder_load.split(",")])
        if args.torch_threads < 0:
            raise BenchError("--torch-threads must be >= 0 (0: automatic)")
        if min(args.rounds, args.batches) < 1 or args.warmup < 0:
            raise BenchError("--rounds and --batches must be >= 1, --warmup >= 0")
    except BenchError as e:
        p.error(str(e))
    return args


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
    """Expand 'eval'; every name must be a registered pipeline (an unregistered one is an error: a
    pipeline that silently went missing must not turn into a quiet gap in the figures)."""
    known = set(list_families()) | set(GROUPS)
    out = []
    for name in (x.strip() for x in text.split(",") if x.strip()):
        if name not in known:
            raise BenchError(f"--pipelines: unknown pipeline {name!r}; choose from {', '.join(sorted(known))}")
        out += [n for n in GROUPS.get(name, (name,)) if n not in out]
    if not out:
        raise BenchError("--pipelines: empty list")
    missing = [n for n in out if n not in BASELINES]
    if missing:
        raise BenchError(f"--pipelines: no PIL baseline for {', '.join(missing)} (add one to bench/stages.py)")
    return out


def _options(items):
    """['multicrop.preset=tiny', ...] -> {'multicrop': {'preset': 'tiny'}}; 'eval.X' goes to both evals."""
    out: dict[str, dict] = {}
    for item in items:
        try:
            [(dotted, value)] = parse_set([item]).items()
        except ConfigError:
            raise BenchError(f"--option {item!r}: expected PIPELINE.KEY=VALUE") from None
        name, dot, key = dotted.partition(".")
        if not (dot and key):
            raise BenchError(f"--option {item!r}: expected PIPELINE.KEY=VALUE")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare string such as 2x160+4x96
        for target in GROUPS.get(name, (name,)):
            out.setdefault(target, {})[key] = value
    return out



# == main ============================================================================================

def run(args) -> list[dict]:
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
            if "loader" in args.modes:
                records.append(measure(args, cfg, "loader", name, "dali",
                                       lambda name=name: loader_stage(args, cfg, name)))
            if with_baseline:
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
        print(f"throughput.py: error: {first if args.data in first else f'{args.data}: {first}'}", file=sys.stderr)
        sys.exit(2)   # a bad input, as argparse's own errors
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

