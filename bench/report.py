"""The report of a throughput run: environment and data facts, records, ratios within the run, the
table, the JSON (layout in `write_json`) and the PNG plot. Pure functions of the records."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import subprocess
import sys

import torch

from sslkit.shard import collect_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "sslkit.bench.throughput/1"


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
        "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "cpus_usable": cpus(),
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
    info = collect_info(directory, limit=2000)   # stored sizes of up to 2000 samples spread evenly
    m = info["manifest"]
    return {"dir": os.path.abspath(directory), "images": m["total"], "shards": len(m["shards"]),
            "labelled": bool(m.get("classes")), "bytes_per_image": info["bytes_per_image"],
            "megapixels_per_image": info["megapixels_mean"], "megapixels": info["megapixels"],
            "shorter_side": info["shorter_side"], "longer_side": info["longer_side"]}



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
        share = f"; one GPU's share of an 8-GPU node with {8 * threads} cores" if args.device == "gpu" else ""
        lines += ["", f"threads {threads} (baseline: {_workers(threads)}{share}), batch {batch}",
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
