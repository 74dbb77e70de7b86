"""Train mode: the trainer's own step fed by the real loader vs by one batch kept on the device.

The end-to-end figure (nanoGPT bench.py's real_data switch): steps/s on batches from the real
pipeline and on one batch already on the device, and the share of a step spent waiting for data,
data_stall_pct = 100 * (1 - real / synthetic). It calls what the trainer calls: `sslkit.train.build`,
`sslkit.train.train_step`, and the method's epoch hook every `steps_per_epoch` steps (a DeepClusterV2
memory bank holds one epoch), so any number of epoch boundaries inside the timed rounds is fine.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from report import new_record
from stages import forever


class EpochClock:
    """Calls the method's epoch hook whenever a step starts a new epoch (not before the first: the
    method's `prepare_benchmark` stands in for the start of training)."""

    def __init__(self, run):
        self.run, self.steps, self.epoch = run, 0, 0

    def tick(self):
        if self.steps and self.steps % self.run.ctx.steps_per_epoch == 0:
            self.epoch += 1
            self.run.method.on_epoch_start(self.epoch)
        self.steps += 1


def train_records(args, cfg) -> list[dict]:
    from sslkit import train as trainer
    from sslkit import dist
    from sslkit.config import TrainConfig, apply_overrides, parse_set, torch_device_type
    from sslkit.log import get_logger
    from sslkit.methods import method_entry
    from sslkit.threads import use_threads

    name = args.method or "deepclusterv2"
    entry = method_entry(name)
    presets = entry.meta["presets"]
    preset = args.train_preset or ("tiny" if args.device == "cpu" and "tiny" in presets
                                   else entry.meta.get("default_preset"))
    base = TrainConfig(method=name, method_options=entry.meta["options"]())
    if preset:
        base = apply_overrides(base, presets[preset].overrides)
    overrides = {"data": args.data, "batch_size": cfg["batch_size"], "loader_threads": cfg["threads"],
                 "device": torch_device_type(args.device), "seed": args.seed,
                 "out": tempfile.mkdtemp(prefix="bench-train-"), "warmup_epochs": 0}
    if args.arch:
        overrides["arch"] = args.arch
    tcfg = apply_overrides(apply_overrides(base, overrides), parse_set(args.train_set))
    rec = new_record("train", f"{name}:{preset or 'default'}", "trainer", args, cfg)
    rec.update(method=name, arch=tcfg.arch, preset=preset, steps_per_s={"real": None, "synthetic": None},
               data_stall_pct=None, recipe={"config": {k: str(v) for k, v in vars(tcfg).items()}})
    # torch beside DALI, as the CLIs run it: the share of the cores that this row's DALI threads leave
    threads = use_threads(args.device, cfg["threads"], getattr(args, "torch_threads", 0))
    rec.update(torch_threads=threads.torch, torch_threads_from=threads.torch_from)
    try:
        info = dist.init(tcfg.device)
        run = trainer.build(tcfg, info, get_logger(0))
        run.method.prepare_benchmark()
        clock, lr = EpochClock(run), float(run.schedule[0])
        batches = forever(run.loader)

        def step(batch):
            clock.tick()
            trainer.train_step(run, batch, lr)

        for _ in range(max(args.warmup, run.loader.config.prefetch + 1)):
            step(next(batches))
        sync = torch.cuda.synchronize if args.device == "gpu" else (lambda: None)
        real, synth = [], []
        for _ in range(args.rounds):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.batches):
                step(next(batches))
            sync()
            real.append(args.batches / (time.perf_counter() - t0))
            fixed = next(batches)  # one batch already on the device, reused: no data loading at all
            t0 = time.perf_counter()
            for _ in range(args.batches):
                step(fixed)
            sync()
            synth.append(args.batches / (time.perf_counter() - t0))
        r, s = statistics.median(real), statistics.median(synth)
        images = run.global_batch
        rec.update(status="ok", steps_per_s={"real": r, "synthetic": s}, epochs_crossed=clock.epoch,
                   data_stall_pct=max(0.0, 100.0 * (1.0 - r / s)),
                   images_per_s={"median": r * images, "min": min(real) * images, "max": max(real) * images},
                   rounds=[{"images": args.batches * images, "seconds": args.batches / x, "images_per_s": x * images}
                           for x in real])
    except Exception as e:  # noqa: BLE001 - one failed row, the others still run
        rec.update(status="failed", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return [rec]
