"""Interop: loading trunks from runs/checkpoints/files (sslkit.trunk) and the converter
(sslkit.convert): VISSL layouts in, torchvision-layout .pth/.safetensors out, strict key checks."""

from __future__ import annotations

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
