"""Does a pretraining method learn anything? The CPU protocol end to end on Fashion-MNIST.

    python bench/ssl_quality.py --device cpu --method deepclusterv2 --preset fmnist --json bench/out/q.json
    python bench/ssl_quality.py --device cpu --method colorization --preset sample --dataset sample --json F

1. shards: `--dataset fmnist` (default): the first --train-images (5,000) Fashion-MNIST training images,
   labelled (pretraining data, kNN memory and probe training set), and the 10,000 test images (what every
   number is measured on; --test-images N takes the first N), each `sslkit.shard build IDX --limit N`.
   `--dataset sample`: the embedded colour corpus labelled by photo,
   `sample:600` at seed 0 for training and `sample:300` at seed 1 for testing (other random crops of the
   same 12 photographs) -- for colorization, which has nothing to learn from grey images;
2. pretraining: `train.py --method M --preset P --data TRAIN --out RUN --device cpu` (a subprocess);
3. supervised reference: the same architecture trained with labels on the same images by the project's
   own trainer, `train.py --method supervised --preset tiny --arch ARCH` (eval_train crops at scale
   --sup-scale-1 + flip, --sup-epochs epochs, SGD + cosine, cross-entropy) -- the upper end the SSL trunk
   is read against. It is built with the architecture's default options and RGB input: for colorization's
   1-channel, stride-1 trunk it is the RGB version of the same architecture;
4. evaluation with `python -m sslkit.eval` (run in this process, each recorded as its command line;
   features cached under the work folder):
   kNN (k=20, T=0.07) and a linear probe (`--fast`: cached centre-crop features, no augmentation) for
   the SSL trunk, the same trunk at its seeded initialisation (the CLI's baseline), raw pixels (a
   --pixels-size centre crop, 28: the raw 28x28 Fashion-MNIST image; L2-normalised; kNN and linear) and
   the supervised trunk (its global pool). The SSL trunk and its random init are read at several layers
   (--layers; default the global pool res5avg, then res4 and res3 average-pooled to ~1k dims here): a
   pretext task specialises the last block to itself, and Goyal et al. (2019) read jigsaw and
   colorization at res4 or earlier. The headline `ssl`/`random` figures are the first layer's; all
   are under `layers` in the JSON.

Trunk features use a --size crop of the images resized to --size (64: 28x28 upsampled, the resolution
of the `fmnist` presets' large crops). Numbers are fractions. Everything (shards, runs, features,
per-eval JSON) lives under --work and is reused on a re-run with the same options (--fresh starts
over). Budget: <= 15 minutes on 2 CPU cores per method (the `fmnist` presets are sized for it; the
figures are in docs/BENCHMARKS.md, "Does it learn?").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def fashion_mnist() -> str:
    from sslkit.shard.sources import fashion_mnist_dir
    d = fashion_mnist_dir()
    if d is None:
        sys.exit("error: Fashion-MNIST not found: run `make test` (fetches Debian's dataset-fashion-mnist into "
                 ".cache/data) or set SSLKIT_FASHION_MNIST")
    return d


def cpu_seconds(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class Runner:
    """Runs and records commands (the JSON's `commands`), timing each stage: wall seconds, and CPU
    seconds (user + system of the stage's processes), which a machine shared with other jobs inflates
    far less than wall time."""

    def __init__(self):
        self.commands: list[str] = []
        self.reused: list[str] = []     # evaluations read back from an earlier invocation's JSON, not run again
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def add(self, stage: str, wall: float, cpu: float):
        self.seconds[stage] = self.seconds.get(stage, 0.0) + wall
        self.cpu_seconds[stage] = self.cpu_seconds.get(stage, 0.0) + cpu

    def __call__(self, stage: str, argv: list[str]):
        line = " ".join(shlex.quote(a) for a in argv)
        self.commands.append(line)
        print(f"\n$ {line}", flush=True)
        t0, c0 = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
        rc = subprocess.call(argv, cwd=REPO)
        self.add(stage, time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_CHILDREN) - c0)
        if rc != 0:
            sys.exit(f"error: stage {stage} failed (exit {rc}): {line}")

    def evaluate(self, kind: str, argv: list[str], out: str, reuse: bool = False) -> dict:
        """`python -m sslkit.eval KIND ARGV --out OUT` run in this process (torch, DALI and the pipelines'
        numba operators load once per bench run, not once per evaluation: most of a small evaluation's
        time), recorded like a subprocess; with reuse, skipped when OUT exists (an evaluation an earlier
        invocation finished). Returns OUT's report."""
        full = [kind, *argv, "--out", out]
        line = "python -m sslkit.eval " + " ".join(shlex.quote(x) for x in full)
        self.commands.append(line)
        if reuse and os.path.exists(out):
            self.reused.append(line)
        else:
            from sslkit.eval.cli import main as eval_main
            print(f"\n$ {line}", flush=True)
            t0, c0 = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
            rc = eval_main(full)
            self.add(f"eval_{kind}", time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_SELF) - c0)
            if rc != 0:
                sys.exit(f"error: evaluation failed (exit {rc}): {line}")
        with open(out) as f:
            return json.load(f)


def supervised_command(py: str, train_dir: str, arch: str, out: str, epochs: int, size: int, batch: int,
                       lr: float, min_scale: float, seed: int, device: str) -> list[str]:
    """The supervised reference as the project trains it: `train.py --method supervised --preset tiny`
    with the SSL trunk's architecture, eval_train crops of `size` px at scale min_scale-1 + flip, SGD
    momentum 0.9, lr per 256 images (scaled to the batch), cosine to 0, weight decay 5e-4 (none on
    BN and biases), cross-entropy."""
    return [py, "train.py", "--method", "supervised", "--preset", "tiny", "--arch", arch, "--data", train_dir,
            "--out", out, "--device", device, "--epochs", str(epochs), "--batch-size", str(batch), "--lr", str(lr),
            "--seed", str(seed), "--set", "weight_decay=5e-4", "--set", f"method_options.size={size}",
            "--set", f"method_options.scale=[{min_scale},1.0]", "--set", "log_every=50"]


def top1s(rep: dict, kind: str) -> dict:
    """{subject: top-1} of one evaluation report (kNN: at k=20)."""
    return {name: r["top1"]["20"] if kind == "knn" else r["top1"] for name, r in rep["results"].items()}


DATASETS = ("fmnist", "sample")
RESNET_LAYERS, ALEXNET_LAYERS = "res5avg,res4,res3", "conv5,conv4,conv3"   # default --layers
SAMPLE_TEST = 300   # sample:300 at seed 1: the test set of --dataset sample


def build_shards(run: Runner, py: str, dataset: str, n_train: int, n_test: int | None, work: str
                 ) -> tuple[str, str, int]:
    """(train shards, test shards, test images) of a dataset, built under work/shards once: Fashion-MNIST's
    first n_train training images and first n_test test images (all 10,000 by default), each taken with
    `sslkit.shard build --limit`."""
    if dataset == "fmnist":
        fm = fashion_mnist()
        n_test = n_test or 10000
        splits = ((os.path.join(work, "shards", f"fm-train{n_train}"), "train", n_train),
                  (os.path.join(work, "shards", "fm-test" if n_test == 10000 else f"fm-test{n_test}"), "t10k", n_test))
        for d, split, n in splits:
            if not os.path.exists(os.path.join(d, "manifest.json")):
                run("shards", [py, "-m", "sslkit.shard", "build", os.path.join(fm, f"{split}-images-idx3-ubyte.gz"),
                               "--limit", str(n), "--out", d, "--no-progress"])
        return splits[0][0], splits[1][0], n_test
    n_test = n_test or SAMPLE_TEST
    train_dir = os.path.join(work, "shards", f"sample{n_train}-seed0")
    test_dir = os.path.join(work, "shards", f"sample{n_test}-seed1")
    for d, spec, seed in ((train_dir, f"sample:{n_train}", 0), (test_dir, f"sample:{n_test}", 1)):
        if not os.path.exists(os.path.join(d, "manifest.json")):
            run("shards", [py, "-m", "sslkit.shard", "build", spec, "--seed", str(seed), "--out", d, "--no-progress"])
    return train_dir, test_dir, n_test


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="deepclusterv2", help="pretraining method for train.py (deepclusterv2)")
    p.add_argument("--preset", default="fmnist", help="its preset (fmnist)")
    p.add_argument("--epochs", type=int, help="pretraining epochs (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to train.py")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where everything runs (cpu)")
    p.add_argument("--json", required=True, help="write the summary here")
    p.add_argument("--dataset", choices=DATASETS, default="fmnist",
                   help="fmnist (Fashion-MNIST, grey 28x28) or sample (the embedded colour corpus labelled by "
                        "photo: sample:N at seed 0 / sample:300 at seed 1; for colorization) (fmnist)")
    p.add_argument("--work", default=os.path.join(REPO, ".cache", "ssl_quality"),
                   help="shards, runs, features and per-eval JSON (.cache/ssl_quality)")
    p.add_argument("--train-images", type=int,
                   help="training images: pretraining, kNN memory, probe training (fmnist: the first 5000; "
                        "sample: sample:600)")
    p.add_argument("--test-images", type=int,
                   help="test images every number is measured on (fmnist: the first N of the 10,000; sample: 300)")
    p.add_argument("--size", type=int, default=64, help="eval crop of the trunks, the image resized to it (64)")
    p.add_argument("--pixels-size", type=int, default=28, help="eval crop of the raw-pixel baseline (28)")
    p.add_argument("--sup-epochs", type=int, default=15, help="epochs of the supervised reference (15)")
    p.add_argument("--sup-scale", type=float, default=0.5,
                   help="min RandomResizedCrop scale of the supervised reference (0.5)")
    p.add_argument("--sup-batch", type=int, default=128, help="batch of the supervised reference (128)")
    p.add_argument("--sup-lr", type=float, default=0.1, help="lr per 256 images of the supervised reference (0.1)")
    p.add_argument("--layers", help="comma-separated trunk layers the SSL trunk and its random init are read at, "
                                     "the first one the headline `ssl`/`random` figures (default: res5avg,res4,res3; "
                                     "AlexNet trunks conv5,conv4,conv3)")
    p.add_argument("--probe-epochs", type=int, default=28, help="linear probe epochs, fast mode (28)")
    p.add_argument("--seed", type=int, default=0, help="seed of the supervised run and the baselines (0)")
    p.add_argument("--fresh", action="store_true", help="delete this configuration's runs and results first")
    args = p.parse_args(argv)
    args.train_images = args.train_images or {"fmnist": 5000, "sample": 600}[args.dataset]
    args.work = os.path.abspath(args.work)
    return args


def data_tag(args) -> str:
    """The training and test data in a folder name: the supervised run and the results depend on it."""
    return f"{args.dataset}{args.train_images}" + (f"-test{args.test_images}" if args.test_images else "")


def pretrain(run: Runner, py: str, args, train_dir: str) -> tuple[str, str]:
    """(run folder, results folder) of the pretraining run, trained with train.py (re-running resumes; a
    finished run returns at once; --fresh deletes both folders first)."""
    tag = f"{args.method}-{args.preset}-e{args.epochs or 'preset'}-{data_tag(args)}" + \
        ("-" + "-".join(s.replace("=", "_").replace("/", "_") for s in args.set) if args.set else "")
    run_dir = os.path.join(args.work, "runs", tag)
    results_dir = os.path.join(args.work, "results", tag)
    cmd = [py, "train.py", "--method", args.method, "--preset", args.preset, "--data", train_dir, "--out", run_dir,
           "--device", args.device]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    for s in args.set:
        cmd += ["--set", s]
    if args.fresh:
        for d in (run_dir, results_dir):
            shutil.rmtree(d, ignore_errors=True)
    os.makedirs(results_dir, exist_ok=True)
    run("pretrain", cmd)
    return run_dir, results_dir


def supervised_reference(run: Runner, py: str, args, spec, train_dir: str) -> tuple[str, dict]:
    """(run folder, record) of the supervised reference: the project's trainer as a subprocess, the SSL
    trunk's architecture with its default options and RGB input (a finished run returns at once)."""
    sup_dir = os.path.join(args.work, "supervised", f"{spec.arch}-e{args.sup_epochs}-c{args.sup_scale}"
                           f"-b{args.sup_batch}-lr{args.sup_lr}-{data_tag(args)}-s{args.size}-seed{args.seed}")
    if args.fresh:
        shutil.rmtree(sup_dir, ignore_errors=True)
    run("supervised", supervised_command(py, train_dir, spec.arch, sup_dir, args.sup_epochs, args.size,
                                         args.sup_batch, args.sup_lr, args.sup_scale, args.seed, args.device))
    info = {"run": sup_dir, "ckpt": _ckpt_path(sup_dir), "epochs": _epoch_records(sup_dir),
            "trunk": {"arch": spec.arch, "kwargs": {}, "input": "rgb"}}
    if spec.kwargs or spec.input != "rgb":
        info["note"] = (f"the SSL trunk is {spec.arch} with {spec.kwargs}, input {spec.input}; the supervised "
                        f"reference is {spec.arch} with its defaults and RGB input")
    return sup_dir, info


def evaluate(run: Runner, args, layers: list[str], ckpts: dict[str, str], eval_dirs: tuple[str, str],
             results_dir: str) -> tuple[dict, dict]:
    """kNN + linear of the SSL trunk (and its random init) at every layer, raw pixels and the supervised
    trunk: (headline figures {ssl, random, pixels, supervised: {kind: top1}}, {layer: {ssl, random: ...}})."""
    common = ["--train", eval_dirs[0], "--val", eval_dirs[1], "--device", args.device,
              "--cache-dir", os.path.join(args.work, "features"), "--no-progress"]
    trunk_crop = ["--size", str(args.size), "--resize", str(args.size)]
    pixels_crop = ["--size", str(args.pixels_size), "--resize", str(args.pixels_size)]
    probe = ["--fast", "--epochs", str(args.probe_epochs)]
    jobs = [  # (name, layer, ckpt args, crop): the SSL trunk (with its random init) at every layer
        *[("ssl", layer, [ckpts["ssl"], "--layer", layer], trunk_crop) for layer in layers],
        ("pixels", None, ["pixels"], pixels_crop),
        ("supervised", None, [ckpts["supervised"], "--no-baseline"], trunk_crop),
    ]
    summary = {k: {} for k in ("ssl", "random", "pixels", "supervised")}
    by_layer = {layer: {"ssl": {}, "random": {}} for layer in layers}
    for name, layer, ck, crop in jobs:
        for kind, extra in (("knn", ["--k", "10,20,100,200"]), ("linear", probe)):
            out = os.path.join(results_dir, f"{name}{'-' + layer if layer else ''}-{kind}.json")
            rep = run.evaluate(kind, ["--ckpt", *ck, *crop, *common, *extra], out)
            for subject, top1 in top1s(rep, kind).items():
                key = {"ckpt": name, "random": "random"}.get(subject, name)
                if layer:
                    by_layer[layer][key][kind] = top1
                if layer in (None, layers[0]):
                    summary[key][kind] = top1
    return summary, by_layer


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())   # the machine may be shared: wall times are read against this
    run, py = Runner(), sys.executable
    train_dir, test_dir, n_test = build_shards(run, py, args.dataset, args.train_images, args.test_images, args.work)
    run_dir, results_dir = pretrain(run, py, args, train_dir)
    from sslkit.trunk import load_trunk
    _, spec = load_trunk(run_dir)
    sup_dir, sup_info = supervised_reference(run, py, args, spec, train_dir)
    layers = (args.layers or (ALEXNET_LAYERS if spec.arch.startswith("alexnet") else RESNET_LAYERS)).split(",")
    summary, by_layer = evaluate(run, args, layers, {"ssl": run_dir, "supervised": sup_dir},
                                 (train_dir, test_dir), results_dir)
    run.seconds["total"] = time.perf_counter() - t_start
    run.cpu_seconds["total"] = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
    report = {**summary, "layer": layers[0], "layers": by_layer, "ckpt": _ckpt_path(run_dir),
              "trunk": spec.to_dict(), "pretrain_epoch_losses": [r["loss"] for r in _epoch_records(run_dir)],
              "supervised_run": sup_info,
              "data": {"dataset": args.dataset, "train": train_dir, "test": test_dir,
                       "train_images": args.train_images, "test_images": n_test},
              "protocol": {"knn": "k=20, T=0.07, L2-normalised, memory = train shards", "linear":
                           f"--fast: BN+Linear on cached centre-crop features, {args.probe_epochs} epochs",
                           "trunk_crop": f"resize {args.size} + centre crop {args.size}",
                           "pixels_crop": f"resize {args.pixels_size} + centre crop {args.pixels_size}"},
              "results_dir": results_dir, "commands": run.commands, "seconds": run.seconds,
              "cpu_seconds": run.cpu_seconds, "load_average": {"start": load_start, "end": list(os.getloadavg())},
              "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
              "argv": sys.argv[1:] if argv is None else argv}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print_table(summary, by_layer, layers)
    print(f"total {run.seconds['total']:.0f} s wall, {run.cpu_seconds['total']:.0f} s CPU "
          f"(load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); wrote {args.json}")
    return 0


def print_table(summary: dict, by_layer: dict, layers: list[str]) -> None:
    rows = [("pixels", summary["pixels"])]
    for layer in layers:
        rows += [(f"random {layer}", by_layer[layer]["random"]), (f"ssl {layer}", by_layer[layer]["ssl"])]
    rows.append(("supervised", summary["supervised"]))
    print(f"\n{'features':<16} {'kNN top-1':>10} {'linear top-1':>13}")
    for name, r in rows:
        print(f"{name:<16} {r.get('knn', float('nan')):>10.4f} {r.get('linear', float('nan')):>13.4f}")


def _epoch_records(run_dir: str) -> list[dict]:
    """The per-epoch records of a run's log.jsonl (loss and the method's metrics), [] without a log."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: v for k, v in r.items() if k in ("epoch", "loss", "top1", "acc", "epoch_s")}
                for r in map(json.loads, f) if r.get("kind") == "epoch"]


def _ckpt_path(run_dir: str) -> str:
    from sslkit.ckpt import find_latest
    return find_latest(run_dir) or run_dir


if __name__ == "__main__":
    sys.exit(main())
