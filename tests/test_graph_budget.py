"""Operator budgets of every pipeline's device="gpu" graph, checked on a CPU-only machine.

A DALI graph costs ~0.2-0.3 ms per operator per batch whatever the operator computes (an H200 ran
every pipeline at img/s x operators ~ 450-630k), so the operator count is the throughput budget. The
graph is traced without a GPU: torch is told CUDA exists, and the pipeline's build stops after DALI
has laid out its operators (`Pipeline._build_graph`), before anything touches a device.
"""

from __future__ import annotations

import collections

import pytest
import torch
from nvidia.dali import pipeline as dali_pipeline

from pipelines import make_loader

BUDGETS = {  # pipeline: (options, max operators)
    "multicrop": ({"preset": "2x224+6x96"}, 60),
    "jigsaw": ({}, 45),
    "colorization": ({}, 45),
    "jigclu": ({}, 60),
    "eval_val": ({}, 36),
    "eval_train": ({}, 36),
}
FORBIDDEN = {"PythonFunction", "DLTensorPythonFunction", "TorchPythonFunction"}   # Python per sample


class _Traced(Exception):
    def __init__(self, ops):
        super().__init__("traced")
        self.ops = ops


def trace_gpu_graph(name: str, data: str, **options) -> list[tuple[str, str]]:
    """(operator type, device) of every operator of `name`'s device="gpu" graph."""
    def build(self):
        self._build_graph()
        raise _Traced([(type(op._op).__name__, op._op.device) for op in self._ops])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(dali_pipeline.Pipeline, "build", build)
        try:
            make_loader(name, data, batch_size=8, device="gpu", device_id=0, hw_decoder_load=1.0, **options)
        except _Traced as t:
            return t.ops
    raise AssertionError(f"{name}: the pipeline was not built")


@pytest.fixture(scope="module")
def counts(sample_shards):
    out = {name: trace_gpu_graph(name, sample_shards, **options) for name, (options, _) in BUDGETS.items()}
    print("\nGPU-graph operators (cpu / mixed / gpu):")
    for name, ops in out.items():
        by_device = collections.Counter(dev for _, dev in ops)
        print(f"  {name:13s} {len(ops):3d}  ({by_device['cpu']} / {by_device['mixed']} / {by_device['gpu']})  "
              f"budget {BUDGETS[name][1]}: {dict(collections.Counter(t for t, _ in ops))}")
    return out


@pytest.mark.parametrize("name", list(BUDGETS))
def test_gpu_graph_fits_its_operator_budget(name, counts):
    ops, budget = counts[name], BUDGETS[name][1]
    assert len(ops) <= budget, f"{name}: {len(ops)} operators > budget {budget}: {collections.Counter(ops)}"
    kinds = {t for t, _ in ops}
    assert not kinds & FORBIDDEN, f"{name}: Python runs per sample ({kinds & FORBIDDEN})"
    assert ("Image", "mixed") in ops, f"{name}: the GPU graph must decode with nvJPEG"
    # every image operator after the decoder runs on the GPU; the CPU does only scalar bookkeeping
    image_ops = {"Resize", "MultiPaste", "Crop", "Stack", "ExpandDims", "CropMirrorNormalize", "ColorTwist"}
    assert all(dev == "gpu" for t, dev in ops if t in image_ops), ops


def test_an_adopted_folder_costs_no_operator_more(sample_shards, tmp_path):
    """sslkit reads the samples itself (one external source): adopted tars, which have no `index` or
    `cls` member, give the same graph as built ones: the source is two CPU operators."""
    from sslkit.shard.adopt import IndexOptions, index
    adopted = str(tmp_path / "adopted")
    index(IndexOptions(sources=(sample_shards,), out=adopted, workers=1, progress=False))
    built, theirs = trace_gpu_graph("eval_val", sample_shards), trace_gpu_graph("eval_val", adopted)
    assert collections.Counter(theirs) == collections.Counter(built)
    assert collections.Counter(built)[("ExternalSource", "cpu")] == 2   # image, (index, label)
