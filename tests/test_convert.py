"""Interop: loading trunks from runs/checkpoints/files (sslkit.trunk) and the converter
(sslkit.convert): VISSL layouts in, torchvision-layout .pth/.safetensors out, strict key checks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sslkit import convert, models
from sslkit.errors import SslkitError
from sslkit.trunk import KeyMismatchError, TrunkError, load_trunk, random_trunk


def same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def trained_like(arch: str, seed: int = 0, num_classes: int = 0, **kw) -> torch.nn.Module:
    """A trunk whose BN statistics and counters differ from a fresh one (so a load is visible)."""
    torch.manual_seed(seed)
    m = models.create(arch, num_classes=num_classes, **kw)
    for name, t in m.state_dict().items():
        if t.is_floating_point():
            t.add_(0.01 * torch.randn_like(t)) if "running_var" not in name else t.mul_(1.5)
        else:
            t.fill_(7)
    return m


def vissl_checkpoint(state: dict, resnet: bool) -> dict:
    """Written by hand (not by sslkit.convert): VISSL's nesting and key names."""
    trunk = {("_feature_blocks." + k if resnet else k): v for k, v in state.items()}
    head = {"clf.0.weight": torch.zeros(3, 4)}
    return {"phase_idx": 10, "iteration": 1234, "type": "checkpoint",
            "classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": head}}}}


def write_run(out: str, trunk: torch.nn.Module, entry: dict | None, arch: str = "resnet_tiny") -> str:
    d = os.path.join(out, "checkpoints", "step-00000003")
    os.makedirs(d)
    g = {"version": 1, "step": 3, "epoch": 1, "world_size": 8,
         "config": {"arch": arch, "method": "deepclusterv2", "method_options": {}},
         "model": {**{"backbone." + k: v for k, v in trunk.state_dict().items()}, "prototypes0": torch.zeros(2, 2)}}
    if entry is not None:
        g["trunk"] = entry
    torch.save(g, os.path.join(d, "global.pt"))
    open(os.path.join(d, "COMPLETE"), "w").close()
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("step-00000003")
    return out


# -- loading trunks ----------------------------------------------------------------------------------
def test_load_trunk_from_run_checkpoint_folder_and_global(tmp_path):
    trunk = trained_like("resnet_tiny", width=8)
    run = write_run(str(tmp_path / "run"), trunk, {"arch": "resnet_tiny", "kwargs": {"width": 8}, "input": "rgb"})
    ck = os.path.join(run, "checkpoints", "step-00000003")
    ids = set()
    for path in (run, ck, os.path.join(ck, "global.pt")):
        model, spec = load_trunk(path)   # world size 8 in the file, no rank files: neither matters
        same_tensors(model.state_dict(), trunk.state_dict())
        assert not model.training and spec.step == 3 and spec.method == "deepclusterv2"
        ids.add(spec.identity)
    assert len(ids) == 1


def test_load_trunk_without_trunk_entry_and_L_input(tmp_path):
    plain = trained_like("resnet_tiny")
    model, spec = load_trunk(write_run(str(tmp_path / "a"), plain, None))
    assert (spec.arch, spec.kwargs, spec.input) == ("resnet_tiny", {}, "rgb")
    color = trained_like("resnet_tiny", width=8, in_channels=1, last_stride=1)
    entry = {"arch": "resnet_tiny", "kwargs": {"width": 8, "in_channels": 1, "last_stride": 1}, "input": "L"}
    model, spec = load_trunk(write_run(str(tmp_path / "b"), color, entry))
    assert spec.input == "L" and model.layer4[0].conv1.stride == (1, 1)
    same_tensors(model.state_dict(), color.state_dict())


def test_load_trunk_errors_are_one_line(tmp_path):
    with pytest.raises(TrunkError, match="no complete checkpoint"):
        os.makedirs(tmp_path / "empty" / "checkpoints")
        load_trunk(str(tmp_path / "empty"))
    with pytest.raises(TrunkError, match="pass --arch"):
        torch.save(trained_like("resnet_tiny").state_dict(), tmp_path / "x.pth")
        load_trunk(str(tmp_path / "x.pth"))
    with pytest.raises(SslkitError, match="--arch"):
        random_trunk(None)
    bad = trained_like("resnet_tiny", width=8)
    run = write_run(str(tmp_path / "bad"), bad, {"arch": "resnet_tiny", "kwargs": {}, "input": "rgb"})
    with pytest.raises(KeyMismatchError) as e:
        load_trunk(run)                       # width 32 model, width 8 weights
    assert "wrong shape" in str(e.value) and "\n" not in str(e.value)


# -- export: ours -> torchvision layout -> ours ------------------------------------------------------
@pytest.mark.parametrize("arch,kw", [("resnet_tiny", {"width": 8}), ("alexnet_jigsaw", {})])
def test_export_round_trip_is_identity(tmp_path, arch, kw):
    trunk = trained_like(arch, **kw)
    run = write_run(str(tmp_path / "run"), trunk, {"arch": arch, "kwargs": kw, "input": "rgb"}, arch)
    pth, st = str(tmp_path / "t.pth"), str(tmp_path / "t.safetensors")
    assert convert.main(["export", run, "--out", pth, "--out", st]) == 0
    raw = torch.load(pth, weights_only=True)
    same_tensors(raw, trunk.state_dict())      # torchvision layout: the trunk's own keys, nothing else
    back, spec = load_trunk(pth, arch=arch, kwargs=kw)
    same_tensors(back.state_dict(), trunk.state_dict())
    back2, spec2 = load_trunk(st)               # safetensors carry arch/kwargs/input: no --arch needed
    same_tensors(back2.state_dict(), trunk.state_dict())
    assert spec.identity == spec2.identity == load_trunk(run)[1].identity


def test_full_classifier_checkpoint_loads_as_trunk(tmp_path):
    full = trained_like("resnet_tiny", width=8, num_classes=10)    # a torchvision-style classifier
    torch.save(full.state_dict(), tmp_path / "cls.pth")
    model, _ = load_trunk(str(tmp_path / "cls.pth"), arch="resnet_tiny", kwargs={"width": 8})
    expected = {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")}
    same_tensors(model.state_dict(), expected)


def test_export_keys_are_torchvision_resnet_keys():
    # torchvision's resnet18 state_dict keys, minus fc (a trunk has no classifier)
    ours = set(models.create("resnet18", num_classes=0).state_dict())
    full = set(models.create("resnet18", num_classes=1000).state_dict())
    assert full - ours == {"fc.weight", "fc.bias"}
    assert "layer1.0.conv1.weight" in ours and "layer2.0.downsample.0.weight" in ours and "bn1.running_var" in ours


# -- VISSL import ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kw,resnet", [("resnet_tiny", {"width": 8}, True),
                                            ("resnet_tiny", {"width": 8, "in_channels": 1}, True),
                                            ("alexnet_colorization", {}, False)])
def test_vissl_import_loads_every_key(tmp_path, arch, kw, resnet):
    ref = trained_like(arch, **kw)
    src = str(tmp_path / "model_final_checkpoint.torch")
    torch.save(vissl_checkpoint(ref.state_dict(), resnet), src)
    model, spec = convert.import_vissl(src, arch, {k: v for k, v in kw.items() if k != "in_channels"})
    same_tensors(model.state_dict(), ref.state_dict())
    assert spec.input == ("L" if getattr(ref, "in_channels", 3) == 1 else "rgb")
    out = str(tmp_path / "imported.pth")
    argv = ["vissl", src, "--arch", arch, "--out", out]
    if "width" in kw:
        argv += ["--arch-kwargs", '{"width": 8}']
    assert convert.main(argv) == 0
    same_tensors(torch.load(out, weights_only=True), ref.state_dict())


def test_vissl_checkpoint_without_num_batches_tracked(tmp_path):
    ref = trained_like("resnet_tiny", width=8)
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(vissl_checkpoint(state, True), tmp_path / "old.torch")
    model, _ = convert.import_vissl(str(tmp_path / "old.torch"), "resnet_tiny", {"width": 8})
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)


def test_vissl_missing_and_unexpected_keys_are_listed(tmp_path, capsys):
    state = dict(trained_like("resnet_tiny", width=8).state_dict())
    del state["layer3.0.conv2.weight"]
    state["layer9.extra.weight"] = torch.zeros(1)
    src = str(tmp_path / "broken.torch")
    torch.save(vissl_checkpoint(state, True), src)
    with pytest.raises(KeyMismatchError) as e:
        convert.import_vissl(src, "resnet_tiny", {"width": 8})
    msg = str(e.value)
    assert isinstance(e.value, SslkitError) and "\n" not in msg
    assert "missing 1: layer3.0.conv2.weight" in msg and "unexpected 1: layer9.extra.weight" in msg
    assert convert.main(["vissl", src, "--arch", "resnet_tiny", "--arch-kwargs", '{"width": 8}',
                         "--out", str(tmp_path / "x.pth")]) == 2
    assert "layer3.0.conv2.weight" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "other.torch")
    with pytest.raises(convert.ConvertError, match="no `_feature_blocks"):
        convert.import_vissl(str(tmp_path / "other.torch"), "resnet_tiny")


# -- torchvision layout at full size: a ResNet-50 trunk, a ResNeXt-101 32x8d classifier --------------
# Derived from torchvision's architecture (torchvision itself does not import beside the CPU torch):
# state_dict keys with num_batches_tracked (tests/test_models.py::torchvision_resnet_keys builds the
# same lists from torchvision's naming scheme) and the published parameter counts with the 1000-class fc.
TORCHVISION = {  # arch: (state_dict keys with fc, parameters with fc, {key: shape})
    "resnet50": (320, 25_557_032, {"conv1.weight": (64, 3, 7, 7), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                                   "layer3.5.conv2.weight": (256, 256, 3, 3), "layer4.2.bn3.running_var": (2048,),
                                   "fc.weight": (1000, 2048)}),
    "resnext101_32x8d": (626, 88_791_336, {"layer1.0.conv2.weight": (256, 8, 3, 3),
                                           "layer3.22.conv3.weight": (1024, 1024, 1, 1),
                                           "layer4.0.conv2.weight": (2048, 64, 3, 3),
                                           "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
                                           "fc.weight": (1000, 2048), "fc.bias": (1000,)}),
}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def filled(arch: str, num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
    """A full-size model with seeded random values everywhere (built on meta, then filled: no slow init)."""
    with torch.device("meta"):
        m = models.create(arch, num_classes=num_classes)
    m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in m.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g) if t.is_floating_point() else torch.full(t.shape, 5))
    return m


def parameter_count(state: dict) -> int:
    return sum(v.numel() for k, v in state.items() if not k.endswith(BUFFERS))


def check_torchvision_layout(state: dict, arch: str, with_fc: bool):
    keys, params, shapes = TORCHVISION[arch]
    fc = 2048 * 1000 + 1000
    assert len(state) == keys - (0 if with_fc else 2)
    assert parameter_count(state) == params - (0 if with_fc else fc)
    for k, shape in shapes.items():
        if with_fc or not k.startswith("fc."):
            assert tuple(state[k].shape) == shape, k
    assert ("fc.weight" in state) == with_fc


def test_resnet50_trunk_round_trips_in_torchvision_layout(tmp_path):
    trunk = filled("resnet50")
    run = write_run(str(tmp_path / "run"), trunk, {"arch": "resnet50", "kwargs": {}, "input": "rgb"}, "resnet50")
    pth, st = str(tmp_path / "rn50.pth"), str(tmp_path / "rn50.safetensors")
    assert convert.main(["export", run, "--out", pth, "--out", st]) == 0
    raw = torch.load(pth, weights_only=True)
    check_torchvision_layout(raw, "resnet50", with_fc=False)
    same_tensors(raw, trunk.state_dict())
    from safetensors.torch import load_file
    same_tensors(load_file(st), trunk.state_dict())
    # a torchvision-style resnet50 with its 1000-class fc takes it with only fc missing
    full = models.create("resnet50", num_classes=1000)
    res = full.load_state_dict(raw, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    back, spec = load_trunk(st)
    same_tensors(back.state_dict(), trunk.state_dict())
    assert spec.arch == "resnet50"


def write_supervised_run(out: str, trunk: torch.nn.Module, arch: str, classes: int, data: str | None = None,
                         kwargs: dict | None = None) -> tuple[str, dict]:
    """A `supervised` run's checkpoint: backbone.* and classifier.* (what methods/supervised.py saves)."""
    g = torch.Generator().manual_seed(3)
    fc = {"weight": torch.randn(classes, trunk.num_features, generator=g), "bias": torch.randn(classes, generator=g)}
    d = os.path.join(out, "checkpoints", "step-00000005")
    os.makedirs(d)
    torch.save({"version": 1, "step": 5, "epoch": 1, "world_size": 2,
                "config": {"arch": arch, "method": "supervised", "method_options": {}, "data": data},
                "data": {"path": data} if data else None,
                "trunk": {"arch": arch, "kwargs": kwargs or {}, "input": "rgb"},
                "model": {**{"backbone." + k: v for k, v in trunk.state_dict().items()},
                          **{"classifier." + k: v for k, v in fc.items()}}}, os.path.join(d, "global.pt"))
    open(os.path.join(d, "COMPLETE"), "w").close()
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("step-00000005")
    return out, {"fc." + k: v for k, v in fc.items()}


def test_resnext101_32x8d_classifier_round_trips_with_classifier(tmp_path):
    trunk = filled("resnext101_32x8d")
    run, fc = write_supervised_run(str(tmp_path / "student"), trunk, "resnext101_32x8d", 1000)
    pth = str(tmp_path / "student.pth")   # (.safetensors classifiers: the resnet_tiny test below)
    assert convert.main(["export", run, "--with-classifier", "--out", pth]) == 0
    raw = torch.load(pth, weights_only=True)
    check_torchvision_layout(raw, "resnext101_32x8d", with_fc=True)
    same_tensors(raw, {**trunk.state_dict(), **fc})
    models.create("resnext101_32x8d", num_classes=1000).load_state_dict(raw, strict=True)


def test_with_classifier_class_names_and_refusals(tmp_path, capsys):
    from conftest import build_small
    data = str(tmp_path / "labelled")
    build_small(data, sources=("sample:12",), max_count=12)
    names = sorted(json.load(open(os.path.join(data, "manifest.json")))["classes"],
                   key=json.load(open(os.path.join(data, "manifest.json")))["classes"].get)
    trunk = trained_like("resnet_tiny", width=8)
    run, fc = write_supervised_run(str(tmp_path / "sup"), trunk, "resnet_tiny", len(names), data, {"width": 8})
    st = str(tmp_path / "sup.safetensors")
    assert convert.main(["export", run, "--with-classifier", "--out", st]) == 0
    from safetensors import safe_open
    with safe_open(st, framework="pt") as f:
        assert json.loads(f.metadata()["classes"]) == names
    assert "sslkit.models.create('resnet_tiny'" in capsys.readouterr().out
    # a classifier file re-exports to the same tensors and class names
    again = str(tmp_path / "again.safetensors")
    assert convert.main(["export", st, "--with-classifier", "--out", again]) == 0
    from safetensors.torch import load_file
    same_tensors(load_file(again), {**trunk.state_dict(), **fc})
    with safe_open(again, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["classes"]) == names and meta["num_classes"] == str(len(names))
    assert meta["format"] == "torchvision" and meta["arch"] == "resnet_tiny" and json.loads(meta["kwargs"]) == {"width": 8}
    # an existing output is never replaced unless asked
    assert convert.main(["export", run, "--with-classifier", "--out", st]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert convert.main(["export", run, "--with-classifier", "--out", st, "--overwrite"]) == 0
    # a self-supervised run has no classifier; AlexNet and colorization trunks have no torchvision one
    ssl = write_run(str(tmp_path / "ssl"), trunk, {"arch": "resnet_tiny", "kwargs": {"width": 8}, "input": "rgb"})
    cases = [(ssl, "holds no classifier")]
    alex = trained_like("alexnet_jigsaw")
    cases.append((write_supervised_run(str(tmp_path / "alex"), alex, "alexnet_jigsaw", 3)[0], "AlexNet trunk"))
    color = trained_like("resnet_tiny", width=8, in_channels=1)
    entry = {"arch": "resnet_tiny", "kwargs": {"width": 8, "in_channels": 1}, "input": "L"}
    cases.append((write_run(str(tmp_path / "color"), color, entry), "1-channel colorization trunk"))
    capsys.readouterr()
    for src, why in cases:
        out = str(tmp_path / "x.pth")
        assert convert.main(["export", src, "--with-classifier", "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and why in err and "\n" not in err and not os.path.exists(out)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exports_get_the_usual_file_mode(tmp_path, umask, mode):
    trunk = trained_like("resnet_tiny", width=8)
    run = write_run(str(tmp_path / "run"), trunk, {"arch": "resnet_tiny", "kwargs": {"width": 8}, "input": "rgb"})
    old = os.umask(umask)
    try:
        outs = [str(tmp_path / "t.pth"), str(tmp_path / "t.safetensors")]
        assert convert.main(["export", run, "--out", outs[0], "--out", outs[1]]) == 0
    finally:
        os.umask(old)
    assert [os.stat(p).st_mode & 0o777 for p in outs] == [mode, mode]


def test_targets_of_alexnet_and_colorization_exports(tmp_path, capsys):
    alex = trained_like("alexnet_jigsaw")
    run = write_run(str(tmp_path / "a"), alex, {"arch": "alexnet_jigsaw", "kwargs": {}, "input": "rgb"}, "alexnet_jigsaw")
    st = str(tmp_path / "a.safetensors")
    assert convert.main(["export", run, "--out", st]) == 0
    assert "VISSL layout (_feature_blocks.N keys)" in capsys.readouterr().out
    from safetensors import safe_open
    with safe_open(st, framework="pt") as f:
        assert f.metadata()["format"] == "vissl-alexnet" and all(k.startswith("_feature_blocks.") for k in f.keys())
    color = trained_like("resnet50", in_channels=1, last_stride=1)
    entry = {"arch": "resnet50", "kwargs": {"in_channels": 1, "last_stride": 1}, "input": "L"}
    st = str(tmp_path / "c.safetensors")
    assert convert.main(["export", write_run(str(tmp_path / "c"), color, entry, "resnet50"), "--out", st]) == 0
    assert "timm.create_model('resnet50', in_chans=1, num_classes=0)" in capsys.readouterr().out
    with safe_open(st, framework="pt") as f:
        assert f.metadata()["format"] == "torchvision-1ch" and tuple(f.get_tensor("conv1.weight").shape) == (64, 1, 7, 7)
    back, spec = load_trunk(st)
    assert spec.input == "L" and back.layer4[0].conv2.stride == (1, 1)


def test_with_classifier_from_torchvision_style_files(tmp_path, capsys):
    """A classifier .pth from elsewhere (torch's legacy format too) re-exports whole; junk and trunk-only
    files are one-line errors."""
    full = trained_like("resnet_tiny", num_classes=5)
    legacy = str(tmp_path / "legacy.pth")
    torch.save(full.state_dict(), legacy, _use_new_zipfile_serialization=False)
    out = str(tmp_path / "out.pth")
    assert convert.main(["export", legacy, "--arch", "resnet_tiny", "--with-classifier", "--out", out]) == 0
    same_tensors(torch.load(out, weights_only=True), full.state_dict())
    (tmp_path / "junk.pth").write_text("junk")
    torch.save(trained_like("resnet_tiny").state_dict(), tmp_path / "trunk.pth")
    capsys.readouterr()
    for name, why in (("junk.pth", "cannot be read as a state dict"), ("trunk.pth", "no fc.weight/fc.bias")):
        assert convert.main(["export", str(tmp_path / name), "--arch", "resnet_tiny", "--with-classifier",
                             "--out", str(tmp_path / "x.pth")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and why in err and "\n" not in err


def test_light_copies_of_trunk_constants_agree():
    """convert and the eval CLI keep torch-free copies of two constants of sslkit.trunk (for --help)."""
    from sslkit import trunk
    from sslkit.eval import defaults
    assert convert.INPUTS == defaults.INPUTS == trunk.INPUTS
    assert convert.SAFETENSORS_EXT == trunk.SAFETENSORS_EXT
