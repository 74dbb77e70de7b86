"""A run's curves as one PNG, from `<run>/log.jsonl` (schema: docs/LOGS.md).

    python -m sslkit.viz --run runs/dcv2 --out curves.png

Panels, all against the training step: loss (every logged step, and the epoch means), learning rate,
images/s, data stall (% of each iteration spent waiting for the loader: per log window from the
step records, per epoch from `data_stall_pct`), then one panel per other numeric field: a method's
extra outputs (e.g. `top1`), and every field of records of any other kind (a monitor's kNN top-1,
say), so new fields show up without a change here (not plotted: `epoch_s`, `corrupt_samples`).
Lines that are not JSON (a record cut short by a kill) are counted and skipped.
"""

from __future__ import annotations

import json
import math
import os

from .errors import SslkitError

LOG = "log.jsonl"
# fields that place a record or are shown in the fixed panels, not plotted as panels of their own
POSITION = {"time", "kind", "step", "epoch"}
STEP_FIXED = {"loss", "lr", "img_per_s", "data_s", "step_s", "mem_mb"}
EPOCH_FIXED = {"loss", "data_stall_pct", "epoch_s", "corrupt_samples"}
MAX_EXTRA_PANELS = 12


class CurvesError(SslkitError):
    """A run folder or log that cannot be plotted (one line)."""


def read_log(run: str) -> tuple[list[dict], int]:
    """(records in file order, number of unreadable lines) of `run/log.jsonl` (or a .jsonl file)."""
    path = run if os.path.isfile(run) else os.path.join(run, LOG)
    if not os.path.exists(path):
        raise CurvesError(f"{path}: no such file (a run folder holds log.jsonl once its first step is logged)")
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                records.append(rec)
            else:
                bad += 1
    if not records:
        raise CurvesError(f"{path}: no records with a step ({bad} unreadable line(s))")
    return records, bad


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(records: list[dict], kind: str, field: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `field` in the records of `kind`, where it is a finite number."""
    pts = [(r["step"], r[field]) for r in records if r.get("kind", "step") == kind and _number(r.get(field))]
    return [p[0] for p in pts], [p[1] for p in pts]


def panels(records: list[dict]) -> list[dict]:
    """What to draw: [{"title", "ylabel", "lines": [(label, steps, values, style)]}], fixed panels first."""
    stall = [(r["step"], 100 * r["data_s"] / r["step_s"]) for r in records
             if r.get("kind", "step") == "step" and _number(r.get("data_s")) and _number(r.get("step_s"))
             and r["step_s"] > 0]
    fixed = [
        {"title": "loss", "ylabel": "loss", "lines": [("step", *series(records, "step", "loss"), "-"),
                                                      ("epoch mean", *series(records, "epoch", "loss"), "o-")]},
        {"title": "learning rate", "ylabel": "lr", "lines": [("lr", *series(records, "step", "lr"), "-")]},
        {"title": "throughput", "ylabel": "images/s (all ranks)",
         "lines": [("img/s", *series(records, "step", "img_per_s"), "-")]},
        {"title": "data stall", "ylabel": "% of iteration waiting for data",
         "lines": [("log window", [s for s, _ in stall], [v for _, v in stall], "-"),
                   ("epoch", *series(records, "epoch", "data_stall_pct"), "o-")]},
    ]
    fixed.append({"title": "peak memory (rank 0)", "ylabel": "MB", "lines": [("MB", *series(records, "step", "mem_mb"),
                                                                              "-")]})
    extra = []
    for kind, skip in (("step", STEP_FIXED), ("epoch", EPOCH_FIXED)):   # a method's own outputs
        for field in _fields(records, kind, skip):
            if not any(p["ylabel"] == field for p in extra):
                extra.append({"title": field, "ylabel": field,
                              "lines": [("step", *series(records, "step", field), "-"),
                                        ("epoch mean", *series(records, "epoch", field), "o-")]})
    for kind in dict.fromkeys(r.get("kind", "step") for r in records):  # monitors and any other kind
        if kind not in ("step", "epoch"):
            extra += [{"title": f"{kind}: {field}", "ylabel": field,
                       "lines": [(kind, *series(records, kind, field), "o-")]} for field in _fields(records, kind, set())]
    return [p for p in fixed + extra[:MAX_EXTRA_PANELS] if any(line[1] for line in p["lines"])]


def _fields(records: list[dict], kind: str, skip: set) -> list[str]:
    """Numeric fields of `kind`'s records, in first-seen order, less the positions and `skip`."""
    return list(dict.fromkeys(k for r in records if r.get("kind", "step") == kind for k, v in r.items()
                              if k not in POSITION | skip and _number(v)))


def plot(run: str, out: str, title: str | None = None) -> tuple[str, int, int]:
    """Write the PNG; returns (path, number of panels, unreadable lines skipped)."""
    records, bad = read_log(run)
    todo = panels(records)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = 2 if len(todo) > 1 else 1
    rows = math.ceil(len(todo) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.2 * rows), squeeze=False)
    for ax, p in zip(axes.flat, todo):
        for label, steps, values, style in p["lines"]:
            if steps:
                ax.plot(steps, values, style, label=label, markersize=3, linewidth=1)
        ax.set_title(p["title"])
        ax.set_xlabel("step")
        ax.set_ylabel(p["ylabel"])
        ax.grid(alpha=0.3)
        if sum(1 for line in p["lines"] if line[1]) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(todo):]:
        ax.set_visible(False)
    last = records[-1]
    fig.suptitle(title or f"{os.path.abspath(run)}: {len(records)} records, last step {last['step']}"
                 f" (epoch {last.get('epoch', '?')})", fontsize="medium")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, len(todo), bad
