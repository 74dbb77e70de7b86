"""The scaling study's figure in the style of Goyal et al. (2019): transfer against the axis.

One panel per metric and layer position (kNN and linear top-1 at each evaluated layer, SVM mAP and low-shot
SVM mAP at the SVM layers); one line per trunk, the mean over seeds with +-1 std error bars; the trunk's
random init as a dotted line of its colour; raw pixels as a dashed grey line. Log x for data and |P|.

    python bench/scaling_plot.py STUDY.json [OUT.png]       # redraw from a study's JSON, print its table
"""

from __future__ import annotations

import json
import os
import statistics
import sys

LOG_AXES = ("data", "perms")
AXIS_LABEL = {"data": "pretraining images", "perms": "|P| (permutations)", "k": "K (nearest ab bins)",
              "arch": "trunk"}


def panels(points: list[dict]) -> list[tuple[str, str, int, str | None]]:
    """(title, kind, layer position, shot) of every panel, from the points' results."""
    n_layers = max(len(p["config"]["eval"]["layers"]) for p in points)
    out = []
    for kind, what in (("knn", "kNN top-1"), ("linear", "linear top-1")):
        for i in range(n_layers):
            out.append((what, kind, i, None))
    first = points[0]["results"]
    for i, layer in enumerate(first.get("svm", {})):
        out.append(("SVM mAP", "svm", i, None))
        shots = sorted((int(k) for k in first.get("lowshot", {}).get(layer, {}).get("ssl", {})), reverse=True)
        if shots:
            out.append((f"low-shot SVM mAP, {shots[0]}/class", "lowshot", i, str(shots[0])))
    return out


def metric(point: dict, kind: str, pos: int, shot: str | None, subject: str) -> tuple[float | None, str | None]:
    """(value, layer name) of one point for a panel, None where the point has no such result."""
    layers = point["config"]["eval"]["layers"]
    if pos >= len(layers) or layers[pos] not in point["results"].get(kind, {}):
        return None, None
    r = point["results"][kind][layers[pos]].get(subject)
    if r is None:
        return None, layers[pos]
    if kind == "lowshot":
        r = r.get(shot)
        return (None if r is None else r["mAP"]), layers[pos]
    return r["mAP" if kind == "svm" else "top1"], layers[pos]


def pixel_value(report: dict, kind: str, shot: str | None) -> float | None:
    r = report["references"]["pixels"].get(kind, {}).get("pixels", {}).get("pixels")
    if r is None:
        return None
    if kind == "lowshot":
        return r.get(shot, {}).get("mAP")
    return r["mAP" if kind == "svm" else "top1"]


def line_of(point: dict) -> str:
    """The figure line (and table trunk) a point belongs to: its trunk, or "all" on the arch axis, where
    the trunk is the x value."""
    return "all" if point["config"]["axis"] == "arch" else point["config"]["arch"]


def series(points: list[dict], kind: str, pos: int, shot: str | None, subject: str, values: list):
    """{trunk: (x, mean, std)} over seeds, and the layer names seen."""
    by: dict = {}
    names = set()
    for p in points:
        v, layer = metric(p, kind, pos, shot, subject)
        if layer:
            names.add(layer)
        if v is None or v != v:       # missing or NaN
            continue
        trunk = line_of(p)
        by.setdefault(trunk, {}).setdefault(values.index(p["config"]["value"]), []).append(v)
    out = {}
    for trunk, per_x in by.items():
        xs = sorted(per_x)
        out[trunk] = (xs, [statistics.fmean(per_x[x]) for x in xs],
                      [statistics.stdev(per_x[x]) if len(per_x[x]) > 1 else 0.0 for x in xs])
    return out, names


def plot_study(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study, points = report["study"], report["points"]
    axis, values = study["axis"], study["values"]
    numeric = _numbers(values)
    log_x = axis in LOG_AXES or (axis == "option" and numeric is not None and min(numeric) > 0
                                 and max(numeric) >= 10 * min(numeric))
    xs_of = (lambda idx: [numeric[i] for i in idx]) if numeric is not None else (lambda idx: list(idx))
    specs = panels(points)
    cols = min(4, len(specs))
    rows = -(-len(specs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (what, kind, pos, shot) in zip(axes.flat, specs):
        ssl, names = series(points, kind, pos, shot, "ssl", values)
        rnd, _ = series(points, kind, pos, shot, "random", values)
        for c, trunk in enumerate(sorted(ssl)):
            x, m, s = ssl[trunk]
            ax.errorbar(xs_of(x), m, yerr=s, marker="o", capsize=3, color=colors[c % len(colors)],
                        label=f"{study['method']} {trunk}" if trunk != "all" else study["method"])
            if trunk in rnd:
                rx, rm, _ = rnd[trunk]
                ax.plot(xs_of(rx), rm, ":", marker="x" if numeric is None else None, color=colors[c % len(colors)],
                        label=f"random init {trunk}" if trunk != "all" else "random init")
        pix = pixel_value(report, kind, shot)
        if pix is not None:
            ax.axhline(pix, ls="--", color="0.5", label="raw pixels")
        ax.set_title(f"{what} @ {' | '.join(sorted(names))}", fontsize=9)
        if log_x:
            ax.set_xscale("log")
        if numeric is None:
            ax.set_xticks(range(len(values)), values, rotation=15, fontsize=8)
            ax.set_xlim(-0.5, len(values) - 0.5)
        else:
            ax.set_xticks(numeric, [_short(v) for v in numeric], fontsize=8)
            ax.minorticks_off()
        ax.set_xlabel(study.get("option") if axis == "option" else AXIS_LABEL[axis], fontsize=8)
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(specs):]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:      # the legend in an empty slot keeps the lines readable
        spare[0].legend(handles, labels, loc="center", fontsize=8)
    else:
        axes.flat[0].legend(fontsize=7)
    done = f"{report['points_done']}/{report['points_total']} points" + ("" if report["complete"] else ", INCOMPLETE")
    fig.suptitle(f"{study['method']} ({study['train_preset']}) on {os.path.basename(str(study['dataset']))}: "
                 f"transfer vs {study.get('option') if axis == 'option' else axis}; {study['seeds']} seed(s), {done}",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def summary_table(report: dict) -> str:
    """The study as a markdown table: one row per trunk and axis value (mean +- std over seeds, "n=" when
    a cell has fewer seeds than the study), then each trunk's random init and raw pixels; one column per
    panel of the figure."""
    study, points = report["study"], report["points"]
    if not points:
        return "(no points yet)"
    values, specs = study["values"], panels(points)
    head = [f"{what.split()[0]} {_layer(points, kind, pos, shot)}" + (f" {shot}-shot" if shot else "")
            for what, kind, pos, shot in specs]
    cells: dict = {}          # (trunk, axis value or "random init") -> [cell per panel]
    for j, (_what, kind, pos, shot) in enumerate(specs):
        for subject in ("ssl", "random"):
            per_trunk = {}
            for p in points:
                v, _ = metric(p, kind, pos, shot, subject)
                if v is None or v != v:
                    continue
                trunk = line_of(p)
                row = p["config"]["value"] if subject == "ssl" else "random init"
                if subject == "random" and trunk == "all":
                    trunk, row = p["config"]["value"], "random init"
                per_trunk.setdefault((trunk, row), {})[p["config"]["seed"]] = v   # random: once per seed
            for key, by_seed in per_trunk.items():
                cells.setdefault(key, [""] * len(specs))[j] = _mean_std(list(by_seed.values()), study["seeds"])
    order = {v: i for i, v in enumerate(values)}
    keys = sorted(cells, key=lambda k: (str(k[0]), k[1] == "random init", order.get(k[1], 0)))
    axis = study.get("option") if study["axis"] == "option" else study["axis"]
    lines = [f"| trunk | {axis} | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    lines += [f"| {t} | {_short(v) if v != 'random init' else v} | " + " | ".join(cells[(t, v)]) + " |"
              for t, v in keys]
    pix = [pixel_value(report, kind, shot) for _w, kind, _p, shot in specs]
    lines.append("| raw pixels | - | " + " | ".join("" if v is None else f"{v:.4f}" for v in pix) + " |")
    return "\n".join(lines)


def _layer(points: list[dict], kind: str, pos: int, shot: str | None) -> str:
    names = {metric(p, kind, pos, shot, "ssl")[1] for p in points} - {None}
    return "/".join(sorted(names))


def _mean_std(vs: list[float], seeds: int) -> str:
    if not vs:
        return ""
    cell = f"{statistics.fmean(vs):.4f}" + (f"±{statistics.stdev(vs):.4f}" if len(vs) > 1 else "")
    return cell + (f" (n={len(vs)})" if len(vs) < seeds else "")


def _numbers(values: list) -> list[float] | None:
    """The axis values as numbers (x positions), or None when any is not a number (a categorical axis)."""
    if not values or any(isinstance(v, bool) for v in values):
        return None
    try:
        return [v if isinstance(v, (int, float)) else float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _short(v) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, int) and v >= 1000:
        return f"{v // 1000000}M" if v % 1000000 == 0 else f"{v / 1000:g}k"
    return str(v)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        rep = json.load(f)
    out = sys.argv[2] if len(sys.argv) == 3 else os.path.splitext(sys.argv[1])[0] + ".png"
    plot_study(rep, out)
    print(summary_table(rep))
    print(f"wrote {out}")
