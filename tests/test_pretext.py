"""Pretext pipelines on CPU: jigsaw (tiles + permutation label), colorization (L + soft ab targets),
jigsaw clustering (4 patches; the montages are tested with the method) -- shapes, geometry, fidelity to the reference functions."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import reference
from pipelines import SpecError, list_families, make_loader
from pipelines.jigclu import LOCATIONS, MOCO_V2
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, ViewRule
from sslkit import color
from sslkit import permutations as perm_sets
from sslkit.errors import SslkitError
from sslkit.shard.access import SampleReader

from reference import jigsaw_cells, render, window_from_uniforms

MEAN = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
STD = np.array(IMAGENET_STD, np.float32)[:, None, None]


def normalised_range():
    return torch.tensor((0 - MEAN) / STD).view(3), torch.tensor((1 - MEAN) / STD).view(3)


def source_hw(reader: SampleReader, index: int) -> tuple[int, int]:
    w, h = json.loads(reader.component(index, "json"))["size"]
    return h, w


@pytest.fixture(scope="module")
def reader(sample_shards):
    return SampleReader(sample_shards)


# -- jigsaw -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jigsaw(sample_shards):
    loader = make_loader("jigsaw", sample_shards, batch_size=32, permutations=100, with_params=True, seed=1)
    return loader, next(iter(loader))


def test_pretext_families_registered():
    assert {"jigsaw", "colorization", "jigclu"} <= set(list_families())


def test_jigsaw_outputs(jigsaw):
    loader, b = jigsaw
    assert loader.family.num_classes == 100
    assert b["tiles"].shape == (32, 9, 3, 64, 64) and b["tiles"].dtype == torch.float32
    assert b["perm"].shape == (32,) and b["perm"].dtype == torch.int64
    assert 0 <= int(b["perm"].min()) and int(b["perm"].max()) < 100
    lo, hi = normalised_range()
    per_channel = b["tiles"].transpose(0, 2).reshape(3, -1)
    assert torch.isfinite(per_channel).all()
    assert (per_channel.min(1).values >= lo - 1e-4).all() and (per_channel.max(1).values <= hi + 1e-4).all()
    assert b["tiles"].std() > 0.2
    assert len(set(b["index"].tolist())) == 32 and b["intact"].all()
    # the table the graph indexes is sslkit.permutations' max_avg set, seed 0
    np.testing.assert_array_equal(loader.family.perms, perm_sets.generate(100, "max_avg", seed=0))
    np.testing.assert_array_equal(b["params.order"].numpy(), loader.family.perms[b["perm"].numpy()])


def test_jigsaw_geometry(jigsaw, reader):
    """A 255 crop of the image resized to shorter side 256 (square, inside the image), one 64 px tile
    per 85 px cell at offsets in [0, 20]."""
    _, b = jigsaw
    assert b["params.crop"].shape == (32, 255, 255, 3)
    off = b["params.offsets"].numpy()
    assert off.shape == (32, 9, 2) and off.min() == 0 and off.max() == 20  # 576 draws: both ends occur
    for i, index in enumerate(b["index"].tolist()):
        h, w = source_hw(reader, index)
        y, x, ch, cw = b["params.window"][i].tolist()
        assert ch == pytest.approx(cw) and ch == pytest.approx(min(h, w) * 255 / 256, rel=1e-5)
        assert -1e-3 <= y and y + ch <= h + 1e-3 and -1e-3 <= x and x + cw <= w + 1e-3


def test_jigsaw_unpermute_recovers_the_crop(jigsaw):
    """original[P[p][k]] = tiles[k]; each original tile is its cell's patch of the crop, so
    reassembling them rebuilds the crop wherever tiles cover it."""
    loader, b = jigsaw
    perms = loader.family.perms
    n_gray = 0
    for i in range(32):
        order = perms[int(b["perm"][i])]
        original = np.empty((9, 3, 64, 64), np.float32)
        original[order] = b["tiles"][i].numpy()
        crop, gray, cells = jigsaw_cells(b, i, cell=85, tile=64)
        n_gray += gray
        off = b["params.offsets"][i].numpy()
        canvas = np.full((255, 255, 3), -1.0)
        for c in range(9):
            want = (cells[c] / 255.0 - MEAN) / STD
            # exact, gray included: the luma is float in the torch stage (DALI's rounded it to uint8)
            np.testing.assert_allclose(original[c], want, atol=1e-4)
            pixels = (original[c] * STD + MEAN).transpose(1, 2, 0) * 255.0
            col, row = divmod(c, 3)
            y, x = row * 85 + off[c, 0], col * 85 + off[c, 1]
            canvas[y:y + 64, x:x + 64] = pixels
        covered = canvas[..., 0] >= 0
        assert covered.mean() == pytest.approx(9 * 64 * 64 / 255 ** 2)
        assert np.abs(canvas[covered] - crop[covered]).max() < 1.01
        if gray:
            t = original * STD + MEAN
            assert np.abs(t[:, 0] - t[:, 1]).max() < 1e-5 and np.abs(t[:, 1] - t[:, 2]).max() < 1e-5
    assert 0 < n_gray < 32


def test_jigsaw_label_and_augmentation_rates(sample_shards):
    """Permutation index uniform over |P| (chi-square), grayscale ~0.66, flip ~0.5."""
    loader = make_loader("jigsaw", sample_shards, batch_size=96, permutations=4, with_params=True, seed=5)
    perms, gray, flip = [], [], []
    for _ in range(3):
        for b in loader:
            perms += b["perm"].tolist()
            gray += b["params.gray"].tolist()
            flip += b["params.flip"].tolist()
    n = len(perms)
    counts = np.bincount(perms, minlength=4)
    assert len(counts) == 4
    chi2 = float(((counts - n / 4) ** 2 / (n / 4)).sum())
    assert chi2 < 16.3, counts  # chi-square, 3 dof, alpha = 0.001
    for rate, p in ((np.mean(gray), 0.66), (np.mean(flip), 0.5)):
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_jigsaw_permutation_files(sample_shards, tmp_path):
    table = perm_sets.generate(10, "max_min", seed=3)
    one_based = tmp_path / "naroozi_perms_10_patches_9_max.npy"
    np.save(one_based, (table + 1).astype(np.int32))  # the published Noroozi files count from 1
    loader = make_loader("jigsaw", sample_shards, batch_size=16, permutations=str(one_based), with_params=True)
    np.testing.assert_array_equal(loader.family.perms, table)
    b = next(iter(loader))
    assert int(b["perm"].max()) < 10
    np.testing.assert_array_equal(b["params.order"].numpy(), table[b["perm"].numpy()])
    # files written by sslkit.permutations.save (0-based) load as they are
    saved = perm_sets.save(tmp_path / "p.npy", table)
    assert loader.family.describe()["num_permutations"] == 10
    from pipelines.jigsaw import Jigsaw
    np.testing.assert_array_equal(Jigsaw(permutations=saved).perms, table)
    # bad inputs: one line each, before any pipeline is built
    dup = tmp_path / "dup.npy"
    np.save(dup, np.stack([table[0], table[0]]))
    not_perm = tmp_path / "bad.npy"
    np.save(not_perm, np.zeros((3, 9), np.int64))
    four = tmp_path / "four.npy"
    np.save(four, np.array([[0, 1, 2, 3], [3, 2, 1, 0]]))
    cases = [({"permutations": str(tmp_path / "missing.npy")}, "no such file"),
             ({"permutations": str(dup)}, "same permutation"),
             ({"permutations": str(not_perm)}, "not a permutation"),
             ({"permutations": str(four)}, "needs 9"),
             ({"permutations": 0}, "n must be"),
             ({"permutations": 2.5}, "expected a number"),
             ({"geometry": "vissl"}, "geometry")]
    for kw, msg in cases:
        with pytest.raises(SpecError, match=msg) as e:
            make_loader("jigsaw", sample_shards, batch_size=4, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(SslkitError, match="unknown option.*size; accepted: permutations, geometry, dtype$"):
        make_loader("jigsaw", sample_shards, batch_size=4, size=64)


def test_jigsaw_noroozi_geometry(sample_shards, reader):
    """225 crop, 75 px cells, offsets in [0, 11], no flip / gray, each tile normalised by its own
    per-channel mean and std after a per-channel jitter; un-permuted tiles still match their cells."""
    loader = make_loader("jigsaw", sample_shards, batch_size=16, permutations=100, geometry="noroozi",
                         with_params=True, seed=2)
    b = next(iter(loader))
    tiles = b["tiles"].numpy()
    assert tiles.shape == (16, 9, 3, 64, 64)
    assert np.abs(tiles.mean(axis=(3, 4))).max() < 1e-3
    stds = tiles.std(axis=(3, 4))
    assert np.median(stds) == pytest.approx(1.0, abs=0.01) and stds.max() < 1.0 + 1e-3  # flat tiles: epsilon
    off = b["params.offsets"].numpy()
    assert off.min() >= 0 and off.max() <= 11
    assert not b["params.gray"].any() and not b["params.flip"].any()
    corr = []
    for i in range(16):
        h, w = source_hw(reader, int(b["index"][i]))
        assert b["params.window"][i, 2].item() == pytest.approx(min(h, w) * 225 / 256, rel=1e-5)
        original = np.empty_like(tiles[i])
        original[loader.family.perms[int(b["perm"][i])]] = tiles[i]
        _, _, cells = jigsaw_cells(b, i, cell=75, tile=64)   # no grayscale in this geometry
        for c in range(9):
            ref = cells[c].reshape(3, -1)
            got = original[c].reshape(3, -1)
            for ch in range(3):
                if ref[ch].std() > 2:  # skip flat tiles (black sky)
                    corr.append(np.corrcoef(ref[ch], got[ch])[0, 1])
    # the jitter is affine per channel, so only clamping at 0 / 255 (bright tiles) keeps this below 1
    corr = np.array(corr)
    assert len(corr) > 100 and np.median(corr) > 0.9999 and np.mean(corr > 0.99) > 0.9, np.sort(corr)[:20]


# -- colorization -------------------------------------------------------------------------------

def test_colorization_outputs(sample_shards):
    loader = make_loader("colorization", sample_shards, batch_size=8, seed=1)
    b = next(iter(loader))
    assert b["L"].shape == (8, 1, 224, 224) and b["L"].dtype == torch.float32
    assert b["ab_idx"].shape == (8, 56, 56, 10) and b["ab_idx"].dtype == torch.int64
    assert b["ab_w"].shape == (8, 56, 56, 10) and b["ab_w"].dtype == torch.float32
    assert b["nongray"].shape == (8,) and b["nongray"].dtype == torch.bool
    assert "weight" not in b and "rgb" not in b and "params.rgb" not in b
    assert -50.0 <= float(b["L"].min()) and float(b["L"].max()) <= 50.0 and b["L"].std() > 5
    assert 0 <= int(b["ab_idx"].min()) and int(b["ab_idx"].max()) < 313
    torch.testing.assert_close(b["ab_w"].sum(-1), torch.ones(8, 56, 56))
    assert (b["ab_w"][..., :-1] >= b["ab_w"][..., 1:] - 1e-6).all()  # nearest bin first, largest weight
    dense = color.expand_topk(b["ab_idx"], b["ab_w"])
    assert dense.shape == (8, 56, 56, 313)
    torch.testing.assert_close(dense.sum(-1), torch.ones(8, 56, 56))


def test_colorization_matches_sslkit_color(sample_shards, reader):
    """The batch equals sslkit.color applied to the crop: L - 50 at full resolution, the soft targets
    of ab subsampled at pixels (4i, 4j); the crop is Goyal's (shorter side 256, 224 crop)."""
    loader = make_loader("colorization", sample_shards, batch_size=8, k=5, sigma=7.0, with_params=True, seed=3)
    b = next(iter(loader))
    rgb = b["params.rgb"].numpy()
    lab = reference.rgb_to_lab(rgb)                                              # [B, S, S, 3], numpy float64
    np.testing.assert_allclose(b["L"][:, 0].numpy(), lab[..., 0] - 50.0, atol=2e-3)
    idx, w = color.soft_encode_topk(lab[:, ::4, ::4, 1:], k=5, sigma=7.0)
    np.testing.assert_allclose(b["ab_w"].numpy(), w, atol=1e-4)
    assert (b["ab_idx"].numpy() == idx).mean() > 0.99  # float32 vs float64 Lab: a few points change snap cell
    np.testing.assert_array_equal(b["nongray"].numpy(), np.abs(lab[:, ::4, ::4, 1:]).max(axis=(1, 2, 3)) > 5)
    for i, index in enumerate(b["index"].tolist()):
        h, w_ = source_hw(reader, index)
        y, x, ch, cw = b["params.window"][i].tolist()
        assert ch == pytest.approx(cw) and ch == pytest.approx(min(h, w_) * 224 / 256, rel=1e-5)


def _same_targets(ab: torch.Tensor, k: int, sigma: float):
    """NearestBins vs the exhaustive search over all 313 bins (tests/reference.py): identical weights
    and identical indices -- ties go to the lower bin index in both."""
    from sslkit.color import NearestBins
    idx, w = NearestBins(k)(ab, sigma)
    ref_idx, ref_w = reference.soft_encode_exhaustive(ab, k, sigma)
    assert torch.equal(w, ref_w)
    assert torch.equal(idx, ref_idx)


def _lab(rgb_n13: torch.Tensor) -> torch.Tensor:
    """[N, 1, 3] uint8 -> ab [N, 2] by sslkit.color."""
    return color.rgb_to_lab_nchw(rgb_n13.permute(2, 1, 0)[None])[0, 1:, 0].t()


def test_nearest_bins_equals_sslkit_soft_encoding():
    """Over the whole sRGB gamut (an 8-level-step RGB grid, which includes the cube's corners and
    edges: the extreme a and b, and the gray axis, where four bins tie) and random colours, for several
    k and sigma."""
    levels = torch.cat([torch.arange(0, 256, 8), torch.tensor([255])]).to(torch.uint8)
    grid = torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 1, 3)
    _same_targets(_lab(grid), 10, 5.0)
    rand = torch.randint(0, 256, (20000, 1, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ab = _lab(rand)
    for k, sigma in ((1, 5.0), (5, 2.0), (32, 10.0)):
        _same_targets(ab, k, sigma)


def test_colorization_prior_weights(sample_shards, tmp_path):
    """With a prior, weight = Zhang's factor of the nearest bin; when the prior is the batch's own
    nearest-bin histogram the mean weight is exactly 1 (sum prior * factor = 1)."""
    plain = next(iter(make_loader("colorization", sample_shards, batch_size=16, size=32, seed=4)))
    nearest = plain["ab_idx"][..., 0]
    prior = np.bincount(nearest.flatten().numpy(), minlength=313) / nearest.numel()
    path = tmp_path / "prior.npy"
    np.save(path, prior)
    b = next(iter(make_loader("colorization", sample_shards, batch_size=16, size=32, seed=4, prior=str(path))))
    assert torch.equal(b["ab_idx"], plain["ab_idx"])
    factor = color.rebalance_weights(prior, gamma=0.5)
    assert b["weight"].shape == (16, 8, 8) and b["weight"].dtype == torch.float32
    torch.testing.assert_close(b["weight"], torch.from_numpy(factor).float()[nearest])
    assert float(b["weight"].double().mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(b["weight"].min()) > 0
    bad = tmp_path / "short.npy"
    np.save(bad, prior[:100])
    for kw, msg in (({"prior": str(bad)}, "313"), ({"prior": str(tmp_path / "none.npy")}, "no such file"),
                    ({"size": 30}, "divisible by 4"), ({"k": 0}, "k=0"), ({"resize": 100}, "resize")):
        with pytest.raises(SpecError, match=msg):
            make_loader("colorization", sample_shards, batch_size=4, **kw)


def test_colorization_gray_images_are_not_nongray(sample_shards, reader):
    """Zhang's mask: False for gray photographs (a = b = 0 everywhere), True for colour ones."""
    gray = set()
    for i in range(96):
        rgb = np.asarray(Image.open(io.BytesIO(reader.component(i, "jpg"))).convert("RGB")).astype(int)
        if np.abs(rgb[..., 0] - rgb[..., 1]).max() == 0 and np.abs(rgb[..., 1] - rgb[..., 2]).max() == 0:
            gray.add(i)
    assert 0 < len(gray) < 96
    loader = make_loader("colorization", sample_shards, batch_size=32, size=32, seed=0)
    seen = {}
    for b in loader:
        seen.update(zip(b["index"].tolist(), b["nongray"].tolist()))
    assert len(seen) == 96
    assert not any(seen[i] for i in gray)
    assert sum(seen[i] for i in seen if i not in gray) > 0.8 * (96 - len(gray))


# -- jigsaw clustering ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jigclu(sample_shards):
    loader = make_loader("jigclu", sample_shards, batch_size=16, with_params=True, seed=1)
    return loader, next(iter(loader))


def test_jigclu_outputs(jigclu):
    loader, b = jigclu
    p = b["patches"]
    assert p.shape == (16, 4, 3, 112, 112) and p.dtype == torch.float32
    lo, hi = normalised_range()
    per_channel = p.transpose(0, 2).reshape(3, -1)
    assert torch.isfinite(per_channel).all()
    assert (per_channel.min(1).values >= lo - 1e-4).all() and (per_channel.max(1).values <= hi + 1e-4).all()
    views = loader.family.views
    assert views.color == MOCO_V2 and views.groups == [(4, 112)]
    assert all(r.scale == (0.2, 1.0) and r.box == 0.8 for r in views.rules)


def test_jigclu_boxes_and_windows(jigclu, reader):
    """Boxes cover 0.8 of each side, in the order TL, BL, TR, BR; each patch's window is the reference
    RandomResizedCrop of its box (tests/reference.py) for the patch's own uniforms, to the pixel: inside
    its box, with an area of 0.2..1 of it."""
    _, b = jigclu
    rules = [ViewRule((0.2, 1.0), box=0.8, box_y=int(loc[0] == "B"), box_x=int(loc[1] == "R"))
             for loc in LOCATIONS]
    for i, index in enumerate(b["index"].tolist()):
        h, w = source_hw(reader, index)
        bh, bw = math.floor(0.8 * h + 0.5), math.floor(0.8 * w + 0.5)
        assert abs(bh / h - 0.8) <= 0.5 / h + 1e-9 and abs(bw / w - 0.8) <= 0.5 / w + 1e-9
        want = {"TL": (0, 0), "BL": (h - bh, 0), "TR": (0, w - bw), "BR": (h - bh, w - bw)}
        for k, loc in enumerate(LOCATIONS):
            window, flip = window_from_uniforms(h, w, rules[k], b["params.u"][i, k].numpy())
            assert tuple(b["params.windows"][i, k].tolist()) == tuple(float(v) for v in window), (i, k)
            assert bool(b["params.flips"][i, k]) == flip
            y, x, eh, ew = window
            by, bx = want[loc]
            assert by <= y and y + eh <= by + bh and bx <= x and x + ew <= bx + bw
            assert 0.2 * 0.9 <= eh * ew / (bh * bw) <= 1.0 + 1e-6


def test_jigclu_patches_follow_the_moco_recipe(jigclu):
    """The colour/blur/flip/normalise stage is the shared multi-crop kernel with MoCo v2's recipe:
    it equals the numpy/OpenCV reference on the graph's own crops and uniforms."""
    _, b = jigclu
    crops, u = b["params.crops.0"].numpy(), b["params.u"].numpy()
    for i in range(16):
        for k in range(4):
            ref = render(crops[i, k], u[i, k], MOCO_V2, IMAGENET_MEAN, IMAGENET_STD)
            np.testing.assert_allclose(b["patches"][i, k].numpy(), ref, atol=1e-4)


# -- all three ------------------------------------------------------------------------------------

# Small and quick to run (jigclu with the torch colour stage: the jigclu fixture tests the fused kernel).
SMALL = {"jigsaw": {"permutations": 10}, "colorization": {"size": 32}, "jigclu": {"size": 32, "kernel": "torch"}}


def test_two_ranks_read_disjoint_halves_in_the_same_order(sample_shards):
    """The reader is shared: on each rank every family yields the same sample indices, and the two
    ranks' samples are disjoint with equal batch counts."""
    per_family = {}
    for name, kw in SMALL.items():
        per_family[name] = []
        for rank in range(2):
            loader = make_loader(name, sample_shards, batch_size=24, rank=rank, world_size=2, seed=3, **kw)
            assert len(loader) == 2
            per_family[name].append([i for b in loader for i in b["index"].tolist()])
    first = per_family["jigsaw"]
    assert len(first[0]) == len(first[1]) == 48 and not set(first[0]) & set(first[1])
    assert per_family["colorization"] == first and per_family["jigclu"] == first


@pytest.mark.parametrize("name", ["jigsaw", "colorization", "jigclu"])
def test_visualizer(name, sample_shards, tmp_path):
    from sslkit.viz import main
    out = tmp_path / f"{name}.png"
    assert main(["--pipeline", name, "--data", sample_shards, "--out", str(out), "--n", "2"]) == 0
    with Image.open(out) as im:
        assert im.width > 400 and im.height > 200 and np.asarray(im).std() > 10


def test_visualizer_option_errors_are_one_line(sample_shards, tmp_path, capsys):
    """A wrong --option key lists the pipeline's keys; --preset on a pipeline without presets says which
    pipelines have them. Both fail before any pipeline is built."""
    from sslkit.viz import main
    base = ["--data", sample_shards, "--out", str(tmp_path / "x.png")]
    assert main(["--pipeline", "jigsaw", "--option", "size=64", *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: pipeline 'jigsaw': unknown option(s) size; accepted: permutations, geometry, dtype"
    assert main(["--pipeline", "colorization", "--preset", "tiny", *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no presets (only multicrop has them)" in err[0]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["jigsaw", "colorization", "jigclu"])
def test_gpu_graph_matches_cpu(name, sample_shards):
    """Same seed on both devices: every random draw (uniforms, windows, flips, permutations, tile
    offsets) is EXACTLY equal; pixels differ only by the decoders (nvJPEG vs libjpeg-turbo) and resize
    kernels: 99.9% of crop pixels within 6 grey levels. The batch stage is the same torch code: on the
    CPU's own crops the GPU gives the same bins (ab_idx) on >= 99.9% of entries."""
    kw = {"jigsaw": {"permutations": 100}, "colorization": {}, "jigclu": {"kernel": "torch"}}[name]
    c = next(iter(make_loader(name, sample_shards, batch_size=8, seed=4, with_params=True, **kw)))
    g = next(iter(make_loader(name, sample_shards, batch_size=8, seed=4, device="gpu", with_params=True, **kw)))
    exact = {"index", "label", "perm", "params.u", "params.window", "params.flip", "params.windows", "params.flips",
             "params.offsets", "params.order", "params.gray"}
    crops = {"params.crop", "params.rgb", "params.crops.0"}
    for key, v in c.items():
        assert g[key].is_cuda, key
        if key in exact:
            assert torch.equal(v, g[key].cpu()), key
        elif key in crops:
            assert ((v.int() - g[key].cpu().int()).abs() <= 6).float().mean() > 0.999, key
    if name == "colorization":
        fam = make_loader(name, sample_shards, batch_size=8, seed=4, **kw).family
        on_cpu = fam.postprocess({"rgb": c["params.rgb"]})
        on_gpu = fam.postprocess({"rgb": c["params.rgb"].cuda()})
        assert (on_cpu["ab_idx"] == on_gpu["ab_idx"].cpu()).float().mean() >= 0.999
        torch.testing.assert_close(on_gpu["ab_w"].cpu(), on_cpu["ab_w"], atol=1e-4, rtol=0)
        torch.testing.assert_close(on_gpu["L"].cpu(), on_cpu["L"], atol=1e-3, rtol=0)
