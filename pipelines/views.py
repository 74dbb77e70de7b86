"""The multi-view machinery shared by multicrop, jigclu and eval_train.

Graph per image (any number of views, each with its own window rule, in crop groups of equal size):
decode once -> ONE uniform op draws every view's N_VIEW_U numbers -> ceil(V / 3) numba ops turn them
into crop windows (pipelines/kernels.py) -> one antialiased resize per view (flip folded in) -> one
stack per group. On a GPU the graph ends there and `postprocess` runs the colour stage of spec.py
(`augment.photometric`) on the whole batch in torch; on a CPU the fused numba kernel can do it in the
graph instead (`kernel="fused"`, one op per group). Both read the same uniforms, so they give the
same views (tests/test_pipelines.py pins both, and the windows, to tests/reference.py).

Operators in the GPU graph: 4 (reader stage) + 1 + 2 ceil(V / 3) + V + groups, e.g. 21 for 2x224+6x96.
"""

from __future__ import annotations

import torch

from . import augment as A
from .family import TORCH_DTYPES, GraphInputs
from .kernels import fused_views
from .spec import IMAGENET_MEAN, IMAGENET_STD, ColorRecipe, SpecError, ViewRule, check_blur_fits, check_choice

KERNELS = (None, "fused", "torch")


class Views:
    """`groups` [(count, size)], largest first; one `ViewRule` per view in output order; one colour recipe."""

    def __init__(self, groups, rules: list[ViewRule], color: ColorRecipe, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 dtype: str = "float32", kernel: str | None = None):
        check_choice("dtype", dtype, tuple(TORCH_DTYPES))
        check_choice("kernel", kernel, KERNELS)
        self.groups = [(int(c), int(s)) for c, s in groups]
        if sum(c for c, _ in self.groups) != len(rules):
            raise SpecError(f"{len(rules)} window rules for {sum(c for c, _ in self.groups)} views")
        self.rules = [r.validate() for r in rules]
        color.validate()
        check_blur_fits(color, min(s for _, s in self.groups))
        self.color, self.mean, self.std = color, tuple(mean), tuple(std)
        self.dtype, self.kernel = dtype, kernel

    @property
    def num_views(self) -> int:
        return len(self.rules)

    def kernel_for(self, device: str) -> str:
        """Where the colour stage runs: the fused numba kernel in the graph (the CPU default: on two cores it
        ran 2x224+6x96 at 2.4x the speed of the torch stage, which competes with DALI's threads from
        the main thread) or the torch batch stage (GPU, and `kernel="torch"` anywhere)."""
        if self.kernel == "fused" and device == "gpu":
            raise SpecError("kernel='fused' is the CPU kernel; GPU pipelines run the colour stage in torch")
        return self.kernel or ("fused" if device == "cpu" else "torch")

    def graph(self, g: GraphInputs) -> dict:
        fused = self.kernel_for(g.device) == "fused"
        img = A.decode(g.jpg, g.device, g.hw_decoder_load)
        u = A.uniforms(self.num_views)
        starts, ends = A.view_windows(g.shape, u, self.rules)
        crops = [A.resized_crop(img, s, e, size, g.device)
                 for (s, e), size in zip(zip(starts, ends), [s for c, s in self.groups for _ in range(c)])]
        out, first = {}, 0
        for i, (count, _) in enumerate(self.groups):
            group = A.stack(crops[first:first + count])                       # [F, S, S, 3] uint8
            out[f"viewgroup.{i}"] = fused_views(group, u, first, self.color, self.mean, self.std) if fused else group
            if g.with_params:
                out[f"params.crops.{i}"] = group
            first += count
        out["u"] = u
        if g.with_params:
            for k, (s, e) in enumerate(zip(starts, ends)):
                out[f"params.roi.{k}.start"], out[f"params.roi.{k}.end"] = s, e
        return out

    def postprocess(self, batch: dict) -> list[torch.Tensor]:
        """Pops the graph's outputs; returns one [B, F, 3, S, S] tensor per group. With params, also
        leaves params.u [B, V, N_VIEW_U] (the uniforms), params.windows [B, V, 4] (y, x, h, w in source
        pixels) and params.flips [B, V]."""
        u = batch.pop("u")
        dtype, out, first = TORCH_DTYPES[self.dtype], [], 0
        for i, (count, size) in enumerate(self.groups):
            x = batch.pop(f"viewgroup.{i}")
            if x.dtype == torch.uint8:
                b = x.shape[0]
                x = A.photometric(x.flatten(0, 1), u[:, first:first + count].flatten(0, 1), self.color, self.mean,
                                  self.std, dtype).view(b, count, 3, size, size)
            out.append(x.to(dtype))
            first += count
        if "params.roi.0.start" in batch:
            batch["params.u"] = u
            starts = torch.stack([batch.pop(f"params.roi.{k}.start") for k in range(self.num_views)], 1)
            ends = torch.stack([batch.pop(f"params.roi.{k}.end") for k in range(self.num_views)], 1)
            batch["params.windows"], batch["params.flips"] = A.windows(starts, ends)
        return out
