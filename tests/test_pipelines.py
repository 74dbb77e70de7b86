"""pipelines: multi-crop and evaluation loaders on CPU -- shapes, sharding, epochs, resume, parity
with the numpy reference (crop windows exactly, the colour stage of both kernels to 1e-4), corrupt
and undecodable samples, clear errors."""

from __future__ import annotations

import collections
import io
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import LoaderError, SpecError, list_families, make_loader
from pipelines.spec import N_VIEW_U, VIEW_U, CropGroup, MultiCropSpec, multicrop_spec
from sslkit.errors import SslkitError
from sslkit.shard import ManifestError, load
from sslkit.shard.access import SampleReader
from sslkit.shard.tarwriter import read_index

from conftest import build_small, jpeg_bytes
from reference import crop_window, render, view_params, window_from_uniforms

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


def assert_views_match_reference(b: dict, spec=None):
    """Every view of a `with_params` multicrop batch equals the numpy/OpenCV reference rendering of its
    uint8 crop and uniforms, to 1e-4."""
    spec = spec or TINY
    crops = [b[f"params.crops.{g}"].numpy() for g in range(len(spec.groups))]
    u = b["params.u"].numpy()
    k = 0
    for g, group in enumerate(spec.groups):
        for j in range(group.count):
            for i in range(len(b["index"])):
                ref = render(crops[g][i, j], u[i, k], spec.color, spec.mean, spec.std)
                np.testing.assert_allclose(b["views"][k][i].numpy(), ref, atol=1e-4)
            k += 1


def test_fused_kernel_matches_reference(tiny_batch):
    """The CPU kernel's colour/blur/normalise/flip equals the numpy/OpenCV reference on DALI's crops."""
    assert_views_match_reference(tiny_batch[1])


def test_torch_stage_matches_reference_and_the_fused_kernel(sample_shards, tiny_batch):
    """The torch batch stage (the GPU path, run here on the CPU) gives the reference's views to the
    same 1e-4 as the fused kernel, and the two loaders, same seed, give the same views."""
    loader = make_loader("multicrop", sample_shards, batch_size=32, preset="tiny", seed=1, kernel="torch",
                         with_params=True)
    b = next(iter(loader))
    _, fused = tiny_batch
    assert torch.equal(b["index"], fused["index"]) and torch.equal(b["params.u"], fused["params.u"])
    assert_views_match_reference(b)
    for k in range(TINY.num_views):
        np.testing.assert_allclose(b["views"][k].numpy(), fused["views"][k].numpy(), atol=2e-4)


def test_photometric_stage_on_synthetic_crops(photos):
    """augment.photometric (the torch batch stage) = the numpy/OpenCV reference to 1e-4 on real photo
    crops for every kind of draw (jitter on / off, gray, blur at the largest radius, one-pixel-wide
    structure at the borders), on both of its blur paths: the CPU one (blurred views only) and the GPU
    one (every view, the identity kernel where there is no blur) run here on the CPU."""
    from pipelines import augment as A
    from pipelines.spec import ColorRecipe
    rng = np.random.default_rng(0)
    recipe = ColorRecipe()
    crops = np.stack([photos[name][y:y + 24, x:x + 24] for name in ("cat", "astronaut", "coffee", "rocket")
                      for y, x in ((0, 0), (37, 51), (100, 9))])                             # [12, 24, 24, 3]
    u = rng.random((len(crops), N_VIEW_U), dtype=np.float32)
    u[0, [VIEW_U["blur"], VIEW_U["sigma"]]] = (0.0, 0.9999)      # the largest sigma: radius 6
    u[1, VIEW_U["apply"]], u[2, VIEW_U["gray"]], u[3, VIEW_U["blur"]] = 0.99, 0.0, 0.99
    got = A.photometric(torch.from_numpy(crops), torch.from_numpy(u), recipe, TINY.mean, TINY.std)
    for i in range(len(crops)):
        np.testing.assert_allclose(got[i].numpy(), render(crops[i], u[i], recipe, TINY.mean, TINY.std), atol=1e-4)
    x = A.channels_first(torch.from_numpy(crops))
    sigma = A.blur_sigma(torch.from_numpy(u), recipe)
    assert (sigma > 0).any() and (sigma == 0).any()
    torch.testing.assert_close(A._blur(x, sigma, recipe.blur_radius), A.gaussian_blur(x, sigma, recipe.blur_radius),
                               atol=1e-4, rtol=0)


def test_crop_windows_follow_the_rule_exactly(tiny_batch, sample_shards):
    """Every view's window and flip are the reference rule (tests/reference.py) applied to the view's own
    uniforms, equal to the pixel; and each crop is its window resized (mirrored when flipped), checked
    against PIL's antialiased bilinear resize of the source window (grey levels, decoders and filters
    differ slightly)."""
    _, b = tiny_batch
    reader = SampleReader(sample_shards)
    rules = TINY.rules()
    assert b["params.windows"].shape == (32, 4, 4) and b["params.flips"].shape == (32, 4)
    match, other = [], []
    for i, index in enumerate(b["index"].tolist()):
        w, h = json.loads(reader.component(index, "json"))["size"]
        src = Image.open(io.BytesIO(reader.component(index, "jpg"))).convert("RGB")
        for k, rule in enumerate(rules):
            want, flip = window_from_uniforms(h, w, rule, b["params.u"][i, k].numpy())
            assert tuple(b["params.windows"][i, k].tolist()) == tuple(float(v) for v in want), (i, k)
            assert bool(b["params.flips"][i, k]) == flip
            y, x, ch, cw = want
            size = TINY.view_sizes()[k]
            ref = np.asarray(src.crop((x, y, x + cw, y + ch)).resize((size, size), Image.Resampling.BILINEAR), float)
            crop = b[f"params.crops.{0 if k < 2 else 1}"][i, k % 2].numpy().astype(float)
            match.append(np.abs(crop - (ref[:, ::-1] if flip else ref)).mean())
            other.append(np.abs(crop - (ref if flip else ref[:, ::-1])).mean())
    assert b["params.flips"].any() and not b["params.flips"].all()
    assert np.median(match) < 2.0 and max(match) < 8.0, sorted(match)[-5:]
    assert np.mean(np.array(match) < np.array(other)) > 0.9


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
                    ch, cw = b["params.windows"][i, k, 2:].tolist()
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
    u = torch.cat([b["params.u"] for _ in range(4) for b in loader]).reshape(-1, N_VIEW_U).numpy()
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
    # a state from other options is refused (world size and batch size may change: see the elastic test)
    other = make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=3)
    with pytest.raises(LoaderError, match="seed"):
        other.load_state_dict(state)


@pytest.mark.parametrize("old, new", [((2, 16), (1, 16)), ((1, 16), (2, 8)), ((2, 8), (3, 8))])
def test_elastic_resume_reads_each_unread_sample_once(sample_shards, old, new):
    """A state saved by `old` (world size, batch) ranks mid-epoch resumes on `new` ranks: over the
    interrupted epoch every sample is read, none more often than padding allows; the next epoch is
    a whole one on the new world."""
    (w0, b0), (w1, b1) = old, new
    ranks = [make_loader("eval_train", sample_shards, batch_size=b0, rank=r, world_size=w0, seed=4) for r in range(w0)]
    seen, states = [], []
    for loader in ranks:
        it = iter(loader)
        seen += [i for _ in range(2) for i in next(it)["index"].tolist()]
        states.append(loader.state_dict())
    assert len(set(seen)) == len(seen) == 2 * w0 * b0
    after = [make_loader("eval_train", sample_shards, batch_size=b1, rank=r, world_size=w1, seed=4) for r in range(w1)]
    for loader in after:
        loader.load_state_dict(states[0])   # any old rank's state: they differ only in rank and DALI's state
    lengths = {len(loader) for loader in after}
    assert len(lengths) == 1    # every new rank runs the same number of batches
    rest = [i for loader in after for b in loader for i in b["index"].tolist()]
    counts = collections.Counter(seen + rest)
    assert set(counts) == set(range(96))
    assert sum(c - 1 for c in counts.values()) < w1 * b1      # repeats: the end-of-epoch padding only
    assert all(loader.epoch == 1 and len(loader) == loader.batches_per_epoch for loader in after)
    whole = [i for loader in after for b in loader for i in b["index"].tolist()]
    assert set(whole) == set(range(96)) and len(whole) - 96 < w1 * b1


def test_resume_after_the_shards_moved(sample_shards, tmp_path):
    """The state names the dataset by its identity, not its folder: it resumes on a moved copy (same
    sample order), and is refused by a dataset with other content."""
    run = make_loader("multicrop", sample_shards, batch_size=16, preset="tiny", seed=3)
    it = iter(run)
    next(it)
    state = run.state_dict()
    want = [b["index"] for b in it]
    moved = str(tmp_path / "elsewhere" / "shards")
    shutil.copytree(sample_shards, moved)
    resumed = make_loader("multicrop", moved, batch_size=16, preset="tiny", seed=3)
    resumed.load_state_dict(state)
    got = [b["index"] for b in resumed]
    assert len(got) == len(want) == 5 and all(torch.equal(a, b) for a, b in zip(want, got))
    assert resumed.describe()["dataset"]["identity"] == run.describe()["dataset"]["identity"]
    assert resumed.dataset_size == 96 and resumed.num_classes == 12
    other = str(tmp_path / "other")
    build_small(other, sources=("sample:96",), seed=1)
    with pytest.raises(LoaderError, match="dataset"):
        make_loader("multicrop", other, batch_size=16, preset="tiny", seed=3).load_state_dict(state)


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
    area = (b["params.windows"][:, 0, 2] * b["params.windows"][:, 0, 3]).numpy()
    assert area.min() > 0 and b["params.flips"][:, 0].any() and not b["params.flips"][:, 0].all()


def test_eval_val_matches_reference(sample_shards):
    """eval_val = resize the shorter side to 256 (antialiased) -> centre 224 -> normalise, against PIL's
    antialiased bilinear resize of the same JPEGs: the resamplers differ by a few grey levels at edges,
    the layout, normalisation and crop position must not (a pixel's shift fails the 99th percentile)."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    b = next(iter(make_loader("eval_val", sample_shards, batch_size=8, shuffle_buffer=0)))
    reader = SampleReader(sample_shards)
    for view, index in zip(b["views"][0].numpy(), b["index"].tolist()):
        with Image.open(io.BytesIO(reader.component(index, "jpg"))) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = 256 / min(w, h)
            im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
            x0, y0 = (int((n - 224) / 2 + 0.5) for n in im.size)     # DALI rounds a half pixel up
            ref = np.asarray(im.crop((x0, y0, x0 + 224, y0 + 224)), np.float64)
        grey = (view.transpose(1, 2, 0) * std + mean) * 255.0          # back to grey levels, HWC
        diff = np.abs(grey - ref)
        assert view.shape == (3, 224, 224) and np.median(diff) < 1.0 and np.percentile(diff, 99) < 10, \
            (index, np.median(diff), np.percentile(diff, 99))


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


def test_damaged_header_is_replaced_by_the_placeholder(sample_shards, tmp_path):
    """A JPEG with valid SOI / EOI markers but a damaged header (a frame header too short for its
    fields) fails the reader's structure check, so it is served as the placeholder, counted, and the
    epoch completes."""
    d = str(tmp_path / "badheader")
    shutil.copytree(sample_shards, d)
    m = load(d)
    shard = m["shards"][0]
    off, size, _ = read_index(os.path.join(d, shard["index"]))[5]["jpg"]
    with open(os.path.join(d, shard["path"]), "r+b") as f:
        f.seek(off + 2)
        f.write(b"\xff\xc0\x00\x02" + b"\x00" * 64)  # garbage frame header right after SOI
    loader = make_loader("multicrop", d, batch_size=16, preset="tiny", seed=0, shuffle_buffer=0)
    seen, broken = [], []
    for b in loader:
        seen += b["index"].tolist()
        broken += b["index"][~b["intact"]].tolist()
    assert sorted(seen) == list(range(96))
    assert broken == [shard["first_index"] + 5] and loader.corrupt_total == 1


def _segments(jpg: bytes) -> dict:
    """Offset of the first segment of each marker before the first scan."""
    out, i = {}, 2
    while i < len(jpg):
        m = jpg[i + 1]
        out.setdefault(m, i)
        if m == 0xDA:
            return out
        i += 2 + int.from_bytes(jpg[i + 2:i + 4], "big")
    return out


def test_jpeg_structure_check(photos, sample_shards):
    """The reader's check (pipelines.kernels.jpeg_ok) passes every real encoding -- no valid image may
    become a placeholder -- and fails truncation and each header damage that makes libjpeg give up."""
    from pipelines.kernels import PLACEHOLDER_JPEG, jpeg_ok

    def ok(data: bytes) -> bool:
        return bool(jpeg_ok(np.frombuffer(data, np.uint8)))

    cat = photos["cat"]
    good = [jpeg_bytes(cat, quality=q, subsampling=s) for q in (30, 95) for s in (0, 2)]
    good += [jpeg_bytes(cat, progressive=True), jpeg_bytes(cat, optimize=True), jpeg_bytes(cat[..., 0]),
             jpeg_bytes(Image.fromarray(cat).convert("CMYK")), bytes(PLACEHOLDER_JPEG)]
    reader = SampleReader(sample_shards)
    good += [reader.component(i, "jpg") for i in range(96)]
    assert all(ok(g) for g in good)
    base = jpeg_bytes(cat[:64, :64])
    seg = _segments(base)

    def patched(marker: int, offset: int, data: bytes) -> bytes:
        i = seg[marker] + offset
        return base[:i] + data + base[i + len(data):]

    bad = {"truncated": base[: len(base) // 2], "no EOI": base[:-2] + b"\0\0", "empty": b"",
           "short frame header": patched(0xC0, 2, b"\x00\x02"),
           "zero height": patched(0xC0, 5, b"\x00\x00"),
           "12-bit": patched(0xC0, 4, b"\x0c"),
           "sampling factor 0": patched(0xC0, 11, b"\x00"),
           "Huffman counts": patched(0xC4, 5, b"\xff" * 16),
           "quantisation table 9": patched(0xC0, 12, b"\x09"),
           "scan component 9": patched(0xDA, 5, b"\x09"),
           "scan table 7": patched(0xDA, 6, b"\x77"),
           "segment past the end": patched(0xE0, 2, b"\xff\xff"),
           "no start of scan": base[:seg[0xDA]] + b"\xff\xd9"}
    assert ok(base) and not [name for name, data in bad.items() if ok(data)]


def _progressive_shards(root: str, photos: dict) -> tuple[str, int]:
    """Shards of progressive JPEGs (they pass the builder untouched); the second Huffman table of
    sample 3 -- after the first scan, where the reader's check does not look -- is made impossible."""
    src = os.path.join(root, "src")
    os.makedirs(src)
    for k, name in enumerate(["astronaut", "coffee", "cat", "rocket", "motorcycle", "flower"] * 2):
        with open(os.path.join(src, f"{k:02d}.jpg"), "wb") as f:
            f.write(jpeg_bytes(photos[name][: 160 + 8 * k, : 200], quality=85, progressive=True))
    out = os.path.join(root, "shards")
    build_small(out, sources=(src,), max_count=6, shuffle=False)
    m = load(out)
    shard = m["shards"][0]
    off, size, _ = read_index(os.path.join(out, shard["index"]))[3]["jpg"]
    with open(os.path.join(out, shard["path"]), "r+b") as f:
        f.seek(off)
        data = bytearray(f.read(size))
        sos = data.index(b"\xff\xda")
        dht = data.index(b"\xff\xc4", sos)
        data[dht + 5:dht + 21] = b"\xff" * 16         # 16 x 255 codes: "Bogus Huffman table definition"
        f.seek(off)
        f.write(data)
    return out, shard["first_index"] + 3


def test_undecodable_sample_is_a_one_line_loader_error(photos, tmp_path):
    """A sample whose header is sound up to the first scan but which still cannot be decoded is not
    swapped (the check cannot see it): the loader stops with ONE line that names rank, epoch, batch, the
    sample's shard and key (DALI's decoder error carries its source), and the command that checks the
    shards."""
    d, bad = _progressive_shards(str(tmp_path), photos)
    loader = make_loader("eval_val", d, batch_size=4, shuffle_buffer=0)
    with pytest.raises(LoaderError) as e:
        list(loader)
    msg, tar = str(e.value), os.path.join(d, load(d)["shards"][0]["path"])
    assert "\n" not in msg and "rank 0, epoch 0" in msg and "decode" in msg
    assert f"{tar}:" in msg and f"{bad:010d}" in msg, msg
    assert f"python -m sslkit.shard verify --full {d}" in msg


def test_clear_errors(sample_shards, tmp_path):
    with pytest.raises(SslkitError, match="unknown pipeline 'nope'; choose from colorization, eval_train"):
        make_loader("nope", sample_shards, batch_size=4)
    with pytest.raises(SpecError, match="unknown multi-crop preset"):
        make_loader("multicrop", sample_shards, batch_size=4, preset="3x300")
    with pytest.raises(SpecError, match="scale"):
        make_loader("multicrop", sample_shards, batch_size=4,
                    spec=MultiCropSpec((CropGroup(2, 64, (0.5, 0.2)),)))
    # an option the pipeline does not take: one line listing the ones it does
    with pytest.raises(SslkitError, match="unknown option.*colour_jitter; accepted: preset, spec, dtype, kernel$"):
        make_loader("multicrop", sample_shards, batch_size=4, colour_jitter=0.4)
    with pytest.raises(SpecError, match="kernel='fast': choose from"):
        make_loader("multicrop", sample_shards, batch_size=4, kernel="fast")
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
    """Same seed on both devices: the random draws (uniforms, windows, flips) are EXACTLY equal (they are
    CPU ops in both graphs); the pixels differ by the decoders (nvJPEG vs libjpeg-turbo) and resize
    kernels only: 99.9% of crop pixels within 6 grey levels, and the views' colour stage (the same torch
    code) within 0.1 (normalised units, ~6 grey levels) on 99.9% of values."""
    kw = dict(batch_size=16, preset="tiny", seed=4, with_params=True, kernel="torch")
    a = next(iter(make_loader("multicrop", sample_shards, **kw)))
    g = next(iter(make_loader("multicrop", sample_shards, device="gpu", **kw)))
    assert all(t.is_cuda for t in g["views"]) and g["index"].is_cuda
    for key in ("index", "label", "params.u", "params.windows", "params.flips"):
        assert torch.equal(a[key], g[key].cpu()), key
    for key in ("params.crops.0", "params.crops.1"):
        diff = (a[key].int() - g[key].cpu().int()).abs()
        assert (diff <= 6).float().mean() > 0.999, (key, diff.float().mean())
    for va, vg in zip(a["views"], g["views"]):
        assert ((va - vg.cpu()).abs() <= 0.1).float().mean() > 0.999
    # the colour stage alone, on the same crops: the same torch code on both devices
    from pipelines.multicrop import MultiCrop
    fam = MultiCrop(preset="tiny", kernel="torch")
    batch = {"u": a["params.u"], "viewgroup.0": a["params.crops.0"], "viewgroup.1": a["params.crops.1"]}
    on_cpu = fam.postprocess(dict(batch))["views"]
    on_gpu = fam.postprocess({k: v.cuda() for k, v in batch.items()})["views"]
    for c, v in zip(on_cpu, on_gpu):
        torch.testing.assert_close(v.cpu(), c, atol=1e-4, rtol=0)
