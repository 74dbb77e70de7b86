"""`sslkit.shard merge`: one dataset from the parts of a multi-machine build (or from several builds).

Each part numbers its samples from 0, so merging rewrites every sample with its global index (the
key, the `index` component and, when class sets differ, `cls`); image bytes are copied untouched.
Input shards are checksummed while they are read, so a corrupted part cannot be merged silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile


from ..progress import Progress
from . import manifest as mf
from .build import BuildError
from .tarwriter import ShardWriter, read_index, split_name


class _HashingReader:
    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n=-1):
        b = self.f.read(n)
        self.sha.update(b)
        return b


def _samples(path: str, expected_sha: str):
    """Yield (key, [(ext, bytes), ...]) from a tar in stored order, checking its sha256 at the end."""
    with open(path, "rb") as raw:
        hr = _HashingReader(raw)
        with tarfile.open(fileobj=hr, mode="r|") as tar:
            key, comps = None, []
            for member in tar:
                if not member.isreg():
                    continue
                k, ext = split_name(member.name)
                if k != key and comps:
                    yield key, comps
                    comps = []
                key = k
                comps.append((ext, tar.extractfile(member).read()))
            if comps:
                yield key, comps
        while hr.read(1 << 20):
            pass
    if hr.sha.hexdigest() != expected_sha:
        raise BuildError(f"{path}: sha256 does not match its manifest; re-build that part")


def _check_parts(manifests: list[tuple[str, dict]]):
    parts = [m.get("part", [0, 1]) for _, m in manifests]
    if all(p[1] == 1 for p in parts):
        return  # independent builds: simply concatenated
    n = parts[0][1]
    if any(p[1] != n for p in parts):
        raise BuildError(f"parts disagree on N: {[f'{i}/{k}' for i, k in parts]}")
    have = sorted(p[0] for p in parts)
    if have != list(range(n)):
        missing = sorted(set(range(n)) - set(have))
        raise BuildError(f"cannot merge: part(s) {missing} of {n} missing" if missing else
                         f"the same part given twice: {have}")
    strip = lambda b: {k: v for k, v in b.items() if k not in ("part", "fingerprint")}  # noqa: E731
    first = strip(manifests[0][1]["build"])
    for d, m in manifests[1:]:
        if strip(m["build"]) != first:
            raise BuildError(f"{d}: built with other options than {manifests[0][0]}; parts must share them")


def _shared_samples(manifests: list[tuple[str, dict]]) -> str | None:
    """Where two inputs hold the same samples: the same tar (sha256), or in built folders the same
    source file (each sample's json names it). None when the inputs are disjoint."""
    seen: dict[str, str] = {}
    for d, m in manifests:
        for s in m["shards"]:
            if s["sha256"] in seen:
                return f"{os.path.join(d, s['path'])} and {seen[s['sha256']]} are the same tar"
            seen[s["sha256"]] = os.path.join(d, s["path"])
    if any(mf.is_adopted(m) for _, m in manifests):
        return None
    sources: dict[str, str] = {}
    for d, m in manifests:
        for s in m["shards"]:
            with open(os.path.join(d, s["path"]), "rb") as f:
                for sample in read_index(os.path.join(d, s["index"])):
                    off, size, _ = sample["json"]
                    f.seek(off)
                    src = json.loads(f.read(size)).get("source")
                    if src is None:
                        continue
                    if src in sources and sources[src] != d:
                        return f"{src} is a sample of both {sources[src]} and {d}"
                    sources[src] = d
    return None


def _claim_out(out: str, inputs: list[str]):
    """Merge writes into an empty (or new) folder, or one holding nothing but the inputs themselves."""
    os.makedirs(out, exist_ok=True)
    inside = {os.path.realpath(d) for d in inputs}
    foreign = [n for n in sorted(os.listdir(out)) if os.path.realpath(os.path.join(out, n)) not in inside]
    if foreign:
        raise BuildError(f"{out} is not empty (it holds {foreign[0]}{' and more' if len(foreign) > 1 else ''}); "
                         "merge into an empty or new folder")


def merge(inputs: list[str], out: str, prefix: str | None = None, progress: bool = True,
          allow_duplicates: bool = False) -> dict:
    manifests = [(d, mf.load(d)) for d in inputs]
    if len({os.path.realpath(d) for d in inputs}) < len(inputs):
        raise BuildError("the same folder is given twice")
    _check_parts(manifests)
    if not allow_duplicates:
        shared = _shared_samples(manifests)
        if shared:
            raise BuildError(f"cannot merge: {shared}; the inputs share samples (--allow-duplicates to keep both)")
    adopted = {mf.is_adopted(m) for _, m in manifests}
    if len(adopted) > 1:
        raise BuildError("cannot merge adopted (shard index) and built (shard build) folders")
    manifests.sort(key=lambda dm: dm[1].get("part", [0, 1])[0] if dm[1].get("part", [0, 1])[1] > 1 else 0)
    labelled = {bool(m["classes"]) for _, m in manifests}
    if len(labelled) > 1:
        raise BuildError("cannot merge labelled and unlabelled shard folders")
    classes = None   # the union of the inputs' classes, renumbered in sorted order
    if labelled.pop():
        classes = {c: i for i, c in enumerate(mf.class_order({c for _, m in manifests for c in m["classes"]}))}
    if adopted.pop():
        from .adopt import merge_adopted
        return merge_adopted(manifests, out, classes)
    _claim_out(out, inputs)
    prefix = prefix or manifests[0][1]["build"].get("prefix", "shard")
    shards, rejects, class_counts = [], [], {}
    index = 0
    total = sum(m["total"] for _, m in manifests)
    bar = Progress(total, "merge", unit="img", enabled=progress, every=30.0)
    for d, m in manifests:
        remap = None
        if classes is not None:
            ids = {v: k for k, v in m["classes"].items()}
            remap = {i: classes[ids[i]] for i in ids}
            for c, n in (m.get("class_counts") or {}).items():
                class_counts[c] = class_counts.get(c, 0) + n
        for s in m["shards"]:
            name = f"{prefix}-{len(shards):06d}"
            writer = ShardWriter(os.path.join(out, name + ".tar"), os.path.join(out, name + ".idx"))
            first = index
            try:
                for _, comps in _samples(os.path.join(d, s["path"]), s["sha256"]):
                    new = []
                    for ext, data in comps:
                        if ext == "index":
                            data = mf.key_for(index).encode()
                        elif ext == "cls" and remap is not None:
                            data = f"{remap[int(data)]:0{mf.CLS_DIGITS}d}".encode()
                        new.append((ext, data))
                    writer.add(mf.key_for(index), new)
                    index += 1
                    bar.update(1)
            except BaseException:
                writer.abort()
                raise
            info = writer.commit()
            shards.append({"path": name + ".tar", "index": name + ".idx", "first_index": first, **info})
        with open(os.path.join(d, mf.REJECTED)) as f:
            next(f, None)
            rejects += [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    bar.close()
    fingerprint = hashlib.sha256("".join(m["build"]["fingerprint"] for _, m in manifests).encode()).hexdigest()[:16]
    manifest = mf.make(total=index, shards=shards, classes=classes,
                       class_counts={c: class_counts.get(c, 0) for c in classes} if classes else None,
                       components=manifests[0][1]["components"],
                       build={"fingerprint": fingerprint, "prefix": prefix,
                              "merged_from": [os.path.abspath(d) for d, _ in manifests],
                              "options": manifests[0][1]["build"]},
                       rejected=len(rejects), ignored=sum(m.get("ignored", 0) for _, m in manifests),
                       inputs=sum(m.get("inputs", m["total"]) for _, m in manifests))
    mf.finish(out, manifest, rejects)
    print(f"{out}: merged {len(manifests)} folder(s) into {index} samples in {len(shards)} shard(s)",
          file=sys.stderr)
    return manifest
