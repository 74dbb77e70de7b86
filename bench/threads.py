"""Seconds per training step at torch's default intra-op threads vs the share sslkit.threads gives it,
on an idle machine and beside a CPU hog (the loaded-machine case of issue 20).

    python -m sslkit.shard build sample --out shards/sample --shuffle --seed 0 --max-count 500
    python bench/threads.py --data shards/sample --json bench/out/threads.json

The step is the trainer's own (`train.build` + `train.train_step`, DeepClusterV2 `tiny` with random
assignments, as bench/throughput.py's train mode), fed by the real DALI loader at its default
threads (the process' share of the cores). Rows: torch at its start-up thread count (one per core
unless OMP_NUM_THREADS is set: run this without it) and at `sslkit.threads.plan_threads`' share,
each alone and beside --hog busy-loop processes (another job on the same cores; each bounded in time
and killed after its round). Rounds are interleaved (round 1 of every row, then round 2, ...) so that
drift in the machine's load hits every row alike; a row shows the median [min - max] over rounds of
the mean seconds per step of a round, after one untimed step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

HOG = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/threads.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard folder, e.g. shards/sample")
    p.add_argument("--method", default="deepclusterv2",
                   help="method of the step (its tiny preset); default %(default)s")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default %(default)s)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override as train.py's --set (repeatable)")
    p.add_argument("--hog", type=int, default=1, help="busy-loop processes beside the loaded rows (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per row (default %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round (default %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows and the machine's facts here")
    args = p.parse_args(argv)
    if min(args.rounds, args.steps, args.batch_size) < 1 or args.hog < 0:
        p.error("--rounds, --steps and --batch-size must be >= 1, --hog >= 0")
    return args


def build_run(args):
    """The trainer's run (model, optimizer, loader) for the method's tiny preset on --data."""
    from sslkit import dist
    from sslkit import train as trainer
    from sslkit.config import TrainConfig, apply_overrides, parse_set
    from sslkit.log import get_logger
    from sslkit.methods import method_entry

    entry = method_entry(args.method)
    cfg = apply_overrides(TrainConfig(method=args.method, method_options=entry.meta["options"]()),
                          entry.meta["presets"]["tiny"].overrides)
    cfg = apply_overrides(cfg, {"data": args.data, "batch_size": args.batch_size, "device": "cpu",
                                "out": tempfile.mkdtemp(prefix="bench-threads-"), "warmup_epochs": 0})
    cfg = apply_overrides(cfg, parse_set(args.train_set))
    run = trainer.build(cfg, dist.init("cpu"), get_logger(0))
    run.method.prepare_benchmark()
    return trainer, run


def timed_round(trainer, run, batches, steps: int) -> float:
    """Mean seconds per step over `steps` steps, after one untimed step."""
    lr = float(run.schedule[0])
    trainer.train_step(run, next(batches), lr)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(run, next(batches), lr)
    return (time.perf_counter() - t0) / steps


def start_hogs(n: int, seconds: float) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOG.format(seconds=seconds)]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for h in hogs:
        h.kill()
        h.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from sslkit.threads import plan_threads
    from stages import forever

    default_torch = torch.get_num_threads()       # before anything sets it
    plan = plan_threads("cpu")
    t_start, load_start = time.perf_counter(), os.getloadavg()
    trainer, run = build_run(args)
    batches = forever(run.loader)
    rows = [{"torch_threads": n, "label": label, "hog": hog, "rounds": []}
            for hog in ((0, args.hog) if args.hog else (0,))
            for n, label in ((default_torch, "torch default"), (plan.torch, "sslkit.threads share"))]
    for r in range(args.rounds):
        for row in rows:
            torch.set_num_threads(row["torch_threads"])   # after build: the trainer may set it too
            hogs = start_hogs(row["hog"], seconds=120)
            try:
                row["rounds"].append(timed_round(trainer, run, batches, args.steps))
            finally:
                stop_hogs(hogs)
            print(f"round {r + 1}/{args.rounds}: torch {row['torch_threads']} ({row['label']}), "
                  f"{row['hog']} hog(s): {row['rounds'][-1]:.3f} s/step", flush=True)
    print(f"\n{args.method} tiny, batch {args.batch_size}, DALI {run.loader.config.num_threads} threads, "
          f"{plan.cores} cores; median [min - max] of {args.rounds} rounds x {args.steps} steps")
    for row in rows:
        row["s_per_step"] = {"median": statistics.median(row["rounds"]), "min": min(row["rounds"]),
                             "max": max(row["rounds"])}
        s = row["s_per_step"]
        print(f"  torch {row['torch_threads']:>2} ({row['label']:<20}) hog {row['hog']}: "
              f"{s['median']:.3f} s/step [{s['min']:.3f} - {s['max']:.3f}]")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": "python bench/threads.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "method": args.method, "batch_size": args.batch_size, "cores": plan.cores,
                       "dali_threads": run.loader.config.num_threads, "plan": plan.describe(), "rows": rows,
                       "load_average": {"start": load_start, "end": os.getloadavg()},
                       "seconds": time.perf_counter() - t_start,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
