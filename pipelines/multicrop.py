"""Multi-crop views (SwAV / DeepClusterV2): e.g. 2x224 + 6x96 from one decode per image.

Graph per image: decode once -> per view a crop window (torchvision's rule) and ONE antialiased
resize of that window -> all of the image's random draws in one op (`u`, [views, 9], see spec.py)
-> colour + clamp + blur + normalise + flip:
- `kernel="fused"` (the CPU default): one numba kernel call per sample (pipelines/kernels.py);
- `kernel="native"` (the GPU default): DALI ops per view -- color_twist (float, so no uint8
  round trip) -> clamp -> gaussian_blur only for the samples that drew it, kernel sized to sigma ->
  crop_mirror_normalize with the flip folded in.
Both read the same `u`, so they produce the same views; tests run both on the CPU to prove it.
Outputs `viewgroup.G` = [B, F, 3, S, S] per crop group; the loader splits them into `views`.
"""

from __future__ import annotations

from dataclasses import asdict

import nvidia.dali.math as dmath
from nvidia.dali import fn, types

from . import augment as A
from .family import DTYPES, GraphInputs
from .kernels import MAX_GROUPS, fused_views
from .spec import N_VIEW_U, VIEW_U, ColorRecipe, MultiCropSpec, SpecError, multicrop_spec


class MultiCrop:
    name = "multicrop"

    def __init__(self, preset: str = "2x224+6x96", spec: MultiCropSpec | None = None, dtype: str = "float32",
                 kernel: str | None = None):
        self.spec = spec.validate() if spec is not None else multicrop_spec(preset)
        if dtype not in DTYPES:
            raise SpecError(f"dtype={dtype!r}: choose from {sorted(DTYPES)}")
        if kernel not in (None, "fused", "native"):
            raise SpecError(f"kernel={kernel!r}: choose 'fused' (CPU) or 'native' (DALI ops)")
        self.dtype, self.kernel = dtype, kernel

    def describe(self) -> dict:
        return {"family": self.name, "spec": asdict(self.spec), "dtype": self.dtype, "kernel": self.kernel}

    def graph(self, g: GraphInputs) -> dict:
        spec = self.spec
        kernel = self.kernel or ("fused" if g.device == "cpu" else "native")
        if kernel == "fused" and g.device == "gpu":
            raise SpecError("kernel='fused' is the CPU kernel; GPU pipelines use kernel='native'")
        if kernel == "fused" and len(spec.groups) > MAX_GROUPS:
            raise SpecError(f"the CPU kernel handles at most {MAX_GROUPS} crop groups")
        img = A.decode(g.jpg, g.device, g.hw_decoder_load)
        u = fn.random.uniform(range=[0.0, 1.0], shape=[spec.num_views, N_VIEW_U])
        out, crops, stacks = {}, [], []
        for group in spec.groups:
            first = len(crops)
            for _ in range(group.count):
                anchor, extent = A.crop_window(g.shape, group.scale, group.ratio)
                crops.append(fn.resize(img, size=[group.size, group.size], roi_start=anchor,
                                       roi_end=anchor + extent, antialias=True,
                                       interp_type=types.INTERP_LINEAR, device=g.device))
                if g.with_params:
                    out[f"params.{len(crops) - 1}.anchor"] = anchor
                    out[f"params.{len(crops) - 1}.extent"] = extent
            stacks.append(_stack(crops[first:]))
        if kernel == "fused":
            groups = fused_views(stacks, [gr.count for gr in spec.groups], u, spec.color.as_array(),
                                 spec.mean, spec.std)
        else:
            groups, k = [], 0
            for group in spec.groups:
                views = [_native_view(crops[k + j], u, k + j, spec, g.device) for j in range(group.count)]
                groups.append(_stack(views))
                k += group.count
        for i, grp in enumerate(groups):
            out[f"viewgroup.{i}"] = fn.cast(grp, dtype=DTYPES[self.dtype]) if self.dtype != "float32" else grp
        if g.with_params:
            out["params.u"] = u
            for i, st in enumerate(stacks):
                out[f"params.crops.{i}"] = st
        return out


def _stack(nodes):
    return fn.stack(*nodes) if len(nodes) > 1 else fn.expand_dims(nodes[0], axes=[0])


def _native_view(crop, u, k: int, spec: MultiCropSpec, device: str):
    """One view with DALI ops, from row k of the sample's uniforms (semantics of spec.py)."""
    r: ColorRecipe = spec.color

    def draw(name):
        return u[k, VIEW_U[name]]

    applied = fn.cast(draw("apply") < r.p, dtype=types.FLOAT)
    gray = fn.cast(draw("gray") < r.gray_p, dtype=types.FLOAT)
    b = 1.0 + applied * (r.brightness * (2.0 * draw("brightness") - 1.0))
    c = 1.0 + applied * (r.contrast * (2.0 * draw("contrast") - 1.0))
    s = (1.0 + applied * (r.saturation * (2.0 * draw("saturation") - 1.0))) * (1.0 - gray)
    hue = applied * (360.0 * r.hue * (2.0 * draw("hue") - 1.0))
    view = fn.color_twist(crop, brightness=b, contrast=c, saturation=s, hue=hue, dtype=types.FLOAT, device=device)
    view = dmath.clamp(view, 0.0, 255.0)
    if draw("blur") < r.blur_p:
        lo, hi = r.blur_sigma
        view = fn.gaussian_blur(view, sigma=lo + (hi - lo) * draw("sigma"), device=device)
    flip = fn.cast(draw("flip") < r.flip_p, dtype=types.INT32)
    return fn.crop_mirror_normalize(view, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
                                    device=device)
