"""DALI pipeline -> torch batches, with exact epochs, a resumable state and corrupt-sample counts.

Epoch semantics (why this is not DALI's stock iterator): each rank's reader slice is padded to the
same length P (pad_last_batch), so every rank runs ceil(P / B) pipeline batches per epoch and the
loader yields the first floor(P / B) of them (drop-last) -- identical on every rank, so no rank can
hang or run an extra step at an epoch boundary. The state is (epoch, position, DALI checkpoint):
restoring it rebuilds the pipeline from the checkpoint and continues the very same sample order. The
state names the dataset by its identity (`sslkit.shard.manifest.identity`), not its path, so a run
resumes on shards that were moved or copied.

Corrupt samples: the reader stage swaps every JPEG that fails the structure check for a placeholder
and reports it in `batch["intact"]`; the loader counts them and reports each epoch. A sample that
passes the check but still cannot be decoded stops the loader with a one-line `LoaderError` that
passes DALI's reason through (it names the sample's tar, offset and key).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from nvidia.dali import pipeline_def

from sslkit.errors import SslkitError
from sslkit import threads

from .augment import image_shape
from .family import GraphInputs, Pipeline
from .reader import READER_NAME, ShardSet, parse_decimal, read

log = logging.getLogger("sslkit.loader")

STATE_VERSION = 2


class LoaderError(SslkitError, RuntimeError):
    """The loader cannot continue (one-line reason)."""


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int
    device: str = "cpu"            # "cpu" | "gpu"
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_threads: int = 0           # 0: default_threads() -- several processes per machine: pass their share
    device_id: int | None = None   # CUDA device for device="gpu" (None: 0); the caller knows its local rank
    shuffle_buffer: int = 4096     # samples; shards are globally pre-shuffled, this decorrelates batches
    prefetch: int = 2
    hw_decoder_load: float | None = None   # share of JPEGs for the hardware decoder; None: default_hw_decoder_load()
    use_mmap: bool = True          # False for shards on a network file system
    with_params: bool = False
    extra_keys: tuple[str, ...] = ()   # members handed over as raw bytes, batch[key]: list[bytes] (captions, json)

    def validate(self):
        if self.device not in ("cpu", "gpu"):
            raise LoaderError(f"device={self.device!r}: expected 'cpu' or 'gpu'")
        if self.batch_size < 1:
            raise LoaderError(f"batch_size={self.batch_size}: must be positive")
        if not 0 <= self.rank < self.world_size:
            raise LoaderError(f"rank {self.rank} outside world_size {self.world_size}")
        if self.device == "gpu" and not torch.cuda.is_available():
            raise LoaderError("device='gpu' but torch sees no CUDA device; use device='cpu'")
        taken = {"index", "label", "intact"} & set(self.extra_keys)
        if taken:
            raise LoaderError(f"extra_keys {sorted(taken)}: these batch keys are the loader's own")
        if self.hw_decoder_load is not None and not 0.0 <= self.hw_decoder_load <= 1.0:
            raise LoaderError(f"hw_decoder_load={self.hw_decoder_load}: expected 0..1")


def default_threads(processes_per_machine: int = 1, device: str = "cpu") -> int:
    """This process' share of the CPU cores it may use; at most sslkit.threads.GPU_THREADS for a GPU
    pipeline (sslkit.threads, which also gives torch its threads beside these)."""
    return threads.dali_threads(threads.core_share(threads.machine_cores(), processes_per_machine), device)


def default_hw_decoder_load(device_id: int) -> float:
    """Share of JPEG decoding given to the hardware decoder: all of it on Hopper and newer (an H200's
    seven NVJPG engines decoded 26.7k img/s at 1.0 vs 20.6k at DALI's 0.65), DALI's 0.65 before (an
    A100 has one engine, ~5k img/s: the CUDA decoder must take a share)."""
    major, _ = torch.cuda.get_device_capability(device_id)
    return 1.0 if major >= 9 else 0.65


class DaliLoader:
    """Iterable over one epoch of batches (dicts of torch tensors on the loader's device)."""

    def __init__(self, family: Pipeline, shards: ShardSet, config: LoaderConfig):
        config.validate()
        if config.device == "gpu" and config.device_id is None:
            config = replace(config, device_id=0)
        if config.num_threads <= 0:
            config = replace(config, num_threads=default_threads(device=config.device))
        if config.device == "gpu" and config.hw_decoder_load is None:
            config = replace(config, hw_decoder_load=default_hw_decoder_load(config.device_id))
        self.family, self.shards, self.config = family, shards, config
        self.device = torch.device("cuda", config.device_id) if config.device == "gpu" else torch.device("cpu")
        self.epoch = 0
        self.position = 0            # batches already yielded in the current epoch
        self.corrupt_epoch = 0       # placeholders served this epoch (this rank)
        self.corrupt_total = 0
        self.corrupt_last_epoch = 0  # placeholders served in the epoch that ended last (this rank)
        self._corrupt_seen: list[int] = []   # the first few replaced samples of this epoch, for the report
        self._names: list[str] = []
        self._pipe = self._build()
        meta = self._pipe.reader_meta(READER_NAME)
        per_rank = meta["epoch_size_padded"] // meta["number_of_shards"]
        self.samples_per_rank = per_rank
        # Training drops the last partial batch (same step count on every rank); evaluation pipelines
        # (`exhaustive`) see every sample exactly once, the last batch trimmed of the reader's padding.
        self.drop_last = not getattr(family, "exhaustive", False)
        self._runs_per_epoch = math.ceil(per_rank / config.batch_size)
        self._len = per_rank // config.batch_size if self.drop_last else None
        if self.drop_last and self._len == 0:
            raise LoaderError(f"{shards.directory}: {per_rank} samples per rank (of {shards.total}, world size "
                              f"{config.world_size}) is less than one batch of {config.batch_size}")

    # -- what the trainer and the methods may know ------------------------------------------------
    @property
    def dataset_size(self) -> int:
        return self.shards.total

    @property
    def num_classes(self) -> int | None:
        return self.shards.num_classes

    def describe(self) -> dict:
        """The pipeline's options and the dataset's facts, as plain data."""
        c = self.config
        return {"pipeline": self.family.describe(),
                "dataset": {"directory": self.shards.directory, "identity": self.shards.identity,
                            "size": self.dataset_size, "num_classes": self.num_classes},
                "batch_size": c.batch_size, "rank": c.rank, "world_size": c.world_size, "device": c.device,
                "samples_per_rank": self.samples_per_rank, "batches_per_epoch": len(self)}

    # -- pipeline ---------------------------------------------------------------------------------
    def _build(self, checkpoint: str | None = None):
        cfg, shards, family = self.config, self.shards, self.family
        names: list[str] = []

        @pipeline_def(enable_checkpointing=True)
        def pipe():
            jpg, index, label, intact, extras = read(
                shards, rank=cfg.rank, world_size=cfg.world_size, shuffle_buffer=cfg.shuffle_buffer,
                want_label=shards.labelled, seed=cfg.seed + cfg.rank, use_mmap=cfg.use_mmap,
                extra_keys=tuple(cfg.extra_keys))
            outs = family.graph(GraphInputs(jpg=jpg, shape=image_shape(jpg), device=cfg.device,
                                            hw_decoder_load=cfg.hw_decoder_load, with_params=cfg.with_params))
            outs["index"], outs["intact"] = index, intact
            if label is not None:
                outs["label"] = label
            outs.update(zip(cfg.extra_keys, extras))
            names.extend(outs)
            return tuple(outs.values())

        # The dynamic executor reference-counts its buffers: an output handed to torch by DLPack stays
        # valid while torch holds it, so outputs are shared with torch, never copied (see _to_torch).
        kw = dict(batch_size=cfg.batch_size, num_threads=cfg.num_threads,
                  device_id=cfg.device_id if cfg.device == "gpu" else None,
                  seed=cfg.seed + cfg.rank, prefetch_queue_depth=cfg.prefetch, exec_dynamic=True)
        if checkpoint is not None:
            kw["checkpoint"] = checkpoint
        p = pipe(**kw)
        p.build()
        self._names = names
        return p

    def _run(self):
        try:
            return self._pipe.run()
        except RuntimeError as e:
            raise LoaderError(self._failure(e)) from e

    def _failure(self, e: Exception) -> str:
        """One line for a DALI failure: where, DALI's own reason (its decoder names the sample's source,
        `<tar>:<offset>:<key>.jpg`), and the tool that checks the shards. The JPEG check already swapped
        every sample whose structure is damaged, so what is left is damage the check cannot see."""
        lines = [s.strip() for s in str(e).splitlines()]
        body = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
        reason = "; ".join(s for s in body if s and "no longer valid" not in s) or type(e).__name__
        return (f"rank {self.config.rank}, epoch {self.epoch}, batch {self.position}: DALI failed on a sample "
                f"({reason}); find damaged samples with `python -m sslkit.shard verify --full "
                f"{self.shards.directory}`")

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
            keep = keep_last if not self.drop_last and self.position == n_batches - 1 else self.config.batch_size
            batch = self._to_torch(self._run(), keep)
            self.position += 1
            yield batch
        for _ in range(self._runs_per_epoch - n_batches):
            self._run()  # the dropped remainder keeps every rank's reader on the same epoch boundary
        if self.corrupt_epoch:
            names = ", ".join(self.shards.sample_name(i) for i in self._corrupt_seen)
            more = f" and {self.corrupt_epoch - len(self._corrupt_seen)} more" if self.corrupt_epoch > len(self._corrupt_seen) else ""
            log.warning("rank %d, epoch %d (0-based, as in log.jsonl): %d damaged image(s) replaced by a gray "
                        "placeholder: %s%s; list them all with `python -m sslkit.shard verify --full %s`",
                        self.config.rank, self.epoch, self.corrupt_epoch, names, more, self.shards.directory)
        self.epoch += 1
        self.position = 0
        self.corrupt_last_epoch, self.corrupt_epoch, self._corrupt_seen = self.corrupt_epoch, 0, []

    def _to_torch(self, outputs, keep: int) -> dict[str, Any]:
        """Every output as a torch tensor on the loader's device (the first `keep` samples), then the
        pipeline's batch stage."""
        ragged = set(self.config.extra_keys) | ({"index"} if self.shards.adopted else set())
        raw = {name: _byte_strings(tl, keep) if name in ragged else _to_tensor(tl, self.device)[:keep]
               for name, tl in zip(self._names, outputs)}
        # The reader's fields are CPU tensors: parsed and counted there, so nothing waits for the GPU.
        if self.shards.adopted:
            index = self.shards.locate(raw["index"])
            raw["index"] = torch.from_numpy(index)
            if self.shards.label_table is not None:
                raw["label"] = torch.from_numpy(np.asarray(self.shards.label_table[index], np.int64))
        else:
            raw["index"] = parse_decimal(raw["index"])
        if "label" in raw and raw["label"].dtype == torch.uint8:
            raw["label"] = parse_decimal(raw["label"])
        raw["intact"] = raw["intact"].view(-1).bool()
        broken = int((~raw["intact"]).sum())
        if broken and len(self._corrupt_seen) < 5:
            self._corrupt_seen += raw["index"][~raw["intact"]].tolist()[:5 - len(self._corrupt_seen)]
        self.corrupt_epoch += broken
        self.corrupt_total += broken
        batch = {name: t if isinstance(t, list) else _to_device(t, self.device) for name, t in raw.items()}
        # Batch-level work the pipeline does in torch on the loader's device (colour stage, Lab and
        # soft targets, ...): vectorised over the batch, never per sample.
        return self.family.postprocess(batch)

    # -- state ------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self.config
        return {"pipeline": self.family.describe(), "dataset": self.shards.identity, "total": self.shards.total,
                "batch_size": c.batch_size, "rank": c.rank, "world_size": c.world_size, "seed": c.seed,
                "shuffle_buffer": c.shuffle_buffer}

    def state_dict(self) -> dict:
        """Where this rank is: restore it with `load_state_dict` to continue the same sample order."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "dali": self._pipe.checkpoint(), "corrupt_total": self.corrupt_total,
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict):
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state version {state.get('version')} (this sslkit writes {STATE_VERSION})")
        mine = self._fingerprint()
        if state["fingerprint"] != mine:
            diff = sorted(k for k in mine if state["fingerprint"].get(k) != mine[k])
            raise LoaderError(f"loader state was saved with different options ({', '.join(diff)}); "
                              "resume with the same data, batch size, seed and world size")
        self.epoch, self.position = state["epoch"], state["position"]
        self.corrupt_total = state.get("corrupt_total", 0)
        self._pipe = self._build(state["dali"])


def _to_tensor(tl, device: torch.device) -> torch.Tensor:
    """A DALI output as a torch tensor, zero-copy by DLPack. For a GPU output, torch.from_dlpack hands
    DALI the consumer's (torch's current) stream, and DALI makes that stream wait for the work that
    produced the data, so torch never reads it early; the DLPack capsule keeps a reference to DALI's
    buffer, which the dynamic executor then does not reuse while torch holds the tensor. (Copying into
    torch memory with feed_ndarray instead crashed every GPU loader: CPU outputs of a GPU pipeline
    were memcpy'd to a device pointer.)"""
    if hasattr(tl, "is_dense_tensor") and not tl.is_dense_tensor():
        raise LoaderError("a pipeline output has samples of different shapes")
    t = tl.as_tensor()
    if device.type == "cuda" and type(t).__name__ == "TensorGPU":
        with torch.cuda.device(device):
            return torch.from_dlpack(t)
    return torch.from_dlpack(t)


def _byte_strings(tl, keep: int) -> list[bytes]:
    """A ragged CPU output (source infos, captions, JSON) as one bytes object per sample."""
    return [np.asarray(tl[i]).tobytes() for i in range(keep)]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU outputs of a GPU pipeline (uniforms, windows, indices) go over through pinned memory, without
    waiting for the device."""
    if t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True)
