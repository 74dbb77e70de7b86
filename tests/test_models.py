"""Model zoo: shapes, exact parameter counts, torchvision/VISSL key names, checkpoint round trips,
feature maps against the Goyal'19 linear-probe table (VISSL's eval_mlp pools), and the registry.

Big models are built on the meta device wherever only shapes or counts matter, so the whole file
stays well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sslkit.errors import SslkitError
from sslkit.models import (ALEXNET_FEATURE_NAMES, RESNET_FEATURE_NAMES, Bottleneck, ResNet, create,
                           list_models, register)

RESNETS = {  # name: (blocks per stage, bottleneck?, groups, width per group, params with 1000 classes)
    "resnet18": ([2, 2, 2, 2], False, 1, 64, 11_689_512),
    "resnet34": ([3, 4, 6, 3], False, 1, 64, 21_797_672),
    "resnet50": ([3, 4, 6, 3], True, 1, 64, 25_557_032),
    "resnet101": ([3, 4, 23, 3], True, 1, 64, 44_549_160),
    "resnext50_32x4d": ([3, 4, 6, 3], True, 32, 4, 25_028_904),
    "resnext101_32x4d": ([3, 4, 23, 3], True, 32, 4, 44_177_704),
    "resnext101_32x8d": ([3, 4, 23, 3], True, 32, 8, 88_791_336),
    "resnext101_32x16d": ([3, 4, 23, 3], True, 32, 16, 194_026_792),
}

# AlexNet conv weights+biases (grouped convs see half the input channels) plus BN weight+bias:
# jigsaw      conv1 3*96*121+96, conv2 256*48*25+256, conv3 384*256*9+384 (+768 BN),
#             conv4 384*192*9+384 (+768), conv5 256*192*9+256 (+512)                    = 2,336,128
# colorization: conv1 1*96*121+96 (+192 BN), conv2 (+512 BN), conv3..5 as above        = 2,313,600
ALEXNET_PARAMS = {"alexnet_jigsaw": 2_336_128, "alexnet_colorization": 2_313_600}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def make_input(m: nn.Module, batch: int = 2, size: int = 64) -> torch.Tensor:
    """A random batch with the model's channels, at its fixed input size (AlexNets) or `size` (ResNets)."""
    size = getattr(m, "input_size", size)
    return torch.randn(batch, m.in_channels, size, size)


def torchvision_resnet_keys(layers: list[int], bottleneck: bool) -> list[str]:
    """state_dict keys of torchvision.models.ResNet, from its documented naming scheme only."""
    def bn(prefix: str) -> list[str]:
        return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    expansion = 4 if bottleneck else 1
    keys = ["conv1.weight", *bn("bn1")]
    inplanes = 64
    for stage, n_blocks in enumerate(layers):
        planes, stride = 64 * 2 ** stage, (1 if stage == 0 else 2)
        for i in range(n_blocks):
            p = f"layer{stage + 1}.{i}"
            for c in range(1, 4 if bottleneck else 3):
                keys += [f"{p}.conv{c}.weight", *bn(f"{p}.bn{c}")]
            # torchvision adds the projection shortcut only where the shape changes.
            if i == 0 and (stride != 1 or inplanes != planes * expansion):
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
        inplanes = planes * expansion
    return keys + ["fc.weight", "fc.bias"]


def vissl_alexnet_keys(bn_on_conv12: bool) -> list[str]:
    """state_dict keys of VISSL's alexnet_jigsaw / alexnet_colorization trunks (`_feature_blocks`)."""
    def conv_block(i: int, bn: bool) -> list[str]:
        keys = [f"_feature_blocks.{i}.0.weight", f"_feature_blocks.{i}.0.bias"]
        if bn:
            keys += [f"_feature_blocks.{i}.1.{s}"
                     for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        return keys

    return (conv_block(0, bn_on_conv12) + conv_block(2, bn_on_conv12)
            + conv_block(4, True) + conv_block(5, True) + conv_block(6, True))


# ---------------------------------------------------------------- every registered model

def test_registry_holds_the_zoo():
    assert set(list_models()) == set(RESNETS) | set(ALEXNET_PARAMS) | {"resnet_tiny"}
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_shapes(name):
    torch.manual_seed(0)
    m = create(name, num_classes=7).eval()
    x = make_input(m, size=32)  # 32 px still leaves ResNets a 1x1 res5 map
    with torch.no_grad():  # one real forward per model (the 194M one included)
        feats = m.forward_features(x)
        logits = m.fc(feats)
    assert feats.shape == (2, m.num_features) and logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    # Without classes there is no fc at all and forward returns the features (shapes only, on meta).
    with torch.device("meta"):
        trunk = create(name, num_classes=0).eval()
        out = trunk(torch.empty(x.shape))
    assert trunk.fc is None and trunk.num_classes == 0
    assert out.shape == (2, trunk.num_features) == (2, m.num_features)
    assert not [k for k in trunk.state_dict() if k.startswith("fc.")]


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet18", "alexnet_jigsaw", "alexnet_colorization"])
def test_forward_is_fc_of_forward_features(name):
    torch.manual_seed(0)
    m = create(name, num_classes=5).eval()
    x = make_input(m)
    with torch.no_grad():
        assert torch.equal(m(x), m.fc(m.forward_features(x)))
    trunk = create(name, num_classes=None).eval()
    with torch.no_grad():
        assert torch.equal(trunk(x), trunk.forward_features(x))


@pytest.mark.parametrize("name", list(RESNETS))
def test_resnet_parameter_counts(name):
    with torch.device("meta"):  # no memory, no init: counting the 194M model costs nothing
        m = create(name, num_classes=1000)
        trunk = create(name, num_classes=0)
    assert n_params(m) == RESNETS[name][-1]  # published counts include the 1000-class fc
    assert n_params(m) - n_params(trunk) == m.num_features * 1000 + 1000


@pytest.mark.parametrize("name", list(ALEXNET_PARAMS))
def test_alexnet_parameter_counts(name):
    with torch.device("meta"):
        trunk = create(name)
        m = create(name, num_classes=1000)
    assert n_params(trunk) == ALEXNET_PARAMS[name]
    assert n_params(m) - n_params(trunk) == m.num_features * 1000 + 1000


# ---------------------------------------------------------------- ResNet: torchvision compatibility

@pytest.mark.parametrize("name", list(RESNETS))
def test_state_dict_keys_equal_torchvision(name):
    layers, bottleneck, *_ = RESNETS[name]
    with torch.device("meta"):
        m = create(name)
    # Same keys in the same order (the order torchvision registers its modules in).
    assert list(m.state_dict()) == torchvision_resnet_keys(layers, bottleneck)


def test_resnet_layout_details():
    with torch.device("meta"):
        r50, rx50, rx101 = create("resnet50"), create("resnext50_32x4d"), create("resnext101_32x8d")
        r18 = create("resnet18")
    # v1.5: the stride sits on the 3x3 conv of the first block of a stage.
    assert r50.layer2[0].conv1.stride == (1, 1) and r50.layer2[0].conv2.stride == (2, 2)
    assert r50.layer2[0].downsample[0].stride == (2, 2)
    assert r50.layer4[0].downsample[0].weight.shape == (2048, 1024, 1, 1)
    assert r50.fc.weight.shape == (1000, 2048) and r50.num_features == 2048 and r18.num_features == 512
    # ResNeXt 32xCd: 32 groups of C channels in the first stage's 3x3 conv.
    assert rx50.layer1[0].conv2.groups == 32 and rx50.layer1[0].conv2.weight.shape == (128, 4, 3, 3)
    assert rx101.layer1[0].conv2.weight.shape == (256, 8, 3, 3)
    assert rx101.layer4[0].conv2.weight.shape == (2048, 64, 3, 3)


@pytest.mark.parametrize("name", ["resnet_tiny", "resnext50_32x4d", "alexnet_jigsaw", "alexnet_colorization"])
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    a = create(name, num_classes=3)
    x = make_input(a, size=32)
    with torch.no_grad():
        a.train()(x)  # move BN running stats away from their init, so they must be carried over
    b = create(name, num_classes=3)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_headless_model_loads_full_checkpoint():
    torch.manual_seed(0)
    full = create("resnet50").eval()
    trunk = create("resnet50", num_classes=0).eval()
    with pytest.raises(RuntimeError, match="fc.weight"):
        trunk.load_state_dict(full.state_dict())
    result = trunk.load_state_dict(full.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trunk(x), full.forward_features(x))
    # And the other way: a trunk checkpoint fills everything but the classifier.
    result = full.load_state_dict(trunk.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []


# ---------------------------------------------------------------- ResNet options

# Goyal'19 / VISSL linear probes: (AvgPool2d kernel, stride, pad) per layer at 224 input, and the flattened widths.
RN50_PROBE = {"conv1": ((10, 10, 4), 9216), "res2": ((16, 8, 0), 9216), "res3": ((13, 5, 0), 8192),
              "res4": ((8, 3, 0), 9216), "res5": ((6, 1, 0), 8192)}


def probe_dims(maps: dict[str, torch.Tensor], pools: dict[str, tuple]) -> dict[str, int]:
    return {k: nn.AvgPool2d(*pools[k])(v).flatten(1).shape[1] for k, v in maps.items()}


def test_resnet50_feature_maps_match_the_linear_probe_table():
    torch.manual_seed(0)
    m = create("resnet50", num_classes=0).eval()
    with torch.no_grad():
        maps = m.feature_maps(torch.randn(1, 3, 224, 224), layers=RESNET_FEATURE_NAMES)
    assert list(maps) == list(RESNET_FEATURE_NAMES)
    assert {k: tuple(v.shape[1:]) for k, v in maps.items() if k != "res5avg"} == {
        "conv1": (64, 112, 112), "res2": (256, 56, 56), "res3": (512, 28, 28), "res4": (1024, 14, 14),
        "res5": (2048, 7, 7)}
    assert probe_dims({k: maps[k] for k in RN50_PROBE}, {k: p for k, (p, _) in RN50_PROBE.items()}) == {
        k: d for k, (_, d) in RN50_PROBE.items()}
    torch.testing.assert_close(maps["res5avg"], maps["res5"].mean((2, 3)))


def test_colorization_resnet50_last_stride_1_and_gray_input():
    torch.manual_seed(0)
    m = create("resnet50", num_classes=0, in_channels=1, last_stride=1).eval()
    with torch.device("meta"):
        default = create("resnet50", num_classes=0)
    assert list(m.state_dict()) == list(default.state_dict())  # same checkpoint layout
    assert m.conv1.weight.shape == (64, 1, 7, 7)
    # A stride change, not dilation: every conv of res5 is undilated and at stride 1.
    convs = [c for c in m.layer4.modules() if isinstance(c, nn.Conv2d)]
    assert all(c.stride == (1, 1) and c.dilation == (1, 1) for c in convs)
    with torch.no_grad():
        maps = m.feature_maps(torch.randn(1, 1, 224, 224), layers=("res4", "res5", "res5avg"))
    assert maps["res4"].shape == (1, 1024, 14, 14) and maps["res5"].shape == (1, 2048, 14, 14)
    assert maps["res5avg"].shape == (1, m.num_features)
    # VISSL: the colorization res5 probe pools (12, 2, 0) down to 2x2x2048.
    assert nn.AvgPool2d(12, 2, 0)(maps["res5"]).flatten(1).shape == (1, 8192)


def test_last_stride_on_a_small_input():
    with torch.no_grad():
        x = torch.randn(1, 3, 112, 112)
        s2 = create("resnet_tiny", last_stride=2).eval().feature_maps(x, "res5")["res5"]
        s1 = create("resnet_tiny", last_stride=1).eval().feature_maps(x, "res5")["res5"]
    assert s2.shape[-2:] == (4, 4) and s1.shape[-2:] == (7, 7)


def test_feature_maps_names_and_errors():
    torch.manual_seed(0)
    m = create("resnet_tiny", width=16).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = m.feature_maps(x)
        feats = m.forward_features(x)
        pooled = m.feature_maps(x, ["res5avg", "conv1"])
    assert list(maps) == ["conv1", "res2", "res3", "res4", "res5"]
    assert [tuple(v.shape[1:]) for v in maps.values()] == [(16, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4),
                                                          (128, 2, 2)]
    assert list(pooled) == ["res5avg", "conv1"] and m.num_features == 128
    torch.testing.assert_close(pooled["res5avg"], feats)
    torch.testing.assert_close(maps["res5"].mean((2, 3)), feats)
    with pytest.raises(ValueError, match="res6"):
        m.feature_maps(x, ["res5", "res6"])
    with pytest.raises(ValueError):
        m.feature_maps(x, [])


def test_zero_init_residual():
    basic = create("resnet_tiny", zero_init_residual=True)
    bottle = ResNet(Bottleneck, [1, 2, 1, 1], width=8, zero_init_residual=True)
    for model, last in ((basic, "bn2"), (bottle, "bn3")):
        norms = {n: mod.weight for n, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)}
        zeroed = {n for n, w in norms.items() if n.endswith(last) and n.startswith("layer")}
        assert len(zeroed) == (4 if model is basic else 5)
        assert all((w == 0).all() for n, w in norms.items() if n in zeroed)
        assert all((w == 1).all() for n, w in norms.items() if n not in zeroed)
    default = create("resnet_tiny")
    assert all((mod.weight == 1).all() for mod in default.modules() if isinstance(mod, nn.BatchNorm2d))


def test_norm_layer_override_and_syncbn_conversion():
    gn = create("resnet_tiny", width=16, norm_layer=lambda c: nn.GroupNorm(4, c))
    kinds = {type(mod) for mod in gn.modules()}
    assert nn.GroupNorm in kinds and nn.BatchNorm2d not in kinds
    with torch.no_grad():
        assert gn(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    bn = create("resnet_tiny", width=16)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(create("resnet_tiny", width=16))
    assert not any(type(mod) is nn.BatchNorm2d for mod in sync.modules())
    assert sum(isinstance(mod, nn.SyncBatchNorm) for mod in sync.modules()) == 1 + 4 * 2 + 3  # stem, blocks, shortcuts
    assert list(sync.state_dict()) == list(bn.state_dict())
    direct = create("resnet_tiny", width=16, norm_layer=nn.SyncBatchNorm)
    assert list(direct.state_dict()) == list(bn.state_dict())


def test_tiny_model_trains():
    torch.manual_seed(0)
    m = create("resnet_tiny", width=16, num_classes=4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert losses[-1] < losses[0]


def test_invalid_resnet_options_fail_loudly():
    with pytest.raises(ValueError, match="last_stride"):
        create("resnet18", last_stride=3)
    with pytest.raises(ValueError, match="num_classes"):
        create("resnet18", num_classes=-1)
    with pytest.raises(ValueError, match="BasicBlock"):
        create("resnet18", groups=32, width_per_group=4)
    with pytest.raises(TypeError):
        create("resnet18", bogus=1)


# ---------------------------------------------------------------- AlexNet trunks

def test_alexnet_jigsaw_on_64px_tiles():
    torch.manual_seed(0)
    m = create("alexnet_jigsaw")
    assert (m.in_channels, m.input_size, m.num_features, m.fc) == (3, 64, 1024, None)
    tiles = torch.randn(9 * 2, 3, 64, 64)  # two puzzles of 9 tiles each, as the siamese trunk sees them
    with torch.no_grad():
        maps = m.eval().feature_maps(tiles, ["conv1", "pool1", "conv2", "pool2", "conv5", "pool5", "flatten"])
    # 64 -conv1 k11 s2-> 27 -pool-> 13 -conv2-> 13 -pool-> 6 -conv3..5-> 6 -pool-> 2
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == {
        "conv1": (96, 27, 27), "pool1": (96, 13, 13), "conv2": (256, 13, 13), "pool2": (256, 6, 6),
        "conv5": (256, 6, 6), "pool5": (256, 2, 2), "flatten": (1024,)}
    with torch.no_grad():
        assert m(tiles).shape == (18, 1024)
    with pytest.raises(ValueError, match="input_size"):
        m(torch.randn(1, 3, 96, 96))
    assert create("alexnet_jigsaw", input_size=96).num_features == 256 * 4 * 4
    assert list(m.state_dict()) == vissl_alexnet_keys(bn_on_conv12=False)
    lrn = [mod for mod in m.modules() if isinstance(mod, nn.LocalResponseNorm)]
    assert [(n.size, n.alpha, n.beta, n.k) for n in lrn] == [(5, 1e-4, 0.75, 1.0)] * 2


# Goyal'19 linear-probe pools (kernel, stride) for AlexNets at 227 input, and the widths they give.
ALEXNET_PROBE = {
    "alexnet_jigsaw": {"conv1": ((28, 9), 9600), "conv2": ((24, 6), 9216), "conv3": ((14, 3), 9600),
                       "conv4": ((14, 3), 9600), "conv5": ((16, 2), 9216)},
    "alexnet_colorization": {"conv1": ((19, 4), 9600), "conv2": ((12, 3), 9216), "conv3": ((9, 1), 9600),
                             "conv4": ((9, 1), 9600), "conv5": ((8, 1), 9216)},
}


@pytest.mark.parametrize("name", list(ALEXNET_PROBE))
def test_alexnet_feature_maps_match_the_linear_probe_table(name):
    torch.manual_seed(0)
    m = create(name).eval()
    with torch.no_grad():
        maps = m.feature_maps(torch.randn(1, m.in_channels, 227, 227))
    assert list(maps) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    table = ALEXNET_PROBE[name]
    assert probe_dims(maps, {k: p for k, (p, _) in table.items()}) == {k: d for k, (_, d) in table.items()}


def test_alexnet_colorization_layout():
    m = create("alexnet_colorization", num_classes=10)
    assert (m.in_channels, m.input_size, m.num_features) == (1, 227, 9216)
    assert m._feature_blocks[0][0].stride == (4, 4) and m._feature_blocks[0][0].weight.shape == (96, 1, 11, 11)
    assert not any(isinstance(mod, nn.LocalResponseNorm) for mod in m.modules())
    assert list(m.state_dict()) == vissl_alexnet_keys(bn_on_conv12=True) + ["fc.weight", "fc.bias"]
    assert set(ALEXNET_FEATURE_NAMES) >= {"conv1", "conv5", "pool5"}
    with torch.no_grad():
        assert m.eval()(torch.randn(2, 1, 227, 227)).shape == (2, 10)
    with pytest.raises(ValueError, match="too small"):
        create("alexnet_colorization", input_size=60)


# ---------------------------------------------------------------- registry

def test_registry_register_create_and_errors(monkeypatch):
    # Work on a copy so the test leaves the real registry untouched.
    from sslkit import registry
    monkeypatch.setitem(registry._ENTRIES, "model", dict(registry._ENTRIES["model"]))

    @register("toy_linear")
    def toy(num_classes: int = 2) -> nn.Module:
        return nn.Linear(3, num_classes)

    assert "toy_linear" in list_models() and create("toy_linear", num_classes=5).out_features == 5
    with pytest.raises(ValueError, match="already registered"):
        register("toy_linear")(toy)
    with pytest.raises(ValueError, match="already registered"):
        register("resnet18")(toy)
    assert isinstance(create("resnet18", num_classes=0), ResNet)  # the original survived
    with pytest.raises(ValueError) as err:
        create("resnet1O")
    msg = str(err.value)
    assert "\n" not in msg and "resnet1O" in msg and all(n in msg for n in list_models())
    with pytest.raises(ValueError):
        register("")
    # options a factory does not take: one line that lists the accepted ones
    with pytest.raises(SslkitError, match="unknown option.*widht.*accepted: num_classes"):
        create("toy_linear", widht=3)
