"""The checkpoint shapes found online load as trunks (`eval --ckpt`, `convert`) and as a fresh run's
start (`init_from`): a bare state dict, `{"state_dict": ...}`, `{"model": ...}`, DDP's `module.` keys."""

from __future__ import annotations

import pytest
import torch

from sslkit.trunk import TrunkError, build_trunk, init_from, load_trunk

SHAPES = {
    "bare": lambda s: s,
    "state_dict": lambda s: {"state_dict": s, "epoch": 90, "arch": "resnet_tiny"},
    "model": lambda s: {"model": s, "optimizer": {"lr": torch.tensor(0.1)}},
    "ddp": lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}},
}


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(0)
    return build_trunk("resnet_tiny", {"width": 8})


@pytest.mark.parametrize("shape", list(SHAPES))
def test_eval_loads_every_shape(trunk, tmp_path, shape):
    path = str(tmp_path / "weights.pth")
    torch.save(SHAPES[shape](trunk.state_dict()), path)
    model, spec = load_trunk(path, arch="resnet_tiny", kwargs={"width": 8})
    got, want = model.state_dict(), trunk.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("shape", ["state_dict", "ddp"])
def test_init_from_takes_a_foreign_trunk_file(trunk, tmp_path, shape):
    path = str(tmp_path / "weights.pth")
    torch.save(SHAPES[shape](trunk.state_dict()), path)

    class Method(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_trunk("resnet_tiny", {"width": 8})
            self.head = torch.nn.Linear(4, 2)

    method = Method()
    init_from(method, path)
    assert all(torch.equal(method.backbone.state_dict()[k], v) for k, v in trunk.state_dict().items())


def test_a_file_without_tensors_is_one_line(tmp_path):
    path = str(tmp_path / "notes.pth")
    torch.save({"state_dict": {"lr": 0.1}}, path)
    with pytest.raises(TrunkError, match="not a state dict of tensors"):
        load_trunk(path, arch="resnet_tiny")
    with pytest.raises(TrunkError, match="not a state dict of tensors"):
        init_from(torch.nn.Linear(2, 2), path)
