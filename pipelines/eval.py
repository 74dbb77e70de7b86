"""Evaluation crops (linear probe, k-NN, SVM): `eval_val` and `eval_train`, with labels.

- eval_val:   resize the shorter side to 256 (antialiased) -> centre crop 224 -> normalise;
- eval_train: RandomResizedCrop 224 at (0.08, 1) with a horizontal flip -> normalise (the multi-view
  machinery of pipelines/views.py with one view and no colour change).
Batches carry `views` = [tensor] like every view pipeline. With `with_params=True`, eval_train also
gives params.windows ([B, 1, 4] (y, x, h, w) in source pixels) and params.flips.
"""

from __future__ import annotations

from dataclasses import asdict

from sslkit.registry import register

from . import augment as A
from .family import TORCH_DTYPES, GraphInputs
from .spec import FLIP_ONLY, EvalSpec, ViewRule, check_choice
from .views import Views


class _Eval:
    name = "eval"

    def __init__(self, size: int = 224, resize: int = 256, scale=(0.08, 1.0), dtype: str = "float32",
                 spec: EvalSpec | None = None):
        self.spec = (spec or EvalSpec(size=size, resize=resize, scale=tuple(scale))).validate()
        check_choice("dtype", dtype, tuple(TORCH_DTYPES))
        self.dtype = dtype

    def describe(self) -> dict:
        return {"pipeline": self.name, "spec": asdict(self.spec), "dtype": self.dtype}


@register("pipeline", "eval_val")
class EvalVal(_Eval):
    name = "eval_val"
    exhaustive = True  # every sample exactly once per epoch, no drop-last

    def graph(self, g: GraphInputs) -> dict:
        img = A.decode(g.jpg, g.device, g.hw_decoder_load)
        img = A.resize_shorter(img, self.spec.resize, g.device)
        return {"crop": A.center_crop_normalize(img, self.spec.size, self.spec.mean, self.spec.std, g.device)}

    def postprocess(self, batch: dict) -> dict:
        batch["views"] = [batch.pop("crop").to(TORCH_DTYPES[self.dtype])]          # [B, 3, S, S], normalised
        return batch


@register("pipeline", "eval_train")
class EvalTrain(_Eval):
    name = "eval_train"

    def __init__(self, size: int = 224, resize: int = 256, scale=(0.08, 1.0), dtype: str = "float32",
                 spec: EvalSpec | None = None):
        super().__init__(size, resize, scale, dtype, spec)
        s = self.spec
        self.views = Views([(1, s.size)], [ViewRule(s.scale, s.ratio, flip_p=FLIP_ONLY.flip_p)], FLIP_ONLY, s.mean,
                           s.std, dtype=dtype)   # nothing but flip + normalisation after the crop: the
        # fused kernel in DALI's threads on a CPU, the torch stage on a GPU

    def graph(self, g: GraphInputs) -> dict:
        return self.views.graph(g)

    def postprocess(self, batch: dict) -> dict:
        batch["views"] = [self.views.postprocess(batch)[0][:, 0]]
        return batch
