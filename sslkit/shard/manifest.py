"""The manifest: the contract between a shard folder and everything that reads it.

`manifest.json` lists every shard with its sample count, size and sha256, the classes, and the
options that built it. Readers start from it, never from a glob, and `load()` refuses a manifest
that is missing, malformed or inconsistent with the files beside it.
"""

from __future__ import annotations

import hashlib
import json
import os

from .. import __version__
from ..errors import SslkitError
from ..files import atomic_write  # noqa: F401 -- also used as mf.atomic_write by build, adopt, pseudolabel

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ADOPTED = "adopted"      # `layout` of a folder indexed by `sslkit.shard index` (tars written by other tools)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")     # image members an adopted sample may hold, in preference order
LABEL_SOURCES = ("auto", "cls", "json", "shard", "none")   # where an adopted folder's labels come from
REJECTED = "rejected.tsv"
KEY_DIGITS = 10          # keys and the `index` component are the zero-padded sample index
CLS_DIGITS = 10          # `cls` is zero-padded too, so DALI sees a fixed-size field


class ManifestError(SslkitError, ValueError):
    """The shard folder cannot be read as described (one-line reason)."""


def key_for(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def write(directory: str, manifest: dict):
    atomic_write(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1, sort_keys=False) + "\n")


SHARD_FIELDS = ("path", "index", "count", "bytes", "sha256", "first_index")


def shard_entry(rec: dict) -> dict:
    """A shard's manifest entry (its fields in the one order) from any record that holds them."""
    return {k: rec[k] for k in SHARD_FIELDS}


def make(*, total: int, shards: list[dict], classes: dict | None, class_counts: dict | None, components: list,
         build: dict, rejected: int = 0, ignored: int = 0, inputs: int | None = None, part=(0, 1), **more) -> dict:
    """The one manifest constructor (build, merge and the pseudo-label writer; what `validate` reads).
    `inputs` defaults to total + rejected; `more` holds a layout's own fields (an adopted folder's
    `layout`, `offsets`, `labels`, ...), written after the common ones."""
    return {
        "format_version": FORMAT_VERSION,
        "created_by": f"sslkit {__version__}",
        "total": total,
        "rejected": rejected,
        "ignored": ignored,
        "inputs": total + rejected if inputs is None else inputs,
        "classes": classes,
        "class_counts": class_counts,
        "components": list(components),
        "part": list(part),
        "shards": [shard_entry(s) for s in shards],
        "build": build,
        **more,
    }


def class_order(names) -> list[str]:
    """The one order of class names, hence their ids: numerically when every name is an integer, else sorted."""
    names = list(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def format_rejects(rows) -> str:
    """rejected.tsv: one `source<TAB>reason` line per rejected input, under a header."""
    clean = lambda s: str(s).replace("\t", " ").replace("\n", " ")  # noqa: E731
    return "source\treason\n" + "".join(f"{clean(a)}\t{clean(b)}\n" for a, b in rows)


def finish(directory: str, manifest: dict, rejects) -> None:
    """Write a finished folder's rejected.tsv, then its manifest.json (last: it marks the folder done)."""
    atomic_write(os.path.join(directory, REJECTED), format_rejects(rejects))
    write(directory, manifest)


def load(directory: str, check_files: bool = True) -> dict:
    """Load and sanity-check `directory/manifest.json`; with `check_files`, also that each shard and
    index file exists with the recorded size (cheap: no hashing, see `verify` for that)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ManifestError(f"{directory}: no such shard folder")
    if not os.path.exists(path):
        busy = any(os.path.isdir(os.path.join(directory, d)) for d in (".build", ".sslkit-index"))
        hint = " (a build or index is in progress or was interrupted: re-run it)" if busy else ""
        tars = any(n.lower().endswith(".tar") for n in os.listdir(directory))
        how = ("adopt these tars in place with `python -m sslkit.shard index " + directory + " --out " + directory + "`"
               if tars else "build shards with `python -m sslkit.shard build`")
        raise ManifestError(f"{path}: missing{hint}; {how}")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None
    validate(m, path)
    if check_files:
        for s in m["shards"]:
            tar = os.path.join(directory, s["path"])
            if not os.path.exists(tar):
                raise ManifestError(f"{tar}: listed in the manifest but missing")
            if os.path.getsize(tar) != s["bytes"]:
                raise ManifestError(f"{tar}: {os.path.getsize(tar)} bytes, manifest says {s['bytes']}")
            idx = os.path.join(directory, s["index"])
            if not os.path.exists(idx):
                raise ManifestError(f"{idx}: DALI index file missing (re-run the build or index that wrote {directory})")
        for extra in ([m["offsets"]] + ([m["labels"]["file"]] if m.get("labels") else [])) if is_adopted(m) else []:
            if not os.path.exists(os.path.join(directory, extra)):
                raise ManifestError(f"{os.path.join(directory, extra)}: missing (re-run `python -m sslkit.shard index`)")
    return m


def _check(ok: bool, path: str, what: str):
    if not ok:
        raise ManifestError(f"{path}: {what}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(m, path: str = MANIFEST):
    """The one manifest schema, checked on every load: one line naming the first field that is wrong."""
    _check(isinstance(m, dict), path, "not a manifest (a JSON object is expected)")
    for name in ("format_version", "total", "shards", "classes", "rejected"):
        _check(name in m, path, f"missing field {name!r}")
    _check(m["format_version"] == FORMAT_VERSION, path,
           f"format_version {m['format_version']!r} (this sslkit reads {FORMAT_VERSION})")
    _check(_is_int(m["total"]) and m["total"] >= 0, path, "field 'total' must be a non-negative integer")
    _check(_is_int(m["rejected"]) and m["rejected"] >= 0, path, "field 'rejected' must be a non-negative integer")
    _check(isinstance(m["shards"], list), path, "field 'shards' must be a list")
    fields = {"path": str, "index": str, "count": int, "bytes": int, "sha256": str, "first_index": int}
    first = 0
    for k, s in enumerate(m["shards"]):
        _check(isinstance(s, dict), path, f"shards[{k}] must be an object")
        for name, kind in fields.items():
            _check(name in s, path, f"shards[{k}] lacks {name!r}")
            ok = _is_int(s[name]) and s[name] >= 0 if kind is int else isinstance(s[name], str) and s[name]
            _check(ok, path, f"shards[{k}].{name} must be a {'non-negative integer' if kind is int else 'string'}")
        _check(s["first_index"] == first, path, f"shard {s['path']} starts at index {s['first_index']}, expected {first}")
        first += s["count"]
    _check(first == m["total"], path, f"shards hold {first} samples but total says {m['total']}")
    classes = m["classes"]
    _check(classes is None or isinstance(classes, dict), path, "field 'classes' must be an object (name: id) or null")
    if classes:
        ids = sorted(classes.values()) if all(_is_int(v) for v in classes.values()) else None
        _check(ids == list(range(len(classes))), path, "field 'classes' must map names to the ids 0..C-1")
    if m.get("layout") == ADOPTED:
        _check(isinstance(m.get("offsets"), str), path, "an adopted folder needs field 'offsets' (a file name)")
        labels = m.get("labels")
        _check((labels is None) == (not classes), path, "field 'labels' must name the labels file exactly when "
               "there are classes")
        _check(labels is None or isinstance(labels, dict) and isinstance(labels.get("file"), str), path,
               "field 'labels' must be an object with a 'file'")
    else:
        _check(m.get("layout", "built") == "built", path, f"unknown layout {m.get('layout')!r}")
        _check(isinstance(m.get("components", []), list), path, "field 'components' must be a list")


def is_adopted(m: dict) -> bool:
    return m.get("layout") == ADOPTED


def shard_paths(directory: str, m: dict) -> tuple[list[str], list[str]]:
    """Absolute tar and index paths of a loaded manifest, in order."""
    tars = [os.path.join(os.path.abspath(directory), s["path"]) for s in m["shards"]]
    idxs = [os.path.join(os.path.abspath(directory), s["index"]) for s in m["shards"]]
    return tars, idxs


def identity(m: dict) -> str:
    """What makes two shard folders the same dataset, whatever their path: the shards' checksums and
    counts, and the classes. A run resumes on moved or copied shards when this matches."""
    blob = json.dumps({"total": m["total"], "classes": m.get("classes"),
                       "shards": [[s["sha256"], s["count"]] for s in m["shards"]]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
