"""The jigsaw method on CPU: the tile-order convention and its round trip through the pipeline, head
sizes that follow |P|, shapes, the loss falling on real batches, the AlexNet and ResNet-50 trunks,
the presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import make_loader
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD
from sslkit import permutations as perm_sets
from sslkit import registry
from sslkit.config import ConfigError, TrainConfig, apply_overrides
from sslkit.methods import RunContext, method_entry
from sslkit.methods.jigsaw import JigsawOptions

from conftest import assert_step_moves, sgd_losses
from reference import jigsaw_cells

ENTRY = method_entry("jigsaw")
MEAN = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
STD = np.array(IMAGENET_STD, np.float32)[:, None, None]
CELL, TILE = 85, 64   # the goyal geometry: 255 px crop, 85 px cells, 64 px tiles


def config(preset="tiny", **overrides) -> TrainConfig:
    cfg = TrainConfig(method="jigsaw", method_options=ENTRY.meta["options"]())
    return apply_overrides(apply_overrides(cfg, ENTRY.meta["presets"][preset].overrides), overrides)


def context(loader=None, pipeline=None) -> RunContext:
    if loader is not None:
        pipeline = loader.describe()["pipeline"]
    return RunContext(dataset_size=96, steps_per_epoch=12, batch_size=8, pipeline=pipeline or {})


@pytest.fixture(scope="module")
def loader(sample_shards):
    """The tiny preset's pipeline over conftest's 96 embedded photos (build_small), keeping the crops."""
    opts = config().method_options
    return make_loader(ENTRY.factory.pipeline, sample_shards, batch_size=8, seed=3, with_params=True,
                       **ENTRY.factory.loader_options(opts))


@pytest.fixture(scope="module")
def batches(loader):
    return list(loader)   # one epoch: 12 batches of 8 (tiles, perm labels and the crops they came from)


# -- the convention ---------------------------------------------------------------------------------

def test_tile_order_convention():
    """tiles[k] = original[P[p][k]] (permute_tiles), undone by unpermute_tiles, numpy and torch, one
    image or a batch; cells are numbered column-major."""
    table = perm_sets.generate(20, seed=1)
    labels = np.array([3, 7, 19])
    original = np.random.default_rng(0).normal(size=(3, 9, 2, 4, 4))
    shuffled = perm_sets.permute_tiles(original, table[labels])
    for b, p in enumerate(labels):
        for k in range(9):
            np.testing.assert_array_equal(shuffled[b, k], original[b, table[p][k]])
    np.testing.assert_array_equal(perm_sets.unpermute_tiles(shuffled, table[labels]), original)
    t = perm_sets.permute_tiles(torch.from_numpy(original), torch.from_numpy(table[labels]))
    np.testing.assert_array_equal(t.numpy(), shuffled)
    np.testing.assert_array_equal(perm_sets.unpermute_tiles(t, table[labels]).numpy(), original)
    np.testing.assert_array_equal(perm_sets.permute_tiles(np.arange(9) * 10, table[5]), table[5] * 10)
    assert perm_sets.cell_position(1) == (1, 0)   # middle-left
    assert perm_sets.cell_position(3) == (0, 1)   # top-middle
    with pytest.raises(ValueError, match="must start with"):
        perm_sets.permute_tiles(original, table[:2])


def test_label_round_trips_through_the_pipeline(loader, batches):
    """Un-permuting a batch's tiles by its label (the row of the set the method's options resolve to)
    puts every cell's patch of the crop back in place; any other label does not."""
    table = perm_sets.resolve(config().method_options.permutations)
    n_gray = n_checked = 0
    for b in batches[:2]:
        np.testing.assert_array_equal(b["params.order"].numpy(), table[b["perm"].numpy()])
        original = perm_sets.unpermute_tiles(b["tiles"], table[b["perm"].numpy()]).numpy()
        pixels = (original * STD + MEAN) * 255.0                      # [B, 9, 3, t, t], grey levels
        for i in range(len(original)):
            _, gray, cells = jigsaw_cells(b, i, CELL, TILE)
            n_gray += gray
            assert np.abs(pixels[i] - cells).max() < 0.05
            wrong = table[(int(b["perm"][i]) + 1) % len(table)]
            scrambled = perm_sets.unpermute_tiles(b["tiles"][i], wrong).numpy() * STD * 255.0
            assert np.abs(scrambled + MEAN * 255.0 - cells).mean() > 1.0
            n_checked += 1
    assert n_checked == 16 and 0 < n_gray < 16


# -- the model -------------------------------------------------------------------------------------

def test_head_size_follows_the_permutation_set(loader, batches):
    """|P| comes from the pipeline's description (or, without one, the same spec): 100 and 2000 give
    different last layers; the per-tile head reads the trunk's width; logits are [B, |P|]."""
    heads = {}
    for n in (100, 2000):
        cfg = config(**{"method_options.permutations": n})
        pipe = registry.create("pipeline", "jigsaw", **ENTRY.factory.loader_options(cfg.method_options))
        method = ENTRY.factory(cfg, context(pipeline=pipe.describe()))
        assert method.num_permutations == n == len(pipe.perms)
        heads[n] = method.classifier
        assert method.tile_head[0].in_features == method.backbone.num_features == 256
        assert method.classifier.in_features == 9 * cfg.method_options.tile_dim
        with torch.no_grad():
            assert method.logits(batches[0]["tiles"]).shape == (8, n)
    assert heads[100].out_features == 100 and heads[2000].out_features == 2000
    # what the trainer passes (its loader's description of the pipeline); no description: from the spec
    described = ENTRY.factory(config(), context(loader))
    assert described.classifier.out_features == 100
    assert ENTRY.factory(config(), context()).classifier.out_features == 100
    with pytest.raises(ConfigError, match="permutations"):
        ENTRY.factory(config(**{"method_options.permutations": "/no/such/perms.npy"}), context())


def test_forward_shapes_and_loss_falls(loader, batches):
    torch.manual_seed(0)
    cfg = config()
    method = ENTRY.factory(cfg, context(loader))
    out = method(batches[0])
    assert set(out) == {"loss", "acc"} and all(v.shape == () for v in out.values())
    assert out["loss"].item() == pytest.approx(np.log(100), abs=0.5)   # chance at init
    losses = sgd_losses(method, batches[:4])
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


def test_alexnet_and_resnet50_trunks(batches):
    """Goyal's AlexNet jigsaw trunk: 1024-d pool5 per 64 px tile, takes an optimiser step; ResNet-50:
    2048-d per tile into the 1000-d tile head (VISSL's sizes)."""
    torch.manual_seed(0)
    alex = ENTRY.factory(config(arch="alexnet_jigsaw"), context(pipeline={"num_permutations": 100}))
    assert alex.backbone.num_features == 1024 and alex.tile_head[0].in_features == 1024
    assert alex.trunk_spec == {"arch": "alexnet_jigsaw", "kwargs": {}, "input": "rgb"}
    assert_step_moves(alex, batches[0], alex.backbone._feature_blocks[0][0].weight)
    rn50 = ENTRY.factory(config("rn50_perm2000"), context(pipeline={"num_permutations": 2000}))
    assert rn50.tile_head[0].in_features == 2048 and rn50.tile_head[0].out_features == 1000
    assert isinstance(rn50.tile_head[1], torch.nn.BatchNorm1d)
    assert rn50.classifier.in_features == 9000 and rn50.classifier.out_features == 2000
    with torch.no_grad():
        assert rn50.logits(batches[0]["tiles"][:2]).shape == (2, 2000)


def test_presets():
    import train
    for name, preset in ENTRY.meta["presets"].items():
        cfg = config(name)
        train.check_config(cfg)
        assert preset.description and isinstance(cfg.method_options, JigsawOptions)
    for name, n in (("rn50_perm100", 100), ("rn50_perm2000", 2000), ("rn50_perm10000", 10000)):
        cfg = config(name)
        assert (cfg.arch, cfg.method_options.permutations, cfg.method_options.tile_dim) == ("resnet50", n, 1000)
        assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.exclude_norm_bias_wd) == \
            ("sgd", 0.1, 0.9, 1e-4, True)
        assert (cfg.epochs, cfg.schedule, cfg.milestones, cfg.gamma, cfg.warmup_epochs) == \
            (105, "multistep", (30, 60, 90, 100), 0.1, 0)
        assert cfg.batch_size * 8 == 256
    assert config("alexnet_perm2000").arch == "alexnet_jigsaw"
    assert config("tiny").arch == "resnet_tiny"
