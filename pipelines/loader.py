"""DALI pipeline -> torch batches, with exact epochs, a resumable (and elastic) state and corrupt-sample counts.

Epoch semantics: sslkit owns the sample order (`pipelines.order`): the shards are permuted per epoch,
each rank reads one contiguous slice of the epoch, shuffled within windows of `shuffle_buffer`
samples. Training pads the epoch to full batches on every rank (repeating at most world x batch - 1
samples), so every rank runs the same number of batches and every sample is seen each epoch;
evaluation pipelines (`exhaustive`) see every sample exactly once, the last batch partial.

The state is (epoch, position, the stages of the epoch so far, DALI's checkpoint). Restored with the
same world size and batch size it continues the very same samples and augmentations. Restored on
another world size or batch size (elastic resume) the interrupted epoch continues with the samples the
old ranks had not reached, split over the new ranks (each once, padding aside), and the next epoch
starts afresh; the augmentations' random streams restart from a seed derived from the run's. The state
names the dataset by its identity (`sslkit.shard.manifest.identity`), not its path, so a run resumes
on shards that were moved or copied.

Corrupt samples: the reader stage swaps every JPEG that fails the structure check for a placeholder
and reports it in `batch["intact"]`; the loader counts them and reports each epoch. A sample that
passes the check but still cannot be decoded stops the loader with a one-line `LoaderError` that
passes DALI's reason through.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from nvidia.dali import pipeline_def

from sslkit.errors import SslkitError
from sslkit import threads

from .augment import image_shape
from .family import GraphInputs, Pipeline
from .order import EpochOrder, Stage
from .reader import SampleSource, ShardSet, read

log = logging.getLogger("sslkit.loader")

STATE_VERSION = 3


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
    shuffle_buffer: int = 4096     # samples shuffled together in a rank's slice (<= 1: stored order)
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


def epoch_order(shards: ShardSet, config: LoaderConfig, epoch: int, pad: bool = True,
                earlier: tuple[Stage, ...] = ()) -> EpochOrder:
    """The sample order of `epoch` of `shards` for `config`'s world (after `earlier` stages of it)."""
    return EpochOrder(shards.counts, shards.first_index, config.seed, epoch, config.shuffle_buffer, pad=pad,
                      stages=earlier + (Stage(config.world_size, config.batch_size),))


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
        # Training pads every rank to the same number of full batches; evaluation pipelines
        # (`exhaustive`) see every sample exactly once, each rank's last batch partial.
        self.exhaustive = bool(getattr(family, "exhaustive", False))
        self.epoch = 0
        self.position = 0            # batches already yielded in the current epoch
        self.earlier_stages: tuple[Stage, ...] = ()   # of the current epoch, read by other ranks (elastic resume)
        self.corrupt_epoch = 0       # placeholders served this epoch (this rank)
        self.corrupt_total = 0
        self.corrupt_last_epoch = 0  # placeholders served in the epoch that ended last (this rank)
        self._corrupt_seen: list[int] = []   # the first few replaced samples of this epoch, for the report
        self._names: list[str] = []
        self._source: SampleSource | None = None
        self.samples_per_rank = self.order(self.epoch).rank_length()
        if not self.exhaustive and shards.total < config.world_size * config.batch_size:
            raise LoaderError(f"{shards.directory}: {shards.total} samples is less than one batch of "
                              f"{config.batch_size} on each of {config.world_size} rank(s)")
        self._pipe = self._build()

    # -- what the trainer and the methods may know ------------------------------------------------
    @property
    def dataset_size(self) -> int:
        return self.shards.total

    @property
    def num_classes(self) -> int | None:
        return self.shards.num_classes

    @property
    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch on this world size (`len` is the current epoch's, which is shorter
        when it was resumed on another world size)."""
        return -(-self.order(self.epoch, fresh=True).rank_length() // self.config.batch_size)

    def describe(self) -> dict:
        """The pipeline's options and the dataset's facts, as plain data."""
        c = self.config
        return {"pipeline": self.family.describe(),
                "dataset": {"directory": self.shards.directory, "identity": self.shards.identity,
                            "size": self.dataset_size, "num_classes": self.num_classes},
                "batch_size": c.batch_size, "rank": c.rank, "world_size": c.world_size, "device": c.device,
                "samples_per_rank": self.samples_per_rank, "batches_per_epoch": self.batches_per_epoch}

    def order(self, epoch: int, fresh: bool = False) -> EpochOrder:
        """The sample order of `epoch` (with the current epoch's earlier stages unless `fresh`)."""
        earlier = self.earlier_stages if epoch == self.epoch and not fresh else ()
        return epoch_order(self.shards, self.config, epoch, pad=not self.exhaustive, earlier=earlier)

    @property
    def epoch_fraction(self) -> float:
        """Share of the current epoch's samples (over all ranks) already read."""
        c = self.config
        done = sum(st.world_size * st.batch_size * st.consumed for st in self.earlier_stages)
        done += c.world_size * c.batch_size * self.position
        left = c.world_size * (self.order(self.epoch).rank_length() - c.batch_size * self.position)
        return done / max(done + left, 1)

    # -- pipeline ---------------------------------------------------------------------------------
    def _build(self, checkpoint: str | None = None):
        cfg, shards, family = self.config, self.shards, self.family
        names: list[str] = []
        if self._source is not None:
            self._source.close()
        source = SampleSource(shards, self.order, cfg.rank, self.epoch, self.position, cfg.batch_size,
                              want_label=shards.labelled, extra_keys=tuple(cfg.extra_keys), use_mmap=cfg.use_mmap)
        source.prepare()

        @pipeline_def(enable_checkpointing=True)
        def pipe():
            jpg, meta, extras = read(source, extra_keys=tuple(cfg.extra_keys))
            outs = family.graph(GraphInputs(jpg=jpg, shape=image_shape(jpg), device=cfg.device,
                                            hw_decoder_load=cfg.hw_decoder_load, with_params=cfg.with_params))
            outs["meta"] = meta
            outs.update(zip(cfg.extra_keys, extras))
            names.extend(outs)
            return tuple(outs.values())

        # The dynamic executor reference-counts its buffers: an output handed to torch by DLPack stays
        # valid while torch holds it, so outputs are shared with torch, never copied (see _to_torch).
        # A pipeline rebuilt for another world size or batch size (elastic resume) gets another seed:
        # its random streams cannot continue the old ranks' ones.
        seed = cfg.seed + cfg.rank + 1_000_003 * len(self.earlier_stages)
        kw = dict(batch_size=cfg.batch_size, num_threads=cfg.num_threads,
                  device_id=cfg.device_id if cfg.device == "gpu" else None,
                  seed=seed, prefetch_queue_depth=cfg.prefetch, exec_dynamic=True)
        if checkpoint is not None:
            kw["checkpoint"] = checkpoint
        p = pipe(**kw)
        p.build()
        self._names, self._source = names, source
        return p

    def _run(self):
        try:
            return self._pipe.run()
        except RuntimeError as e:
            if isinstance(self._source.failure, SslkitError):   # the source's own one-line error
                raise self._source.failure from None
            raise LoaderError(self._failure(e)) from e

    def _failure(self, e: Exception) -> str:
        """One line for a DALI failure: where, DALI's own reason, and the tool that checks the shards.
        The JPEG check already swapped every sample whose structure is damaged, so what is left is
        damage the check cannot see (or an unreadable shard, which the source names)."""
        lines = [s.strip() for s in str(e).splitlines()]
        body = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
        reason = "; ".join(s for s in body if s and "no longer valid" not in s) or type(e).__name__
        return (f"rank {self.config.rank}, epoch {self.epoch}, batch {self.position}: DALI failed on a sample"
                f"{self._culprit(reason)} ({reason}); find damaged samples with `python -m sslkit.shard verify "
                f"--full {self.shards.directory}`")

    def _culprit(self, reason: str) -> str:
        """` <tar>:<member> (sample i)` of the batch's sample that DALI names by its place ("sample #3"):
        the order is sslkit's, so the batch's samples are known."""
        found = re.search(r"sample #(\d+)", reason)
        if not found:
            return ""
        b = self.config.batch_size
        seq = self.order(self.epoch).rank_sequence(self.config.rank)
        index = int(seq[(self.position * b + int(found.group(1))) % len(seq)])
        return f" {self.shards.sample_name(index)} (sample {index})"

    # -- iteration --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return -(-self.samples_this_epoch // self.config.batch_size)

    @property
    def samples_this_epoch(self) -> int:
        """Samples this rank reads in the current epoch: training, its padded slice; evaluation, its own
        slice of the stored order (ranks' slices differ by at most one)."""
        if self.exhaustive:
            return len(self.order(self.epoch).rank_sequence(self.config.rank))
        return self.order(self.epoch).rank_length()

    def __iter__(self):
        n_batches, length, b = len(self), self.samples_this_epoch, self.config.batch_size
        while self.position < n_batches:
            keep = min(b, length - self.position * b)
            batch = self._to_torch(self._run(), keep)
            self.position += 1
            yield batch
        if self.corrupt_epoch:
            names = ", ".join(self.shards.sample_name(i) for i in self._corrupt_seen)
            more = f" and {self.corrupt_epoch - len(self._corrupt_seen)} more" if self.corrupt_epoch > len(self._corrupt_seen) else ""
            log.warning("rank %d, epoch %d (0-based, as in log.jsonl): %d damaged image(s) replaced by a gray "
                        "placeholder: %s%s; list them all with `python -m sslkit.shard verify --full %s`",
                        self.config.rank, self.epoch, self.corrupt_epoch, names, more, self.shards.directory)
        self.epoch += 1
        self.position, self.earlier_stages = 0, ()
        self.corrupt_last_epoch, self.corrupt_epoch, self._corrupt_seen = self.corrupt_epoch, 0, []

    def _to_torch(self, outputs, keep: int) -> dict[str, Any]:
        """Every output as a torch tensor on the loader's device (the first `keep` samples), then the
        pipeline's batch stage."""
        ragged = set(self.config.extra_keys)
        raw = {name: _byte_strings(tl, keep) if name in ragged else _to_tensor(tl, self.device)[:keep]
               for name, tl in zip(self._names, outputs)}
        # The reader's fields are CPU tensors: counted there, so nothing waits for the GPU.
        meta = raw.pop("meta")   # [B, 3]: index, intact, label (labelled) or [B, 2]: index, intact
        raw["index"], raw["intact"] = meta[:, 0].contiguous(), meta[:, 1].bool()
        if meta.shape[1] > 2:
            raw["label"] = meta[:, 2].contiguous()
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
        """What a state must share with this loader to be resumed (world size and batch size may differ)."""
        c = self.config
        return {"pipeline": self.family.describe(), "dataset": self.shards.identity, "total": self.shards.total,
                "seed": c.seed, "shuffle_buffer": c.shuffle_buffer}

    def state_dict(self) -> dict:
        """Where this rank is: restore it with `load_state_dict` to continue the same sample order."""
        c = self.config
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "stages": [[s.world_size, s.batch_size, s.consumed] for s in self.earlier_stages],
                "world_size": c.world_size, "batch_size": c.batch_size, "rank": c.rank,
                "dali": self._pipe.checkpoint(), "corrupt_total": self.corrupt_total,
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict):
        """Continue from `state`: this rank's own (same world size and batch size: the same samples and
        augmentations), or any rank's of a run on another world size or batch size (elastic: the
        interrupted epoch's unread samples, split over this world)."""
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state version {state.get('version')} (this sslkit writes {STATE_VERSION})")
        mine = self._fingerprint()
        if state["fingerprint"] != mine:
            diff = sorted(k for k in mine if state["fingerprint"].get(k) != mine[k])
            raise LoaderError(f"loader state was saved with different options ({', '.join(diff)}); "
                              "resume with the same data, pipeline, seed and shuffle_buffer")
        c = self.config
        self.epoch, self.position = state["epoch"], state["position"]
        self.earlier_stages = tuple(Stage(*s) for s in state["stages"])
        self.corrupt_total = state.get("corrupt_total", 0)
        same = (state["world_size"], state["batch_size"], state["rank"]) == (c.world_size, c.batch_size, c.rank)
        if not same and self.position:   # elastic: the rest of the epoch is a new stage
            self.earlier_stages += (Stage(state["world_size"], state["batch_size"], self.position),)
            self.position = 0
        self.samples_per_rank = self.order(self.epoch).rank_length()
        if not same:
            self._pipe = self._build()
            return
        try:
            self._pipe = self._build(state["dali"])
        except RuntimeError as e:   # a graph that changed since (another sslkit version): same samples
            log.warning("rank %d: DALI's saved state does not fit this pipeline (%s); the sample order continues "
                        "exactly, the augmentations' random draws restart", c.rank, str(e).splitlines()[0][:160])
            self._pipe = self._build()


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
