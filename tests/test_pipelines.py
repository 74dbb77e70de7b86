"""pipelines: multi-crop and evaluation loaders on CPU -- shapes, sharding, epochs, resume, parity
with the numpy reference, corrupt samples, clear errors."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from pipelines import LoaderError, SpecError, list_families, make_loader
from pipelines.spec import VIEW_U, CropGroup, MultiCropSpec, multicrop_spec
from sslkit.shard import ManifestError, load
from sslkit.shard.tarwriter import read_index

from conftest import build_small
from reference import crop_window, render, view_params

TINY = multicrop_spec("tiny")


@pytest.fixture(scope="module")
def tiny_batch(sample_shards):
    loader = make_loader("multicrop", sample_shards, batch_size=32, preset="tiny", with_params=True, seed=1)
    return loader, next(iter(loader))


def indices(loader, epochs=1) -> list[list[int]]:
    out = []
    for _ in range(epochs):
        out.append([i for b in loader for i in b["index"].tolist()])
    return out


def test_families_registered():
    assert {"multicrop", "eval_val", "eval_train"} <= set(list_families())


def test_multicrop_outputs(tiny_batch, sample_shards):
    loader, b = tiny_batch
    assert len(loader) == 96 // 32
    assert [tuple(v.shape) for v in b["views"]] == [(32, 3, 64, 64)] * 2 + [(32, 3, 32, 32)] * 2
    lo = (0 - np.array(TINY.mean)) / np.array(TINY.std)
    hi = (1 - np.array(TINY.mean)) / np.array(TINY.std)
    for v in b["views"]:
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
        per_channel = v.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= torch.tensor(lo, dtype=torch.float32) - 1e-4).all()
        assert (per_channel.max(1).values <= torch.tensor(hi, dtype=torch.float32) + 1e-4).all()
        assert v.std() > 0.2  # real image content, not a constant
    assert b["index"].dtype == torch.int64 and b["label"].dtype == torch.int64
    assert len(set(b["index"].tolist())) == 32 and b["index"].max() < 96
    assert b["intact"].all()
    # labels are the shards' labels for those indices
    from sslkit.shard.access import SampleReader
    reader = SampleReader(sample_shards)
    for i, lab in zip(b["index"].tolist()[:8], b["label"].tolist()[:8]):
        assert int(reader.component(i, "cls")) == lab


def test_default_preset_is_swav_multicrop(sample_shards):
    loader = make_loader("multicrop", sample_shards, batch_size=8, dtype="float16")
    b = next(iter(loader))
    assert [v.shape[-1] for v in b["views"]] == [224, 224] + [96] * 6
    assert all(v.dtype == torch.float16 for v in b["views"])


def test_presets_match_the_seed_configurations():
    def groups(p):
        return [(g.count, g.size, g.scale) for g in multicrop_spec(p).groups]
    assert groups("2x224+6x96") == [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))]
    assert groups("2x160+4x96") == [(2, 160, (0.08, 1.0)), (4, 96, (0.05, 0.14))]
    assert groups("2x224") == [(2, 224, (0.08, 1.0))]
    c = multicrop_spec().color
    assert (c.brightness, c.contrast, c.saturation, c.hue, c.p, c.gray_p, c.blur_p, c.blur_sigma) == \
        (0.8, 0.8, 0.8, 0.2, 0.8, 0.2, 0.5, (0.1, 2.0))


def test_fused_kernel_matches_reference(tiny_batch):
    """The CPU kernel's colour/blur/normalise/flip equals the numpy/OpenCV reference on DALI's crops."""
    _, b = tiny_batch
    crops = [b["params.crops.0"].numpy(), b["params.crops.1"].numpy()]
    u = b["params.u"].numpy()
    k = 0
    for g, group in enumerate(TINY.groups):
        for j in range(group.count):
            for i in range(32):
                ref = render(crops[g][i, j], u[i, k], TINY.color, TINY.mean, TINY.std)
                np.testing.assert_allclose(b["views"][k][i].numpy(), ref, atol=1e-4)
            k += 1


def test_native_dali_ops_match_reference(sample_shards):
    """The GPU graph's DALI ops (color_twist, clamp, gaussian_blur, crop_mirror_normalize), run on the
    CPU, give the reference's views too: the two kernels implement one spec."""
    loader = make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=4, kernel="native",
                         with_params=True)
    b = next(iter(loader))
    crops = [b["params.crops.0"].numpy(), b["params.crops.1"].numpy()]
    u = b["params.u"].numpy()
    k, errors = 0, []
    for g, group in enumerate(TINY.groups):
        for j in range(group.count):
            for i in range(16):
                ref = render(crops[g][i, j], u[i, k], TINY.color, TINY.mean, TINY.std)
                errors.append(np.abs(b["views"][k][i].numpy() - ref))
            k += 1
    # DALI's float colour twist uses slightly rounded YIQ constants: ~1 grey level at most
    assert max(e.max() for e in errors) < 0.05 and np.mean([e.mean() for e in errors]) < 0.01


def test_crop_windows_follow_the_reference_distribution(sample_shards):
    """Crop area fraction and log aspect ratio: DALI's windows vs the reference rule (KS distance)."""
    group = CropGroup(1, 32, (0.14, 1.0))
    spec = MultiCropSpec((group, CropGroup(1, 16, (0.05, 0.14))))
    loader = make_loader("multicrop", sample_shards, batch_size=96, spec=spec, with_params=True, seed=7)
    from sslkit.shard.access import SampleReader
    reader = SampleReader(sample_shards)
    rng = np.random.default_rng(0)
    for k, g in enumerate(spec.groups):
        dali_area, dali_ratio, ref_area, ref_ratio = [], [], [], []
        for _ in range(6):
            for b in loader:
                for i, idx in enumerate(b["index"].tolist()):
                    meta = json.loads(reader.component(idx, "json"))
                    w, h = meta["size"]
                    ch, cw = b[f"params.{k}.extent"][i].tolist()
                    dali_area.append(ch * cw / (w * h))
                    dali_ratio.append(math.log(cw / ch))
                    for _ in range(10):  # a larger reference sample: the KS noise is DALI's side
                        _, _, rh, rw = crop_window(h, w, g, rng)
                        ref_area.append(rh * rw / (w * h))
                        ref_ratio.append(math.log(rw / rh))
        # two-sample KS critical value at alpha = 0.001 for n = 576, m = 5760 is ~0.085
        assert _ks(dali_area, ref_area) < 0.09, k
        assert _ks(dali_ratio, ref_ratio) < 0.09, k
        assert min(dali_area) >= g.scale[0] * 0.9 and max(dali_area) <= 1.0


def _ks(a, b) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))


def test_augmentation_rates_match_the_spec(sample_shards):
    """Flip / grayscale / blur / jitter rates drawn in the graph match the recipe's probabilities."""
    loader = make_loader("multicrop", sample_shards, batch_size=96, preset="tiny", with_params=True, seed=11)
    u = torch.cat([b["params.u"] for _ in range(4) for b in loader]).reshape(-1, 9).numpy()
    params = [view_params(row, TINY.color) for row in u]
    n = len(params)
    for key, p in [("flip", 0.5), ("gray", 0.2), ("blur", 0.5), ("applied", 0.8)]:
        rate = np.mean([q[key] for q in params])
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (key, rate)
    sig = np.array([q["sigma"] for q in params if q["blur"]])
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(sig.mean() - 1.05) < 0.1
    b = np.array([q["b"] for q in params if q["applied"]])
    assert b.min() >= 0.2 and b.max() <= 1.8 and abs(b.mean() - 1.0) < 0.05


def test_grayscale_views_are_gray(tiny_batch):
    _, b = tiny_batch
    u = b["params.u"].numpy()
    k = 0
    found = 0
    for i in range(32):
        if u[i, k, VIEW_U["gray"]] < 0.2:
            v = b["views"][k][i].numpy() * np.array(TINY.std)[:, None, None] + np.array(TINY.mean)[:, None, None]
            assert np.abs(v[0] - v[1]).max() < 1e-3 and np.abs(v[1] - v[2]).max() < 1e-3
            found += 1
    assert found >= 1


def test_ranks_see_disjoint_samples_and_equal_batch_counts(sample_shards):
    per_rank = []
    lengths = []
    for rank in range(2):
        loader = make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", rank=rank, world_size=2, seed=0)
        lengths.append(len(loader))
        got = indices(loader)[0]
        assert len(got) == len(loader) * 16
        per_rank.append(set(got))
    assert lengths[0] == lengths[1] == 48 // 16
    assert not per_rank[0] & per_rank[1]
    # an uneven split: 96 samples over 5 ranks still gives every rank the same number of batches
    counts = {len(make_loader("eval_train", sample_shards, batch_size=4, rank=r, world_size=5)) for r in range(5)}
    assert counts == {math.ceil(96 / 5) // 4}


def test_epochs_differ_and_seed_reproduces(sample_shards):
    a = make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=5)
    e0, e1 = indices(a, epochs=2)
    assert e0 != e1 and len(e0) == len(e1) == 96
    assert len(set(e0)) == 96  # drop-last with 96 = 6 x 16: every sample once
    b = make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=5)
    assert indices(b, epochs=2) == [e0, e1]
    c = make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=6)
    assert indices(c)[0] != e0


def test_resume_continues_the_sequence(sample_shards):
    ref = make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=2)
    batches = [b for _ in range(2) for b in ref]  # two epochs, 12 batches
    run = make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=2)
    it = iter(run)
    for _ in range(4):
        next(it)
    state = run.state_dict()
    assert state["epoch"] == 0 and state["position"] == 4
    resumed = make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=2)
    resumed.load_state_dict(state)
    rest = [b for b in resumed] + [b for b in resumed]
    assert len(rest) == 8
    for want, got in zip(batches[4:], rest):
        assert torch.equal(want["index"], got["index"])
        for v1, v2 in zip(want["views"], got["views"]):
            assert torch.equal(v1, v2)
    # a state from other options is refused
    other = make_loader("multicrop", sample_shards, batch_size=8, preset="tiny", seed=2)
    with pytest.raises(LoaderError, match="batch_size"):
        other.load_state_dict(state)


def test_eval_pipelines(sample_shards):
    val = make_loader("eval_val", sample_shards, batch_size=40)
    batches = list(val)
    assert [len(b["index"]) for b in batches] == [40, 40, 16]  # every sample once, last batch partial
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(96))
    assert batches[0]["views"][0].shape == (40, 3, 224, 224) and "label" in batches[0]
    again = torch.cat([b["views"][0] for b in make_loader("eval_val", sample_shards, batch_size=40, shuffle_buffer=0)])
    first = torch.cat([b["views"][0] for b in make_loader("eval_val", sample_shards, batch_size=40, shuffle_buffer=0)])
    assert torch.equal(again, first)  # deterministic centre crops
    train = make_loader("eval_train", sample_shards, batch_size=32, with_params=True)
    b = next(iter(train))
    assert b["views"][0].shape == (32, 3, 224, 224) and b["label"].shape == (32,)
    area = (b["params.0.extent"][:, 0] * b["params.0.extent"][:, 1]).numpy()
    assert area.min() > 0


def _corrupt_copy(src: str, dst: str) -> list[int]:
    """Copy a shard folder, truncate two JPEGs in place (zero their tails) and return their indices."""
    shutil.copytree(src, dst)
    m = load(dst)
    shard = m["shards"][1]
    tar = os.path.join(dst, shard["path"])
    samples = read_index(os.path.join(dst, shard["index"]))
    bad = []
    with open(tar, "r+b") as f:
        for j in (3, 10):
            off, size, _ = samples[j]["jpg"]
            f.seek(off + size // 2)
            f.write(b"\0" * (size - size // 2))  # a truncated upload: no end-of-image marker
            bad.append(shard["first_index"] + j)
    return bad


def test_corrupt_jpeg_does_not_stop_an_epoch(sample_shards, tmp_path):
    d = str(tmp_path / "corrupt")
    bad = _corrupt_copy(sample_shards, d)
    loader = make_loader("multicrop", d, batch_size=16, preset="tiny", seed=0)
    seen, broken = [], []
    for b in loader:
        seen += b["index"].tolist()
        broken += b["index"][~b["intact"]].tolist()
        assert all(torch.isfinite(v).all() for v in b["views"])
    assert len(seen) == 96 and sorted(broken) == sorted(bad)
    assert loader.corrupt_total == 2 and loader.epoch == 1


def test_undecodable_header_is_quarantined_and_the_epoch_completes(sample_shards, tmp_path):
    """A JPEG that passes the marker check but cannot be decoded: the loader names it, swaps it for a
    placeholder and rebuilds the pipeline from the checkpoint taken before the failing batch."""
    d = str(tmp_path / "badheader")
    shutil.copytree(sample_shards, d)
    m = load(d)
    shard = m["shards"][0]
    off, size, _ = read_index(os.path.join(d, shard["index"]))[5]["jpg"]
    with open(os.path.join(d, shard["path"]), "r+b") as f:
        f.seek(off + 2)
        f.write(b"\xff\xc0\x00\x02" + b"\x00" * 64)  # garbage frame header right after SOI
    loader = make_loader("multicrop", d, batch_size=16, preset="tiny", seed=0, shuffle_buffer=0)
    seen = [i for b in loader for i in b["index"].tolist()]
    assert sorted(seen) == list(range(96))
    assert len(loader.quarantined) == 1 and loader.corrupt_total == 1


def test_clear_errors(sample_shards, tmp_path):
    with pytest.raises(SpecError, match="unknown pipeline"):
        make_loader("nope", sample_shards, batch_size=4)
    with pytest.raises(SpecError, match="unknown multi-crop preset"):
        make_loader("multicrop", sample_shards, batch_size=4, preset="3x300")
    with pytest.raises(SpecError, match="scale"):
        make_loader("multicrop", sample_shards, batch_size=4,
                    spec=MultiCropSpec((CropGroup(2, 64, (0.5, 0.2)),)))
    with pytest.raises(SpecError, match="unexpected keyword"):
        make_loader("multicrop", sample_shards, batch_size=4, colour_jitter=0.4)
    with pytest.raises(ManifestError, match="no such shard folder"):
        make_loader("multicrop", str(tmp_path / "missing"), batch_size=4)
    with pytest.raises(LoaderError, match="less than one batch"):
        make_loader("multicrop", sample_shards, batch_size=200)
    if not torch.cuda.is_available():
        with pytest.raises(LoaderError, match="no CUDA"):
            make_loader("multicrop", sample_shards, batch_size=4, device="gpu")
    # an index file that belongs to another tar
    d = str(tmp_path / "swapped")
    shutil.copytree(sample_shards, d)
    m = load(d)
    a, b = (os.path.join(d, s["index"]) for s in m["shards"][:2])
    lines = open(a).read().splitlines()
    open(a, "w").write("\n".join([lines[0].split()[0] + " 31"] + lines[1:-1]) + "\n")
    with pytest.raises(ManifestError, match="index holds"):
        make_loader("multicrop", d, batch_size=4)
    # an unmerged part
    part = str(tmp_path / "part")
    build_small(part, sources=("sample:20",), part=(0, 2))
    with pytest.raises(ManifestError, match="merge the parts"):
        make_loader("multicrop", part, batch_size=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_matches_cpu(sample_shards):
    a = next(iter(make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=4, kernel="native")))
    g = next(iter(make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=4, device="gpu")))
    assert torch.equal(a["index"], g["index"].cpu())
    for va, vg in zip(a["views"], g["views"]):
        assert (va - vg.cpu()).abs().mean() < 0.02
