"""DALI pipeline -> torch batches, with exact epochs, a resumable state and corrupt-sample handling.

Epoch semantics (why this is not DALI's stock iterator): each rank's reader slice is padded to the
same length P (pad_last_batch), so every rank runs ceil(P / B) pipeline batches per epoch and the
loader yields the first floor(P / B) of them (drop-last) -- identical on every rank, so no rank can
hang or run an extra step at an epoch boundary. The state is (epoch, position, DALI checkpoint):
restoring it rebuilds the pipeline from the checkpoint and continues the very same sample order.

Corrupt samples: the graph replaces JPEGs that fail the integrity check by a placeholder and
reports them in `batch["intact"]`; the loader counts them and reports each epoch. A decode error
that still escapes (e.g. a damaged header) names its sample; the loader then quarantines that
sample (a private copy of the index marks it broken), rebuilds the pipeline from the checkpoint
taken before the failing batch and carries on.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from typing import Any

import torch
from nvidia.dali import pipeline_def, types
from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray

from .augment import image_shape
from .family import GraphInputs, ViewFamily
from .reader import READER_NAME, ShardSet, read, replace_broken

log = logging.getLogger("sslkit.loader")

STATE_VERSION = 1
_FAILED_SAMPLE = re.compile(r"(/[^\s:]+\.tar):(\d+):([^\s:]+)")


class LoaderError(RuntimeError):
    """The loader cannot continue (one-line reason)."""


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int
    device: str = "cpu"            # "cpu" | "gpu"
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_threads: int = 0           # 0: the CPU cores of this process' share of the machine
    device_id: int | None = None   # CUDA device for device="gpu" (default: the local rank)
    shuffle_buffer: int = 4096     # samples; shards are globally pre-shuffled, this decorrelates batches
    prefetch: int = 2
    hw_decoder_load: float = 0.65
    use_mmap: bool = True          # False for shards on a network file system
    with_params: bool = False

    def validate(self):
        if self.device not in ("cpu", "gpu"):
            raise LoaderError(f"device={self.device!r}: expected 'cpu' or 'gpu'")
        if self.batch_size < 1:
            raise LoaderError(f"batch_size={self.batch_size}: must be positive")
        if not 0 <= self.rank < self.world_size:
            raise LoaderError(f"rank {self.rank} outside world_size {self.world_size}")
        if self.device == "gpu" and not torch.cuda.is_available():
            raise LoaderError("device='gpu' but torch sees no CUDA device; use device='cpu'")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise LoaderError(f"hw_decoder_load={self.hw_decoder_load}: expected 0..1")


def default_threads(world_size: int) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world_size > 1 else 1
    return max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) // local)


class DaliLoader:
    """Iterable over one epoch of batches (dicts of torch tensors on the loader's device)."""

    def __init__(self, family: ViewFamily, shards: ShardSet, config: LoaderConfig):
        config.validate()
        if config.device == "gpu" and config.device_id is None:
            config = replace(config, device_id=int(os.environ.get("LOCAL_RANK", "0")))
        if config.num_threads <= 0:
            config = replace(config, num_threads=default_threads(config.world_size))
        self.family, self.shards, self.config = family, shards, config
        self.epoch = 0
        self.position = 0            # batches already yielded in the current epoch
        self.corrupt_epoch = 0       # placeholders served this epoch (this rank)
        self.corrupt_total = 0
        self.quarantined: list[str] = []
        self._index_overrides: dict[str, str] = {}
        self._tmp = None
        self._names: list[str] = []
        self._runs = 0               # pipeline batches produced since the reader started
        self._reader_seed = config.seed + config.rank
        self._pipe = self._build()
        meta = self._pipe.reader_meta(READER_NAME)
        per_rank = meta["epoch_size_padded"] // meta["number_of_shards"]
        self.samples_per_rank = per_rank
        # Training drops the last partial batch (same step count on every rank); evaluation families
        # (`exhaustive`) see every sample exactly once, the last batch trimmed of the reader's padding.
        self.drop_last = not getattr(family, "exhaustive", False)
        self._runs_per_epoch = math.ceil(per_rank / config.batch_size)
        self._len = per_rank // config.batch_size if self.drop_last else None
        if self.drop_last and self._len == 0:
            raise LoaderError(f"{shards.directory}: {per_rank} samples per rank (of {shards.total}, world size "
                              f"{config.world_size}) is less than one batch of {config.batch_size}")

    # -- pipeline ---------------------------------------------------------------------------------
    def _build(self, checkpoint: str | None = None):
        cfg, shards, family = self.config, self.shards, self.family
        names: list[str] = []
        index_paths = tuple(self._index_overrides.get(p, p) for p in shards.indexes)
        shard_view = replace(shards, indexes=index_paths)

        @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
        def pipe():
            jpg, index, label, intact = read(shard_view, rank=cfg.rank, world_size=cfg.world_size,
                                             shuffle_buffer=cfg.shuffle_buffer, want_label=shards.labelled,
                                             seed=self._reader_seed, use_mmap=cfg.use_mmap)
            jpg = replace_broken(jpg, intact)
            outs = family.graph(GraphInputs(jpg=jpg, shape=image_shape(jpg), device=cfg.device,
                                            hw_decoder_load=cfg.hw_decoder_load, with_params=cfg.with_params))
            outs["index"] = index
            if label is not None:
                outs["label"] = label
            outs["intact"] = intact
            names.extend(outs)
            return tuple(outs.values())

        # The dynamic executor reference-counts outputs: a batch handed to torch stays valid while
        # torch holds it, so CPU outputs are shared with torch instead of copied.
        kw = dict(batch_size=cfg.batch_size, num_threads=cfg.num_threads,
                  device_id=cfg.device_id if cfg.device == "gpu" else None,
                  seed=cfg.seed + cfg.rank, prefetch_queue_depth=cfg.prefetch, exec_dynamic=True)
        if checkpoint is not None:
            kw["checkpoint"] = checkpoint
        p = pipe(**kw)
        p.build()
        self._names = names
        return p

    def _quarantine(self, tar: str, offset: int, name: str) -> bool:
        """Mark one sample as broken in a private copy of its index; True if it was found."""
        try:
            i = self.shards.tars.index(tar)
        except ValueError:
            return False
        src = self.shards.indexes[i]
        current = self._index_overrides.get(src, src)
        with open(current) as f:
            lines = f.readlines()
        hit = False
        for j, line in enumerate(lines[1:], start=1):
            fields = line.split()
            for k in range(0, len(fields), 4):
                if fields[k] == "jpg" and int(fields[k + 1]) == offset:
                    fields[k + 2] = "2"  # two bytes: the integrity check fails -> placeholder
                    lines[j] = " ".join(fields) + "\n"
                    hit = True
        if not hit:
            return False
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="sslkit-quarantine-")
        dst = os.path.join(self._tmp, f"{i:06d}-{os.path.basename(src)}")
        with open(dst, "w") as f:
            f.writelines(lines)
        self._index_overrides[src] = dst
        self.quarantined.append(f"{tar}:{name}")
        return True

    def _run(self):
        checkpoint = self._pipe.checkpoint()
        for attempt in range(8):
            try:
                out = self._pipe.run()
                self._runs += 1
                return out
            except RuntimeError as e:
                msg = str(e)
                m = _FAILED_SAMPLE.search(msg)
                found = [(m.group(1), int(m.group(2)), m.group(3))] if m else self._locate_broken()
                found = [f for f in found if self._quarantine(*f)]
                if not found:
                    first = next((line for line in msg.splitlines() if "encountered" in line or "failure" in line),
                                 msg[:200])
                    raise LoaderError(f"rank {self.config.rank}: DALI failed on a sample that could not be located "
                                      f"({first.strip()}); run `python -m sslkit.shard verify --full "
                                      f"{self.shards.directory}` to find it") from e
                for tar, _, name in found:
                    log.warning("rank %d: %s:%s does not decode; it is replaced by a placeholder from now on",
                                self.config.rank, tar, name)
                self._pipe = self._build(checkpoint)
        raise LoaderError("too many undecodable samples in one batch")

    def _locate_broken(self) -> list[tuple[str, int, str]]:
        """Replay the reader alone (same seed and arguments, no decoding) up to the batch that failed
        and return the samples of that batch that PIL cannot decode either. Rare and slow by design:
        it only runs after DALI reported a decode error without naming the sample."""
        import io

        import numpy as np
        from nvidia.dali import fn
        from PIL import Image
        cfg = self.config
        index_paths = tuple(self._index_overrides.get(p, p) for p in self.shards.indexes)
        shard_view = replace(self.shards, indexes=index_paths)

        @pipeline_def(batch_size=cfg.batch_size, num_threads=1, device_id=None, seed=cfg.seed + cfg.rank)
        def probe():
            jpg, _, _, _ = read(shard_view, rank=cfg.rank, world_size=cfg.world_size,
                                shuffle_buffer=cfg.shuffle_buffer, want_label=False, seed=self._reader_seed,
                                use_mmap=cfg.use_mmap)
            return jpg, fn.get_property(jpg, key="source_info")

        p = probe()
        p.build()
        for _ in range(self._runs):
            p.run()
        jpgs, infos = p.run()
        bad = []
        for i in range(len(jpgs)):
            data = np.array(jpgs[i]).tobytes()
            if len(data) < 4:
                continue  # already quarantined: the graph serves the placeholder for it
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except Exception:  # noqa: BLE001 - anything PIL cannot decode is a suspect
                m = _FAILED_SAMPLE.search(np.array(infos[i]).tobytes().decode())
                if m:
                    bad.append((m.group(1), int(m.group(2)), m.group(3)))
        return bad

    # -- iteration --------------------------------------------------------------------------------
    def _shard_samples(self, epoch: int) -> int:
        """Real samples of the reader shard this rank reads in `epoch` (DALI moves each rank to the
        next shard every epoch and splits the sample list contiguously)."""
        n, w = self.shards.total, self.config.world_size
        shard = (self.config.rank + epoch) % w
        return n * (shard + 1) // w - n * shard // w

    def __len__(self) -> int:
        if self.drop_last:
            return self._len
        return math.ceil(self._shard_samples(self.epoch) / self.config.batch_size)

    def __iter__(self):
        n_batches = len(self)
        keep_last = self._shard_samples(self.epoch) - (n_batches - 1) * self.config.batch_size
        while self.position < n_batches:
            outputs = self._run()
            batch = self._to_torch(outputs)
            if not self.drop_last and self.position == n_batches - 1 and keep_last < self.config.batch_size:
                batch = _trim(batch, keep_last)
            broken = int((~batch["intact"]).sum())
            if broken:
                self.corrupt_epoch += broken
                self.corrupt_total += broken
            self.position += 1
            yield batch
        for _ in range(self._runs_per_epoch - n_batches):
            self._run()  # the dropped remainder keeps every rank's reader on the same epoch boundary
        if self.corrupt_epoch:
            log.warning("rank %d epoch %d: %d corrupt sample(s) were replaced by placeholders; "
                        "check the shards with `python -m sslkit.shard verify --full %s`",
                        self.config.rank, self.epoch, self.corrupt_epoch, self.shards.directory)
        self.epoch += 1
        self.position = 0
        self.corrupt_epoch = 0

    def _to_torch(self, outputs) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        views = []
        device = torch.device("cuda", self.config.device_id) if self.config.device == "gpu" else torch.device("cpu")
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        for name, tl in zip(self._names, outputs):
            t = _to_tensor(tl, device, stream)
            if name.startswith("viewgroup."):
                views.extend(t.unbind(1))  # [B, F, 3, S, S] -> F views of [B, 3, S, S]
            else:
                batch[name] = t
        if views:
            batch["views"] = views
        batch["index"] = batch["index"].long().view(-1)
        if "label" in batch:
            batch["label"] = batch["label"].long().view(-1)
        batch["intact"] = batch["intact"].bool().view(-1)
        post = getattr(self.family, "postprocess", None)
        # Batch-level work a family does in torch on the loader's device (e.g. 313-bin soft targets):
        # vectorised over the batch, never per sample.
        return post(batch) if post is not None else batch

    # -- state ------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self.config
        return {"family": self.family.describe(), "shards": self.shards.directory, "total": self.shards.total,
                "batch_size": c.batch_size, "rank": c.rank, "world_size": c.world_size, "seed": c.seed,
                "shuffle_buffer": c.shuffle_buffer}

    def state_dict(self) -> dict:
        """Where this rank is: restore it with `load_state_dict` to continue the same sample order."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "runs": self._runs,
                "dali": self._pipe.checkpoint(), "corrupt_total": self.corrupt_total,
                "quarantined": list(self.quarantined), "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict):
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state version {state.get('version')} (this sslkit writes {STATE_VERSION})")
        mine = self._fingerprint()
        if state["fingerprint"] != mine:
            diff = sorted(k for k in mine if state["fingerprint"].get(k) != mine[k])
            raise LoaderError(f"loader state was saved with different options ({', '.join(diff)}); "
                              "resume with the same data, batch size, seed and world size")
        for entry in state.get("quarantined", []):
            tar, _, name = entry.rpartition(":")
            self._requarantine(tar, name)
        self.epoch, self.position, self._runs = state["epoch"], state["position"], state["runs"]
        self.corrupt_total = state.get("corrupt_total", 0)
        self._pipe = self._build(state["dali"])

    def _requarantine(self, tar: str, name: str):
        from sslkit.shard.tarwriter import read_index
        i = self.shards.tars.index(tar)
        for sample in read_index(self.shards.indexes[i]):
            if sample["jpg"][2] == name:
                self._quarantine(tar, sample["jpg"][0], name)

    def close(self):
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):
        self.close()


def _trim(batch: dict, n: int) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = [t[:n] for t in v] if isinstance(v, list) else v[:n]
    return out


_TORCH_DTYPE = {types.FLOAT: torch.float32, types.FLOAT16: torch.float16, types.INT64: torch.int64,
                types.INT32: torch.int32, types.UINT8: torch.uint8, types.BOOL: torch.bool}


def _to_tensor(tl, device, stream):
    if hasattr(tl, "is_dense_tensor") and not tl.is_dense_tensor():
        raise LoaderError("a pipeline output has samples of different shapes")
    t = tl.as_tensor()
    if device.type == "cpu":
        return torch.from_dlpack(t)  # zero-copy, safe with the dynamic executor (see _build)
    out = torch.empty(t.shape(), dtype=_TORCH_DTYPE[t.dtype], device=device)
    feed_ndarray(t, out, cuda_stream=stream)
    return out
