"""What a pipeline is: options in, a DALI sub-graph and a torch batch stage out.

A pipeline class (registered with `@sslkit.registry.register("pipeline", name)`) is built from its
options and gives:
- `graph(g: GraphInputs) -> {name: node}`: the DALI graph after the shared reader stage (the JPEG
  bytes, already checked, and their header shape). Every name comes back as `batch[name]`, a torch
  tensor on the loader's device (CPU nodes are copied there); `params.*` names exist only when the
  loader was made with `with_params=True` (tests, the visualizer);
- `postprocess(batch) -> batch`: vectorised torch work on the whole batch on the loader's device,
  which turns the graph's outputs into the batch contract: `views` (list, largest first), `tiles` +
  `perm`, `L` + `ab_idx` + `ab_w` + `nongray` (+ `weight`), `patches`. The loader adds `index`,
  `label` (labelled data) and `intact` before calling it;
- `describe() -> dict`: the options as plain data (loader state, visualizer, benchmarks);
- optionally `exhaustive = True`: an evaluation pipeline that sees every sample exactly once.

The multi-view pipelines (multicrop, jigclu, eval_train) share `pipelines.views.Views`, whose graph
outputs are `viewgroup.G` ([F, S, S, 3] uint8 crops of group G, or [F, 3, S, S] float32 views from
the fused CPU kernel) and the per-view uniforms `u` (kept as `params.u` with params).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class GraphInputs:
    jpg: Any                 # encoded bytes (CPU node), corrupt samples already replaced
    shape: Any               # (H, W, C) from the JPEG header (CPU node)
    device: str              # "cpu" | "gpu"
    hw_decoder_load: float | None   # GPU pipelines: the resolved share; None on CPU
    with_params: bool        # also return the random parameters (tests, visualizer)


class Pipeline(Protocol):
    name: str

    def graph(self, g: GraphInputs) -> dict[str, Any]:
        ...

    def postprocess(self, batch: dict) -> dict:
        ...

    def describe(self) -> dict:
        ...


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
