"""Goyal et al. (ICCV 2019)'s scaling study as one command: transfer against data size, problem complexity
(|P| for jigsaw, K for colorization) and capacity, one pretraining + evaluation per point.

    python bench/scaling.py --preset cpu-perms                      # a named study (see --list-presets)
    python bench/scaling.py --method jigsaw --train-preset fmnist --axis perms --values 10,100,1000 \\
        --arches resnet_tiny,resnet18 --dataset fmnist --seeds 2 --json bench/out/scaling-perms.json

Every point (one axis value x one trunk x one seed) is:
1. pretraining: `train.py --method M --preset P --arch A --seed S --data SUBSET --out RUN` plus the axis'
   override: --axis data: the first N images of the training source (`sslkit.shard build --limit N`; an
   image folder is first listed once in a fixed random order, so subsets are nested and mix classes) at a
   fixed number of images seen (--budget-images B: B/N epochs, to the nearest whole epoch, so steps stay
   about equal at the preset's batch); --axis perms: `--set method_options.permutations=V`; --axis k:
   `--set method_options.k=V`; --axis arch: `--arch V` (the values are the trunks); --axis option:
   `--set KEY=V` for --option KEY (any train.py config field: recipe sweeps);
2. evaluation on fixed labelled sets, whatever the axis (the `bench/ssl_quality.py` protocol): the first
   --train-images of the training source (kNN memory, probe and SVM training set) and --test-images test
   images (every number is measured on them); kNN (k=20, T=0.07) and a linear probe (--fast: cached
   centre-crop features) at each of --layers, one-vs-rest linear SVMs (mAP, 3-fold CV of the cost) and
   low-shot SVMs at --shots per class (mean over --draws draws) at --svm-layers; each beside the same trunk
   at its seeded random init (`python -m sslkit.eval`'s baseline). Raw pixels are evaluated once per study.

Plot (one PNG per study, i.e. per axis, in the paper's style): every metric against the axis, one line per
trunk, the mean over seeds with +-1 standard deviation error bars (--seeds N), log x for data and |P|, the
trunk's random init (dotted, its colour) and raw pixels (dashed grey) as reference lines.

Resumable: each point lives in WORK/points/<name>-<hash>, the hash of its full configuration (method,
presets, trunk, seed, axis value, data, evaluation options, device). A finished point (its point.json) is
never recomputed; a half-trained one continues through train.py's own resume from its run folder; an
evaluation that wrote its JSON is not re-run. So re-running an interrupted study (Ctrl-C, kill, preemption,
--max-points) continues where it stopped. Every command run (and every command behind a cached point) is
in the study's JSON. Nothing is ever deleted: a different configuration is a different folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from ssl_quality import (ALEXNET_LAYERS, REPO, RESNET_LAYERS, Runner, build_shards,  # noqa: E402
                         cpu_seconds)   # (stdlib only at import)

AXES = ("data", "perms", "k", "arch", "option")
AXIS_OPTION = {"perms": "method_options.permutations", "k": "method_options.k"}   # --axis option: --option KEY
NOT_OPTIONS = ("arch", "data", "out", "seed", "device", "method", "preset")      # the study sets these itself

# Study presets. CPU ones run on the 2-core machine (Fashion-MNIST / the embedded colour corpus); `full-*`
# ones are the paper's scale on GPUs (their data must be given: --dataset SOURCE, --eval-train/--eval-test).
# Cost estimates are in docs/BENCHMARKS.md ("Scaling study").
CPU_EVAL = dict(train_images=5000, test_images=None, layers=None, svm_layers=1, probe_epochs=28, shots="1,4,8",
                draws=5, device="cpu")
GPU_EVAL = dict(train_images=None, test_images=None, layers=None, svm_layers=3, probe_epochs=28,
                shots="1,2,4,8,16,32,64,96", draws=5, device="cuda")   # VOC07 SVMs at 3 layers, as the paper


def _preset(about: str, method: str, train_preset: str, axis: str, values: str, *, dataset: str | None = "fmnist",
            arches: str | None = "resnet_tiny", seeds: int = 1, evaluation: dict = CPU_EVAL, **more) -> dict:
    """One study preset: what is pretrained and varied, on which data, evaluated how (CPU_EVAL or GPU_EVAL);
    `more` adds the rest (option, epochs, budget_images, set) and overrides evaluation fields."""
    return dict(about=about, method=method, train_preset=train_preset, axis=axis, values=values, arches=arches,
                dataset=dataset, seeds=seeds, **{**evaluation, **more})


PRESETS = {
    "tiny": _preset("tests and smoke runs: jigsaw `tiny`, |P| 10 vs 100 on 64 colour crops, 1 epoch, one layer "
                    "pair; ~1 min on 2 cores",
                    "jigsaw", "tiny", "perms", "10,100", dataset="sample", epochs=1, train_images=64,
                    test_images=48, layers="res5avg,res3", probe_epochs=2, shots="1,2", draws=2),
    # resnet18's jigsaw step is ~12x resnet_tiny's on 2 cores, so only cpu-perms carries both lines;
    # `--arches resnet_tiny,resnet18` adds the second line to cpu-data (~2.5 h more).
    "cpu-data": _preset("jigsaw `fmnist`, 1k/4k/16k/60k Fashion-MNIST images at 64,000 images seen (2,000 steps "
                        "at batch 32), resnet_tiny, 2 seeds",
                        "jigsaw", "fmnist", "data", "1000,4000,16000,60000", seeds=2, budget_images=64000),
    "cpu-perms": _preset("jigsaw `fmnist` on 5,000 Fashion-MNIST images, |P| 10/100/1000, resnet_tiny vs "
                         "resnet18, 2 seeds, 5 epochs (780 steps)",
                         "jigsaw", "fmnist", "perms", "10,100,1000", arches="resnet_tiny,resnet18", seeds=2,
                         epochs=5),
    "cpu-k": _preset("colorization `sample` on the embedded colour corpus (600 / 300 crops), K 2/10/40, "
                     "resnet_tiny vs alexnet_colorization, 2 seeds",
                     "colorization", "sample", "k", "2,10,40", dataset="sample",
                     arches="resnet_tiny,alexnet_colorization", seeds=2, train_images=600, test_images=300),
    "cpu-arch": _preset("jigsaw `fmnist` at Goyal's geometry (64 px tiles of a 255 px crop, which AlexNet's "
                        "trunk needs): resnet_tiny vs resnet18 vs alexnet_jigsaw, 1 epoch, 1 seed",
                        "jigsaw", "fmnist", "arch", "resnet_tiny,resnet18,alexnet_jigsaw", arches=None, epochs=1,
                        set=["method_options.geometry=goyal"]),
    # Recipe points for small images (issue 22, item 4): the variants the literature suggests, as config
    # overrides of the `fmnist` presets (tile geometry, head width, |P| are cpu-perms, batch, epochs), on
    # 5,000 Fashion-MNIST images.
    "cpu-jigsaw-geometry": _preset("jigsaw `fmnist`: tile geometry small (16 px tiles of a 63 px crop) vs noroozi "
                                   "(64 px tiles, per-tile normalisation) vs goyal (64 px of 255), 1 seed",
                                   "jigsaw", "fmnist", "option", "small;noroozi;goyal",
                                   option="method_options.geometry"),
    "cpu-jigsaw-head": _preset("jigsaw `fmnist`: per-tile head width 64/128/512, 1 seed",
                               "jigsaw", "fmnist", "option", "64,128,512", option="method_options.tile_dim"),
    "cpu-jigsaw-batch": _preset("jigsaw `fmnist`: batch 16/32/64 at the same lr per 256 images and epochs, 1 seed",
                                "jigsaw", "fmnist", "option", "16,32,64", option="batch_size"),
    "cpu-jigsaw-epochs": _preset("jigsaw `fmnist`: 10/20/40 epochs, 1 seed",
                                 "jigsaw", "fmnist", "option", "10,20,40", option="epochs"),
    "cpu-jigclu-patch": _preset("jigclu `fmnist`: 32/48/64 px patches (64-128 px montages; the method refuses < 32), "
                                "1 seed",
                                "jigclu", "fmnist", "option", "32,48,64", option="method_options.patch_size"),
    "cpu-jigclu-cross": _preset("jigclu `fmnist`: patch overlap (cross) 0/0.15/0.3, 1 seed",
                                "jigclu", "fmnist", "option", "0.0,0.15,0.3", option="method_options.cross"),
    "full-data": _preset("Goyal'19 Fig. 1: jigsaw |P| 2000 on 1M/10M/50M/100M images of a YFCC100M file list at a "
                         "fixed 134M images seen (ImageNet-1k x 105 epochs), ResNet-50 vs AlexNet, VOC07 SVM transfer",
                         "jigsaw", "rn50_perm2000", "data", "1000000,10000000,50000000,100000000", dataset=None,
                         arches="resnet50,alexnet_jigsaw", evaluation=GPU_EVAL, budget_images=134_553_600),
    "full-perms": _preset("Goyal'19 Fig. 2: jigsaw on ImageNet-1k, |P| 100/701/2000/5000/10000, ResNet-50 vs "
                          "AlexNet, 105 epochs, VOC07 SVM transfer",
                          "jigsaw", "rn50_perm2000", "perms", "100,701,2000,5000,10000", dataset=None,
                          arches="resnet50,alexnet_jigsaw", evaluation=GPU_EVAL),
    "full-k": _preset("Goyal'19 complexity axis for colorization on ImageNet-1k, K 2/10/40, ResNet-50 vs AlexNet "
                      "(needs --set method_options.prior=FILE)",
                      "colorization", "rn50_k10", "k", "2,10,40", dataset=None,
                      arches="resnet50,alexnet_colorization", evaluation=GPU_EVAL),
}
DEFAULTS = dict(method=None, train_preset=None, axis=None, option=None, values=None, arches=None, dataset="fmnist",
                seeds=1, epochs=None, budget_images=None, label_column=None, **CPU_EVAL)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named study; the options below override it")
    p.add_argument("--list-presets", action="store_true", help="print the study presets and exit")
    g = p.add_argument_group("the study")
    g.add_argument("--method", help="pretraining method of train.py (jigsaw, colorization, ...)")
    g.add_argument("--train-preset", help="its train.py preset (e.g. fmnist, sample, rn50_perm2000)")
    g.add_argument("--axis", choices=AXES, help="what varies: data (images), perms (|P|), k (K), arch (trunk), "
                                                "option (any train.py config field, --option KEY)")
    g.add_argument("--option", metavar="KEY", help="--axis option: the config field varied, e.g. lr, "
                                                   "method_options.tile_dim, method_options.geometry")
    g.add_argument("--values", help="comma-separated axis values (data accepts 1k, 10M; arch takes trunk names; "
                                    "option: values as --set reads them, ';'-separated when they hold commas)")
    g.add_argument("--arches", help="comma-separated trunks, one line each (not with --axis arch)")
    g.add_argument("--seeds", type=int, help="seeds per point (0..N-1): pretraining, random init and probes")
    g.add_argument("--epochs", type=int, help="pretraining epochs (default: the train preset's)")
    g.add_argument("--budget-images", type=_count, help="--axis data: images seen per point (epochs = B / N)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to train.py")
    g.add_argument("--arch-set", action="append", default=[], metavar="ARCH:KEY=VALUE",
                   help="passed on to train.py for that trunk only (e.g. alexnet_jigsaw:method_options.geometry=goyal)")
    g.add_argument("--launcher", help="prefix of train.py instead of this Python, e.g. 'torchrun --nproc_per_node=8'")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--dataset", help="fmnist, sample, an image folder (classes: its subfolders; taken in a fixed "
                                     "random order) or a file list (in its order): the first --test-images items "
                                     "are the test set, subsets of the rest train")
    g.add_argument("--label-column", help="--dataset FILE_LIST: its column of class names (a folder's classes "
                                           "are its first-level subfolders)")
    g.add_argument("--train-images", type=_count, help="evaluation training set (fmnist: 5000; sample: 600)")
    g.add_argument("--test-images", type=_count, help="test set (fmnist: 10000; sample: 300)")
    g.add_argument("--eval-train", help="labelled shard folder to evaluate on instead (e.g. VOC07 trainval)")
    g.add_argument("--eval-test", help="labelled shard folder measured on instead (e.g. VOC07 test)")
    g.add_argument("--layers", help="kNN/linear layers (default res5avg,res4,res3; AlexNet conv5,conv4,conv3)")
    g.add_argument("--svm-layers", type=int, help="SVM and low-shot at the first N of --layers (0: none)")
    g.add_argument("--shots", help="low-shot samples per class (1,4,8)")
    g.add_argument("--draws", type=int, help="low-shot draws per shot count (5)")
    g.add_argument("--probe-epochs", type=int, help="linear probe epochs (28)")
    g.add_argument("--size", type=int, default=64, help="trunk eval crop, the image resized to it (64)")
    g.add_argument("--pixels-size", type=int, default=28, help="raw-pixel baseline crop (28)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="where training and evaluation run (cpu)")
    g = p.add_argument_group("output")
    g.add_argument("--work", default=os.path.join(REPO, ".cache", "scaling"), help="points, shards, features")
    g.add_argument("--json", help="study JSON (default bench/out/scaling-<preset or method-axis>.json)")
    g.add_argument("--plot", help="PNG (default: the JSON's name with .png)")
    g.add_argument("--max-points", type=int, help="compute at most N new points, then write the JSON and stop")
    args = p.parse_args(argv)
    if args.list_presets:
        for name, s in PRESETS.items():
            print(f"{name:<20} {s['about']}")
        sys.exit(0)
    return resolve(p, args)


def _count(text: str) -> int:
    """1000, 1k, 10M -> int."""
    t = text.strip().lower().replace("_", "")
    mult = {"k": 10**3, "m": 10**6}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count like 1000, 4k or 10M") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return n


def resolve(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Preset, then command-line options; checks what a study needs before anything runs."""
    base = {**DEFAULTS, **PRESETS.get(args.preset, {})}
    for key, val in base.items():
        if key in ("set", "arch_set"):           # lists: the preset's, then the command line's
            setattr(args, key, list(val) + getattr(args, key))
        elif key != "about" and getattr(args, key, None) is None:
            setattr(args, key, val)
    for need in ("method", "train_preset", "axis", "values", "dataset"):
        if getattr(args, need) is None:
            p.error(f"--{need.replace('_', '-')} is required (or a --preset that sets it)")
    if args.axis == "option":
        if not args.option or args.option.split(".")[0] in NOT_OPTIONS or (args.option == "epochs" and args.epochs):
            p.error(f"--axis option needs --option KEY, a train.py config field other than {', '.join(NOT_OPTIONS)} "
                    "(and not epochs together with --epochs)")
    text = str(args.values)
    try:
        args.values = [v.strip() if args.axis in ("arch", "option") else _count(v)
                       for v in text.split(";" if ";" in text else ",") if v.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(f"--values: {e}")
    if len(set(args.values)) != len(args.values) or not args.values:
        p.error(f"--values {args.values}: need distinct values")
    args.arches = args.values if args.axis == "arch" else [a for a in (args.arches or "resnet_tiny").split(",") if a]
    if args.axis == "data" and args.epochs and args.budget_images:
        p.error("--axis data: give --epochs or --budget-images, not both")
    args.arch_sets = {}
    for item in args.arch_set:
        arch, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            p.error(f"--arch-set {item!r}: expected ARCH:KEY=VALUE")
        args.arch_sets.setdefault(arch, []).append(kv)
    args.option = args.option if args.axis == "option" else AXIS_OPTION.get(args.axis)
    if args.option and any(s.split("=")[0] == args.option for s in args.set):
        p.error(f"--set {args.option}=... is what --axis {args.axis} varies: drop it")
    if (args.eval_train is None) != (args.eval_test is None):
        p.error("--eval-train and --eval-test go together")
    for opt, d in (("--eval-train", args.eval_train), ("--eval-test", args.eval_test)):
        if d is not None and not os.path.exists(os.path.join(d, "manifest.json")):
            p.error(f"{opt} {d}: no manifest.json there (a shard folder from `python -m sslkit.shard build`)")
    if args.dataset not in ("fmnist", "sample") and not os.path.exists(args.dataset):
        p.error(f"--dataset {args.dataset}: no such file or folder (fmnist, sample, or a shard build source)")
    try:
        args.shots = [_count(s) for s in str(args.shots).split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(f"--shots: {e}")
    name = args.preset or f"{args.method}-{args.axis}"
    args.json = os.path.abspath(args.json or os.path.join(REPO, "bench", "out", f"scaling-{name}.json"))
    args.plot = os.path.abspath(args.plot or os.path.splitext(args.json)[0] + ".png")
    args.work = os.path.abspath(args.work)
    return args


# --- data ---------------------------------------------------------------------------------------------

def shuffled_list(folder: str, work: str) -> str:
    """A folder tree (first-level subfolders = classes) as a file list in a fixed random order (seed 0),
    written once under work/lists: `--skip/--limit` on a sorted walk would take whole classes, on this
    list they take nested random subsets (the first N images of every larger subset, as data axes need)."""
    import random
    from sslkit.shard.sources import FolderSource, SourceOptions
    root = os.path.abspath(folder)
    out = os.path.join(work, "lists", f"{os.path.basename(root)}-{hashlib.sha1(root.encode()).hexdigest()[:8]}.tsv")
    if not os.path.exists(out):
        items = [(it.ref, it.label) for it in FolderSource(root, SourceOptions(labels="dirs")).items()]
        random.Random(0).shuffle(items)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            f.write("path\tlabel\n" + "".join(f"{path}\t{label}\n" for path, label in items))
        os.replace(out + ".tmp", out)
        print(f"{root}: {len(items)} images listed in a fixed random order in {out}", flush=True)
    return out


def source_subset(run: Runner, py: str, a, n: int | None, skip: int) -> str:
    """Items skip..skip+n of --dataset (a folder: of its shuffled list) as a shard folder under work/shards,
    built once with `sslkit.shard build --skip --limit`."""
    src, labels = a.dataset, ["--label-column", a.label_column] if a.label_column else []
    if os.path.isdir(src):
        src, labels = shuffled_list(src, a.work), ["--label-column", "label"]
    tag = hashlib.sha1(os.path.abspath(a.dataset).encode()).hexdigest()[:8]
    name = os.path.basename(os.path.abspath(a.dataset))
    out = os.path.join(a.work, "shards", f"{name}-{tag}-skip{skip}-n{n or 'all'}")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        cmd = [py, "-m", "sslkit.shard", "build", src, *labels, "--out", out, "--skip", str(skip), "--shuffle",
               "--no-progress"]
        run("shards", cmd + (["--limit", str(n)] if n else []))
    return out


def eval_sets(run: Runner, py: str, a) -> tuple[str, str]:
    """(training, test) labelled shard folders every point is evaluated on."""
    if a.eval_train:
        return os.path.abspath(a.eval_train), os.path.abspath(a.eval_test)
    if a.dataset in ("fmnist", "sample"):
        n = a.train_images or {"fmnist": 5000, "sample": 600}[a.dataset]
        train, test, _ = build_shards(run, py, a.dataset, n, a.test_images, a.work)
        return train, test
    n_test = a.test_images or 10000
    return source_subset(run, py, a, a.train_images, n_test), source_subset(run, py, a, n_test, 0)


def pretrain_set(run: Runner, py: str, a, value, eval_train: str) -> str:
    """What a point pretrains on: the first N training images on the data axis, else the evaluation set."""
    if a.axis != "data":
        return eval_train
    if a.dataset in ("fmnist", "sample"):
        return build_shards(run, py, a.dataset, value, a.test_images, a.work)[0]
    skip = 0 if a.eval_train else (a.test_images or 10000)    # the source's test items are not pretrained on
    return source_subset(run, py, a, value, skip)


# --- points -------------------------------------------------------------------------------------------

def point_configs(a, data_id: dict) -> list[dict]:
    """Every point of the study, in run order: value-major, then trunk, then seed."""
    out = []
    for value in a.values:
        for arch in ([value] if a.axis == "arch" else a.arches):
            for seed in range(a.seeds):
                layers = a.layers or (ALEXNET_LAYERS if arch.startswith("alexnet") else RESNET_LAYERS)
                epochs = a.epochs
                if a.axis == "data" and a.budget_images:
                    epochs = max(1, round(a.budget_images / value))
                sets = list(a.set) + a.arch_sets.get(arch, [])
                if a.option:
                    sets.append(f"{a.option}={value}")
                cfg = {"method": a.method, "train_preset": a.train_preset, "arch": arch, "seed": seed,
                       "axis": a.axis, "value": value, "epochs": epochs, "sets": sets, "data": data_id,
                       "pretrain_images": value if a.axis == "data" else None, "device": a.device,
                       "launcher": a.launcher,
                       "eval": {"layers": layers.split(","), "svm_layers": a.svm_layers, "size": a.size,
                                "probe_epochs": a.probe_epochs, "shots": a.shots, "draws": a.draws}}
                if a.axis == "option":
                    cfg["option"] = a.option
                out.append(cfg)
    return out


def point_key(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def point_name(cfg: dict) -> str:
    axis = cfg["option"].split(".")[-1] + "=" if cfg["axis"] == "option" else cfg["axis"]
    name = f"{cfg['method']}-{cfg['arch']}-{axis}{cfg['value']}-seed{cfg['seed']}"
    return "".join(ch if ch.isalnum() or ch in "._=-" else "_" for ch in name)[:120]


def run_point(run: Runner, py: str, a, cfg: dict, pre_dir: str, eval_dirs: tuple[str, str], folder: str,
              say) -> dict:
    """Pretrain (resuming train.py's run) and evaluate one point; returns its record."""
    run_dir = os.path.join(folder, "run")
    cmd = (shlex.split(cfg["launcher"]) if cfg["launcher"] else [py]) + [
        "train.py", "--method", cfg["method"], "--preset", cfg["train_preset"], "--arch", cfg["arch"],
        "--data", pre_dir, "--out", run_dir, "--device", cfg["device"], "--seed", str(cfg["seed"])]
    if cfg["epochs"]:
        cmd += ["--epochs", str(cfg["epochs"])]
    for s in cfg["sets"]:
        cmd += ["--set", s]
    resumed = os.path.isdir(os.path.join(run_dir, "checkpoints"))
    say("pretraining" + (" (resuming its run folder)" if resumed else ""))
    pretrain(run, cmd, run_dir)
    results = evaluate_trunk(run, a, run_dir, cfg["eval"], eval_dirs, os.path.join(folder, "results"), cfg["seed"],
                             say)
    with open(os.path.join(run_dir, "config.json")) as f:
        train_cfg = json.load(f)
    log = _log_records(run_dir)
    epochs = [r for r in log if r.get("kind") == "epoch"]
    return {"pretrain": {"run": run_dir, "data": pre_dir, "epochs": train_cfg["epochs"],
                         "data_counts": _counts(pre_dir), "batch_size": train_cfg["batch_size"],
                         "steps": max([r.get("step", 0) for r in log] or [0]),
                         "epoch_losses": [r["loss"] for r in epochs],
                         "pretext_acc": epochs[-1].get("acc") if epochs else None,
                         "seconds": sum(r.get("epoch_s", 0.0) for r in epochs), "resumed": resumed},
            "results": results}


def pretrain(run: Runner, argv: list[str], run_dir: str) -> None:
    """Run train.py (recorded like every command) and pass SIGTERM/SIGUSR1 on to it, so a preempted study
    leaves a checkpointed run that the next invocation resumes. train.py exits 0 after a preemption, so
    the run is complete only when its log holds its last epoch; otherwise stop before evaluating."""
    line = " ".join(shlex.quote(x) for x in argv)
    run.commands.append(line)
    print(f"\n$ {line}", flush=True)
    t0, c0 = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    child = subprocess.Popen(argv, cwd=REPO)
    forwarded = []

    def forward(signum, _frame):
        forwarded.append(signal.Signals(signum).name)
        child.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        rc = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    run.add("pretrain", time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_CHILDREN) - c0)
    if rc != 0:
        sys.exit(f"error: pretraining failed (exit {rc}): {line}")
    with open(os.path.join(run_dir, "config.json")) as f:
        last = json.load(f)["epochs"] - 1
    finished = any(r.get("kind") == "epoch" and r.get("epoch") == last for r in _log_records(run_dir))
    if forwarded or not finished:      # a signal stops the study even when it came after the last step
        where = "after its last epoch" if finished else "before its last epoch"
        sys.exit(f"stopped: pretraining in {run_dir} ended {where} "
                 f"({', '.join(forwarded) or 'train.py stopped early'}); re-run the same command to continue")


def _log_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- evaluation ---------------------------------------------------------------------------------------

def evaluate_trunk(run: Runner, a, ckpt: str, ev: dict, eval_dirs: tuple[str, str], out_dir: str, seed: int,
                   say, pixels: bool = False) -> dict:
    """kNN + linear at every layer, SVM + low-shot at the first svm_layers: {kind: {layer: {subject: ...}}}
    with subjects ssl and random (a trunk) or pixels."""
    common = ["--train", eval_dirs[0], "--val", eval_dirs[1], "--device", a.device, "--seed", str(seed),
              "--cache-dir", os.path.join(a.work, "features"), "--no-progress"]
    size = a.pixels_size if pixels else ev["size"]
    common += ["--size", str(size), "--resize", str(size)]
    layers = [None] if pixels else ev["layers"]
    svm_layers = layers[:max(0, ev["svm_layers"])]
    jobs = [(kind, layer) for layer in layers for kind in ("knn", "linear")] + \
           [(kind, layer) for layer in svm_layers for kind in ("svm", "lowshot")]
    extra = {"knn": ["--k", "10,20,100,200"], "linear": ["--fast", "--epochs", str(ev["probe_epochs"])], "svm": [],
             "lowshot": ["--shots", ",".join(map(str, ev["shots"])), "--draws", str(ev["draws"])]}
    out: dict = {}
    for i, (kind, layer) in enumerate(jobs, 1):
        say(f"evaluation {i}/{len(jobs)}: {kind}" + (f" at {layer}" if layer else ""))
        ck = ["--ckpt", "pixels"] if pixels else ["--ckpt", ckpt, "--layer", layer]
        rep = run.evaluate(kind, ck + common + extra[kind], os.path.join(out_dir, f"{kind}-{layer or 'pixels'}.json"),
                           reuse=True)
        subjects = {{"ckpt": "ssl"}.get(n, n): r for n, r in rep["results"].items()}
        out.setdefault(kind, {})[layer or "pixels"] = {n: summarise(kind, r) for n, r in subjects.items()}
    return out


def summarise(kind: str, r: dict) -> dict:
    """The figures a study reads from one evaluation result (fractions)."""
    if kind == "knn":
        return {"top1": r["top1"]["20"]}
    if kind == "linear":
        return {"top1": r["top1"]}
    if kind == "svm":
        return {"mAP": r["mAP"], "top1": r["top1"]}
    return {k: {"mAP": v["mAP"]["mean"], "mAP_std": v["mAP"]["std"], "top1": v["top1"]["mean"]}
            for k, v in r["shots"].items()}


# --- the study ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    a = parse_args(argv)
    t_start, load_start = time.perf_counter(), list(os.getloadavg())
    run, py = Runner(), sys.executable
    os.makedirs(a.work, exist_ok=True)
    print(f"scaling study: {a.method} ({a.train_preset}), axis {a.axis} = {a.values}, trunks {a.arches}, "
          f"{a.seeds} seed(s); work folder {a.work}", flush=True)
    eval_dirs = eval_sets(run, py, a)
    data_id = {"dataset": a.dataset if a.dataset in ("fmnist", "sample") else os.path.abspath(a.dataset),
               "eval_train": _identity(eval_dirs[0]), "eval_test": _identity(eval_dirs[1]),
               "test_images": a.test_images}
    configs = point_configs(a, data_id)
    ref_dir = os.path.join(a.work, "reference", "pixels-" + point_key({"data": data_id, "size": a.pixels_size,
                                                                         "probe": a.probe_epochs, "shots": a.shots,
                                                                         "draws": a.draws, "device": a.device}))
    pix_eval = {"layers": [None], "svm_layers": a.svm_layers, "size": a.pixels_size, "probe_epochs": a.probe_epochs,
                "shots": a.shots, "draws": a.draws}
    pixels = evaluate_trunk(run, a, "pixels", pix_eval, eval_dirs, ref_dir, 0, lambda m: print(f"[pixels] {m}",
                                                                                              flush=True), pixels=True)
    points, computed, durations = [], 0, []
    stopped = False
    for i, cfg in enumerate(configs, 1):
        folder = os.path.join(a.work, "points", f"{point_name(cfg)}-{point_key(cfg)}")
        done = os.path.join(folder, "point.json")

        def say(msg, i=i, cfg=cfg, finished=False):
            left = len(configs) - i + (0 if finished else 1)
            eta = f", ~{_hms(sum(durations) / len(durations) * left)} left" if durations and left else ""
            print(f"[point {i}/{len(configs)} | {_hms(time.perf_counter() - t_start)} elapsed{eta}] "
                  f"{cfg['arch']} {cfg['axis']}={cfg['value']} seed {cfg['seed']}: {msg}", flush=True)
        if os.path.exists(done):
            with open(done) as f:
                rec = json.load(f)
            if rec.get("config") == cfg:
                say("cached (finished earlier), not recomputed")
                rec["cached"] = True
                points.append(rec)
                continue
        if a.max_points is not None and computed >= a.max_points:
            stopped = True         # later points may still be cached: keep reading them back
            continue
        t0, n_cmd = time.perf_counter(), len(run.commands)
        pre_dir = pretrain_set(run, py, a, cfg["value"], eval_dirs[0])
        rec = {"name": point_name(cfg), "key": point_key(cfg), "folder": folder, "config": cfg,
               **run_point(run, py, a, cfg, pre_dir, eval_dirs, folder, say)}
        rec["commands"] = run.commands[n_cmd:]
        rec["wall_seconds"] = time.perf_counter() - t0
        _write_json(done, rec)
        rec["cached"] = False
        points.append(rec)
        computed += 1
        durations.append(rec["wall_seconds"])
        say(f"done in {_hms(rec['wall_seconds'])}", finished=True)
    return finish(a, run, configs, points, pixels, eval_dirs, stopped, t_start, load_start,
                  sys.argv[1:] if argv is None else list(argv))


def finish(a, run: Runner, configs, points, pixels, eval_dirs, stopped, t_start, load_start, argv) -> int:
    from scaling_plot import plot_study, summary_table   # matplotlib only once there is something to draw
    complete = len(points) == len(configs)
    report = {"study": {k: v for k, v in vars(a).items() if k not in ("list_presets",)},
              "complete": complete, "points_total": len(configs), "points_done": len(points),
              "eval_sets": {"train": _counts(eval_dirs[0]), "test": _counts(eval_dirs[1])},
              "references": {"pixels": pixels, "random": "each point's results[...]['random']"},
              "points": points,
              "commands": run.commands + [c for p in points if p.get("cached") for c in p["commands"]],
              "commands_this_run": run.commands, "reused_this_run": run.reused,
              "plot": a.plot if points else None,
              "seconds": {**run.seconds, "total": time.perf_counter() - t_start}, "cpu_seconds": run.cpu_seconds,
              "load_average": {"start": load_start, "end": list(os.getloadavg())},
              "cores": len(os.sched_getaffinity(0)),
              "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "argv": argv}
    if points:
        plot_study(report, a.plot)
        report["table"] = summary_table(report)
        print("\n" + report["table"])
    _write_json(a.json, report)
    print(f"\n{len(points)}/{len(configs)} points in {a.json}" + (f", plot {a.plot}" if points else ""))
    if stopped:
        print(f"stopped after {a.max_points} new point(s) (--max-points): re-run the same command to continue")
    return 0


def _identity(shard_dir: str) -> dict:
    """A shard folder as the cache key sees it: its path and the manifest's total and shard checksums."""
    with open(os.path.join(shard_dir, "manifest.json")) as f:
        m = json.load(f)
    digest = hashlib.sha1("".join(s.get("sha256", "") for s in m.get("shards", [])).encode()).hexdigest()[:12]
    return {"dir": shard_dir, "total": m.get("total"), "shards": digest}


def _counts(shard_dir: str) -> dict:
    """A shard folder's size and what its build rejected (listed in its rejected.tsv)."""
    with open(os.path.join(shard_dir, "manifest.json")) as f:
        m = json.load(f)
    return {"dir": shard_dir, "total": m.get("total"), "rejected": m.get("rejected")}


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


if __name__ == "__main__":
    sys.exit(main())
