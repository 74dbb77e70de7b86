"""`python -m sslkit.pseudolabel` (pseudo-label), `... evaluate`, `... random-labels`."""

from __future__ import annotations

import argparse
import json
import os
import sys

# Only light modules before parsing (`--help` in well under a second): torch, DALI and the job's
# modules are imported once the arguments are known.
from ..config import dali_device
from ..config import parse_size
from ..deps import require_dali
from ..errors import SslkitError
from ..progress import DEFAULT_EVERY

EPILOG = """\
examples:
  python -m sslkit.pseudolabel --teacher runs/teacher --data shards/unlabelled --top-p 10 --top-k 16000 \\
      --out shards/student-data
  torchrun --nproc_per_node=8 -m sslkit.pseudolabel --teacher runs/teacher --data /mnt/yfcc100m \\
      --top-k 16000 --out /mnt/shards/yfcc-pseudo --device cuda --batch-size 512
  python -m sslkit.pseudolabel evaluate --ckpt runs/student-ft --data shards/val
  python -m sslkit.pseudolabel random-labels shards/student-data --out shards/student-random

Re-running the same command after a kill resumes: finished chunks of the teacher pass and finished
output shards are kept. The teacher's scores stay in --work (default OUT/.pseudolabel/): a later run
with another --top-k (and another --out, same --work) selects again without running the teacher.
"""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds > 0")
    return value


TORCH_THREADS_HELP = ("torch intra-op threads per rank (0: OMP_NUM_THREADS when set, else the share of the cores "
                      "that the DALI threads leave, at least 1)")


def _progress_args(p: argparse.ArgumentParser):
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (default: a bar on a terminal, else a line every --progress-every seconds)")
    p.add_argument("--progress-every", type=_seconds, default=DEFAULT_EVERY, metavar="S",
                   help=f"seconds between progress lines when not on a terminal ({DEFAULT_EVERY:g})")


def label_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sslkit.pseudolabel", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Billion-scale semi-supervised learning (Yalniz et al. 2019), step 2: run a supervised teacher "
                    "over unlabelled shards, keep every image's top-P classes, keep the top-K images of every class, "
                    "and write them (images copied byte for byte) as a labelled shard folder for the student. "
                    "Other commands: `evaluate` (a classifier's top-1 on labelled shards), `random-labels` (the "
                    "control set). Run under torchrun for several ranks.")
    p.add_argument("--teacher", required=True, help="run folder, checkpoint folder or global.pt of a "
                   "`train.py --method supervised` run")
    p.add_argument("--data", required=True, help="the unlabelled shard folder (labels, if it has any, are only "
                   "used to report how often the teacher agrees with them)")
    p.add_argument("--out", required=True, help="output shard folder for the student")
    p.add_argument("--top-p", type=int, default=10, help="classes kept per image (paper: 10)")
    p.add_argument("--top-k", type=int, default=16_000, help="images kept per class (paper: 16k of YFCC100M for "
                   "ImageNet's 1000 classes)")
    p.add_argument("--size", type=int, default=None, help="centre-crop size (default: the teacher's training crop)")
    p.add_argument("--resize", type=int, default=None, help="shorter side before the crop (default: size / 0.875)")
    p.add_argument("--batch-size", type=int, default=256, help="images per rank per teacher batch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cuda: nvJPEG decode + bf16 autocast, one GPU per rank (LOCAL_RANK)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on cuda, fp32 on cpu")
    p.add_argument("--chunk", type=int, default=50_000, help="images per committed chunk of the teacher pass "
                   "(what a kill can lose per rank)")
    p.add_argument("--work", default=None, help="teacher scores and journals (default OUT/.pseudolabel); must be on a "
                   "file system every rank sees")
    p.add_argument("--seed", type=int, default=0, help="order of the output samples")
    p.add_argument("--no-shuffle", action="store_true", help="write in class order (DALI only shuffles inside a "
                   "buffer: keep the default for training)")
    p.add_argument("--prefix", default="shard", help="output shard name prefix")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per output shard at most")
    p.add_argument("--max-size", type=parse_size, default=1_000_000_000, help="bytes per output shard at most")
    p.add_argument("--io-threads", type=int, default=8, help="source shards read in parallel while copying")
    p.add_argument("--loader-threads", type=int, default=0, help="DALI threads per rank (0: its share of the cores)")
    p.add_argument("--torch-threads", type=int, default=0, help=TORCH_THREADS_HELP)
    p.add_argument("--stop-after-chunks", type=int, default=None, metavar="N",
                   help="time-boxed runs: every rank stops after N new chunks; re-run to continue")
    p.add_argument("--stop-after-shards", type=int, default=None, metavar="N",
                   help="time-boxed runs: stop after N new output shards; re-run to continue")
    _progress_args(p)
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sslkit.pseudolabel evaluate",
                                description="Top-1 (and top-5) accuracy of a supervised checkpoint's classifier on a "
                                            "labelled shard folder (eval_val crops; classes matched by name).")
    p.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or global.pt")
    p.add_argument("--data", required=True, help="labelled shard folder")
    p.add_argument("--size", type=int, default=None, help="centre crop (default: the checkpoint's training crop)")
    p.add_argument("--resize", type=int, default=None, help="shorter side before the crop (default: size / 0.875)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--loader-threads", type=int, default=0, help="DALI threads (0: this process' share of the cores)")
    p.add_argument("--torch-threads", type=int, default=0, help=TORCH_THREADS_HELP)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    _progress_args(p)
    return p


def random_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sslkit.pseudolabel random-labels",
                                description="The control of the recipe: a copy of a labelled shard folder (e.g. the "
                                            "pseudo-labelled set) whose labels are randomly permuted over the whole "
                                            "set: "
                                            "same images, same order, same class counts, labels without information.")
    p.add_argument("src", help="labelled shard folder")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    _progress_args(p)
    return p


def _threads(args, log):
    """Each rank's DALI and torch threads from its share of the cores (sslkit.threads), logged once."""
    import torch

    from ..threads import use_threads
    if args.loader_threads < 0 or args.torch_threads < 0:
        raise SslkitError("--loader-threads / --torch-threads: expected a count >= 0 (0: automatic)")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    plan = use_threads(dali_device(device), args.loader_threads, args.torch_threads)
    log.info("%s", plan.describe())
    return plan


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["evaluate"]:
            args = evaluate_parser().parse_args(argv[1:])
            require_dali("sslkit pseudolabel evaluate")
            from ..log import get_logger
            log = get_logger(0)
            from .evaluate import evaluate
            threads = _threads(args, log)
            r = evaluate(args.ckpt, args.data, size=args.size, resize=args.resize, batch_size=args.batch_size,
                         device=args.device, loader_threads=threads.dali, progress=not args.no_progress,
                         progress_every=args.progress_every)
            k = next(key for key in r if key.startswith("top") and key != "top1")
            print(f"{args.data}: top-1 {100 * r['top1']:.2f}%  {k} {100 * r[k]:.2f}%  ({r['samples']} images, "
                  f"{r['checkpoint']}, step {r['step']})")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(r, f, indent=1)
            return 0
        if argv[:1] == ["random-labels"]:
            args = random_parser().parse_args(argv[1:])
            from .write import random_labels
            random_labels(args.src, args.out, seed=args.seed, progress=not args.no_progress,
                          progress_every=args.progress_every)
            return 0
        args = label_parser().parse_args(argv)
        require_dali("sslkit pseudolabel")
        from ..log import get_logger
        log = get_logger(int(os.environ.get("RANK", "0")))
        from .run import Options, pseudolabel
        threads = _threads(args, log)
        o = Options(teacher=args.teacher, data=args.data, out=args.out, top_p=args.top_p, top_k=args.top_k,
                    size=args.size, resize=args.resize, batch_size=args.batch_size, chunk=args.chunk,
                    device=args.device, precision=args.precision, work=args.work, shuffle=not args.no_shuffle,
                    seed=args.seed,
                    prefix=args.prefix, max_count=args.max_count, max_size=args.max_size, io_threads=args.io_threads,
                    loader_threads=threads.dali, progress=not args.no_progress, progress_every=args.progress_every,
                    stop_after_chunks=args.stop_after_chunks, stop_after_shards=args.stop_after_shards)
        pseudolabel(o)
        return 0
    except SslkitError as e:   # a bad setting or input; an internal failure keeps its traceback (exit 1)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
