"""Multi-crop views (SwAV / DeepClusterV2): e.g. 2x224 + 6x96 from one decode per image.

    loader = make_loader("multicrop", "shards/x", batch_size=64, preset="2x224+6x96")
    batch["views"]     # 8 tensors [B, 3, S, S], largest first, normalised (float32 or dtype="float16")

The views are the shared multi-view machinery (pipelines/views.py) with one RandomResizedCrop rule
per view and the preset's colour recipe (pipelines/spec.py). `kernel`: where the colour stage runs --
None (fused numba kernel on a CPU, torch on a GPU), "fused" (CPU only) or "torch".
With `with_params=True` the batch also holds params.u ([B, V, N_VIEW_U] uniforms), params.windows
([B, V, 4] (y, x, h, w) crop windows in source pixels), params.flips ([B, V]) and params.crops.G (the
uint8 crops of group G, [B, F, S, S, 3], already flipped, before colour).
"""

from __future__ import annotations

from dataclasses import asdict

from sslkit.registry import register

from .family import GraphInputs
from .spec import MultiCropSpec, multicrop_spec
from .views import Views


@register("pipeline", "multicrop")
class MultiCrop:
    name = "multicrop"

    def __init__(self, preset: str = "2x224+6x96", spec: MultiCropSpec | None = None, dtype: str = "float32",
                 kernel: str | None = None):
        self.spec = spec.validate() if spec is not None else multicrop_spec(preset)
        self.views = Views([(g.count, g.size) for g in self.spec.groups], self.spec.rules(), self.spec.color,
                           self.spec.mean, self.spec.std, dtype=dtype, kernel=kernel)

    def describe(self) -> dict:
        return {"pipeline": self.name, "spec": asdict(self.spec), "dtype": self.views.dtype,
                "kernel": self.views.kernel}

    def graph(self, g: GraphInputs) -> dict:
        return self.views.graph(g)

    def postprocess(self, batch: dict) -> dict:
        batch["views"] = [v for group in self.views.postprocess(batch) for v in group.unbind(1)]
        return batch
