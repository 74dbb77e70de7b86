"""Tests for sslkit.color: Lab conversion, 313 ab bins, soft encoding, rebalancing, prior CLI.

sslkit.color is torch only; its numpy twins live in tests/reference.py and are checked here too
(against OpenCV), since the pipeline tests use them as the reference."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

import reference
from sslkit import color

# sha256 of the 313 standard-order bin centres (Zhang et al.'s pts_in_hull.npy) as float32 bytes, so the
# shipped table is pinned without reading anything outside the repository.
REFERENCE_BINS_SHA256 = "5275882a7263e5264c890b6219e787c430c6ce018f3b2799e2f320ea4ed82069"
PHOTOS = ("astronaut", "coffee", "chelsea")


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: getattr(skdata, name)() for name in PHOTOS}


def _cv2_lab(rgb_u8: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb_u8.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def _random_ab(n: int, seed: int = 0, lo: float = -110.0, hi: float = 110.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, size=(n, 2)).astype(np.float32)


def _brute_sq_dist(ab: np.ndarray) -> np.ndarray:
    """float64 squared distances to the reference bins of ab as the encoder sees it (snapped to 1/SNAP)."""
    bins = color.ab_bins().astype(np.float64)  # pinned to the reference by test_bins_identical_to_reference
    snapped = np.round(ab.astype(np.float64) * color.SNAP) / color.SNAP
    return ((snapped[:, None, :] - bins[None]) ** 2).sum(-1)


def lab_t(rgb) -> torch.Tensor:
    """sslkit.color's Lab of channels-last data (numpy or torch), channels last."""
    x = torch.as_tensor(rgb)
    batch = x if x.ndim == 4 else x[None]
    lab = color.rgb_to_lab_nchw(batch.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return lab if x.ndim == 4 else lab[0]


def rgb_t(lab) -> torch.Tensor:
    x = torch.as_tensor(lab)
    batch = x if x.ndim == 4 else x[None]
    rgb = color.lab_to_rgb_nchw(batch.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return rgb if x.ndim == 4 else rgb[0]


# ------------------------------------------------------------------------------------------ Lab

def test_known_values():
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], dtype=np.uint8)
    lab = reference.rgb_to_lab(rgb)
    assert lab.dtype == np.float32 and lab.shape == (1, 3, 3)
    np.testing.assert_allclose(lab[0, 0], [100.0, 0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(lab[0, 1], [0.0, 0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(lab[0, 2], [53.24, 80.09, 67.20], atol=0.01)
    lab_torch = lab_t(torch.from_numpy(rgb))
    assert isinstance(lab_torch, torch.Tensor) and lab_torch.dtype == torch.float32
    np.testing.assert_allclose(lab_torch.numpy(), lab, atol=1e-3)


def test_round_trip_in_gamut():
    rng = np.random.default_rng(1)
    rgb = rng.uniform(0, 1, size=(4, 32, 32, 3)).astype(np.float32)
    back = reference.lab_to_rgb(reference.rgb_to_lab(rgb))
    assert back.dtype == np.float32 and back.shape == rgb.shape
    assert np.abs(back - rgb).max() < 1e-3
    back_t = rgb_t(lab_t(torch.from_numpy(rgb)))
    assert torch.is_tensor(back_t) and (back_t - torch.from_numpy(rgb)).abs().max() < 1e-3
    # Including the dark linear segments of both sRGB and f(t).
    dark = np.linspace(0, 0.06, 61, dtype=np.float32)[:, None, None].repeat(3, -1)
    assert np.abs(reference.lab_to_rgb(reference.rgb_to_lab(dark)) - dark).max() < 1e-4
    assert (rgb_t(lab_t(dark)) - torch.from_numpy(dark)).abs().max() < 1e-4


def test_lab_to_rgb_clips_out_of_gamut():
    lab = np.array([[[50.0, 120.0, -120.0], [100.0, 0.0, 100.0]]], dtype=np.float32)
    for rgb in (reference.lab_to_rgb(lab), rgb_t(torch.from_numpy(lab)).numpy()):
        assert np.isfinite(rgb).all() and rgb.min() >= 0.0 and rgb.max() <= 1.0


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_agrees_with_opencv_on_photos(photos, backend, dtype):
    for name, img in photos.items():
        x = img if dtype == "uint8" else img.astype(np.float32) / 255.0
        if backend == "torch":
            lab = lab_t(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        else:
            lab = reference.rgb_to_lab(x)
        mad = np.abs(lab - _cv2_lab(img)).mean(axis=(0, 1))
        assert (mad < 0.5).all(), f"{name}: per-channel MAD {mad}"


def test_nchw_and_batches_match_numpy(photos):
    imgs = np.stack([photos["astronaut"][:256, :256], photos["coffee"][:256, :256]])
    ref = reference.rgb_to_lab(imgs)                    # NxHxWx3 numpy
    assert ref.shape == imgs.shape
    np.testing.assert_allclose(ref[1], reference.rgb_to_lab(imgs[1]), atol=1e-5)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    lab = color.rgb_to_lab_nchw(x)
    assert lab.shape == x.shape and lab.dtype == torch.float32
    np.testing.assert_allclose(lab.permute(0, 2, 3, 1).numpy(), ref, atol=1e-3)
    back = color.lab_to_rgb_nchw(lab)
    assert (back - x).abs().max() < 1e-3


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        color.rgb_to_lab_nchw(torch.full((1, 3, 2, 2), 200.0))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        color.rgb_to_lab_nchw(torch.zeros(1, 4, 4, 3))
    with pytest.raises(TypeError, match="torch tensor"):
        color.rgb_to_lab_nchw(np.zeros((1, 3, 4, 4), dtype=np.uint8))


# ----------------------------------------------------------------------------------------- bins

def test_bins_identical_to_reference():
    bins = color.ab_bins()
    assert bins.shape == (313, 2) and bins.dtype == np.float32
    assert hashlib.sha256(bins.tobytes()).hexdigest() == REFERENCE_BINS_SHA256
    assert tuple(bins[0]) == (-90.0, 50.0)
    assert os.path.isfile(color.BINS_FILE)
    bins[0] = 0.0                                        # the caller gets a copy, not the cache
    assert tuple(color.ab_bins()[0]) == (-90.0, 50.0)


def test_quantize_picks_nearest_bin():
    ab = _random_ab(5000, seed=2)
    truth = _brute_sq_dist(ab).argmin(axis=1)
    q = color.quantize_ab(ab)
    assert q.dtype == np.int64 and q.shape == (5000,)
    np.testing.assert_array_equal(q, truth)
    qt = color.quantize_ab(torch.from_numpy(ab.reshape(50, 100, 2)))
    assert qt.shape == (50, 100)
    np.testing.assert_array_equal(qt.reshape(-1).numpy(), truth)
    # The bin centres themselves map to their own index.
    np.testing.assert_array_equal(color.quantize_ab(color.ab_bins()), np.arange(313))


def test_soft_encode_properties():
    k, sigma = 10, 5.0
    ab = _random_ab(2000, seed=3, lo=-80.0, hi=80.0)
    dense = color.soft_encode(ab, k=k, sigma=sigma)
    assert dense.shape == (2000, 313) and dense.dtype == np.float32
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-5)
    assert ((dense > 0).sum(axis=1) == k).all()
    d2 = _brute_sq_dist(ab)
    np.testing.assert_array_equal(dense.argmax(axis=1), d2.argmin(axis=1))
    # The non-zeros sit on the k nearest bins.
    nearest = np.sort(np.argsort(d2, axis=1, kind="stable")[:, :k], axis=1)   # ties: the lower bin, as soft_encode
    np.testing.assert_array_equal(np.sort(np.nonzero(dense)[1].reshape(-1, k), axis=1), nearest)
    # Weight ratios follow the Gaussian kernel: w1 / w2 = exp(-(d1^2 - d2^2) / (2 sigma^2)).
    for s in (sigma, 12.0):
        idx, w = color.soft_encode_topk(ab, k=k, sigma=s)
        rows = np.arange(len(ab))[:, None]
        dk = d2[rows, idx]
        expected = np.exp(-(dk[:, :1] - dk[:, 1:]) / (2 * s * s))
        np.testing.assert_allclose(w[:, :1] / w[:, 1:], expected, rtol=1e-3)
    idx5, w5 = color.soft_encode_topk(ab[:10], k=5)
    assert idx5.shape == (10, 5) and w5.shape == (10, 5)


def test_topk_expand_equals_dense_torch():
    ab = torch.from_numpy(_random_ab(6 * 7 * 8, seed=4).reshape(6, 7, 8, 2))
    idx, w = color.soft_encode_topk(ab, k=10, sigma=5.0)
    assert idx.shape == (6, 7, 8, 10) and idx.dtype == torch.int64 and w.dtype == torch.float32
    dense = color.expand_topk(idx, w)
    assert dense.shape == (6, 7, 8, 313)
    assert torch.equal(dense, color.soft_encode(ab, k=10, sigma=5.0))
    np.testing.assert_array_equal(color.expand_topk(idx.numpy(), w.numpy()), dense.numpy())
    # Far out-of-gamut ab stays finite (no 0/0 from underflow).
    _, wfar = color.soft_encode_topk(torch.tensor([[1000.0, -1000.0]]))
    assert torch.isfinite(wfar).all() and abs(float(wfar.sum()) - 1) < 1e-5


# ---------------------------------------------------------------------------------- rebalancing

def test_rebalance_weights():
    rng = np.random.default_rng(5)
    prior = rng.gamma(0.3, size=313)
    prior[:7] = 0.0                                     # some unseen bins
    prior /= prior.sum()
    f = color.rebalance_weights(prior)
    assert f.shape == (313,) and f.dtype == np.float64 and np.isfinite(f).all()
    assert abs(np.sum(prior * f) - 1.0) < 1e-12
    seen = prior > 0
    order = np.argsort(prior[seen])                     # rarer bins get larger factors
    assert (np.diff(f[seen][order]) <= 1e-12).all()
    assert f[~seen].max() == f[seen].max()              # unseen bins: the largest finite factor
    # Matches Zhang's formula written out (gamma=0.5 mixing, alpha=1 exponent, uniform over non-zero).
    uni = seen / seen.sum()
    mix = 0.5 * prior + 0.5 * uni
    ref = 1.0 / mix[seen]
    ref /= np.sum(prior[seen] * ref)
    np.testing.assert_allclose(f[seen], ref, rtol=1e-12)
    # gamma=1 (pure uniform mix) gives equal weights.
    np.testing.assert_allclose(color.rebalance_weights(prior, gamma=1.0)[seen], 1.0)


def test_pixel_weights():
    prior = np.linspace(1, 2, 313)
    prior /= prior.sum()
    f = color.rebalance_weights(prior)
    ab = _random_ab(300, seed=6, lo=-60.0, hi=60.0)
    hard = color.quantize_ab(ab)
    w_soft = color.pixel_weights(color.soft_encode(ab), f)
    w_hard = color.pixel_weights(hard, f)
    np.testing.assert_allclose(w_soft, f[hard].astype(np.float32))
    np.testing.assert_array_equal(w_soft, w_hard)
    w_t = color.pixel_weights(torch.from_numpy(hard), torch.from_numpy(f))
    assert torch.is_tensor(w_t) and np.array_equal(w_t.numpy(), w_hard)


def test_nongray_mask():
    gray = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, axis=0).repeat(3, -1)
    assert not color.nongray_mask(lab_t(gray)[..., 1:])
    colour = gray.copy()
    colour[10, 10] = (255, 0, 0)                        # one coloured pixel is enough
    batch = lab_t(np.stack([gray, colour]))[..., 1:].numpy()
    np.testing.assert_array_equal(color.nongray_mask(batch), [False, True])
    # Same answer for channels-first torch batches, and the threshold is strict (> 5).
    nchw = torch.from_numpy(batch).permute(0, 3, 1, 2)
    assert color.nongray_mask(nchw).tolist() == [False, True]
    edge = np.zeros((1, 4, 4, 2), dtype=np.float32)
    edge[0, 0, 0, 1] = 5.0
    assert color.nongray_mask(edge).tolist() == [False]
    edge[0, 0, 0, 1] = -5.01
    assert color.nongray_mask(edge).tolist() == [True]


# ---------------------------------------------------------------------------------------- prior

def test_ab_prior_in_memory(photos):
    prior = color.ab_prior(photos.values(), size=64)
    assert prior.shape == (313,) and prior.dtype == np.float64
    assert abs(prior.sum() - 1.0) < 1e-12
    # Equals the histogram of nearest bins of the downscaled photos.
    counts = np.zeros(313)
    for img in photos.values():
        h, w = img.shape[:2]
        s = 64 / max(h, w)
        small = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        counts += np.bincount(color.quantize_ab(lab_t(small)[..., 1:]).flatten().numpy(), minlength=313)
    np.testing.assert_allclose(prior, counts / counts.sum())
    with pytest.raises(ValueError, match="no pixels"):
        color.ab_prior([])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> str:
    from sslkit.shard import BuildOptions, build

    out = str(tmp_path_factory.mktemp("color") / "s")
    build(BuildOptions(sources=("sample:60",), out=out, max_count=30, workers=1, progress=False))
    return out


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sslkit.color", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)


def test_prior_cli(shard_dir, tmp_path):
    out = tmp_path / "prior.npy"
    r = _run_cli("prior", "--data", shard_dir, "--out", str(out), "--limit", "40", "--size", "32")
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "40 images" in r.stdout
    prior = np.load(out)
    assert prior.shape == (313,) and prior.dtype == np.float64
    assert abs(prior.sum() - 1.0) < 1e-12 and (prior >= 0).all()
    # The CLI reads the same images as the in-process iterator (across both shards).
    images = list(color.shard_images(shard_dir, limit=40))
    assert len(images) == 40 and all(im.dtype == np.uint8 and im.shape[-1] == 3 for im in images)
    np.testing.assert_allclose(prior, color.ab_prior(images, size=32))


def test_prior_cli_bad_input(tmp_path):
    r = _run_cli("prior", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "p.npy"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
    assert not (tmp_path / "p.npy").exists()


def test_lightness_only_and_uint8_table_match_the_full_conversion():
    from sslkit.color import rgb_to_L_nchw, rgb_to_lab_nchw
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.integers(0, 256, (2, 3, 17, 19), dtype=np.uint8))
    lab = rgb_to_lab_nchw(x)
    assert torch.allclose(rgb_to_L_nchw(x), lab[:, :1], atol=1e-4)
    # the uint8 lookup table and the float path agree (float path: pow per value)
    lab_float = rgb_to_lab_nchw(x.float() / 255.0)
    assert (lab - lab_float).abs().max() < 1e-3


def test_nearest_bins_break_exact_ties_by_bin_order_whatever_the_candidate_order():
    """The bins are chosen the same way on every device: points on exact ties (gray at (0, 0): four bins
    at 10; (5, 5): four at 5 sqrt 2; bisectors a = 5, b = 15), and the same points moved by the ~1e-5
    a GPU's float32 Lab differs by, give the lower bin index first -- also with every cell's candidate
    list shuffled -- and equal the exhaustive search over all 313 bins."""
    ties = torch.tensor([[0.0, 0.0], [5.0, 5.0], [5.0, 0.0], [0.0, -5.0], [-5.0, 15.0], [35.0, -25.0]])
    wiggled = ties + torch.tensor([[1e-5, -2e-5], [-3e-5, 1e-5], [2e-5, 3e-5], [-1e-5, -1e-5], [3e-5, -3e-5],
                                   [-2e-5, 2e-5]])
    bins = torch.from_numpy(color.ab_bins())
    for k in (1, 2, 4, 5, 9, 10, 13):
        idx, w = color.NearestBins(k)(ties, 5.0)
        ref_idx, ref_w = reference.soft_encode_exhaustive(ties, k, 5.0)
        assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w), k
        assert torch.equal(color.NearestBins(k)(wiggled, 5.0)[0], idx), k
        shuffled = color.NearestBins(k)
        g = torch.Generator().manual_seed(k)
        shuffled.candidates = torch.stack([row[torch.randperm(len(row), generator=g)] for row in shuffled.candidates])
        assert torch.equal(shuffled(ties, 5.0)[0], idx), k
        # within every run of equal distances the bin indices increase
        d2 = ((ties[:, None] - bins[idx]) ** 2).sum(-1)
        same = d2[:, 1:] == d2[:, :-1]
        assert (idx[:, 1:][same] > idx[:, :-1][same]).all()
    # gray: the nearest is bin (0, 0), then its four neighbours at distance 10 in index order
    idx, _ = color.NearestBins(5)(ties[:1], 5.0)
    assert tuple(bins[idx[0, 0]].tolist()) == (0.0, 0.0)
    assert idx[0, 1:].tolist() == sorted(idx[0, 1:].tolist())
    assert sorted(map(tuple, bins[idx[0, 1:]].tolist())) == [(-10.0, 0.0), (0.0, -10.0), (0.0, 10.0), (10.0, 0.0)]
