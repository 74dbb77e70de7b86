"""Jigsaw permutation sets: greedy selection, Hamming stats, files and the CLI."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sslkit import permutations as perm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pairwise(a: np.ndarray) -> np.ndarray:
    """Hamming distance of every unordered pair, by brute force."""
    d = (a[:, None, :] != a[None, :, :]).sum(-1)
    return d[np.triu_indices(len(a), k=1)]


def assert_valid_set(a: np.ndarray, n: int, k: int):
    assert a.shape == (n, k) and a.dtype == np.int64
    assert np.array_equal(np.sort(a, axis=1), np.broadcast_to(np.arange(k), a.shape))
    assert len(np.unique(a, axis=0)) == n


def reference_greedy(k: int, first_row: np.ndarray, n: int, method: str) -> np.ndarray:
    """Algorithm 1 written plainly: recompute distances to the whole selected set each step,
    delete picks from a lexicographic pool, take numpy's first argmax of the mean or the min."""
    remaining = np.array(list(itertools.permutations(range(k))))
    i = int(np.flatnonzero(np.all(remaining == first_row, axis=1))[0])
    selected = [remaining[i]]
    remaining = np.delete(remaining, i, axis=0)
    while len(selected) < n:
        d = (np.array(selected)[:, None, :] != remaining[None, :, :]).sum(-1)
        j = int(np.argmax(d.mean(0) if method == "max_avg" else d.min(0)))
        selected.append(remaining[j])
        remaining = np.delete(remaining, j, axis=0)
    return np.array(selected)


def test_rows_are_unique_permutations():
    for method in perm.METHODS:
        assert_valid_set(perm.generate(300, method=method, seed=4), 300, 9)


@pytest.mark.parametrize("seed", [0, 1])
def test_100_max_avg_matches_published_distances(seed):
    a = perm.generate(100, "max_avg", seed=seed)
    stats = perm.hamming_stats(a)
    assert stats["min"] == 2 and round(stats["mean"], 2) == 8.08
    assert stats["min"] == pairwise(a).min() and stats["mean"] == pytest.approx(pairwise(a).mean())


def test_100_max_min_has_min_distance_6():
    assert perm.hamming_stats(perm.generate(100, "max_min", seed=0))["min"] == 6


def test_first_nine_max_avg_picks_are_mutually_at_distance_9():
    for seed in (0, 7):
        first9 = perm.generate(100, seed=seed)[:9]
        assert np.all(pairwise(first9) == 9)  # a Latin square: every tile visits every position once
    assert pairwise(perm.generate(100, seed=0)[:10]).min() < 9  # ...and the 10th pick cannot be


@pytest.mark.parametrize("method", perm.METHODS)
def test_matches_plain_reference_algorithm(method):
    a = perm.generate(40, method=method, seed=2, n_tiles=7)
    np.testing.assert_array_equal(a, reference_greedy(7, a[0], 40, method))


def test_deterministic_by_seed_and_prefix_stable():
    a = perm.generate(60, seed=3)
    np.testing.assert_array_equal(a, perm.generate(60, seed=3))
    assert not np.array_equal(a, perm.generate(60, seed=4))
    # Picks never depend on n, so a small set is the start of a larger one.
    np.testing.assert_array_equal(a[:20], perm.generate(20, seed=3))


def test_every_permutation_of_a_small_grid():
    a = perm.generate(24, n_tiles=4)
    assert_valid_set(a, 24, 4)
    assert perm.hamming_stats(perm.generate(4, n_tiles=4))["min"] == 4


def test_sixteen_tiles_uses_a_seeded_random_pool():
    a = perm.generate(30, seed=0, n_tiles=16)
    assert_valid_set(a, 30, 16)
    np.testing.assert_array_equal(a, perm.generate(30, seed=0, n_tiles=16))
    assert not np.array_equal(a, perm.generate(30, seed=1, n_tiles=16))
    assert perm.pool_size(30, 16) == 100_000 and perm.pool_size(5000, 16) == 500_000
    # Random 16-tile permutations differ in ~15 places; greedy picks should be at least as spread.
    assert perm.hamming_stats(a)["min"] >= 12 and perm.hamming_stats(a)["mean"] > 15


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be >= 1"),
    (dict(n=362_881), "larger than 9! = 362880"),
    (dict(n=7, n_tiles=3), "larger than 3! = 6"),
    (dict(n=10, method="max"), "unknown method 'max'"),
    (dict(n=10, n_tiles=1), "n_tiles must be between"),
    (dict(n=10, seed=-1), "seed must be >= 0"),
    (dict(n=2.5), "must be integers"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        perm.generate(**kwargs)


def test_hamming_stats_against_brute_force():
    rng = np.random.default_rng(0)
    a = np.array([rng.permutation(9) for _ in range(400)])
    d = pairwise(a)
    stats = perm.hamming_stats(a)
    assert stats == {"min": int(d.min()), "mean": pytest.approx(d.mean())}
    assert isinstance(stats["min"], int) and isinstance(stats["mean"], float)
    assert perm.hamming_stats(a + 1) == stats  # the base does not matter
    with pytest.raises(ValueError, match="at least 2 rows"):
        perm.hamming_stats(a[:1])


def test_save_load_round_trip_with_sidecar(tmp_path):
    a = perm.generate(100, "max_min", seed=5)
    path = perm.save(tmp_path / "p100.npy", a, method="max_min", seed=5)
    np.testing.assert_array_equal(perm.load(path), a)
    meta = json.loads((tmp_path / "p100.json").read_text())
    assert meta["n"] == 100 and meta["n_tiles"] == 9 and meta["method"] == "max_min" and meta["seed"] == 5
    assert meta["hamming_min"] == 6 and meta["hamming_mean"] == pytest.approx(perm.hamming_stats(a)["mean"])
    assert sorted(os.listdir(tmp_path)) == ["p100.json", "p100.npy"]  # no temporary files left behind
    with pytest.raises(ValueError, match="must end in .npy"):
        perm.save(tmp_path / "p100.bin", a)


def test_load_shifts_published_one_based_files(tmp_path):
    a = perm.generate(100, seed=0)
    np.save(tmp_path / "naroozi_perms_100_patches_9_max.npy", (a + 1).astype(np.int32))
    b = perm.load(tmp_path / "naroozi_perms_100_patches_9_max.npy")
    np.testing.assert_array_equal(b, a)
    assert b.dtype == np.int64 and b.min() == 0
    np.save(tmp_path / "float.npy", a.astype(np.float64))  # integral floats are accepted too
    np.testing.assert_array_equal(perm.load(tmp_path / "float.npy"), a)


@pytest.mark.parametrize("name, content, message", [
    ("repeated_tile.npy", np.array([[0, 1, 2], [0, 0, 2]]), r"row 1 is not a permutation"),
    ("out_of_range.npy", np.array([[0, 1, 2], [0, 1, 3]]), r"row 1 is not a permutation"),
    ("duplicate_rows.npy", np.array([[0, 1, 2], [2, 1, 0], [0, 1, 2]]), r"rows \[0, 2\] are the same"),
    ("one_d.npy", np.arange(9), r"expected shape"),
    ("fractional.npy", np.array([[0, 1, 2.5]]), r"not integers"),
    ("text.npy", b"not a numpy file", r"not a readable .npy"),
])
def test_load_rejects_malformed_files(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    with pytest.raises(ValueError, match=message) as err:
        perm.load(path)
    assert name in str(err.value)


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "sslkit.permutations", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_a_set_and_fails_cleanly(tmp_path):
    r = _cli("--n", "100", "--seed", "1", "--out", str(tmp_path / "p.npy"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "min 2, mean 8.080" in r.stdout and "generated in" in r.stdout
    np.testing.assert_array_equal(perm.load(tmp_path / "p.npy"), perm.generate(100, seed=1))
    assert json.loads((tmp_path / "p.json").read_text())["seed"] == 1

    r = _cli("--n", "7", "--tiles", "3", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: n = 7 is larger than 3! = 6 permutations of 3 tiles"]

    r = _cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "default: max_avg" in r.stdout and "--tiles" in r.stdout
