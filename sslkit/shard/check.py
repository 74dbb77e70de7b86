"""`sslkit.shard verify` and `sslkit.shard info`: is a shard folder exactly what its manifest says?"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
from collections import Counter

import numpy as np
from PIL import Image

from ..errors import SslkitError
from ..files import sha256_file
from . import manifest as mf
from .tarwriter import index_of_tar, read_index


class VerifyError(SslkitError, ValueError):
    """A shard folder does not match its manifest (one-line reason naming the file)."""


def verify_shard(directory: str, shard: dict, components: list[str], n_classes: int | None,
                 full: bool) -> int:
    """Check one shard against its manifest entry; return how many images were decoded."""
    tar = os.path.join(directory, shard["path"])
    idx = os.path.join(directory, shard["index"])
    digest = sha256_file(tar)
    if digest != shard["sha256"]:
        raise VerifyError(f"{tar}: sha256 {digest[:12]}... does not match the manifest ({shard['sha256'][:12]}...)")
    try:
        index = read_index(idx)
    except ValueError as e:
        raise VerifyError(str(e)) from None
    actual = index_of_tar(tar)
    if index != actual:
        at = next((i for i, (a, b) in enumerate(zip(index, actual)) if a != b), min(len(index), len(actual)))
        raise VerifyError(f"{idx}: does not match {os.path.basename(tar)} (first difference at sample {at}); "
                          "regenerate it")
    if len(index) != shard["count"]:
        raise VerifyError(f"{tar}: {len(index)} samples, manifest says {shard['count']}")
    decoded = 0
    with open(tar, "rb") as f:
        for j, sample in enumerate(index):
            expected_key = mf.key_for(shard["first_index"] + j)
            missing = [c for c in components if c not in sample]
            if missing:
                raise VerifyError(f"{tar}: sample {expected_key} lacks component(s) {missing}")
            off, size, name = sample["index"]
            if not name.startswith(expected_key + "."):
                raise VerifyError(f"{tar}: sample {j} is named {name}, expected key {expected_key}")
            f.seek(off)
            if f.read(size) != expected_key.encode():
                raise VerifyError(f"{tar}: {name} does not hold its sample index {int(expected_key)}")
            if not full:
                continue
            off, size, name = sample["jpg"]
            f.seek(off)
            data = f.read(size)
            try:
                with Image.open(io.BytesIO(data)) as im:
                    if im.format != "JPEG" or im.mode != "RGB":
                        raise VerifyError(f"{tar}: {name} is {im.format}/{im.mode}, expected an RGB JPEG")
                    im.load()
            except VerifyError:
                raise
            except Exception as e:  # noqa: BLE001
                raise VerifyError(f"{tar}: {name} does not decode: {type(e).__name__}: {e}") from None
            decoded += 1
            if n_classes is not None:
                off, size, name = sample["cls"]
                f.seek(off)
                label = int(f.read(size))
                if not 0 <= label < n_classes:
                    raise VerifyError(f"{tar}: {name} holds class {label}, outside 0..{n_classes - 1}")
            off, size, name = sample["json"]
            f.seek(off)
            try:
                json.loads(f.read(size))
            except json.JSONDecodeError:
                raise VerifyError(f"{tar}: {name} is not valid JSON") from None
    return decoded


def verify_adopted_shard(directory: str, m: dict, k: int, full: bool) -> int:
    """Check one adopted tar: its sha256, and that scanning it again gives the same index, offsets and
    labels; with `full`, decode every image (any format). Returns how many images were decoded."""
    from .adopt import index_shard
    shard = m["shards"][k]
    tar, idx = os.path.join(directory, shard["path"]), os.path.join(directory, shard["index"])
    digest = sha256_file(tar)
    if digest != shard["sha256"]:
        raise VerifyError(f"{tar}: sha256 {digest[:12]}... does not match the manifest ({shard['sha256'][:12]}...); "
                          "the tar changed since it was indexed: re-run `python -m sslkit.shard index`")
    b = m["build"]
    opts = {"label": m["labels"]["from"].split(":")[0] if m.get("labels") else "none",
            "label_field": b.get("label_field"), "image_ext": [e.lower() for e in b["image_ext"]], "full": full}
    fresh = os.path.join(os.path.dirname(os.path.abspath(idx)), f".verify-{os.getpid()}-{k}.idx")
    try:
        rec = index_shard((k, tar, fresh, opts))
        with open(fresh) as f1, open(idx) as f2:
            same = f1.read() == f2.read()
    finally:
        if os.path.exists(fresh):
            os.remove(fresh)
    if not same:
        bad = next((r for r in rec["rejects"] if "decode" in r[1] or "empty image" in r[1]), None)
        why = f" ({bad[0]}: {bad[1]})" if bad else ""
        raise VerifyError(f"{idx}: does not match {tar} scanned again{why}; re-run `python -m sslkit.shard index`")
    lo, hi = shard["first_index"], shard["first_index"] + shard["count"]
    offsets = np.load(os.path.join(directory, m["offsets"]), mmap_mode="r")
    if not np.array_equal(offsets[lo:hi], rec["offsets"]):
        raise VerifyError(f"{os.path.join(directory, m['offsets'])}: entries {lo}..{hi - 1} do not match {tar}")
    if m.get("labels"):
        classes = m["classes"]
        ids = [x if isinstance(x, int) else classes.get(str(x), -1) for x in rec["labels"]]
        table = np.load(os.path.join(directory, m["labels"]["file"]), mmap_mode="r")
        if not np.array_equal(table[lo:hi], np.asarray(ids, np.int32)):
            raise VerifyError(f"{os.path.join(directory, m['labels']['file'])}: labels {lo}..{hi - 1} do not "
                              f"match those in {tar}")
    return shard["count"] if full else 0


def _verify_star(args):
    if args[0] == "adopted":
        return verify_adopted_shard(*args[1:])
    return verify_shard(*args)


LONG_VERIFY_BYTES = 2_000_000_000   # off a terminal, progress lines only for folders this large (> ~10 s)


def verify(directory: str, full: bool = False, workers: int = 1, progress: bool | None = None) -> dict:
    """Raise VerifyError/ManifestError on the first mismatch; return a summary when all is well.
    `progress` None: a bar on a terminal, and off it lines every 30 s for folders over 2 GB."""
    import sys

    from ..progress import Progress
    m = mf.load(directory)
    n_classes = len(m["classes"]) if m["classes"] else None
    if mf.is_adopted(m):
        jobs = [("adopted", directory, m, k, full) for k in range(len(m["shards"]))]
    else:
        jobs = [(directory, s, m["components"], n_classes, full) for s in m["shards"]]
    if progress is None:
        progress = sys.stderr.isatty() or sum(s["bytes"] for s in m["shards"]) > LONG_VERIFY_BYTES
    decoded = 0
    with Progress(m["total"], "verify", unit="img", enabled=progress, every=30.0) as bar:
        if workers > 1 and len(jobs) > 1:
            with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                for n, shard in zip(pool.imap(_verify_star, jobs), m["shards"]):
                    decoded += n
                    bar.update(shard["count"])
        else:
            for job, shard in zip(jobs, m["shards"]):
                decoded += _verify_star(job)
                bar.update(shard["count"])
    return {"shards": len(m["shards"]), "total": m["total"], "decoded": decoded}


def collect_info(directory: str, limit: int = 10_000) -> dict:
    """Counts from the manifest, plus image statistics from up to `limit` samples spread evenly."""
    m = mf.load(directory)
    tars, idxs = mf.shard_paths(directory, m)
    image, adopted = ("jpg", False) if not mf.is_adopted(m) else (m["components"][0], True)
    jpg_bytes, picks = [], []
    for shard_no, idx in enumerate(idxs):
        for sample in read_index(idx):
            jpg_bytes.append(sample[image][1])
            picks.append((shard_no, sample[image] if adopted else sample["json"]))
    step = max(1, len(picks) // max(limit, 1))
    sides, mpix, formats, reencoded = [], [], Counter(), 0
    handles = {}
    try:
        for shard_no, (off, size, _) in picks[::step]:
            f = handles.get(shard_no) or handles.setdefault(shard_no, open(tars[shard_no], "rb"))
            f.seek(off)
            if adopted:     # the image header alone: PIL reads the size without decoding
                try:
                    with Image.open(io.BytesIO(f.read(size))) as im:
                        meta = {"size": im.size, "format": im.format}
                except Exception:  # noqa: BLE001 -- counted, never fatal: info is a survey
                    formats["undecodable"] += 1
                    continue
            else:
                meta = json.loads(f.read(size))
            w, h = meta["size"]
            sides.append((min(w, h), max(w, h)))
            mpix.append(w * h / 1e6)
            formats[meta.get("format", "?")] += 1
            reencoded += bool(meta.get("reencoded"))
    finally:
        for f in handles.values():
            f.close()
    sides_a = np.array(sides) if sides else np.zeros((0, 2))
    pct = lambda a: {p: float(np.percentile(a, p)) for p in (0, 5, 50, 95, 100)} if len(a) else {}  # noqa: E731
    return {
        "manifest": m,
        "sampled": len(sides),
        "bytes_per_image": float(np.mean(jpg_bytes)) if jpg_bytes else 0.0,
        "shorter_side": pct(sides_a[:, 0]),
        "longer_side": pct(sides_a[:, 1]),
        "megapixels": pct(np.array(mpix)),
        "megapixels_mean": float(np.mean(mpix)) if mpix else 0.0,
        "source_formats": dict(formats),
        "reencoded_fraction": reencoded / max(len(sides), 1),
    }


def format_info(directory: str, info: dict) -> str:
    m = info["manifest"]
    size = sum(s["bytes"] for s in m["shards"])
    lines = [
        f"{directory}",
        f"  samples   {m['total']} in {len(m['shards'])} shard(s), {size / 1e6:.1f} MB "
        f"({info['bytes_per_image'] / 1e3:.1f} KB/image)",
        f"  rejected  {m['rejected']} (see {mf.REJECTED})   ignored non-image files {m.get('ignored', 0)}",
    ]
    if m.get("part") and m["part"][1] > 1:
        lines.append(f"  part      {m['part'][0]} of {m['part'][1]} (merge the parts before training)")
    if m["classes"]:
        counts = m.get("class_counts") or {}
        shown = ", ".join(f"{c}={counts.get(c, '?')}" for c in list(m["classes"])[:20])
        more = f", ... ({len(m['classes'])} classes)" if len(m["classes"]) > 20 else ""
        lines.append(f"  classes   {len(m['classes'])}: {shown}{more}")
    else:
        lines.append("  classes   none (unlabelled)")
    fmt = lambda d: " / ".join(f"{d[p]:.0f}" for p in (0, 5, 50, 95, 100)) if d else "-"  # noqa: E731
    lines += [
        f"  image size (stored, {info['sampled']} sampled; min / p5 / median / p95 / max)",
        f"    shorter side  {fmt(info['shorter_side'])} px",
        f"    longer side   {fmt(info['longer_side'])} px",
        "    megapixels    " + (" / ".join(f"{info['megapixels'][p]:.2f}" for p in (0, 5, 50, 95, 100))
                                if info["megapixels"] else "-"),
        f"  source formats {info['source_formats']}, re-encoded {100 * info['reencoded_fraction']:.0f}%"
        if not mf.is_adopted(m) else f"  formats   {info['source_formats']} (adopted in place: stored as their "
                                      f"tool wrote them; labels from {(m.get('labels') or {}).get('from', 'none')})",
    ]
    return "\n".join(lines)
