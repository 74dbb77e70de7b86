"""The teacher pass: every image's top-P classes and scores, per rank, in committed chunks.

Each rank runs the `eval_val` pipeline over its own slice of the shards (`make_loader(rank=r,
world_size=w)`, stored order, shuffle_buffer=1) and writes under

    <work>/scores-<key>/w<W>-b<B>-c<C>/rank<r>/chunk-NNNNNN.npz   index, classes [n,P], scores [n,P], intact
                                             /state.pt            chunks done + the loader's DALI state
                                             /DONE                written after the last chunk (JSON stats)
    <work>/scores-<key>/w<W>-b<B>-c<C>/COMPLETE                   every rank DONE (rank 0 writes it)

`key` hashes what the scores depend on (teacher weights, the data's identity, P, the crop, the device
and precision), so scores are reused by any later run that needs the same ones (another --top-k, say).
A chunk file is written to a temporary name and renamed, then `state.pt` is replaced: a kill at any
moment leaves the chunks named in `state.pt` complete, and a re-run restores the loader from the DALI
state saved with them and continues with the next chunk. The layout folder is named after the world
size, batch size and chunk length, which fix the chunk boundaries; a re-run with other values starts a
new layout (finished chunks of the old one are then not reused).

Ranks never wait for each other in a collective: rank 0 polls the DONE files (the work folder must be
on a file system every rank sees, as the output is), so a rank that finishes hours before a resumed
one cannot time out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..files import atomic_file
from ..config import dali_device
from ..progress import DEFAULT_EVERY, Progress
from ..threads import plan_threads
from .select import top_p
from .teacher import PseudolabelError, Teacher

log = logging.getLogger("sslkit.pseudolabel")

SCORES_VERSION = 1


@dataclass(frozen=True)
class PassOptions:
    size: int
    resize: int
    top_p: int
    batch_size: int = 256
    chunk: int = 50_000            # images per committed chunk (rounded up to whole batches)
    device: str = "cpu"            # "cpu" | "cuda"
    loader_threads: int = 0        # DALI threads (0: this rank's share of the cores)
    progress: bool = True
    progress_every: float = DEFAULT_EVERY   # seconds between progress lines off a terminal
    amp: str = "auto"              # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32

    @property
    def chunk_batches(self) -> int:
        return max(1, -(-self.chunk // self.batch_size))

    @property
    def precision(self) -> str:
        if self.amp == "auto":
            return "bf16" if self.device == "cuda" else "fp32"
        return self.amp


def scores_key(teacher: Teacher, data_identity: str, o: PassOptions) -> str:
    blob = json.dumps({"teacher": teacher.identity, "data": data_identity, "top_p": o.top_p, "size": o.size,
                       "resize": o.resize, "device": o.device, "precision": o.precision,
                       "version": SCORES_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def layout_name(world_size: int, o: PassOptions) -> str:
    return f"w{world_size}-b{o.batch_size}-c{o.chunk_batches}"


def find_complete(scores_dir: str) -> str | None:
    """A layout folder whose every rank finished (any world size), or None."""
    if not os.path.isdir(scores_dir):
        return None
    for name in sorted(os.listdir(scores_dir)):
        d = os.path.join(scores_dir, name)
        if os.path.exists(os.path.join(d, "COMPLETE")):
            return d
    return None


def _atomic(path: str, write):
    with atomic_file(path, "wb", tmp=path + ".tmp") as f:
        write(f)


def _chunk_path(rdir: str, i: int) -> str:
    return os.path.join(rdir, f"chunk-{i:06d}.npz")


def _read_state(rdir: str) -> dict | None:
    path = os.path.join(rdir, "state.pt")
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - an unreadable state only means: start this rank over
        log.warning("%s: unreadable (%s); this rank starts over", path, type(e).__name__)
        return None
    if not isinstance(state, dict) or state.get("version") != SCORES_VERSION:
        return None
    missing = [i for i in range(state["chunks"]) if not os.path.exists(_chunk_path(rdir, i))]
    if missing:
        log.warning("%s: chunk %d is missing; this rank starts over", rdir, missing[0])
        return None
    return state


def run_rank(teacher: Teacher, data_dir: str, o: PassOptions, layout: str, rank: int, world_size: int,
             local_rank: int = 0, max_chunks: int | None = None) -> dict | None:
    """This rank's part of the teacher pass (resuming after its last committed chunk). Returns the
    rank's DONE record, or None when `max_chunks` new chunks were written first (a time-boxed run)."""
    rdir = os.path.join(layout, f"rank{rank}")
    done_path = os.path.join(rdir, "DONE")
    if os.path.exists(done_path):
        with open(done_path) as f:
            return json.loads(f.read())
    state = _resume_state(rdir)
    loader = _open_loader(data_dir, o, rank, world_size, local_rank)
    chunks = _Chunks(rdir, state, loader)
    skip = _restore_loader(loader, state, rank, chunks.done * o.chunk_batches)
    total = loader.samples_this_epoch   # this rank's slice of the stored order
    start = min(chunks.done * o.chunk_batches * o.batch_size, total)
    if chunks.done and rank == 0:
        log.info("rank 0: resuming the teacher pass after %d committed chunk(s) (%d of %d images)", chunks.done,
                 start, total)
    # a bar on a terminal; off it (Slurm, nohup) a line with rate and ETA every 60 s
    bar = Progress(total, f"teacher (rank 0 of {world_size})", initial=start, enabled=o.progress and rank == 0,
                   every=o.progress_every)
    t0 = time.perf_counter()
    try:
        scored = _score(teacher, loader, o, chunks, bar, skip, max_chunks)
    finally:
        bar.close()
    if scored is None:
        return None
    n_new, steady = scored
    t_end = time.perf_counter()
    # images/s after the first batch (pipeline start-up and kernel compilation excluded)
    rate = ((n_new - steady[1]) / max(t_end - steady[0], 1e-9) if steady and n_new > steady[1]
            else n_new / max(t_end - t0, 1e-9))
    rec = {"rank": rank, "samples": total, "chunks": chunks.done, "corrupt": chunks.corrupt, "new_samples": n_new,
           "seconds": t_end - t0, "img_per_s": rate}
    _atomic(done_path, lambda f: f.write(json.dumps(rec).encode()))
    return rec


def _resume_state(rdir: str) -> dict | None:
    """The rank's saved state (None: start over), after removing chunks past it and half-written files."""
    os.makedirs(rdir, exist_ok=True)
    state = _read_state(rdir)
    done = state["chunks"] if state else 0
    for name in os.listdir(rdir):
        if name.endswith(".tmp") or (name.startswith("chunk-") and int(name[6:12]) >= done):
            os.remove(os.path.join(rdir, name))
    return state


def _open_loader(data_dir: str, o: PassOptions, rank: int, world_size: int, local_rank: int):
    """The `eval_val` loader over this rank's slice, in stored order, with this rank's DALI threads."""
    from pipelines import LoaderError, make_loader   # DALI only when there is work to do

    on_gpu = o.device == "cuda"
    threads = plan_threads(dali_device(o.device), o.loader_threads).dali
    try:
        return make_loader("eval_val", data_dir, batch_size=o.batch_size, device=dali_device(o.device),
                           rank=rank, world_size=world_size, seed=0, shuffle_buffer=1, size=o.size,
                           resize=o.resize, num_threads=threads, **({"device_id": local_rank} if on_gpu else {}))
    except LoaderError as e:
        raise PseudolabelError(f"{data_dir}: {e}") from None


def _restore_loader(loader, state: dict | None, rank: int, batches_done: int) -> int:
    """Put the loader where the committed chunks end; the batches to skip when its state cannot be
    restored (the order is replayed, nothing is run on them)."""
    from pipelines import LoaderError

    if state is None:
        return 0
    try:
        loader.load_state_dict(state["loader"])
        return 0
    except (LoaderError, KeyError) as e:
        log.warning("rank %d: cannot restore the loader (%s); replaying %d batches", rank, e, batches_done)
        return batches_done


class _Chunks:
    """This rank's committed chunks: scored batches are buffered, written as one chunk file, then
    `state.pt` (chunks done, corrupt images, the loader's state) is replaced."""

    def __init__(self, rdir: str, state: dict | None, loader):
        self.rdir, self.loader = rdir, loader
        self.done = state["chunks"] if state else 0
        self.corrupt = state.get("corrupt", 0) if state else 0
        self.buf: list[tuple] = []

    def flush(self):
        buf = self.buf
        arrays = {"index": torch.cat([b[0] for b in buf]).cpu().numpy().astype(np.int64),
                  "classes": torch.cat([b[1] for b in buf]).cpu().numpy(),
                  "scores": torch.cat([b[2] for b in buf]).cpu().numpy(),
                  "intact": torch.cat([b[3] for b in buf]).cpu().numpy()}
        self.corrupt += int((~arrays["intact"]).sum())
        _atomic(_chunk_path(self.rdir, self.done), lambda f: np.savez(f, **arrays))
        self.done += 1
        state = {"version": SCORES_VERSION, "chunks": self.done, "corrupt": self.corrupt,
                 "loader": self.loader.state_dict()}
        _atomic(os.path.join(self.rdir, "state.pt"), lambda f: torch.save(state, f))
        self.buf = []


def _score(teacher: Teacher, loader, o: PassOptions, chunks: _Chunks, bar: Progress, skip: int,
           max_chunks: int | None) -> tuple[int, tuple | None] | None:
    """Score the loader's batches into `chunks`: (images scored, (time, images) after the first batch),
    or None when `max_chunks` new chunks were written first."""
    model = teacher.model
    device = next(model.parameters()).device
    on_gpu = o.device == "cuda"
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if o.precision == "bf16"
                else contextlib.nullcontext)
    cls_dtype = torch.int16 if teacher.num_classes <= np.iinfo(np.int16).max else torch.int32
    written, n_new = 0, 0
    steady = None   # (time, images) when the first batch was done: throughput without the start-up
    with torch.inference_mode():
        for batch in loader:
            if skip:
                skip -= 1
                continue
            x = batch["views"][0]
            if x.device != device:
                x = x.to(device, non_blocking=True)
            if on_gpu:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(x)
            scores, classes = top_p(torch.softmax(logits.float(), dim=1), o.top_p)
            chunks.buf.append((batch["index"], classes.to(cls_dtype), scores, batch["intact"]))
            n_new += x.shape[0]
            if steady is None:
                if on_gpu:
                    torch.cuda.synchronize(device)
                steady = (time.perf_counter(), n_new)
            bar.update(x.shape[0])
            if len(chunks.buf) == o.chunk_batches:
                chunks.flush()
                written += 1
                if max_chunks is not None and written >= max_chunks:
                    return None
        if chunks.buf:
            chunks.flush()
    return n_new, steady


def wait_for_ranks(layout: str, world_size: int, poll_s: float = 2.0) -> list[dict]:
    """Rank 0: every rank's DONE record, waiting for the ones still running (no timeout: torchrun ends
    the job if a rank dies)."""
    last_note = time.time()
    while True:
        missing = [r for r in range(world_size) if not os.path.exists(os.path.join(layout, f"rank{r}", "DONE"))]
        if not missing:
            break
        if time.time() - last_note > 60:
            log.info("waiting for rank(s) %s to finish the teacher pass", missing[:8])
            last_note = time.time()
        time.sleep(poll_s)
    recs = []
    for r in range(world_size):
        with open(os.path.join(layout, f"rank{r}", "DONE")) as f:
            recs.append(json.loads(f.read()))
    return recs


def mark_complete(layout: str, recs: list[dict]):
    wall = max(r["seconds"] for r in recs)
    rec = {"ranks": len(recs), "samples": sum(r["samples"] for r in recs), "corrupt": sum(r["corrupt"] for r in recs),
           "img_per_s": sum(r["img_per_s"] for r in recs), "wall_s": wall}
    _atomic(os.path.join(layout, "COMPLETE"), lambda f: f.write(json.dumps(rec).encode()))
    return rec


def iter_chunks(layout: str):
    """(path, arrays) of every committed chunk of a complete layout, rank by rank, in order."""
    with open(os.path.join(layout, "COMPLETE")) as f:
        world = json.loads(f.read())["ranks"]
    for r in range(world):
        rdir = os.path.join(layout, f"rank{r}")
        with open(os.path.join(rdir, "DONE")) as f:
            chunks = json.loads(f.read())["chunks"]
        for i in range(chunks):
            path = _chunk_path(rdir, i)
            try:
                with np.load(path) as z:
                    arrays = {k: z[k] for k in ("index", "classes", "scores", "intact")}
            except Exception as e:  # noqa: BLE001 - any unreadable chunk is the same problem
                raise PseudolabelError(f"{path}: unreadable ({type(e).__name__}: {e}); delete {rdir} and "
                                       f"{os.path.join(layout, 'COMPLETE')} and re-run to recompute that rank"
                                       ) from None
            yield path, arrays
