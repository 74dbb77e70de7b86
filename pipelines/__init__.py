"""DALI pipelines for self-supervised pretraining: one entry point, `make_loader`.

    loader = make_loader("multicrop", "shards/sample", batch_size=64, device="gpu", device_id=local_rank,
                         rank=rank, world_size=world_size, seed=0, preset="2x224+6x96")
    for epoch in range(epochs):
        for batch in loader:          # len(loader) batches, identical on every rank
            batch["views"], batch["index"], batch.get("label")

Pipelines (`sslkit.registry.names("pipeline")`): multicrop, jigsaw, colorization, jigclu, eval_val,
eval_train; each module registers its class with `@register("pipeline", name)`. Options a pipeline
does not take are a one-line error listing the ones it does, before any work starts.
"""

from __future__ import annotations

from sslkit import registry

from .loader import DaliLoader, LoaderConfig, LoaderError
from .reader import ShardSet
from .spec import SpecError

LOADER_KEYS = ("num_threads", "device_id", "shuffle_buffer", "prefetch", "hw_decoder_load", "use_mmap",
               "with_params", "extra_keys")


def list_families() -> list[str]:
    """The registered pipelines (`sslkit.registry.names("pipeline")`)."""
    return registry.names("pipeline")


def make_loader(name: str, data_dir: str, batch_size: int, device: str = "cpu", rank: int = 0,
                world_size: int = 1, seed: int = 0, **options) -> DaliLoader:
    """Build the pipeline `name` over the shard folder `data_dir` for this rank.

    Loader options: num_threads (0: all cores of this process), device_id (device="gpu": the CUDA device,
    default 0 -- pass the local rank), shuffle_buffer, prefetch, hw_decoder_load, use_mmap, with_params,
    extra_keys (members such as "txt" or "json" handed over as `batch[key]`, a list of bytes per sample);
    every other keyword goes to the pipeline (e.g. `preset="2x160+4x96"`, `dtype="float16"`).
    """
    loader_kw = {k: options.pop(k) for k in list(options) if k in LOADER_KEYS}
    pipeline = registry.create("pipeline", name, **options)
    config = LoaderConfig(batch_size=batch_size, device=device, rank=rank, world_size=world_size, seed=seed,
                          **loader_kw)
    config.validate()
    return DaliLoader(pipeline, ShardSet.open(data_dir), config)


# The pipelines register themselves when imported.
from . import colorization, eval, jigclu, jigsaw, multicrop  # noqa: E402, F401

__all__ = ["LOADER_KEYS", "DaliLoader", "LoaderConfig", "LoaderError", "ShardSet", "SpecError", "list_families",
           "make_loader"]
