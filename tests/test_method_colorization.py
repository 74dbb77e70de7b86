"""The colorization method on CPU: shapes, the rebalanced loss against a brute-force reference (dense
targets, a loop over pixels, the gradient through autograd), the loss falling on real batches, the
ResNet-50 (res5 stride 1) and AlexNet trunks, the presets and their option checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import make_loader
from sslkit import color
from sslkit.config import ConfigError, TrainConfig, apply_overrides
from sslkit.methods import RunContext, method_entry
from sslkit.methods.colorization import ColorizationOptions

from conftest import assert_step_moves, sgd_losses

ENTRY = method_entry("colorization")


def config(preset="tiny", **overrides) -> TrainConfig:
    cfg = TrainConfig(method="colorization", method_options=ENTRY.meta["options"]())
    return apply_overrides(apply_overrides(cfg, ENTRY.meta["presets"][preset].overrides), overrides)


def build(cfg: TrainConfig, loader=None):
    pipeline = loader.describe()["pipeline"] if loader is not None else {}
    return ENTRY.factory(cfg, RunContext(dataset_size=96, steps_per_epoch=12, batch_size=8, pipeline=pipeline))


@pytest.fixture(scope="module")
def prior_file(sample_shards, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("prior") / "prior.npy")
    np.save(path, color.ab_prior(color.shard_images(sample_shards, limit=48), size=64))
    return path


@pytest.fixture(scope="module")
def rebalanced(sample_shards, prior_file):
    """(config, loader, one epoch of batches) of the tiny preset with Zhang's rebalancing on the data's prior."""
    cfg = config(**{"method_options.rebalance": True, "method_options.prior": prior_file})
    loader = make_loader(ENTRY.factory.pipeline, sample_shards, batch_size=8, seed=2,
                         **ENTRY.factory.loader_options(cfg.method_options))
    return cfg, loader, list(loader)


def test_shapes(rebalanced):
    cfg, loader, batches = rebalanced
    b = batches[0]
    assert b["L"].shape == (8, 1, 64, 64) and b["ab_idx"].shape == (8, 16, 16, 10) and b["weight"].shape == (8, 16, 16)
    method = build(cfg, loader)
    assert method.trunk_spec == {"arch": "resnet_tiny", "kwargs": {"in_channels": 1, "last_stride": 1}, "input": "L"}
    with torch.no_grad():
        assert method.logits(b["L"]).shape == (8, 313, 16, 16)
        out = method(b)
    assert set(out) == {"loss", "acc", "nongray"} and all(v.shape == () for v in out.values())
    assert out["loss"].item() == pytest.approx(np.log(313), abs=1.0)


def test_rebalanced_loss_matches_brute_force(rebalanced, prior_file):
    """Forward: the plain soft cross-entropy, averaged over pixels. Gradient on the logits of pixel
    (b, i, j): factor[most likely bin] * nongray[b] * (softmax - target) / pixels. One image is made
    gray: it counts in the value but gets no gradient."""
    cfg, loader, batches = rebalanced
    batch = dict(batches[0])
    batch["nongray"] = batch["nongray"].clone()
    batch["nongray"][0] = False
    assert batch["nongray"][1:].any()
    torch.manual_seed(0)
    z = (2 * torch.randn(8, 313, 16, 16)).requires_grad_()
    method = build(cfg, loader)
    method.logits = lambda L: z                       # the head's output, replaced by a leaf we can inspect
    out = method(batch)
    out["loss"].backward()

    factor = torch.from_numpy(color.rebalance_weights(np.load(prior_file), gamma=0.5)).float()
    dense = color.expand_topk(batch["ab_idx"], batch["ab_w"])                # [B, H, W, 313]
    # the pipeline's weight is the factor of the most likely bin of the dense target
    torch.testing.assert_close(batch["weight"], factor[dense.argmax(-1)])
    zd = z.detach().double()
    n = 8 * 16 * 16
    loss_ref, grad_ref = 0.0, torch.zeros_like(zd)
    for b in range(8):
        for i in range(16):
            for j in range(16):
                logp = torch.log_softmax(zd[b, :, i, j], dim=0)
                q = dense[b, i, j].double()
                loss_ref += float(-(q * logp).sum()) / n
                w = float(factor[q.argmax()]) * float(batch["nongray"][b])
                grad_ref[b, :, i, j] = w * (logp.exp() - q) / n
    assert out["loss"].item() == pytest.approx(loss_ref, rel=1e-5)
    torch.testing.assert_close(z.grad.double(), grad_ref, rtol=1e-4, atol=1e-9)
    assert z.grad[0].abs().max() == 0 and z.grad[1:].abs().max() > 0
    # the weighting is not the identity here: the plain loss has another gradient, the same value
    z2 = z.detach().clone().requires_grad_()
    plain = build(config(), loader)
    plain.logits = lambda L: z2
    plain_out = plain(batch)
    plain_out["loss"].backward()
    assert plain_out["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)
    assert not torch.allclose(z2.grad[1:], z.grad[1:], rtol=1e-2)


def test_loss_falls(rebalanced):
    cfg, loader, batches = rebalanced
    torch.manual_seed(0)
    method = build(cfg, loader)
    losses = sgd_losses(method, batches[:4])
    assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:4]), losses


def test_resnet50_and_alexnet_trunks(rebalanced):
    """Goyal's colorization ResNet-50: one input channel, res5 at stride 1 (S/16 map, 2048 channels);
    the AlexNet colorization trunk: conv5 map (256 channels), and it takes an optimiser step."""
    _, loader, batches = rebalanced
    rn50 = build(config("rn50_k10", **{"method_options.rebalance": False}))
    assert rn50.backbone.conv1.in_channels == 1 and rn50.backbone.layer4[0].conv2.stride == (1, 1)
    assert rn50.head.in_channels == 2048 and rn50.head.out_channels == 313
    assert rn50.trunk_spec == {"arch": "resnet50", "kwargs": {"in_channels": 1, "last_stride": 1}, "input": "L"}
    with torch.no_grad():
        L = batches[0]["L"][:2]
        assert rn50.backbone.feature_maps(L, ["res5"])["res5"].shape == (2, 2048, 4, 4)
        assert rn50.logits(L).shape == (2, 313, 16, 16)
    torch.manual_seed(0)
    alex = build(config(arch="alexnet_colorization"), loader)
    assert alex.last_map == "conv5" and alex.head.in_channels == 256
    assert alex.trunk_spec == {"arch": "alexnet_colorization", "kwargs": {"in_channels": 1}, "input": "L"}
    assert_step_moves(alex, batches[0], alex.backbone._feature_blocks[0][0].weight)
    with pytest.raises(ConfigError, match="last_stride"):
        build(config(arch="alexnet_colorization", **{"method_options.last_stride": 2}))


def test_presets_and_option_checks(prior_file):
    import train
    for name, preset in ENTRY.meta["presets"].items():
        cfg = config(name)
        train.check_config(cfg)
        assert preset.description and isinstance(cfg.method_options, ColorizationOptions)
        if cfg.method_options.rebalance:      # the seed recipes: rebalancing needs the data's prior
            with pytest.raises(ConfigError, match="sslkit.color prior"):
                ENTRY.factory.loader_options(cfg.method_options)
            with_prior = apply_overrides(cfg, {"method_options.prior": prior_file})
            assert ENTRY.factory.loader_options(with_prior.method_options)["prior"] == prior_file
        else:
            assert ENTRY.factory.loader_options(cfg.method_options)["prior"] is None
    assert [config(f"rn50_k{k}").method_options.k for k in (2, 10, 40)] == [2, 10, 40]
    seed = config("rn50_k10")
    assert (seed.arch, seed.method_options.size, seed.optimizer, seed.lr, seed.weight_decay, seed.milestones) == \
        ("resnet50", 224, "sgd", 0.1, 1e-4, (30, 60, 90, 100))
    assert config("alexnet_k10").arch == "alexnet_colorization"
    with pytest.raises(ConfigError, match="rebalance=false"):
        ENTRY.factory.loader_options(config(**{"method_options.prior": prior_file}).method_options)
    with pytest.raises(ConfigError, match="divisible by 4"):
        ENTRY.factory.loader_options(config(**{"method_options.size": 66}).method_options)
