"""Results as a printed table (one column per evaluated trunk) and as JSON."""

from __future__ import annotations

import json
import math
import os

from ..files import atomic_write


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def rows(kind: str, result: dict) -> list[tuple[str, str]]:
    """(row label, formatted value) pairs of one trunk's result; values in percent."""
    if kind == "knn":
        return [(f"k={k} top-1 / top-5", f"{_pct(result['top1'][k])} / {_pct(result['top5'][k])}")
                for k in result["top1"]]
    if kind == "linear":
        return [("top-1 / top-5", f"{_pct(result['top1'])} / {_pct(result['top5'])}"),
                ("final train loss", f"{result['train_loss'][-1]:.4f}" if result["train_loss"] else "-")]
    if kind == "svm":
        return [("mAP (VOC AP)", _pct(result["mAP"])), ("top-1 (argmax)", _pct(result["top1"]))]
    if kind == "lowshot":
        out = []
        for k, metrics in result["shots"].items():
            for m, v in metrics.items():
                out.append((f"{k}-shot {m}", f"{_pct(v['mean'])} ± {_pct(v['std'])}"))
        return out
    raise ValueError(kind)


def table(kind: str, results: dict[str, dict], title: str) -> str:
    """Plain-text table: rows = metrics, columns = the evaluated trunks (ckpt, random-init, ...)."""
    names = list(results)
    per = {n: dict(rows(kind, results[n])) for n in names}
    labels = list(dict.fromkeys(label for n in names for label in per[n]))
    w0 = max([len(x) for x in labels] + [6])
    widths = [max(len(n), *(len(per[n].get(label, "-")) for label in labels)) for n in names]
    lines = [title, "  ".join([" " * w0] + [n.rjust(w) for n, w in zip(names, widths)])]
    for label in labels:
        lines.append("  ".join([label.ljust(w0)] + [per[n].get(label, "-").rjust(w) for n, w in zip(names, widths)]))
    return "\n".join(lines)


def _clean(obj):
    """NaN/inf -> None so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, json.dumps(_clean(report), indent=1) + "\n", tmp=path + ".tmp", durable=False)
