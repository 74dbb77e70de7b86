"""`python -m sslkit.eval knn|linear|svm|lowshot --ckpt RUN_OR_CKPT --train DIR --val DIR [...]`."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

# Only light modules before parsing (`--help` in well under a second): torch, DALI and the metric
# modules are imported by `main` once the arguments are known.
from ..config import dali_device
from ..errors import SslkitError
from ..progress import DEFAULT_EVERY
from ..threads import use_threads
from . import defaults

DESCRIPTION = """\
Evaluate a trunk's frozen features on labelled shard folders (built by `python -m sslkit.shard build`).
Features are extracted once per (checkpoint, data, layer, crop) with the DALI eval_val pipeline and
cached; every result is shown beside the same architecture at its seeded random initialisation.

examples:
  python -m sslkit.eval knn --ckpt runs/tiny --train shards/fm-train --val shards/fm-test --size 64 --resize 64
  python -m sslkit.eval linear --fast --ckpt runs/tiny --train ... --val ... --out results/linear.json
  python -m sslkit.eval svm --ckpt resnet50.pth --arch resnet50 --layer res4 --train ... --val ...
  python -m sslkit.eval lowshot --ckpt runs/tiny --shots 1,2,4,8 --draws 5 --train ... --val ...
  python -m sslkit.eval knn --ckpt pixels --size 28 --resize 28 --train ... --val ...
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return vals


def _costs(text: str) -> tuple[float, ...]:
    try:
        return defaults.parse_costs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kwargs(text: str) -> dict:
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({e})") from None
    if not isinstance(val, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object")
    return val


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to evaluate, on what")
    g.add_argument("--ckpt", required=True,
                   help="run folder (newest complete checkpoint), checkpoint folder or global.pt, a torchvision-"
                        "layout .pth/.safetensors (with --arch), 'random' (--arch at its seeded init) or 'pixels'")
    g.add_argument("--train", required=True, help="labelled shard folder: kNN memory / SVM and probe training set")
    g.add_argument("--val", required=True, help="labelled shard folder the results are measured on")
    g.add_argument("--arch", help="architecture for --ckpt random or a .pth (checkpoints name their own)")
    g.add_argument("--arch-kwargs", type=_kwargs, metavar="JSON",
                   help='constructor kwargs for --arch, e.g. \'{"last_stride": 1}\' (in_channels is read off '
                        '.pth weights)')
    g.add_argument("--input", choices=defaults.INPUTS, help="what the trunk sees: rgb, or L (L-50 of Lab, colorization); "
                                                   "default: from the checkpoint, L for 1-channel trunks")
    g.add_argument("--layer", help="feature layer: res5avg (default, global pool), res4, res5, conv1..res3 "
                                   "(pooled to ~9k dims); AlexNet conv1..conv5 (default conv5)")
    g.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the random-init baseline of the same architecture (shown by default)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random init, probe and low-shot draws (0)")
    g = p.add_argument_group("images and compute")
    g.add_argument("--size", type=int, default=224, help="centre crop side (224; e.g. 32 or 64 for 28x28 images)")
    g.add_argument("--resize", type=int, default=256, help="shorter side before cropping (256; >= --size)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the trunk runs and DALI decodes (auto: cuda when torch sees a GPU)")
    g.add_argument("--batch-size", type=int, default=256, help="images per batch: extraction and probe (256)")
    g.add_argument("--threads", type=int, default=0,
                   help="DALI CPU threads (0: this process' share of the cores; at most 4 with --device cuda)")
    g.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads (0: OMP_NUM_THREADS when set, else the share of the cores that "
                        "DALI's threads leave, at least 1)")
    g.add_argument("--cache-dir", default=defaults.DEFAULT_CACHE,
                   help=f"feature cache folder ({defaults.DEFAULT_CACHE}; env SSLKIT_EVAL_CACHE)")
    g.add_argument("--no-cache", action="store_true", help="extract into memory only")
    g.add_argument("--out", help="write the results as JSON here (default: print only)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress (default: a bar on a terminal, else a line every --progress-every seconds)")
    g.add_argument("--progress-every", type=float, default=DEFAULT_EVERY, metavar="S",
                   help=f"seconds between progress lines when not on a terminal ({DEFAULT_EVERY:g})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sslkit.eval", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True, metavar="{knn,linear,svm,lowshot}")

    s = sub.add_parser("knn", help="weighted kNN (DINO eval_knn) top-1/top-5")
    _common(s)
    s.add_argument("--k", dest="ks", type=_ints, default=defaults.DEFAULT_KS,
                   help="neighbour counts, comma-separated (10,20,100,200)")
    s.add_argument("--temperature", type=float, default=defaults.DEFAULT_TEMPERATURE,
                   help="vote weight exp(sim/T) (0.07)")

    s = sub.add_parser("linear", help="linear probe (BN + Linear) on the frozen trunk")
    _common(s)
    s.add_argument("--epochs", type=int, default=defaults.PROTOCOL_EPOCHS,
                   help="epochs (28); lr steps x0.1 at 8/28, 16/28, 24/28 of them")
    s.add_argument("--lr", type=float, default=defaults.BASE_LR, help="lr per 256 images, scaled by the batch (0.01)")
    s.add_argument("--weight-decay", type=float, default=None, help="default 1e-4 ResNet, 5e-4 AlexNet")
    s.add_argument("--fast", action="store_true",
                   help="train on cached centre-crop features (no augmentation; quick on CPU, not the protocol)")
    s.add_argument("--train-scale", type=float, default=0.08, help="RandomResizedCrop min scale, protocol mode (0.08)")

    for name, what in (("svm", "per-class linear SVMs, cost by 3-fold CV AP; VOC mAP"),
                       ("lowshot", "k samples per class, several draws; SVM (or kNN) mean +- std")):
        s = sub.add_parser(name, help=what)
        _common(s)
        s.add_argument("--costs", type=_costs, default=defaults.DEFAULT_COSTS,
                       help="SVM costs: comma-separated, or a list name: short (0.01,0.1,1,10; default), vissl, goyal")
        s.add_argument("--folds", type=int, default=defaults.FOLDS, help="cross-validation folds for the cost (3)")
        s.add_argument("--jobs", type=int, default=1, help="classes fitted in parallel by joblib (1)")
        if name == "lowshot":
            s.add_argument("--shots", type=_ints, default=defaults.DEFAULT_SHOTS,
                           help="samples per class (1,2,4,8,16,32,64,96; shots a class cannot supply are skipped)")
            s.add_argument("--draws", type=int, default=defaults.DEFAULT_DRAWS,
                           help="independent draws per shot count (5)")
            s.add_argument("--classifier", choices=["svm", "knn"], default="svm",
                           help="what is trained per draw (svm)")
            s.add_argument("--k", dest="lowshot_k", type=int, default=20,
                           help="kNN neighbours with --classifier knn (20)")
            s.add_argument("--temperature", type=float, default=defaults.DEFAULT_TEMPERATURE,
                           help="kNN vote temperature (0.07)")
    return p


def options(args: argparse.Namespace, argv: list[str], plan=None):
    from .runner import EvalOptions
    fields = set(EvalOptions.__dataclass_fields__)
    kw = {k: v for k, v in vars(args).items() if k in fields}
    kw["cache_dir"] = None if args.no_cache else args.cache_dir
    kw["extra"] = {"command": "python -m sslkit.eval " + " ".join(shlex.quote(a) for a in argv)}
    if plan is not None:
        kw["extra"]["threads"] = {"dali": plan.dali, "torch": plan.torch, "torch_from": plan.torch_from,
                                  "cores": plan.cores, "processes": plan.processes}
    return EvalOptions(**kw)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.size < 8 or args.resize < args.size:
            raise SslkitError(f"--size {args.size} / --resize {args.resize}: need 8 <= size <= resize")
        if args.progress_every <= 0:
            raise SslkitError(f"--progress-every {args.progress_every}: expected seconds > 0")
        if args.threads < 0 or args.torch_threads < 0:
            raise SslkitError("--threads / --torch-threads: expected a count >= 0 (0: automatic)")
        from ..deps import require_dali
        require_dali("sslkit eval")
        import torch

        from .report import table, write_json
        from .runner import run, title
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        # torch beside DALI: each takes its part of this process' share of the cores (sslkit.threads)
        plan = use_threads(dali_device(args.device), args.threads, args.torch_threads)
        logging.getLogger("sslkit.eval").info("%s", plan.describe())
        args.threads = plan.dali
        report = run(options(args, argv, plan))
    except SslkitError as e:   # a bad setting or input (loader and manifest errors are SslkitErrors too)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(report["eval"], {("random-init" if n == "random" else n): r for n, r in report["results"].items()},
                title(report)))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0
