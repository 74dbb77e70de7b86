"""DALI pipelines for self-supervised pretraining: one entry point, `make_loader`.

    loader = make_loader("multicrop", "shards/sample", batch_size=64, device="gpu",
                         rank=rank, world_size=world_size, seed=0, preset="2x224+6x96")
    for epoch in range(epochs):
        for batch in loader:          # len(loader) batches, identical on every rank
            batch["views"], batch["index"], batch.get("label")

Families (`list_families()`): multicrop, eval_val, eval_train (and the pretext families that
register themselves below). Options not understood by a family raise before any work starts.
"""

from __future__ import annotations

from typing import Callable

from .family import ViewFamily
from .loader import DaliLoader, LoaderConfig, LoaderError
from .reader import ShardSet
from .spec import SpecError

_FAMILIES: dict[str, Callable[..., ViewFamily]] = {}


def register_family(name: str):
    def deco(factory):
        if name in _FAMILIES:
            raise ValueError(f"view family {name!r} registered twice")
        _FAMILIES[name] = factory
        return factory
    return deco


def list_families() -> list[str]:
    return sorted(_FAMILIES)


_LOADER_KEYS = {"num_threads", "device_id", "shuffle_buffer", "prefetch", "hw_decoder_load", "use_mmap",
                "with_params"}


def make_loader(name: str, data_dir: str, batch_size: int, device: str = "cpu", rank: int = 0,
                world_size: int = 1, seed: int = 0, **options) -> DaliLoader:
    """Build the `name` view family over the shard folder `data_dir` for this rank.

    Loader options: num_threads, device_id, shuffle_buffer, prefetch, hw_decoder_load, use_mmap, with_params;
    every other keyword goes to the family (e.g. `preset="2x160+4x96"`, `dtype="float16"`).
    """
    if name not in _FAMILIES:
        raise SpecError(f"unknown pipeline {name!r}; choose from {', '.join(list_families())}")
    loader_kw = {k: options.pop(k) for k in list(options) if k in _LOADER_KEYS}
    try:
        family = _FAMILIES[name](**options)
    except TypeError as e:
        raise SpecError(f"pipeline {name!r}: {e}") from None
    config = LoaderConfig(batch_size=batch_size, device=device, rank=rank, world_size=world_size, seed=seed,
                          **loader_kw)
    config.validate()
    shards = ShardSet.open(data_dir)
    return DaliLoader(family, shards, config)


# -- families ---------------------------------------------------------------------------------------
from .colorization import Colorization  # noqa: E402
from .eval import EvalTrain, EvalVal  # noqa: E402
from .jigclu import JigClu  # noqa: E402
from .jigsaw import Jigsaw  # noqa: E402
from .multicrop import MultiCrop  # noqa: E402

register_family("multicrop")(MultiCrop)
register_family("eval_val")(EvalVal)
register_family("eval_train")(EvalTrain)
register_family("jigsaw")(Jigsaw)
register_family("colorization")(Colorization)
register_family("jigclu")(JigClu)

__all__ = ["DaliLoader", "LoaderConfig", "LoaderError", "ShardSet", "SpecError", "list_families", "make_loader",
           "register_family"]
