"""Self-supervised pretraining, one compact trainer for every method.

    torchrun --nproc_per_node=2 train.py --method deepclusterv2 --preset tiny --data shards/sample --out runs/tiny
    sslkit-train ...                         # installed (also python -m sslkit.train; train.py in a checkout)
    sslkit-train --list-presets              # every method's named recipes

Re-running the same command resumes from the newest complete checkpoint in --out that verifies against
its checksums. SIGTERM or SIGUSR1 (preemption) make every rank write a checkpoint and exit cleanly. One
run holds a run folder at a time (<out>/.lock names its host and pid).

Stages, in order: 1 config -> 2 distributed, then the run folder's lock and the threads -> 3 data and
method -> 4 model on device -> 5 optimiser and schedule -> 6 resume -> 7 train loop -> 8 checkpoints
(and the online kNN monitor). The trainer never branches on the method: a method is a module from the
registry whose forward returns {"loss", ...} plus optional hooks. A library too:
`from sslkit.train import parse_config, train; train(parse_config(["--preset", "tiny", ...]))`.
Every rank runs the same collectives at the same steps whatever its terminal or logging: the loss is
read and the stop flag agreed only at log steps, which are the same steps on every rank. A step is an
optimiser step: with accum_steps > 1 it takes that many of the loader's batches (micro-batches), and
runs stop, log and checkpoint only between steps, so a resume continues at a step's first micro-batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from sslkit.config import (ConfigError, TrainConfig, apply_overrides, dali_device, dumps, load_config, parse_set,
                           preset_config, to_dict)
from sslkit.errors import SslkitError

# fields that may change between a run and its resumption
# (the world size is not a config field: a run resumes on any number of ranks, see resume_elastic)
RESUMABLE_CHANGES = {"epochs", "batch_size", "log_every", "ckpt_every", "keep_ckpts", "tensorboard", "loader_threads",
                     "torch_threads", "loader_prefetch", "hw_decoder_load", "use_mmap", "dist_timeout_s", "monitor"}
# never compared as strings: the run folder is wherever the checkpoint was found, and the data is
# compared by its manifest identity (so moved or copied runs and shards resume)
COMPARED_ELSEWHERE = {"out", "data"}


# ------------------------------------------------------------------------------------------------
# 1. config: defaults < method preset < command-line flags < --set key=value (no torch/DALI needed)
# ------------------------------------------------------------------------------------------------
def parse_config(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="deepclusterv2", help="the SSL method (see --list-presets); default %(default)s")
    p.add_argument("--preset", default=None, help="a named recipe of the method (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the methods' presets (of --method if given) and exit")
    p.add_argument("--config", metavar="CONFIG_JSON",
                   help="start from a saved config (a run's config.json) instead of the method's defaults and preset; "
                        "the flags below and --set still override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit (nothing is read, built or written)")
    p.add_argument("--data", help="shard folder built by `python -m sslkit.shard build` (default shards/sample)")
    p.add_argument("--arch", help="backbone from sslkit.models (resnet50, resnet_tiny, ...)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per rank per (micro-)batch")
    p.add_argument("--global-batch-size", type=int,
                   help="images per optimiser step over all ranks, accum_steps included (must divide evenly)")
    p.add_argument("--lr", type=float, help="learning rate per 256 images; scaled linearly with the global batch")
    p.add_argument("--out", help="run folder: checkpoints, config.json, log.jsonl (default runs/<method>-<preset>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set weight_decay=1e-5 --set method_options.temperature=0.2")
    args = p.parse_args(argv)
    if args.list_presets:
        from sslkit.recipes import list_methods, method_entry  # the presets: no torch
        for name in ([args.method] if "--method" in (argv or sys.argv) else list_methods()):
            entry = method_entry(name)
            print(f"{name}:" + ("" if entry.meta["presets"] else " (no presets)"))
            for preset, spec in entry.meta["presets"].items():
                print(f"  {preset:<18} {spec.description}")
        sys.exit(0)
    if args.config:
        if "--method" in (argv or sys.argv) or args.preset:
            raise ConfigError(f"--config {args.config} names the method and preset; drop --method/--preset "
                              "(or change them with --set)")
        cfg = load_config(args.config)
    else:
        cfg = preset_config(args.method, args.preset)
    flags = {k: v for k, v in dict(data=args.data, arch=args.arch, epochs=args.epochs, batch_size=args.batch_size,
                                   lr=args.lr, out=args.out, device=args.device, seed=args.seed).items()
             if v is not None}
    overrides = parse_set(args.set)
    cfg = apply_overrides(apply_overrides(cfg, flags), overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch_size is not None:
        if args.batch_size is not None:
            raise ConfigError("give --batch-size (per rank) or --global-batch-size, not both")
        if args.global_batch_size % (world * cfg.accum_steps):
            raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by the world size {world}"
                              f" x accum_steps {cfg.accum_steps}")
        cfg = replace(cfg, batch_size=args.global_batch_size // (world * cfg.accum_steps))
    if args.out is None and "out" not in overrides and not args.config:  # a saved config names its run folder
        cfg = replace(cfg, out=os.path.join("runs", f"{cfg.method}-{cfg.preset or 'default'}"))
    check_config(cfg)
    if args.print_config:
        print(dumps(cfg))
        sys.exit(0)
    return cfg


def check_config(cfg: TrainConfig):
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.lr <= 0 or cfg.accum_steps < 1:
        raise ConfigError("batch size, epochs, lr and accum_steps must be positive")
    if not 0 <= cfg.clip_grad < float("inf"):
        raise ConfigError(f"clip_grad={cfg.clip_grad}: a total gradient norm >= 0 (0: no clipping)")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"precision={cfg.precision!r}: choose auto, bf16, fp16 or fp32")
    if cfg.schedule not in ("cosine", "multistep"):
        raise ConfigError(f"schedule={cfg.schedule!r}: choose cosine or multistep")
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"warmup_epochs {cfg.warmup_epochs} must be below epochs {cfg.epochs} "
                          "(e.g. --set warmup_epochs=0 for a short run)")
    if cfg.schedule == "multistep" and any(not 0 < m <= cfg.epochs for m in cfg.milestones):
        raise ConfigError(f"milestones {list(cfg.milestones)} must lie in 1..epochs {cfg.epochs}")
    if cfg.log_every < 1 or cfg.keep_ckpts < 1 or cfg.ckpt_every < 0 or cfg.dist_timeout_s <= 0:
        raise ConfigError("log_every, keep_ckpts and dist_timeout_s must be positive, ckpt_every >= 0")
    if cfg.loader_threads < 0 or cfg.torch_threads < 0 or cfg.loader_prefetch < 1:
        raise ConfigError("loader_threads and torch_threads must be >= 0 (0: automatic), loader_prefetch >= 1")
    if cfg.hw_decoder_load is not None and not 0.0 <= cfg.hw_decoder_load <= 1.0:
        raise ConfigError(f"hw_decoder_load={cfg.hw_decoder_load}: expected 0..1 (or None: by GPU generation)")
    m = cfg.monitor
    if m.every < 1 or m.k < 1 or m.batch_size < 1 or not 8 <= m.size <= m.resize:
        raise ConfigError(f"monitor: every, k and batch_size must be positive and 8 <= size <= resize (got "
                          f"every={m.every}, k={m.k}, batch_size={m.batch_size}, size={m.size}, resize={m.resize})")


def check_resume_compatible(g: dict, cfg: TrainConfig, data_identity: str, log):
    # a field newer than the saved run (accum_steps, clip_grad, ...) held its default there
    saved, now = {**to_dict(TrainConfig()), **g["config"]}, to_dict(cfg)
    ignored = RESUMABLE_CHANGES | COMPARED_ELSEWHERE
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in ignored and saved.get(k) != now.get(k)]
    if g["data"]["identity"] != data_identity:
        diff.insert(0, f"data: {g['data']['path']} -> {os.path.abspath(cfg.data)} (a different dataset)")
    if diff:
        raise ConfigError(f"{cfg.out} holds a run with a different config ({', '.join(diff[:3])}); "
                          "use another --out or the original flags")
    if g["data"]["path"] != os.path.abspath(cfg.data):
        log.info("data moved: %s -> %s (same shards: manifest identity %s)", g["data"]["path"],
                 os.path.abspath(cfg.data), data_identity)


def check_dependencies(cfg: TrainConfig):
    """Optional packages the run needs, before any work: a missing one is one line naming its extra."""
    from sslkit.deps import MissingDependencyError, _installed, require_dali
    require_dali("sslkit-train")
    if cfg.tensorboard and not _installed("tensorboard"):
        raise MissingDependencyError("tensorboard=true needs the tensorboard package, which is not installed: "
                                     "pip install 'sslkit[tensorboard]' (or --set tensorboard=false)")


def main(argv=None) -> int:
    """The command line: parse, then train. Returns the exit status."""
    try:
        cfg = parse_config(argv)
    except SslkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return train(cfg)


def train(cfg: TrainConfig) -> int:
    """Run, or resume, the training `cfg` describes; this process is one rank of a torchrun job or the
    only one. It owns the process while it runs: it sets torch's threads and handles SIGTERM/SIGUSR1.
    Returns the exit status (errors are logged as one line: 2 for a bad setting or input, 1 for a
    rank that failed)."""
    # ----------------------------------------------------------------------------------------------
    # 2. distributed: torchrun env -> process group (gloo on CPU, NCCL on GPU), with a timeout; then
    #    the run folder's lock (sslkit.runlock), held by rank 0 until the run ends; then this rank's
    #    threads (its share of the machine's cores, DALI's first, torch's the rest: sslkit.threads)
    # ----------------------------------------------------------------------------------------------
    try:
        check_dependencies(cfg)
    except SslkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from sslkit import dist, runlock
    from sslkit.log import get_logger
    from sslkit.threads import use_threads
    try:
        info = dist.init(cfg.device, cfg.dist_timeout_s)
    except SslkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = get_logger(info.rank)
    stop = dist.StopRequest(info).install()  # before the slow build: a signal then is acted on at the first check
    lock, peer_gone = None, False
    try:
        lock = runlock.hold(cfg.out, info, log)  # one run per folder: before anything is read or written there
        threads = use_threads(dali_device(info.device), cfg.loader_threads, cfg.torch_threads)
        if info.is_main:
            log.info("%s", threads.describe())
        return fit(cfg, info, log, stop, lock, threads.dali)
    except SslkitError as e:
        if info.is_main or not isinstance(e, dist.AgreedError):  # an agreed error is said once, by rank 0
            log.error("%s", e)
        return 2
    except Exception as e:
        why = dist.peer_failure(e, info)  # a collective failed: another rank is hung, stopped or dead
        if why is None:
            raise
        peer_gone = True
        log.error("%s", why)
        return 1
    finally:
        if lock is not None:
            lock.release()
        stop.uninstall()
        if not peer_gone:  # a group whose peer is gone cannot be torn down politely
            dist.shutdown(info)


@dataclass
class Run:
    """Everything a training step needs (also what bench/'s train mode drives)."""
    cfg: TrainConfig
    info: Any
    ctx: Any
    method: Any            # the method module (hooks, state)
    model: Any             # what forward runs through: the method, wrapped in DDP / compiled
    loader: Any
    optimizer: Any
    scaler: Any
    schedule: Any          # lr per global step
    autocast: Callable

    @property
    def global_batch(self) -> int:
        """Images per optimiser step over all ranks."""
        return self.cfg.batch_size * self.info.world_size * self.cfg.accum_steps

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (the loader's batches are its micro-batches)."""
        from sslkit.optim import optimizer_steps
        return optimizer_steps(self.ctx.steps_per_epoch, self.cfg.accum_steps)


def mixed_precision(precision: str, device) -> tuple[str, Any, Callable]:
    """(the precision "auto" resolves to: bf16 on GPU, fp32 on CPU; its autocast dtype or None; a
    factory of the autocast context, a null context for fp32)."""
    import contextlib

    import torch
    precision = precision if precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)
    return precision, amp_dtype, autocast


def build(cfg: TrainConfig, info, log, check_stop: Callable = lambda: None, dali_threads: int = 0) -> Run:
    """Stages 3-5. dali_threads: the loader's threads (0: loader_threads, else this rank's share of
    the cores; the torch threads are the caller's to set, see sslkit.threads.use_threads)."""
    import torch

    from pipelines import make_loader
    from sslkit import registry
    from sslkit.methods import RunContext, method_entry
    from sslkit.optim import build_optimizer, multistep, optimizer_steps, param_groups, scaled_lr, warmup_cosine
    from sslkit.threads import plan_threads

    device = info.device
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed + info.rank)
    precision, amp_dtype, autocast = mixed_precision(cfg.precision, device)

    # ----------------------------------------------------------------------------------------------
    # 3. data and method: the method names its pipeline; every rank reads its own slice; the method
    #    is built from the run context (dataset size, steps per epoch, ...), never from the loader
    # ----------------------------------------------------------------------------------------------
    cls = method_entry(cfg.method).factory
    if info.is_main:
        log.info("building the %s pipeline over %s (%s)", cls.pipeline, cfg.data, "GPU" if on_gpu else "CPU")
    # DALI threads: the caller's plan, the setting, or this rank's share of the machine's cores
    # (torchrun says how many ranks share it; GPU pipelines need few, see sslkit.threads.GPU_THREADS)
    threads = dali_threads or plan_threads(dali_device(device), cfg.loader_threads).dali
    loader = make_loader(cls.pipeline, cfg.data, batch_size=cfg.batch_size, device=dali_device(device),
                         rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                         num_threads=threads, shuffle_buffer=cfg.shuffle_buffer, prefetch=cfg.loader_prefetch,
                         hw_decoder_load=cfg.hw_decoder_load, use_mmap=cfg.use_mmap,
                         device_id=info.local_rank if on_gpu else None, **cls.loader_options(cfg.method_options))
    ctx = RunContext(rank=info.rank, world_size=info.world_size, device=device, seed=cfg.seed, group=info.group,
                     autocast=autocast, log=log, dataset_size=loader.dataset_size, num_classes=loader.num_classes,
                     steps_per_epoch=loader.batches_per_epoch, batch_size=cfg.batch_size,
                     channels_last=on_gpu and cfg.channels_last, pipeline=loader.describe()["pipeline"],
                     check_stop=check_stop)
    method = registry.create("method", cfg.method, cfg, ctx)
    global_batch = cfg.batch_size * info.world_size * cfg.accum_steps
    steps_per_epoch = optimizer_steps(ctx.steps_per_epoch, cfg.accum_steps)
    if info.is_main:
        log.info("%s on %s: %d images, %d steps/epoch, global batch %d (%d ranks x %d%s), %s, %s",
                 cfg.method, cfg.data, ctx.dataset_size, steps_per_epoch, global_batch, info.world_size,
                 cfg.batch_size, f" x {cfg.accum_steps} micro-batches" if cfg.accum_steps > 1 else "", device,
                 precision)

    # ----------------------------------------------------------------------------------------------
    # 4. model on device: SyncBN, channels_last and bf16 autocast on GPU, DDP around the method
    # ----------------------------------------------------------------------------------------------
    if cfg.sync_bn and info.world_size > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    method.to(device)
    if ctx.channels_last:
        method.to(memory_format=torch.channels_last)
    model = method
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(method, device_ids=[info.local_rank] if on_gpu else None)
    if cfg.compile:
        model = torch.compile(model)

    # ----------------------------------------------------------------------------------------------
    # 5. optimiser and per-step schedule (lr per 256 images, scaled linearly with the global batch,
    #    accumulated micro-batches included; one value per optimiser step)
    # ----------------------------------------------------------------------------------------------
    peak = scaled_lr(cfg.lr, global_batch)
    start = min(cfg.warmup_start_lr if cfg.warmup_start_lr is not None else cfg.lr, peak)
    if cfg.schedule == "multistep":
        schedule = multistep(peak, cfg.milestones, cfg.epochs, steps_per_epoch, cfg.gamma, cfg.warmup_epochs, start)
    else:
        schedule = warmup_cosine(peak, peak * cfg.final_lr_ratio, cfg.epochs, steps_per_epoch, cfg.warmup_epochs,
                                 start)
    optimizer = build_optimizer(cfg.optimizer, param_groups(method, cfg.weight_decay, cfg.exclude_norm_bias_wd),
                                lr=peak, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    return Run(cfg, info, ctx, method, model, loader, optimizer, scaler, schedule, autocast)


def resume_elastic(run: Run, where: str, g: dict, r: dict, step: int, log) -> int:
    """Stage 6 on another world size or batch size than the checkpoint's: the loader continues the
    interrupted epoch with the samples the old ranks had not reached (`r`: old rank `rank % old world`,
    whose loader state holds the epoch's position), the method re-splits its per-rank state from every
    old rank's file, RNG is re-seeded (old ranks' streams cannot be split), and the schedule goes on at
    the same share of the epoch. Returns the shift from `step` to the schedule's index."""
    import torch

    from sslkit import ckpt
    from sslkit.optim import scaled_lr
    cfg, info, loader = run.cfg, run.info, run.loader
    old_world, old_batch = g["world_size"], r["loader"]["batch_size"]
    said = run.method.load_rank_states((s["method"] for s in ckpt.rank_states(where, old_world)), old_world)
    loader.load_state_dict(r["loader"])
    torch.manual_seed(cfg.seed + info.rank + 7919 * step)
    epoch = g["epoch"]
    target = epoch * run.steps_per_epoch + int(loader.epoch_fraction * run.steps_per_epoch)
    if info.is_main:
        old_global = old_world * old_batch * g["config"].get("accum_steps", 1)
        log.info("elastic resume: %d rank(s) x %d -> %d rank(s) x %d (global batch %d -> %d, peak lr %.4g -> %.4g); "
                 "epoch %d continues with its unread samples split over the new ranks (%d batches each), the "
                 "schedule at %.1f%% of it; RNG re-seeded%s", old_world, old_batch, info.world_size, cfg.batch_size,
                 old_global, run.global_batch, scaled_lr(g["config"]["lr"], old_global),
                 scaled_lr(cfg.lr, run.global_batch), epoch, len(loader), 100 * loader.epoch_fraction,
                 f"; {said}" if said else "")
    return target - step


def train_step(run: Run, batches, lr: float) -> dict:
    """One optimiser step over a batch (a dict) or a step's micro-batches (a sized iterable, e.g.
    optim.MicroBatches): per micro-batch forward under autocast and backward of loss / count, so the
    gradient is their mean, DDP all-reducing only in the last backward; then the method's
    after_backward hook, unscaling, clipping (cfg.clip_grad) and the step. Returns the method's
    outputs (scalars averaged over the micro-batches) and `grad_norm`, the pre-clip norm, as tensors:
    nothing here waits for the device."""
    import contextlib

    import torch

    from sslkit.optim import clip_gradients, no_grad_sync
    micro = [batches] if isinstance(batches, dict) else batches
    count, sums = len(micro), {}
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(micro):
        with no_grad_sync(run.model) if i < count - 1 else contextlib.nullcontext():
            with run.autocast():
                out = run.model(batch)
            run.scaler.scale(out["loss"] / count).backward()
        for k, v in out.items():
            if count > 1 and torch.is_tensor(v) and v.numel() == 1:
                sums[k] = sums[k] + v.detach() if k in sums else v.detach()
    out = {**out, **{k: v / count for k, v in sums.items()}}
    run.method.after_backward()
    run.scaler.unscale_(run.optimizer)
    out["grad_norm"] = clip_gradients(run.method.parameters(), run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return out


def epoch_batches(run: Run, epoch: int):
    """What the trainer does in one epoch, for tools that take the steps themselves (bench/): the
    method's epoch hook, then the loader's batches."""
    run.method.on_epoch_start(epoch)
    yield from run.loader


def resume(run: Run, resumed, stats, data: dict, log) -> tuple[int, int, int]:
    """Stage 6: continue from `resumed` (ckpt.load_agreed's answer) or start fresh (init_from, then the
    method's start hook). Returns (step, epoch, the shift from step to the schedule's index)."""
    import torch

    from sslkit.trunk import init_from
    cfg, info, method, loader = run.cfg, run.info, run.method, run.loader
    if not resumed:
        if cfg.init_from:
            init_from(method, cfg.init_from, log if info.is_main else None)
        method.on_train_start(loader)
        return 0, 0, 0
    where, g, r = resumed
    check_resume_compatible(g, cfg, data["identity"], log)
    method.load_state_dict(g["model"])
    run.optimizer.load_state_dict(g["optimizer"])
    run.scaler.load_state_dict(g["scaler"])
    stats.load_state_dict(r["stats"], info.device)
    shift = 0
    if (g["world_size"], r["loader"]["batch_size"]) == (info.world_size, cfg.batch_size):
        method.load_rank_state_dict(r["method"])
        loader.load_state_dict(r["loader"])
        torch.set_rng_state(r["rng"]["cpu"])
        if info.device.type == "cuda" and r["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(r["rng"]["cuda"], info.device)
    else:
        shift = resume_elastic(run, where, g, r, g["step"], log)
    log.info("resumed from %s: epoch %d, step %d", where, g["epoch"], g["step"])
    return g["step"], g["epoch"], shift


def checkpoint_state(run: Run, stats, data: dict, epoch: int) -> tuple[dict, dict]:
    """What a checkpoint holds: (global state, this rank's state)."""
    import torch
    method, device = run.method, run.info.device
    g = {"config": to_dict(run.cfg), "model": method.state_dict(), "optimizer": run.optimizer.state_dict(),
         "scaler": run.scaler.state_dict(), "epoch": epoch, "trunk": method.trunk_spec, "data": data}
    r = {"loader": run.loader.state_dict(), "method": method.rank_state_dict(), "stats": stats.state_dict(),
         "rng": {"cpu": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
    return g, r


def epoch_record(run: Run, stats, epoch: int, step: int) -> dict:
    """Stage 8's record of `epoch`. Collective: one all_sum of the ranks' means (then divided) and of
    this epoch's corrupt samples."""
    from sslkit import dist
    info = run.info
    means = stats.means()
    keys = sorted(means)
    *summed, corrupt = dist.all_sum([means[k] for k in keys] + [stats.data_s, stats.step_s,
                                                                run.loader.corrupt_last_epoch], info)
    summed = [v / info.world_size for v in summed]
    return {"kind": "epoch", "epoch": epoch, "step": step, **dict(zip(keys, summed)),
            "data_stall_pct": 100 * summed[-2] / max(summed[-1], 1e-9), "epoch_s": stats.elapsed(),
            "corrupt_samples": int(corrupt)}


def fit(cfg: TrainConfig, info, log, stop, lock, dali_threads: int = 0) -> int:
    """Stages 3-8 on an initialised process group, under the run folder's lock."""
    from sslkit import ckpt, dist
    from sslkit.log import JsonLog, MetricLogger, StepLog, open_run_files
    from sslkit.shard.manifest import identity, load

    from sslkit.monitor import KnnMonitor
    monitor = KnnMonitor(cfg.monitor, cfg.epochs, info, log)
    monitor.check()  # its folders exist and are labelled, before the build
    run = build(cfg, info, log, stop.check, dali_threads)
    method, loader = run.method, run.loader
    data = {"identity": identity(load(cfg.data)), "path": os.path.abspath(cfg.data)}

    # ----------------------------------------------------------------------------------------------
    # 6. resume: the newest checkpoint every rank can read, or a fresh start (method hook)
    # ----------------------------------------------------------------------------------------------
    stats = MetricLogger()
    resumed = ckpt.load_agreed(cfg.out, info, log)
    try:
        step, epoch, schedule_shift = resume(run, resumed, stats, data, log)
    except dist.Preempted as p:
        log.warning("preempted (%s) before training started; nothing to save: re-run the same command", p.signal_name)
        return 0
    mid_epoch = resumed is not None and (loader.position > 0 or bool(loader.earlier_stages))
    saved_step = step if resumed else None  # the step the newest checkpoint holds (None: none yet)
    # config.json and log.jsonl (rank 0, under the lock); a failure there stops every rank alike
    jlog = dist.on_main(lambda: open_run_files(cfg.out, dumps(cfg), step, lock, cfg.tensorboard), info) or JsonLog(None)

    def save(keep: bool):
        nonlocal saved_step
        ckpt.save(cfg.out, step, *checkpoint_state(run, stats, data, epoch), info, keep=keep, keep_last=cfg.keep_ckpts)
        saved_step = step

    # ----------------------------------------------------------------------------------------------
    # 7. train loop: per-step lr, forward/backward/step; every log_every steps (the same steps on
    #    every rank) one collective reads the mean loss and agrees on stopping; a step takes
    #    accum_steps micro-batches, so logs, stops and checkpoints fall between optimiser steps
    # ----------------------------------------------------------------------------------------------
    total_steps = cfg.epochs * run.steps_per_epoch
    progress = StepLog(jlog, log, info.is_main, total_steps, step + schedule_shift, run.global_batch, info.device)
    run.model.train()
    try:
        while epoch < cfg.epochs:
            if not mid_epoch:
                method.on_epoch_start(epoch)
                stats.reset()
            mid_epoch = False
            step, stopping = train_epoch(run, stop, progress, stats, epoch, step, schedule_shift)
            if stopping:
                save(keep=False)
                log.warning("preempted (%s): checkpoint saved at epoch %d step %d; re-run the same command "
                            "to resume", stop.signal_name or "signal on another rank", epoch, step)
                return 0
            # --------------------------------------------------------------------------------------
            # 8. epoch summary and checkpoint (periodic ones, every ckpt_every epochs, are never pruned)
            # --------------------------------------------------------------------------------------
            rec = epoch_record(run, stats, epoch, step)   # one collective
            epoch += 1
            jlog.write(rec)
            log.info("epoch %d done: loss %.4f, %.0f s, data stall %.1f%%", epoch - 1, rec["loss"], rec["epoch_s"],
                     rec["data_stall_pct"])
            save(keep=(cfg.ckpt_every > 0 and epoch % cfg.ckpt_every == 0) or epoch == cfg.epochs)
            if monitor.due(epoch):  # online kNN (sslkit.monitor): rank 0 evaluates, every rank waits for it
                rec = monitor.run(method, epoch - 1, step)
                if rec:
                    jlog.write(rec)
                run.model.train()
    except dist.Preempted as p:
        resumes = (f"the last checkpoint (step {saved_step}) resumes it" if saved_step is not None else
                   "no checkpoint exists yet, so it starts from the beginning")
        log.warning("preempted (%s) in the epoch-%d start hook; %s: re-run the same command", p.signal_name, epoch,
                    resumes)
        return 0
    finally:
        progress.close()
        jlog.close()

    if info.is_main:
        log.info("done: %d epochs, %d steps. Outputs in %s: checkpoints/ (newest: %s), log.jsonl (per-step and "
                 "per-epoch records), config.json. Next: python -m sslkit.eval knn --ckpt %s --train DIR --val DIR",
                 epoch, step, cfg.out, ckpt.find_latest(cfg.out), cfg.out)
    return 0


def train_epoch(run: Run, stop, progress, stats, epoch: int, step: int, schedule_shift: int) -> tuple[int, bool]:
    """Stage 7 over the rest of `epoch`: one optimiser step per `accum_steps` of the loader's batches,
    each at the schedule's lr (index step + schedule_shift); at every log step (the same steps on every
    rank) one collective, `log_step`. Returns (step, whether the ranks agreed to stop)."""
    from sslkit.optim import accumulate
    t_last = time.perf_counter()
    for batches in accumulate(run.loader, run.cfg.accum_steps):
        lr = float(run.schedule[min(step + schedule_shift, len(run.schedule) - 1)])
        out = train_step(run, batches, lr)
        step += 1
        t_now = time.perf_counter()
        stats.update(out, batches.wait_s, t_now - t_last)   # wait_s: waiting for the loader
        t_last = t_now
        progress.advance()
        if step % run.cfg.log_every == 0 or run.loader.position == len(run.loader):
            if log_step(run, out, stop, progress, stats, epoch, step, lr):
                return step, True
    return step, False


def log_step(run: Run, out: dict, stop, progress, stats, epoch: int, step: int, lr: float) -> bool:
    """A log step (the same steps on every rank). Collective: one all_sum reads the mean loss and
    whether any rank got a stop signal; a NaN or infinite loss stops every rank alike. Returns stop."""
    from sslkit import dist
    info = run.info
    loss, stopping = dist.all_sum([float(out["loss"].detach()), float(stop.signal_name is not None)], info)
    loss /= info.world_size
    if loss != loss or abs(loss) == float("inf"):
        raise SslkitError(f"loss is {loss} at step {step} (lr {lr:.4g}); lower --lr or check the data")
    progress.record(out, epoch, step, loss, lr, stats.window())
    return bool(stopping)


if __name__ == "__main__":
    sys.exit(main())
