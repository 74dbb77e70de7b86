"""Writing labelled shard folders from other shard folders, copying every image byte for byte.

- `write_student`: the pseudo-labelled set, one sample per selected (image, class) record, in the
  shard builder's format (`jpg`, `index`, `cls`, `json`; DALI indices; manifest with the teacher's
  classes), which `python -m sslkit.shard verify --full` accepts and `train.py` trains on;
- `random_labels`: the same samples with their labels permuted over the whole set (the control:
  same images, same class counts, labels that carry no information).

Both are resumable like `sslkit.shard build`: a shard is written under a temporary name, renamed into
place when full, then recorded (fsync'd) in a journal; a re-run replays the journal, checks the files,
and continues with the next shard. Shard boundaries depend only on the sample sequence, so the result is
byte-identical to an uninterrupted run. Source images are read by their DALI index offsets (no tar
walk), a few source shards at a time in a thread pool, and the `index` component of every source sample
is checked against the sample asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..progress import DEFAULT_EVERY, Progress
from ..shard import manifest as mf
from ..shard.journal import ShardJournal
from ..shard.tarwriter import index_lines, parse_index_line, read_index
from .teacher import PseudolabelError

JPEG_SOI = b"\xff\xd8"


# ------------------------------------------------------------------------------------------------
# Reading source samples by index
# ------------------------------------------------------------------------------------------------

def _as_built(image: bytes, where: str) -> dict[str, bytes]:
    """An adopted sample's image as a built folder holds it: an RGB JPEG (passed through when it is one),
    and the json metadata `sslkit.shard build` writes."""
    from ..shard.images import Accepted, ImageOptions, convert
    res = convert(image, where, ImageOptions(min_size=1))
    if not isinstance(res, Accepted):
        raise PseudolabelError(f"{where}: {res.reason}")
    return {"jpg": res.jpg, "json": json.dumps(res.meta, sort_keys=True).encode()}


class SourceSamples:
    """Random access to the components of chosen samples of a shard folder, located once through the
    DALI index files of the shards that hold them (only their lines are parsed)."""

    def __init__(self, directory: str, manifest: dict, indices: np.ndarray, components=("jpg", "index", "json")):
        # An adopted folder (`sslkit.shard index`) holds its tool's image member (any of jpg/png/webp) and
        # no index member: the image is read and turned into the RGB JPEG a built folder would hold.
        self.adopted = mf.is_adopted(manifest)
        if self.adopted:
            components = (manifest["components"][0],)
        self.directory, self.components = directory, tuple(components)
        self.tars, idxs = mf.shard_paths(directory, manifest)
        self.indices = np.unique(np.asarray(indices, np.int64))
        starts = np.array([s["first_index"] for s in manifest["shards"]], np.int64)
        counts = np.array([s["count"] for s in manifest["shards"]], np.int64)
        if self.indices.size and (self.indices[0] < 0 or self.indices[-1] >= manifest["total"]):
            raise PseudolabelError(f"{directory}: sample {int(self.indices[-1])} asked for, the folder holds "
                                   f"0..{manifest['total'] - 1}")
        self.shard = (np.searchsorted(starts, self.indices, side="right") - 1).astype(np.int64)
        # per wanted sample and component: (offset, size)
        self.loc = np.zeros((self.indices.size, len(self.components), 2), np.int64)
        for k in np.unique(self.shard):
            rows = np.flatnonzero(self.shard == k)
            try:
                step, lines = index_lines(idxs[k])
                if len(lines) != counts[k]:
                    raise PseudolabelError(f"{idxs[k]}: {len(lines)} samples, the manifest says {counts[k]}")
                for row in rows:
                    j = int(self.indices[row] - starts[k])
                    entry = parse_index_line(lines[j], step, f"{idxs[k]}:{j + 2}")
                    for c, comp in enumerate(self.components):
                        if comp not in entry:
                            raise PseudolabelError(f"{self.tars[k]}: sample {mf.key_for(int(self.indices[row]))} has "
                                                   f"no {comp!r} component")
                        self.loc[row, c] = entry[comp][:2]
            except ValueError as e:   # a malformed index file
                raise PseudolabelError(str(e)) from None

    def fetch(self, indices: np.ndarray, threads: int = 8) -> dict[int, dict[str, bytes]]:
        """{sample index: {component: bytes}} for `indices` (each a wanted sample), read shard by shard."""
        rows = np.unique(np.searchsorted(self.indices, np.asarray(indices, np.int64)))
        by_shard: dict[int, list[int]] = {}
        for row in rows:
            by_shard.setdefault(int(self.shard[row]), []).append(int(row))

        def read_shard(item):
            k, shard_rows = item
            out = {}
            tar = self.tars[k]
            shard_rows.sort(key=lambda r: self.loc[r, 0, 0])   # increasing offsets in the file
            try:
                fd = os.open(tar, os.O_RDONLY)
            except OSError as e:
                raise PseudolabelError(f"{tar}: cannot open ({e.strerror})") from None
            try:
                for r in shard_rows:
                    i = int(self.indices[r])
                    comps = {}
                    for c, comp in enumerate(self.components):
                        off, size = (int(v) for v in self.loc[r, c])
                        data = os.pread(fd, size, off)
                        if len(data) != size:
                            raise PseudolabelError(f"{tar}: sample {mf.key_for(i)}.{comp} is cut short (the shard is "
                                                   "truncated; run python -m sslkit.shard verify)")
                        comps[comp] = data
                    if self.adopted:
                        comps = _as_built(comps[self.components[0]], f"{tar}@{int(self.loc[r, 0, 0])}")
                    if "index" in comps and comps["index"] != mf.key_for(i).encode():
                        raise PseudolabelError(f"{tar}: sample {i} holds index {comps['index'][:20]!r}; its DALI index "
                                               "does not match the tar (python -m sslkit.shard verify)")
                    if "jpg" in comps and not comps["jpg"].startswith(JPEG_SOI):
                        raise PseudolabelError(f"{tar}: sample {mf.key_for(i)}.jpg is not a JPEG")
                    out[i] = comps
            finally:
                os.close(fd)
            return out

        result: dict[int, dict[str, bytes]] = {}
        items = sorted(by_shard.items())
        if threads > 1 and len(items) > 1:
            with ThreadPoolExecutor(min(threads, len(items))) as pool:
                for part in pool.map(read_shard, items):
                    result.update(part)
        else:
            for item in items:
                result.update(read_shard(item))
        return result


# ------------------------------------------------------------------------------------------------
# The output folder
# ------------------------------------------------------------------------------------------------

def open_journal(out: str, journal: str, prefix: str, max_count: int, max_size: int) -> ShardJournal:
    """The shard journal of this output, after removing what earlier attempts with other options left:
    their journals, and shard files of `prefix` that this journal does not list."""
    shards = ShardJournal(out, journal, prefix, max_count, max_size)
    folder = os.path.dirname(journal)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith("write-") and name.endswith(".jsonl") and name != os.path.basename(journal):
            os.remove(os.path.join(folder, name))
    keep = {r["path"] for r in shards.done} | {r["index"] for r in shards.done}
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.(tar|idx)(\.tmp)?$")
    for name in os.listdir(out):
        if pattern.match(name) and name not in keep:
            os.remove(os.path.join(out, name))
    return shards


@contextlib.contextmanager
def _writing(shards: ShardJournal, bar: Progress):
    """The writing of shards: on any failure the unfinished shard is aborted (complete ones stay, for
    the resume) and the bar says so; the bar is closed either way."""
    try:
        yield
    except BaseException:
        shards.abort()
        bar.close("stopped")
        raise
    finally:
        bar.close()


def check_out(out: str, fingerprint: str) -> dict | None:
    """The manifest of a finished run with this fingerprint (nothing to do), None for a fresh or
    unfinished output folder, an error for a folder that holds something else."""
    path = os.path.join(out, mf.MANIFEST)
    if os.path.isdir(os.path.join(out, ".build")):
        raise PseudolabelError(f"{out} holds an unfinished `sslkit.shard build`; use another --out")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            existing = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PseudolabelError(f"{path}: not a readable manifest ({e}); delete it or use another --out") from None
    if isinstance(existing, dict) and existing.get("build", {}).get("fingerprint") == fingerprint:
        return existing
    raise PseudolabelError(f"{out} already holds a different dataset (manifest.json with other options); use "
                           "another --out or delete it")


def manifest_for(total: int, classes: list[str], class_counts: np.ndarray, shards: list[dict], build: dict) -> dict:
    return mf.make(total=total, shards=shards, classes={c: i for i, c in enumerate(classes)},
                   class_counts={c: int(class_counts[i]) for i, c in enumerate(classes)},
                   components=["jpg", "index", "cls", "json"], build=build)


def finish(out: str, manifest: dict, journal: str):
    mf.finish(out, manifest, [])
    os.remove(journal)


def _shard_index(idx: str, shard: dict) -> list[dict]:
    try:
        entries = read_index(idx)
    except ValueError as e:
        raise PseudolabelError(str(e)) from None
    if len(entries) != shard["count"]:
        raise PseudolabelError(f"{idx}: {len(entries)} samples, the manifest says {shard['count']}")
    return entries


def _cls(c: int) -> bytes:
    return f"{c:0{mf.CLS_DIGITS}d}".encode()


# ------------------------------------------------------------------------------------------------
# The student dataset
# ------------------------------------------------------------------------------------------------

def write_student(out: str, data_dir: str, data_manifest: dict, selection, classes: list[str],
                  build: dict, *, shuffle: bool = True, seed: int = 0, prefix: str = "shard",
                  max_count: int = 10_000, max_size: int = 1_000_000_000, io_threads: int = 8,
                  progress: bool = True, progress_every: float = DEFAULT_EVERY,
                  max_shards: int | None = None) -> dict | None:
    """Write the selected records (cls, score, index; canonical order from the selector) as a shard
    folder. Returns the manifest, or None after `max_shards` new shards (a time-boxed run)."""
    cls, score, index = selection
    n = cls.size
    if n == 0:
        raise PseudolabelError("the selection is empty: no image has any class in its top-P")
    # rank of each record within its class (the selection comes sorted by class, score, index)
    starts = np.flatnonzero(np.r_[True, cls[1:] != cls[:-1]])
    class_rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    cls, score, index, class_rank = cls[order], score[order], index[order], class_rank[order]

    # the journal lives in the output folder (a --work folder can serve several outputs)
    journal = os.path.join(out, ".pseudolabel", f"write-{build['fingerprint']}.jsonl")
    shards = open_journal(out, journal, prefix, max_count, max_size)
    pos = shards.next_index
    if pos:
        print(f"{out}: resuming after {len(shards.done)} complete shard(s), at sample {pos} of {n}", file=sys.stderr)
    source = SourceSamples(data_dir, data_manifest, index[pos:])
    known = set(classes)
    bar = Progress(n, "write", unit="img", initial=pos, enabled=progress, every=progress_every)
    block = max(1, min(max_count, 4096))
    with _writing(shards, bar):
        for b0 in range(pos, n, block):
            b1 = min(n, b0 + block)
            data = source.fetch(index[b0:b1], io_threads)
            for p in range(b0, b1):
                i, c = int(index[p]), int(cls[p])
                src = data[i]
                meta = json.loads(src["json"])
                extra = {}
                if "label" in meta:
                    meta["source_label"] = meta.pop("label")
                    if meta["source_label"] in known:   # a pool labelled with the teacher's classes
                        extra = {"with_source_label": 1, "agree": int(meta["source_label"] == classes[c])}
                meta.update(label=classes[c], source_index=i, score=float(score[p]), class_rank=int(class_rank[p]))
                comps = [("jpg", src["jpg"]), ("index", mf.key_for(p).encode()), ("cls", _cls(c)),
                         ("json", json.dumps(meta, sort_keys=True).encode())]
                before = shards.new_shards
                shards.add(comps, p, extra)
                bar.update(1)
                if max_shards is not None and shards.new_shards > before and shards.new_shards >= max_shards:
                    return None
        shards.close(end=n)
    labelled = sum(r.get("with_source_label", 0) for r in shards.done)
    agree = sum(r.get("agree", 0) for r in shards.done)
    build = dict(build)
    if labelled:
        build["pseudolabel"] = {**build["pseudolabel"], "source_label_agreement": agree / labelled,
                                "with_source_label": labelled}
    counts = np.bincount(cls, minlength=len(classes))
    manifest = manifest_for(n, classes, counts, shards.shard_entries(), build)
    finish(out, manifest, journal)
    return manifest


# ------------------------------------------------------------------------------------------------
# The random-label control
# ------------------------------------------------------------------------------------------------

def random_labels(src: str, out: str, seed: int = 0, progress: bool = True, progress_every: float = DEFAULT_EVERY,
                  max_shards: int | None = None) -> dict | None:
    """A copy of the labelled shard folder `src` whose labels are a random permutation (by `seed`) of
    its labels: the same images in the same order and the same class counts, but labels that say
    nothing about the images. Shard boundaries follow `src`."""
    m = mf.load(src)
    if not m["classes"]:
        raise PseudolabelError(f"{src}: unlabelled; --random-labels permutes the labels of a labelled set")
    names = sorted(m["classes"], key=m["classes"].get)
    fingerprint = hashlib.sha256(json.dumps({"random_labels": mf.identity(m), "seed": seed}).encode()).hexdigest()[:16]
    os.makedirs(out, exist_ok=True)
    existing = check_out(out, fingerprint)
    if existing is not None:
        print(f"{out}: already complete ({existing['total']} samples); nothing to do", file=sys.stderr)
        return existing
    work = os.path.join(out, ".pseudolabel")
    journal = os.path.join(work, f"write-{fingerprint}.jsonl")
    tars, idxs = mf.shard_paths(src, m)
    labels = np.empty(m["total"], np.int64)
    for s, tar, idx in zip(m["shards"], tars, idxs):     # only the 10-byte cls fields: cheap
        with open(tar, "rb") as f:
            for j, entry in enumerate(_shard_index(idx, s)):
                f.seek(entry["cls"][0])
                labels[s["first_index"] + j] = int(f.read(entry["cls"][1]))
    new = labels[np.random.default_rng(seed).permutation(labels.size)]
    # one output shard per source shard: the same boundaries
    shards = open_journal(out, journal, m.get("build", {}).get("prefix", "shard"), max_count=1 << 62,
                          max_size=1 << 62)
    bar = Progress(m["total"], "random labels", unit="img", initial=shards.next_index, enabled=progress,
                   every=progress_every)
    with _writing(shards, bar):
        for s, tar, idx in zip(m["shards"], tars, idxs):
            if s["first_index"] + s["count"] <= shards.next_index:
                continue
            with open(tar, "rb") as f:
                for j, entry in enumerate(_shard_index(idx, s)):
                    i = s["first_index"] + j
                    comps = {}
                    for comp, (off, size, _) in entry.items():
                        f.seek(off)
                        comps[comp] = f.read(size)
                    if comps.get("index") != mf.key_for(i).encode():
                        raise PseudolabelError(f"{tar}: sample {j} holds index {comps.get('index')!r}, expected {i}")
                    meta = json.loads(comps["json"])
                    meta.update(label=names[new[i]], original_label=names[labels[i]], random_labels_seed=seed)
                    comps["cls"] = _cls(int(new[i]))
                    comps["json"] = json.dumps(meta, sort_keys=True).encode()
                    shards.add(list(comps.items()), i)
                    bar.update(1)
            shards.close(end=s["first_index"] + s["count"])
            if max_shards is not None and shards.new_shards >= max_shards:
                return None
    counts = np.bincount(new, minlength=len(names))
    build = {"fingerprint": fingerprint, "prefix": shards.prefix,
             "random_labels": {"source": os.path.abspath(src), "source_identity": mf.identity(m), "seed": seed},
             "source_build": m.get("build")}
    manifest = manifest_for(m["total"], names, counts, shards.shard_entries(), build)
    finish(out, manifest, journal)
    print(f"{out}: {m['total']} samples of {src} with permuted labels (seed {seed})", file=sys.stderr)
    return manifest
