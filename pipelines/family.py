"""What a view family is: options in, a DALI sub-graph out.

A family receives the shared reader outputs (already integrity-checked JPEG bytes, their header
shape, the device) and returns named outputs. Names map to batch keys: `views.K` outputs are
gathered, in order, into `batch["views"]`; every other name becomes `batch[name]`. `params.*`
outputs (crop windows, coin flips) exist only when asked for, for tests and the visualizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from nvidia.dali import types


@dataclass(frozen=True)
class GraphInputs:
    jpg: Any                 # encoded bytes (CPU node), corrupt samples already replaced
    shape: Any               # (H, W, C) from the JPEG header (CPU node)
    device: str              # "cpu" | "gpu"
    hw_decoder_load: float
    with_params: bool        # also return the random parameters (tests, visualizer)


class ViewFamily(Protocol):
    name: str

    def graph(self, g: GraphInputs) -> dict[str, Any]:
        ...

    def describe(self) -> dict:
        """Plain-dict description of the options (stored in loader state, shown by the visualizer)."""
        ...

    # Optional: `postprocess(batch) -> batch`, batch-level torch work on the loader's device, and
    # `exhaustive = True` for evaluation families that must see every sample exactly once.


DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}
