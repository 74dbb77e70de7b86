"""Evaluation crops (linear probe, k-NN, SVM): `eval_val` and `eval_train`, with labels.

- eval_val:   resize the shorter side to 256 (antialiased) -> centre crop 224 -> normalise;
- eval_train: RandomResizedCrop 224 at (0.08, 1) -> horizontal flip -> normalise.
Output `viewgroup.0` holds one view, so batches carry `views` = [tensor] like every family.
"""

from __future__ import annotations

from dataclasses import asdict

from nvidia.dali import fn, types

from . import augment as A
from .family import DTYPES, GraphInputs
from .spec import EvalSpec, SpecError


class _Eval:
    name = "eval"
    train = False

    def __init__(self, size: int = 224, resize: int = 256, scale=(0.08, 1.0), dtype: str = "float32",
                 spec: EvalSpec | None = None):
        self.spec = (spec or EvalSpec(size=size, resize=resize, scale=tuple(scale))).validate()
        if dtype not in DTYPES:
            raise SpecError(f"dtype={dtype!r}: choose from {sorted(DTYPES)}")
        self.dtype = dtype

    def describe(self) -> dict:
        return {"family": self.name, "spec": asdict(self.spec), "dtype": self.dtype}

    def graph(self, g: GraphInputs) -> dict:
        s = self.spec
        img = A.decode(g.jpg, g.device, g.hw_decoder_load)
        mean, std = [255.0 * m for m in s.mean], [255.0 * v for v in s.std]
        out = {}
        if self.train:
            anchor, extent = A.crop_window(g.shape, s.scale, s.ratio)
            img = fn.resize(img, size=[s.size, s.size], roi_start=anchor, roi_end=anchor + extent,
                            antialias=True, interp_type=types.INTERP_LINEAR, device=g.device)
            flip = fn.random.coin_flip(probability=0.5)
            view = fn.crop_mirror_normalize(img, mirror=flip, dtype=DTYPES[self.dtype], output_layout="CHW",
                                            mean=mean, std=std, device=g.device)
            if g.with_params:
                out.update({"params.0.anchor": anchor, "params.0.extent": extent, "params.0.flip": flip})
        else:
            img = fn.resize(img, resize_shorter=float(s.resize), antialias=True,
                            interp_type=types.INTERP_LINEAR, device=g.device)
            view = fn.crop_mirror_normalize(img, crop=[s.size, s.size], dtype=DTYPES[self.dtype],
                                            output_layout="CHW", mean=mean, std=std, device=g.device)
        out["viewgroup.0"] = fn.expand_dims(view, axes=[0])
        return out


class EvalVal(_Eval):
    name = "eval_val"
    train = False
    exhaustive = True  # every sample exactly once per epoch, no drop-last


class EvalTrain(_Eval):
    name = "eval_train"
    train = True
