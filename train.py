"""Self-supervised pretraining, one compact trainer for every method.

    torchrun --nproc_per_node=2 train.py --method deepclusterv2 --preset tiny --data shards/sample --out runs/tiny
    python train.py ...                      # one process works too
    python train.py --method deepclusterv2 --list-presets

Re-running the same command resumes from the newest complete checkpoint in --out. SIGTERM or
SIGUSR1 (preemption) make every rank write a checkpoint and exit cleanly.

Stages, in order: 1 config -> 2 distributed -> 3 method and data -> 4 model on device -> 5 optimiser
and schedule -> 6 resume -> 7 train loop -> 8 checkpoints. The trainer never branches on the method:
a method is a module from the registry whose forward returns {"loss", ...} plus optional hooks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import torch
from tqdm import tqdm

from pipelines import LoaderError, SpecError, make_loader
from sslkit import ckpt, dist
from sslkit.config import ConfigError, TrainConfig, apply_overrides, dumps, parse_set, to_dict
from sslkit.log import JsonLog, get_logger
from sslkit.methods import create_method, list_methods, method_entry
from sslkit.methods.base import RunContext
from sslkit.optim import build_optimizer, param_groups, scaled_lr, warmup_cosine
from sslkit.shard import ManifestError

# fields that may change between a run and its resumption
RESUMABLE_CHANGES = {"epochs", "log_every", "ckpt_every", "keep_ckpts", "tensorboard", "loader_threads"}


# ------------------------------------------------------------------------------------------------
# 1. config: defaults < method preset < command-line flags < --set key=value
# ------------------------------------------------------------------------------------------------
def parse_config(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="deepclusterv2", help=f"one of: {', '.join(list_methods())}")
    p.add_argument("--preset", default=None, help="named recipe of the method (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the method's presets and exit")
    p.add_argument("--data", help="shard folder built by `python -m sslkit.shard build` (default shards/sample)")
    p.add_argument("--arch", help="backbone from sslkit.models (resnet50, resnet_tiny, ...)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per rank per step")
    p.add_argument("--global-batch-size", type=int, help="images per step over all ranks (must divide evenly)")
    p.add_argument("--lr", type=float, help="learning rate per 256 images; scaled linearly with the global batch")
    p.add_argument("--out", help="run folder: checkpoints, config.json, log.jsonl (default runs/<method>-<preset>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set weight_decay=1e-5 --set method_options.temperature=0.2")
    args = p.parse_args(argv)
    entry = method_entry(args.method)
    if args.list_presets:
        for name, overrides in entry.presets.items():
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
        sys.exit(0)
    cfg = TrainConfig(method=args.method, method_options=entry.options())
    preset = args.preset or entry.default_preset
    if preset is not None:
        if preset not in entry.presets:
            raise ConfigError(f"unknown preset {preset!r} for {args.method}; choose from {', '.join(entry.presets)}")
        cfg = apply_overrides(replace(cfg, preset=preset), entry.presets[preset])
    flags = {k: v for k, v in dict(data=args.data, arch=args.arch, epochs=args.epochs, batch_size=args.batch_size,
                                   lr=args.lr, out=args.out, device=args.device, seed=args.seed).items()
             if v is not None}
    cfg = apply_overrides(apply_overrides(cfg, flags), parse_set(args.set))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch_size is not None:
        if args.batch_size is not None:
            raise ConfigError("give --batch-size (per rank) or --global-batch-size, not both")
        if args.global_batch_size % world:
            raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by the world size {world}")
        cfg = replace(cfg, batch_size=args.global_batch_size // world)
    if args.out is None and "out" not in parse_set(args.set):
        cfg = replace(cfg, out=os.path.join("runs", f"{cfg.method}-{cfg.preset or 'default'}"))
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.lr <= 0:
        raise ConfigError("batch size, epochs and lr must be positive")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"precision={cfg.precision!r}: choose auto, bf16, fp16 or fp32")
    return cfg


def check_resume_compatible(saved: dict, cfg: TrainConfig):
    now = to_dict(cfg)
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:3])
        raise ConfigError(f"{cfg.out} holds a run with a different config ({shown}); "
                          "use another --out or the original flags")


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # ----------------------------------------------------------------------------------------------
    # 2. distributed: torchrun env -> process group (gloo on CPU, NCCL on GPU); rank 0 talks
    # ----------------------------------------------------------------------------------------------
    info = dist.init(cfg.device)
    log = get_logger(info.rank)
    try:
        return train(cfg, info, log)
    except (ConfigError, ManifestError, SpecError, LoaderError, ckpt.CheckpointError) as e:
        log.error("%s", e)
        return 2
    finally:
        dist.shutdown(info)


def build(cfg: TrainConfig, info: dist.DistInfo, log) -> SimpleNamespace:
    """Stages 3-5: everything a training step needs (also used by bench/throughput.py's train mode)."""
    device = info.device
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed + info.rank)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    ctx = RunContext(rank=info.rank, world_size=info.world_size, device=device, seed=cfg.seed, group=info.group,
                     autocast=autocast, log=log)

    # ----------------------------------------------------------------------------------------------
    # 3. method and data: the method names its pipeline family; every rank reads its own slice
    # ----------------------------------------------------------------------------------------------
    method = create_method(cfg, ctx)
    loader = make_loader(method.pipeline, cfg.data, batch_size=cfg.batch_size, device="gpu" if on_gpu else "cpu",
                         rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                         num_threads=cfg.loader_threads, shuffle_buffer=cfg.shuffle_buffer,
                         **method.loader_options())
    steps_per_epoch = len(loader)
    global_batch = cfg.batch_size * info.world_size
    if info.is_main:
        log.info("%s on %s: %d images, %d steps/epoch, global batch %d (%d ranks x %d), %s, %s",
                 cfg.method, cfg.data, loader.shards.total, steps_per_epoch, global_batch, info.world_size,
                 cfg.batch_size, device, precision)

    # ----------------------------------------------------------------------------------------------
    # 4. model on device: SyncBN, channels_last and bf16 autocast on GPU, DDP around the method
    # ----------------------------------------------------------------------------------------------
    if cfg.sync_bn and info.world_size > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    method.to(device)
    if on_gpu and cfg.channels_last:
        method.to(memory_format=torch.channels_last)
        method.channels_last = True
    model = method
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(method, device_ids=[info.local_rank] if on_gpu else None)
    if cfg.compile:
        model = torch.compile(model)

    # ----------------------------------------------------------------------------------------------
    # 5. optimiser and per-step schedule (lr per 256 images, scaled linearly with the global batch)
    # ----------------------------------------------------------------------------------------------
    peak = scaled_lr(cfg.lr, global_batch)
    start = cfg.warmup_start_lr if cfg.warmup_start_lr is not None else cfg.lr
    schedule = warmup_cosine(peak, peak * cfg.final_lr_ratio, cfg.epochs, steps_per_epoch, cfg.warmup_epochs,
                             min(start, peak))
    optimizer = build_optimizer(cfg.optimizer, param_groups(method, cfg.weight_decay, cfg.exclude_norm_bias_wd),
                                lr=peak, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    return SimpleNamespace(cfg=cfg, info=info, ctx=ctx, method=method, model=model, loader=loader,
                           optimizer=optimizer, scaler=scaler, schedule=schedule, autocast=autocast,
                           steps_per_epoch=steps_per_epoch, global_batch=global_batch)


def train_step(run: SimpleNamespace, batch: dict, lr: float) -> tuple[float, dict]:
    """One optimisation step: forward under autocast, backward, optimiser step. Returns the loss
    (a Python float: this syncs the GPU, so step times measured around it are real)."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with run.autocast():
        out = run.model(batch)
    loss = out["loss"]
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()} (lr {lr:.4g}); lower --lr or check the data")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss.item(), out


def train(cfg: TrainConfig, info: dist.DistInfo, log) -> int:
    run = build(cfg, info, log)
    method, model, loader, optimizer, scaler = run.method, run.model, run.loader, run.optimizer, run.scaler
    schedule, ctx, steps_per_epoch, global_batch = run.schedule, run.ctx, run.steps_per_epoch, run.global_batch
    device = info.device

    # ----------------------------------------------------------------------------------------------
    # 6. resume: the newest complete checkpoint in --out, or a fresh start (method hook)
    # ----------------------------------------------------------------------------------------------
    step, epoch = 0, 0
    latest = ckpt.find_latest(cfg.out)
    if latest:
        g, r = ckpt.load(latest, info)
        check_resume_compatible(g["config"], cfg)
        method.load_state_dict(g["model"])
        method.to(device)
        optimizer.load_state_dict(g["optimizer"])
        scaler.load_state_dict(g["scaler"])
        method.load_rank_state_dict(r["method"])
        loader.load_state_dict(r["loader"])
        torch.set_rng_state(r["rng"])
        step, epoch = g["step"], g["epoch"]
        log.info("resumed from %s: epoch %d, step %d", latest, epoch, step)
    else:
        method.on_train_start(loader, ctx)
    mid_epoch = latest is not None and loader.position > 0
    if info.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            f.write(dumps(cfg) + "\n")

    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, request_stop)

    def save(keep: bool, in_epoch: int):
        g = {"config": to_dict(cfg), "model": method.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "epoch": in_epoch}
        r = {"loader": loader.state_dict(), "method": method.rank_state_dict(), "rng": torch.get_rng_state()}
        ckpt.save(cfg.out, step, g, r, info, keep=keep, keep_last_n=cfg.keep_ckpts)

    # ----------------------------------------------------------------------------------------------
    # 7. train loop: per step lr, forward under autocast, backward, step; logs every N steps
    # ----------------------------------------------------------------------------------------------
    jlog = JsonLog(os.path.join(cfg.out, "log.jsonl") if info.is_main else None,
                   os.path.join(cfg.out, "tb") if cfg.tensorboard and info.is_main else None)
    total_steps = cfg.epochs * steps_per_epoch
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (info.is_main and sys.stderr.isatty()),
               dynamic_ncols=True)
    model.train()
    while epoch < cfg.epochs:
        if not mid_epoch:
            method.on_epoch_start(epoch, ctx)
        mid_epoch = False
        sums = {"loss": 0.0, "n": 0, "data": 0.0, "step": 0.0}
        t_epoch = time.perf_counter()
        t_last = time.perf_counter()
        for batch in loader:
            t_data = time.perf_counter() - t_last  # waiting for the loader; t_step below is the whole iteration
            lr = float(schedule[min(step, len(schedule) - 1)])
            loss_value, out = train_step(run, batch, lr)
            step += 1
            t_now = time.perf_counter()
            t_step = t_now - t_last
            t_last = t_now
            sums["loss"] += loss_value
            sums["n"] += 1
            sums["data"] += t_data
            sums["step"] += t_step
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                rec = {"kind": "step", "epoch": epoch, "step": step, "loss": loss_value, "lr": lr,
                       "img_per_s": global_batch / t_step, "data_s": t_data, "step_s": t_step,
                       "mem_mb": _memory_mb(device)}
                rec.update({k: float(v) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1})
                jlog.write(rec)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.3g}", refresh=False)
                if not bar.disable:
                    continue
                eta = (total_steps - step) * sums["step"] / max(sums["n"], 1)
                log.info("epoch %d step %d/%d loss %.4f lr %.4g | %.0f img/s | data %.0f ms step %.0f ms | "
                         "mem %.0f MB | eta %s", epoch, step, total_steps, loss_value, lr, global_batch / t_step,
                         1000 * t_data, 1000 * t_step, rec["mem_mb"], _hms(eta))
            if dist.any_true(stop["signal"] is not None, info):
                save(keep=False, in_epoch=epoch)
                log.warning("preempted (%s): checkpoint saved at epoch %d step %d; re-run the same command to resume",
                            stop["signal"] or "signal on another rank", epoch, step)
                jlog.close()
                return 0
        # ------------------------------------------------------------------------------------------
        # 8. checkpoint at every epoch end (periodic copies kept every ckpt_every epochs)
        # ------------------------------------------------------------------------------------------
        loss_mean, data_s, step_s = dist.all_mean([sums["loss"] / max(sums["n"], 1), sums["data"], sums["step"]], info)
        epoch += 1
        rec = {"kind": "epoch", "epoch": epoch - 1, "step": step, "loss": loss_mean,
               "data_stall_pct": 100 * data_s / max(step_s, 1e-9), "epoch_s": time.perf_counter() - t_epoch,
               "corrupt_samples": loader.corrupt_total}
        jlog.write(rec)
        log.info("epoch %d done: loss %.4f, %.0f s, data stall %.1f%%", epoch - 1, loss_mean, rec["epoch_s"],
                 rec["data_stall_pct"])
        save(keep=epoch % cfg.ckpt_every == 0 or epoch == cfg.epochs, in_epoch=epoch)
    bar.close()
    jlog.close()
    log.info("done: %d epochs, %d steps; checkpoints in %s", epoch, step, os.path.join(cfg.out, "checkpoints"))
    return 0


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    sys.exit(main())
