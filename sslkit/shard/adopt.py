"""`sslkit.shard index`: adopt WebDataset tars written by other tools in place.

img2dataset (`00000.tar` of `000000000.jpg/.txt/.json`), webdataset's ShardWriter (`__key__` + `jpg`/`png`/
`webp` + `cls`/`json`) and ImageNet-22K's per-synset tars (`n01440764.tar` of `n01440764_10026.JPEG`) are
all valid WebDataset shards. Adopting them reads each tar once, sequentially (`tarscan`: headers for the
index, every byte for its sha256, no decode unless `--full`), and writes beside them only what sslkit
needs; nothing inside or beside the tars is changed:

    OUT/manifest.json        counts, sizes, sha256 of each tar, classes ("layout": "adopted")
    OUT/sslkit-index/K.idx   DALI index files; the chosen image member is listed as component `img`
    OUT/offsets.npy          int64 [total]: data offset of each sample's image in its tar
    OUT/labels.npy           int32 [total]: class id of each sample (labelled sets only)
    OUT/rejected.tsv         samples left out and why (no image, duplicated key, a cut tar, ...)

A sample's stable index is its position: shard order x position in the shard, as in built shards. The
loader learns which sample DALI read from the reader's source info (tar path and image offset) and looks
the index up in `offsets.npy`, and the label in `labels.npy`: no member is added to any tar.

Resumable like `build`: every finished shard is journalled in `OUT/.sslkit-index/`; `--part I/N` indexes
the I-th contiguous slice of the tar list (for Slurm arrays and multi-machine runs), `merge` joins parts.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import SslkitError
from ..files import atomic_file, atomic_write, json_lines
from ..progress import Progress
from ..runlock import RunLock
from . import manifest as mf
from .tarscan import scan, will_need
from .tarwriter import INDEX_VERSION, split_name

IMAGE_EXTS, LABEL_SOURCES = mf.IMAGE_EXTS, mf.LABEL_SOURCES
IMAGE_COMPONENT = "img"        # the token the chosen image member gets in sslkit's index files
INDEX_DIR = "sslkit-index"
STATE_DIR = ".sslkit-index"
OFFSETS = "offsets.npy"
LABELS = "labels.npy"
READ_AHEAD = 64 << 20     # bytes of tars the kernel is asked to read ahead of the workers
OURS = {mf.MANIFEST, mf.REJECTED, INDEX_DIR, STATE_DIR, OFFSETS, LABELS}


class AdoptError(SslkitError, ValueError):
    """Shards cannot be adopted as asked (one-line reason naming the file)."""


@dataclass(frozen=True)
class IndexOptions:
    sources: tuple[str, ...]
    out: str
    image_ext: tuple[str, ...] = IMAGE_EXTS   # preference order when a sample holds several images
    label: str = "auto"                       # auto: `cls` when the first shard has it, else none
    label_field: str | None = None            # with label="json": a field (a.b for nested) of the JSON member
    class_names: str | None = None            # a file with one class name per line (line i: class i)
    full: bool = False                        # decode every image; undecodable ones are rejected
    part: tuple[int, int] = (0, 1)
    workers: int = 0                          # 0: one per core; does not change the output
    progress: bool = True

    def content(self) -> dict:
        d = asdict(self)
        for k in ("out", "workers", "progress"):
            d.pop(k)
        d["sources"] = [os.path.abspath(s) for s in self.sources]
        d["class_names"] = os.path.abspath(self.class_names) if self.class_names else None
        return d

    def fingerprint(self) -> str:
        blob = json.dumps({"adopted": mf.FORMAT_VERSION, **self.content()}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self):
        i, n = self.part
        if not (n >= 1 and 0 <= i < n):
            raise AdoptError(f"--part {i}/{n}: expected I/N with 0 <= I < N")
        if self.label not in LABEL_SOURCES:
            raise AdoptError(f"--label {self.label!r}: choose from {', '.join(LABEL_SOURCES)}")
        if self.label == "json" and not self.label_field:
            raise AdoptError("--label json needs --label-field NAME")
        if not self.image_ext or not all(e.strip(".") for e in self.image_ext):
            raise AdoptError("--image-ext: give one or more extensions, e.g. jpg,png")


def list_tars(sources) -> list[str]:
    """Tar files of the sources, in order: a .tar file as given, a folder's tars sorted by path."""
    tars: list[str] = []
    for src in sources:
        if os.path.isfile(src):
            if not src.lower().endswith(".tar"):
                raise AdoptError(f"{src}: not a .tar file")
            tars.append(os.path.abspath(src))
        elif os.path.isdir(src):
            found = sorted(os.path.join(root, f) for root, dirs, files in os.walk(src)
                           for f in files if f.lower().endswith(".tar") and not f.startswith("."))
            if not found:
                raise AdoptError(f"{src}: no .tar files in this folder")
            tars += [os.path.abspath(t) for t in found]
        else:
            raise AdoptError(f"{src}: no such file or folder")
    dupes = [t for t, n in Counter(tars).items() if n > 1]
    if dupes:
        raise AdoptError(f"{dupes[0]}: given twice")
    return tars


# ------------------------------------------------------------------------------------------------
# one shard
# ------------------------------------------------------------------------------------------------

def _json_field(data: bytes, path: str):
    value = json.loads(data)
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise KeyError(path)
    return value


def _label(members: dict, tar: str, label: str, field_name: str | None):
    """The sample's raw label (int or str); raises ValueError with the reason."""
    if label == "shard":
        return os.path.splitext(os.path.basename(tar))[0]
    if label == "cls":
        if "cls" not in members:
            raise ValueError("no cls member")
        text = members["cls"].data.strip()
        if not (0 < len(text) <= 10 and text.isdigit()) or int(text) >= 2 ** 31:   # bytes: ASCII digits only
            raise ValueError(f"cls {text[:20]!r} is not a class id (a non-negative integer)")
        return int(text)
    if "json" not in members:
        raise ValueError("no json member")
    try:
        return _json_field(members["json"].data, field_name)
    except (KeyError, ValueError, UnicodeDecodeError):
        raise ValueError(f"the json member has no field {field_name!r} holding an integer or a string") from None


_BLANK = re.compile(r"\s")


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:      # tarscan keeps undecodable bytes as surrogates
        return True
    return False


def _decodes(data: bytes) -> str | None:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if min(im.size) < 1:
                return "an empty image"
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a reason, not a crash
        return f"does not decode ({type(e).__name__}: {str(e)[:80]})"
    return None


def index_shard(job: tuple) -> dict:
    """Scan one tar and write its DALI index; return the shard's record and per-sample arrays."""
    k, tar, idx_path, o = job
    keep = {"cls"} if o["label"] == "cls" else {"json"} if o["label"] == "json" else set()
    if o["full"]:
        keep |= set(o["image_ext"])
    res = scan(tar, keep)
    groups = _group(res.members)
    rejects = []
    if res.damage:
        # The sample being read when the tar ended or broke is left out: the member that was cut, or
        # (a broken header names no member) the last sample, which may have lost a member.
        cut = split_name(res.damaged_member)[0] if res.damaged_member else None
        if groups and cut in (None, groups[-1][0]):
            cut = groups.pop()[0]
        rejects.append([f"{tar}:{cut}" if cut else tar, f"{res.damage}; the sample is left out"])
    names_ok = _names_ok("/".join(m.name for m in res.members))     # one test for the whole tar, as a rule
    lines, offsets, labels, formats, seen = [], [], [], Counter(), {}
    for j, (key, comps) in enumerate(groups):
        members, reason = dict(comps), None
        if len(members) < len(comps):
            seen_ext = set()
            for ext, m in comps:
                if ext in seen_ext:
                    reason = f"member {m.name} appears twice"
                seen_ext.add(ext)
        if key in seen:
            reason = f"duplicated key {key} (first at sample {seen[key]} of this tar)"
        else:
            seen[key] = j
        image_ext = None
        for e in o["image_ext"]:
            if e in members:
                image_ext = e
                break
        if reason is None:
            reason = _problem(members, image_ext, names_ok, o)
        label = None
        if reason is None and o["label"] != "none":
            try:
                label = _label(members, tar, o["label"], o["label_field"])
            except ValueError as e:
                reason = str(e)
        if reason is None and o["full"]:
            reason = _decodes(members[image_ext].data)
        if reason is not None:
            rejects.append([f"{tar}:{key}", reason])
            continue
        img = members[image_ext]
        line = f"{IMAGE_COMPONENT} {img.offset} {img.size} {img.name}"
        if len(members) > 1:
            line += "".join([f" {e} {m.offset} {m.size} {m.name}" for e, m in sorted(members.items())
                             if e != image_ext and e != IMAGE_COMPONENT])
        lines.append(line)
        offsets.append(img.offset)
        labels.append(label)
        formats[image_ext] += 1
    atomic_write(idx_path, f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines),
                 tmp=idx_path + ".tmp", durable=False)     # as the journal: a torn one is indexed again
    return {"k": k, "tar": tar, "count": len(lines), "bytes": res.bytes, "sha256": res.sha256,
            "offsets": np.asarray(offsets, np.int64), "labels": labels, "rejects": rejects,
            "ignored": res.ignored, "formats": dict(formats)}


def _group(members) -> list[tuple[str, list]]:
    """Members grouped into samples as webdataset does: consecutive members sharing a key (the name up
    to the first dot after the last slash); extensions lower-cased."""
    groups: list[tuple[str, list]] = []
    comps: list = []
    last = None
    for m in members:
        name = m.name
        dot = name.find(".", name.rfind("/") + 1)
        key, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())
        if key != last:
            comps = []
            groups.append((key, comps))
            last = key
        comps.append((ext, m))
    return groups


def _names_ok(name: str) -> bool:
    """DALI's index holds a member name as one token of UTF-8 text."""
    return name.isprintable() and not _BLANK.search(name) and (name.isascii() or not _not_utf8(name))


def _problem(members: dict, image_ext: str | None, names_ok: bool, o: dict) -> str | None:
    if image_ext is None:
        return f"no image member ({'/'.join(o['image_ext'])}); it has {', '.join(sorted(members)) or 'nothing'}"
    if not names_ok and not all(_names_ok(m.name) for m in members.values()):
        return "a member name holds white space or bytes that are not UTF-8 text, which DALI's index cannot hold"
    return None


# ------------------------------------------------------------------------------------------------
# the folder
# ------------------------------------------------------------------------------------------------

def _claim(out: str, fp: str) -> dict | None:
    """Check that `out` may receive an index: its sslkit files are ours or absent. Returns the finished
    manifest when this very index is already complete."""
    manifest_path = os.path.join(out, mf.MANIFEST)
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                existing = json.load(f)
        except (ValueError, UnicodeDecodeError):
            existing = None
        if isinstance(existing, dict) and existing.get("build", {}).get("fingerprint") == fp:
            return existing
        raise AdoptError(f"{manifest_path}: {out} already holds another manifest; index into another --out "
                         "(the tars can stay where they are)")
    state = os.path.join(out, STATE_DIR)
    for name in (INDEX_DIR, OFFSETS, LABELS):
        if os.path.exists(os.path.join(out, name)) and not os.path.isdir(state):
            raise AdoptError(f"{os.path.join(out, name)}: exists and was not written by an unfinished "
                             "`sslkit.shard index`; index into another --out")
    return None


def _replay(state: str, fp: str, index_dir: str) -> dict[int, dict]:
    """Finished shards of an interrupted run with the same options (journal + files intact)."""
    opts_path = os.path.join(state, "options.json")
    if os.path.exists(opts_path):
        with open(opts_path) as f:
            if json.load(f).get("fingerprint") != fp:
                raise AdoptError(f"{state}: an unfinished index with other options; re-run that command, "
                                 "or delete this folder to start over")
    done: dict[int, dict] = {}
    journal = os.path.join(state, "shards.jsonl")
    for rec in json_lines(journal):     # up to a torn last line from a kill
        if not _intact(rec, state, index_dir):
            break
        done[rec["k"]] = dict(rec, offsets=np.asarray(rec["offsets"], np.int64))
    return done


def _intact(rec: dict, state: str, index_dir: str) -> bool:
    """A journalled tar's index file is complete and its tables are in the record (the counts agree)."""
    try:
        with open(os.path.join(index_dir, f"{rec['k']:06d}.idx")) as f:
            header = f.readline().split()
    except OSError:
        return False
    count = rec.get("count")
    return (header == [INDEX_VERSION, str(count)] and len(rec.get("offsets", ())) == count
            and len(rec.get("labels", ())) == count)


def _journal(state: str, rec: dict):
    """One JSON line per finished tar, its sample tables included (a few bytes per sample: far cheaper
    than a file per tar). Not fsync'd (it cost more than reading a small tar): after a crash, `_replay`
    keeps the records up to the first torn or incomplete one, and anything lost is simply indexed again."""
    line = json.dumps(dict(rec, offsets=rec["offsets"].tolist()))
    with open(os.path.join(state, "shards.jsonl"), "a") as f:
        f.write(line + "\n")


def _classes(raw_labels: set, class_names: str | None) -> dict[str, int]:
    """Class name -> id. Integer labels keep their ids (names "0".."C-1" or from the names file);
    string labels (a JSON field, the shard's name) are numbered in sorted order."""
    if all(isinstance(x, int) for x in raw_labels):
        count = max(raw_labels) + 1
        if class_names:
            with open(class_names, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
            if len(names) < count:
                raise AdoptError(f"{class_names}: {len(names)} class names, but the labels reach class {count - 1}")
            if len(set(names)) != len(names):
                raise AdoptError(f"{class_names}: class names must be unique")
            return {n: i for i, n in enumerate(names)}
        return {str(i): i for i in range(count)}
    if class_names:
        raise AdoptError("--class-names names integer class ids; these labels are already names")
    return {n: i for i, n in enumerate(mf.class_order(str(x) for x in raw_labels))}


def index(opts: IndexOptions) -> dict:
    """Adopt (or finish adopting) the tars of `opts.sources`; return the manifest written to `opts.out`."""
    opts.validate()
    tars = list_tars(opts.sources)
    i, n = opts.part
    tars = tars[len(tars) * i // n:len(tars) * (i + 1) // n]
    if not tars:
        raise AdoptError(f"--part {i}/{n}: this part holds no tar (there are fewer tars than parts)")
    out, fp = part_folder(opts.out, opts.part), opts.fingerprint()
    os.makedirs(out, exist_ok=True)
    finished = _claim(out, fp)
    if finished is not None:
        print(f"{out}: already indexed ({finished['total']} samples); nothing to do", file=sys.stderr)
        return finished
    state, index_dir = os.path.join(out, STATE_DIR), os.path.join(out, INDEX_DIR)
    # one index at a time per folder: a second one is a one-line error naming the first (host, pid)
    lock = RunLock.acquire(state, lambda msg: print(f"warning: {msg}", file=sys.stderr))
    try:
        os.makedirs(index_dir, exist_ok=True)
        done = _replay(state, fp, index_dir)
        atomic_write(os.path.join(state, "options.json"), json.dumps({"fingerprint": fp, **opts.content()}))
        ahead = ReadAhead([t for k, t in enumerate(tars) if k not in done])
        label = opts.label
        if label == "auto":
            peek = scan(tars[0], max_members=64).members     # the first samples of the first tar decide
            label = "cls" if any(split_name(m.name)[1].lower() == "cls" for m in peek) else "none"
        o = {"label": label, "label_field": opts.label_field,
             "image_ext": [e.lower().lstrip(".") for e in opts.image_ext], "full": opts.full}
        jobs = [(k, t, os.path.join(index_dir, f"{k:06d}.idx"), o) for k, t in enumerate(tars) if k not in done]
        if done:
            print(f"{out}: resuming after {len(done)} of {len(tars)} indexed tar(s)", file=sys.stderr)
        _run_jobs(jobs, state, done, opts, ahead, total_bytes=sum(os.path.getsize(t) for t in tars))
        return _finish(opts, tars, done, label, fp, state)
    finally:
        lock.release()


def part_folder(out: str, part: tuple[int, int]) -> str:
    """Where part I of N goes: OUT/part-IIII-of-NNNN, so every task of a Slurm array can run the same
    command; `merge OUT/part-* --out OUT` then writes the whole dataset's manifest."""
    i, n = part
    return out if n == 1 else os.path.join(out, f"part-{i:04d}-of-{n:04d}")


class ReadAhead:
    """Asks the kernel to read the tars the workers will read next, in their order: posix_fadvise
    WILLNEED returns at once, so the disk streams while the cores hash and parse (a process reading and
    then hashing leaves the disk idle half the time, and two processes reading at once make it seek).
    At most `limit` bytes are asked for beyond the tars already indexed; a larger tar's worker asks for
    the rest as it goes (`tarscan`). Where the call does nothing (a bucket mount), nothing changes."""

    def __init__(self, paths: list[str], limit: int = READ_AHEAD):
        self.paths, self.limit, self.next, self.asked, self.total = paths, limit, 0, {}, 0
        self.top_up()

    def top_up(self):
        while self.next < len(self.paths) and self.total < self.limit:
            path = self.paths[self.next]
            self.next += 1
            self.asked[path] = will_need(path, self.limit)
            self.total += self.asked[path]

    def done(self, path: str):
        self.total -= self.asked.pop(path, 0)
        self.top_up()


def _run_jobs(jobs, state, done, opts, ahead, total_bytes):
    workers = min(opts.workers or os.cpu_count() or 1, max(len(jobs), 1))
    read = sum(r["bytes"] for r in done.values())
    tally = {"read": read, "rejected": sum(len(r["rejects"]) for r in done.values())}
    bar = Progress(total_bytes // 1_000_000, "index", unit="MB", enabled=opts.progress, every=30.0,
                   initial=read // 1_000_000)
    try:
        if workers > 1:
            with mp.get_context("fork").Pool(workers) as pool:
                for rec in pool.imap_unordered(index_shard, jobs):
                    _record(rec, state, done, bar, tally)
                    ahead.done(rec["tar"])
        else:
            for job in jobs:
                _record(index_shard(job), state, done, bar, tally)
                ahead.done(job[1])
    finally:
        bar.close()


def _record(rec, state, done, bar, tally):
    _journal(state, rec)
    done[rec["k"]] = rec
    before = tally["read"] // 1_000_000
    tally["read"] += rec["bytes"]
    tally["rejected"] += len(rec["rejects"])
    bar.update(tally["read"] // 1_000_000 - before, tars=len(done), rejected=tally["rejected"])


def _finish(opts: IndexOptions, tars: list[str], done: dict, label: str, fp: str, state: str) -> dict:
    out = part_folder(opts.out, opts.part)
    shards, first, rejects, formats, raw, offsets = [], 0, [], Counter(), [], []
    for k, tar in enumerate(tars):
        rec = done[k]
        offsets.append(rec["offsets"])
        raw += rec["labels"]
        if rec["count"]:
            shards.append(dict(rec, path=_relative(tar, out), index=f"{INDEX_DIR}/{k:06d}.idx", first_index=first))
        first += rec["count"]
        rejects += rec["rejects"]
        formats.update(rec["formats"])
    if first == 0:
        atomic_write(os.path.join(out, mf.REJECTED), mf.format_rejects(rejects))
        reason = f" (first: {rejects[0][0]}: {rejects[0][1]})" if rejects else ""
        raise AdoptError(f"no sample with an image in {len(tars)} tar(s); every reason is in "
                         f"{os.path.join(out, mf.REJECTED)}{reason}")
    classes = class_counts = None
    if label != "none":
        classes = _classes(set(raw), opts.class_names)
        integers = all(isinstance(x, int) for x in raw)
        ids = np.asarray(raw if integers else [classes[str(x)] for x in raw], np.int32)
        counts = np.bincount(ids, minlength=len(classes))
        class_counts = {c: int(counts[i]) for c, i in classes.items()}
        _save_npy(os.path.join(out, LABELS), ids)
    _save_npy(os.path.join(out, OFFSETS), np.concatenate(offsets))
    labels = {"from": label if label != "json" else f"json:{opts.label_field}", "file": LABELS} if classes else None
    manifest = mf.make(total=first, shards=shards, classes=classes, class_counts=class_counts,
                       components=[IMAGE_COMPONENT], build={"fingerprint": fp, **opts.content()},
                       rejected=len(rejects), ignored=sum(r["ignored"] for r in done.values()),
                       part=opts.part, layout=mf.ADOPTED, image_formats=dict(formats), labels=labels,
                       offsets=OFFSETS)
    mf.finish(out, manifest, rejects)
    shutil.rmtree(state, ignore_errors=True)
    size = sum(s["bytes"] for s in shards)
    print(f"{out}: adopted {first} samples in {len(shards)} tar(s), {size / 1e9:.2f} GB, nothing copied; "
          f"{len(rejects)} rejected (see {os.path.join(out, mf.REJECTED)})"
          + (f"; {len(classes)} classes from {labels['from']}" if classes else "; unlabelled"), file=sys.stderr)
    return manifest


def _relative(tar: str, out: str) -> str:
    """A tar's path in the manifest: relative to the output folder when the tar is inside it (the folder
    can then move with its tars), else absolute."""
    rel = os.path.relpath(tar, os.path.abspath(out))
    return rel if not rel.startswith("..") else tar


def _save_npy(path: str, array: np.ndarray):
    with atomic_file(path, "wb", tmp=path + ".tmp.npy") as f:
        np.save(f, array)


def merge_adopted(manifests: list[tuple[str, dict]], out: str, classes: dict | None) -> dict:
    """One adopted folder from the parts of a multi-machine `index` (or from several indexes), in the
    given order: the index files, offsets and labels are joined, labels renumbered to `classes` (the
    union); no tar is read."""
    os.makedirs(out, exist_ok=True)
    for name in OURS:
        if os.path.exists(os.path.join(out, name)):
            raise AdoptError(f"{os.path.join(out, name)}: exists; merge into a folder without sslkit's files")
    index_dir = os.path.join(out, INDEX_DIR)
    os.makedirs(index_dir, exist_ok=True)
    shards, offsets, labels, rejects, first = [], [], [], [], 0
    for d, m in manifests:
        offsets.append(np.load(os.path.join(d, m["offsets"])))
        if classes is not None:
            remap = np.zeros(len(m["classes"]), np.int32)
            for name, old in m["classes"].items():
                remap[old] = classes[name]
            labels.append(remap[np.load(os.path.join(d, m["labels"]["file"]))])
        for s in m["shards"]:
            name = f"{INDEX_DIR}/{len(shards):06d}.idx"
            shutil.copyfile(os.path.join(d, s["index"]), os.path.join(out, name))
            tar = os.path.abspath(os.path.join(d, s["path"]))
            shards.append(dict(s, path=_relative(tar, out), index=name, first_index=first))
            first += s["count"]
        with open(os.path.join(d, mf.REJECTED), encoding="utf-8") as f:
            next(f, None)
            rejects += [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    _save_npy(os.path.join(out, OFFSETS), np.concatenate(offsets))
    counts = None
    if classes is not None:
        ids = np.concatenate(labels)
        _save_npy(os.path.join(out, LABELS), ids)
        tally = np.bincount(ids, minlength=len(classes))
        counts = {c: int(tally[i]) for c, i in classes.items()}
    first_m = manifests[0][1]
    fingerprint = hashlib.sha256("".join(m["build"]["fingerprint"] for _, m in manifests).encode()).hexdigest()[:16]
    manifest = dict(first_m, total=first, rejected=len(rejects), classes=classes, class_counts=counts,
                    ignored=sum(m.get("ignored", 0) for _, m in manifests),
                    inputs=first + len(rejects), part=[0, 1], shards=shards,
                    image_formats=dict(sum((Counter(m.get("image_formats", {})) for _, m in manifests), Counter())),
                    build=dict(first_m["build"], part=[0, 1], fingerprint=fingerprint,
                               merged_from=[os.path.abspath(d) for d, _ in manifests]))
    mf.finish(out, manifest, rejects)
    print(f"{out}: merged {len(manifests)} adopted folder(s): {first} samples in {len(shards)} tar(s), nothing copied",
          file=sys.stderr)
    return manifest
