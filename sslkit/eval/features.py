"""Features of a labelled shard folder, extracted once and cached on disk.

Extraction runs the DALI `eval_val` pipeline (resize shorter side to `resize`, centre crop `size`)
with `shuffle_buffer=1`, so samples come in stored order, each exactly once; the indices are checked
(any other order is sorted back by index, with a warning, and a missing or repeated sample is an error).

Cache: `<cache_dir>/<key>/` where key = sha256 of the encoder's identity (trunk weights + layer, or
pixels), the data's identity (`sslkit.shard.manifest.identity`: shard checksums, counts, classes),
the crop options and FEATURE_VERSION. Changing any of them gives a new folder; nothing else does
(not the path of the checkpoint or the shards, not the batch size). Writes are chunked: every
`chunk` samples one `chunk-NNNNNN.pt` and then `state.pt` (chunks done + the loader's DALI state)
are replaced atomically, so a killed extraction resumes after its last complete chunk. One writer
per cache key at a time: two processes extracting the same features concurrently would clobber them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import torch

from pipelines import LoaderError, make_loader
from ..files import atomic_file, atomic_write
from ..config import dali_device
from ..progress import DEFAULT_EVERY, Progress
from ..shard import manifest as mf
from .defaults import DEFAULT_CACHE
from .encoders import FEATURE_VERSION
from .errors import EvalError

log = logging.getLogger("sslkit.eval")



@dataclass
class FeatureSet:
    """Features of one shard folder in sample-index order."""
    x: torch.Tensor             # [N, D] float32, CPU
    labels: torch.Tensor        # [N] int64 class ids
    index: torch.Tensor         # [N] int64 sample indices (0..N-1)
    channels: int               # channels of the pooled map (D = channels x s x s)
    classes: list[str]          # class names by id
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, rows) -> "FeatureSet":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return FeatureSet(self.x[rows], self.labels[rows], self.index[rows], self.channels, self.classes, self.meta)


def data_info(data_dir: str) -> dict:
    """Manifest facts of a labelled shard folder: path, identity, total, class names by id."""
    m = mf.load(data_dir)
    if not m.get("classes"):
        raise EvalError(f"{data_dir}: the shards are unlabelled; evaluation needs labels (build with labels)")
    classes = m["classes"]
    names = sorted(classes, key=classes.get) if isinstance(classes, dict) else list(classes)
    return {"dir": os.path.abspath(data_dir), "identity": mf.identity(m), "total": m["total"], "classes": names}


def encoder_name(encoder) -> str:
    """Short name of what is being extracted, for progress lines: pixels, random-init ARCH or ARCH@LAYER."""
    d = encoder.describe()
    if d.get("kind") == "pixels":
        return "pixels"
    return f"{'random-init ' if d.get('source') == 'random' else ''}{d.get('arch')}@{d.get('layer')}"


def cache_key(encoder_identity: str, data_identity: str, size: int, resize: int) -> str:
    blob = json.dumps({"encoder": encoder_identity, "data": data_identity, "size": size, "resize": resize,
                       "version": FEATURE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _atomic_torch_save(obj, path: str):
    with atomic_file(path, "wb", tmp=path + ".tmp", durable=False) as f:
        torch.save(obj, f)


def _atomic_json(obj, path: str):
    atomic_write(path, json.dumps(obj, indent=1), tmp=path + ".tmp", durable=False)


def _chunk_path(folder: str, i: int) -> str:
    return os.path.join(folder, f"chunk-{i:06d}.pt")


def _read_cache(folder: str) -> tuple[dict | None, dict | None]:
    """(meta, state) of a cache folder, None where absent or unreadable (then it starts afresh)."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None, None
    try:
        state = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: the extraction starts afresh
        state = None
    return meta, state


def extract(encoder, data_dir: str, *, size: int, resize: int, device: str = "cpu", batch_size: int = 256,
            cache_dir: str | None = DEFAULT_CACHE, chunk: int = 8192, num_threads: int = 0, progress: bool = True,
            max_chunks: int | None = None, progress_every: float = DEFAULT_EVERY) -> FeatureSet | None:
    """Features of every sample of `data_dir` under `encoder` (see the module docstring).

    `device` is "cpu" or "cuda" (the loader then decodes on the GPU). `max_chunks` stops after that
    many newly written chunks and returns None (a time-boxed or simulated-kill run; resume by calling
    again). With `cache_dir=None` nothing is written. Progress: a bar on a terminal, else a line every
    `progress_every` seconds (sslkit.progress)."""
    info = data_info(data_dir)
    key = cache_key(encoder.identity, info["identity"], size, resize)
    folder = os.path.join(cache_dir, key) if cache_dir else None
    meta, state = _read_cache(folder) if folder else (None, None)
    if meta and meta.get("complete"):
        return _load_complete(folder, meta, info)
    if meta is None or state is None:
        state = None
        meta = {"key": key, "encoder": encoder.identity, "describe": encoder.describe(), "data": info,
                "size": size, "resize": resize, "version": FEATURE_VERSION, "batch_size": batch_size,
                "chunk_batches": max(1, chunk // batch_size), "complete": False}
        if folder:
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(folder):  # a half-written earlier attempt: start clean
                os.remove(os.path.join(folder, name))
            _atomic_json(meta, os.path.join(folder, "meta.json"))
    # a resumed cache keeps its batch size so that chunk boundaries stay whole batches
    bs, per_chunk = meta["batch_size"], meta["chunk_batches"]
    loader = make_loader("eval_val", data_dir, batch_size=bs, device=dali_device(device),
                         shuffle_buffer=1, size=size, resize=resize, num_threads=num_threads)
    done, skip = 0, 0
    if state is not None:
        meta["resumed_by"] = "loader state"
        done = state["chunks"]
        for name in os.listdir(folder):  # chunks written after the last state: redone
            if name.startswith("chunk-") and int(name[6:12]) >= done:
                os.remove(os.path.join(folder, name))
        try:
            loader.load_state_dict(state["loader"])
        except (LoaderError, KeyError):
            # a loader state this version cannot restore: replay the sample order, encode nothing
            skip, meta["resumed_by"] = done * per_chunk, "replay"
    parts = [] if folder is None else None   # in-memory chunks when nothing is cached
    bar = Progress(info["total"], f"features {encoder_name(encoder)} {os.path.basename(info['dir'].rstrip('/'))}",
                   initial=min(done * per_chunk * bs, info["total"]), enabled=progress, every=progress_every)
    buf: list[tuple] = []
    written = 0
    try:
        for batch in loader:
            if skip:
                skip -= 1
                continue
            views = batch["views"][0]
            x = encoder(views).cpu()
            buf.append((x, batch["label"].cpu(), batch["index"].cpu(), int((~batch["intact"]).sum())))
            bar.update(x.shape[0])
            if len(buf) == per_chunk:
                done, written = _flush(buf, folder, done, parts, loader, encoder, meta), written + 1
                buf = []
                if max_chunks is not None and written >= max_chunks:
                    return None
        if buf:
            done = _flush(buf, folder, done, parts, loader, encoder, meta)
    finally:
        bar.close()
        getattr(loader, "close", lambda: None)()   # older loaders hold temporary files
    if folder is None:
        return _assemble(parts, meta, info)
    meta["complete"], meta["chunks"] = True, done
    meta["channels"] = meta.get("channels") or encoder.channels
    _atomic_json(meta, os.path.join(folder, "meta.json"))
    return _load_complete(folder, meta, info)


def _flush(buf, folder, done, parts, loader, encoder, meta) -> int:
    part = {"x": torch.cat([b[0] for b in buf]), "labels": torch.cat([b[1] for b in buf]),
            "index": torch.cat([b[2] for b in buf]), "corrupt": sum(b[3] for b in buf)}
    if folder is None:
        parts.append(part)
        meta["channels"] = encoder.channels
        return done + 1
    _atomic_torch_save(part, _chunk_path(folder, done))
    if "channels" not in meta:
        meta["channels"] = encoder.channels
        _atomic_json(meta, os.path.join(folder, "meta.json"))
    _atomic_torch_save({"chunks": done + 1, "loader": loader.state_dict()}, os.path.join(folder, "state.pt"))
    return done + 1


def _load_complete(folder: str, meta: dict, info: dict) -> FeatureSet:
    parts = (torch.load(_chunk_path(folder, i), map_location="cpu", weights_only=True) for i in range(meta["chunks"]))
    fs = _assemble(parts, meta, info)
    fs.meta["cache"] = folder
    return fs


def _assemble(parts, meta: dict, info: dict) -> FeatureSet:
    """Join chunks (an iterable, read one at a time into preallocated tensors: no second copy of the
    features) and check the order: every index 0..N-1 exactly once, in stored order."""
    n, row, corrupt = info["total"], 0, 0
    x = labels = index = None
    for p in parts:
        m = p["x"].shape[0]
        if x is None:
            x = torch.empty(n, p["x"].shape[1], dtype=p["x"].dtype)
            labels, index = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
        if row + m > n:
            raise EvalError(f"{info['dir']}: the eval loader gave more than the manifest's {n} samples")
        x[row:row + m], labels[row:row + m], index[row:row + m] = p["x"], p["labels"], p["index"]
        row, corrupt = row + m, corrupt + p["corrupt"]
    if row != n:
        raise EvalError(f"{info['dir']}: the eval loader gave {row} samples, the manifest lists {n}")
    expected = torch.arange(n)
    in_order = torch.equal(index, expected)
    if not in_order:
        order = torch.argsort(index)
        if not torch.equal(index[order], expected):
            raise EvalError(f"{info['dir']}: the eval loader gave {index.unique().numel()} distinct indices for "
                            f"{n} samples; features would not line up")
        log.warning("%s: eval_val did not give stored order with shuffle_buffer=1; sorted by index", info["dir"])
        x, labels, index = x[order], labels[order], index[order]
    if corrupt:
        log.warning("%s: %d corrupt sample(s) were replaced by placeholders in the features", info["dir"], corrupt)
    out_meta = {k: v for k, v in meta.items() if k != "data"}
    out_meta["corrupt"], out_meta["stored_order"] = corrupt, in_order
    return FeatureSet(x, labels, index, int(meta["channels"]), list(info["classes"]), out_meta)
