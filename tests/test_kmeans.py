"""Spherical k-means (DeepClusterV2): parity with the float64 numpy reference, cluster
recovery, empty clusters, determinism, chunking, the global assignment table, and a real 2-process
gloo run that must equal the single-process run on the concatenated data.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from math import comb

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import sslkit.kmeans as km
from sslkit.kmeans import (IGNORE_INDEX, assign, gather_assignments, init_indices, spherical_kmeans,
                           spherical_kmeans_numpy)


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: with a thread pool, its barriers cost more than the maths, and far
    more on a busy machine. Restored after each test so other test files keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n: int = 2000, d: int = 16, n_clusters: int = 5, spread: float = 0.05, seed: int = 0):
    """n unit vectors in n_clusters tight, well separated groups: (x [n, d] float32, labels, centers)."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_clusters, d, generator=g), dim=1)
    labels = torch.randint(0, n_clusters, (n,), generator=g)
    x = F.normalize(centers[labels] + spread * torch.randn(n, d, generator=g), dim=1)
    return x, labels, centers


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert & Arabie's ARI: 1 for identical partitions (up to relabelling), ~0 for random ones."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    pairs = sum(comb(int(v), 2) for v in table.ravel())
    rows = sum(comb(int(v), 2) for v in table.sum(1))
    cols = sum(comb(int(v), 2) for v in table.sum(0))
    expected = rows * cols / comb(len(a), 2)
    return (pairs - expected) / (0.5 * (rows + cols) - expected)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("k, seed", [(5, 0), (5, 3), (12, 1)])
def test_matches_numpy_reference(k, seed):
    x, _, _ = blobs()
    c, a = spherical_kmeans(x, k, iters=10, generator=seeded(seed))
    c_ref, a_ref = spherical_kmeans_numpy(x.numpy(), k, 10, init_indices(len(x), k, seeded(seed)).numpy())
    assert a.dtype == torch.int64 and a.shape == (len(x),)
    assert c.dtype == torch.float32 and c.shape == (k, 16)
    np.testing.assert_array_equal(a.numpy(), a_ref)
    np.testing.assert_allclose(c.numpy(), c_ref, atol=1e-5)
    np.testing.assert_allclose(torch.linalg.vector_norm(c, dim=1).numpy(), 1.0, atol=1e-6)


def test_recovers_true_clusters():
    x, labels, centers = blobs()
    # Lloyd's iterations from random rows (no k-means++) can only find all 5 groups if every group
    # got a seed, so take the first seed whose init rows cover all groups.
    seed = next(s for s in range(100) if len(set(labels[init_indices(len(x), 5, seeded(s))].tolist())) == 5)
    c, a = spherical_kmeans(x, 5, generator=seeded(seed))
    assert adjusted_rand_index(a.numpy(), labels.numpy()) > 0.999
    # Each centroid is (nearly) the direction of one true centre, one-to-one.
    cos = c @ centers.t()
    assert sorted(cos.argmax(1).tolist()) == [0, 1, 2, 3, 4]
    assert cos.max(1).values.min() > 0.99


def test_empty_cluster_keeps_far_centroid():
    x, _, _ = blobs(n=500, d=8)
    x = F.normalize(x.abs(), dim=1)  # all rows in the positive orthant
    init = torch.cat([x[:4], -torch.eye(8)[:1]])  # the last centroid is far from every row
    c, a = spherical_kmeans(x, 5, iters=5, init_centroids=init)
    assert not (a == 4).any()
    assert torch.equal(c[4], init[4])
    assert torch.bincount(a, minlength=5)[:4].sum() == len(x)
    # The reference needs init rows from its data: append the far point as a row of its own. It then
    # is the only member of cluster 4, which leaves that centroid and every other row's label alone.
    c_ref, a_ref = spherical_kmeans_numpy(np.concatenate([x.numpy(), init[4:].numpy()]), 5, 5,
                                          np.array([0, 1, 2, 3, len(x)]))
    np.testing.assert_array_equal(a.numpy(), a_ref[:-1])
    np.testing.assert_allclose(c.numpy(), c_ref, atol=1e-5)


def test_more_clusters_than_distinct_points():
    # 3 distinct points (basis vectors: dot products are exactly 0 or 1, so ties are exact) repeated
    # 10 times; any 5 init rows repeat a point, and argmax sends tied rows to the lowest index. Take a
    # seed whose init holds all 3 points (otherwise a missing point ties at 0 and joins cluster 0).
    x = torch.eye(4)[torch.arange(30) % 3]
    seed = next(s for s in range(100) if len(set((init_indices(30, 5, seeded(s)) % 3).tolist())) == 3)
    init_idx = init_indices(30, 5, seeded(seed))
    c, a = spherical_kmeans(x, 5, iters=3, generator=seeded(seed))
    assert torch.equal(c, x[init_idx])  # filled clusters' means are their point; empty ones keep theirs
    counts = torch.bincount(a, minlength=5)
    assert (counts > 0).sum() == 3 and counts.sum() == 30
    first = {}
    for j, row in enumerate(init_idx.tolist()):
        first.setdefault(row % 3, j)
    assert a.tolist() == [first[i % 3] for i in range(30)]
    c_ref, a_ref = spherical_kmeans_numpy(x.numpy(), 5, 3, init_idx.numpy())
    np.testing.assert_array_equal(a.numpy(), a_ref)
    np.testing.assert_allclose(c.numpy(), c_ref, atol=1e-7)


def test_deterministic_and_resumable_generator():
    x, _, _ = blobs(n=600)
    g = seeded(123)
    state = g.get_state()
    c1, a1 = spherical_kmeans(x, 7, generator=g)
    after_one = g.get_state()
    c2, a2 = spherical_kmeans(x, 7, generator=g)  # the next epoch's clustering: new init
    assert not torch.equal(init_indices(600, 7, seeded(123)), init_indices(600, 7, g))
    g.set_state(state)  # resume from the saved state: the same sequence again
    assert torch.equal(spherical_kmeans(x, 7, generator=g)[1], a1)
    assert torch.equal(spherical_kmeans(x, 7, generator=g)[0], c2)
    # One draw per call whatever the number of rows, so ranks with different n stay in lockstep.
    g_small = seeded(123)
    spherical_kmeans(x[:50], 7, generator=g_small)
    assert torch.equal(g_small.get_state(), after_one)
    assert torch.equal(c1, spherical_kmeans(x, 7, generator=seeded(123))[0])


@pytest.mark.parametrize("chunk_size", [1, 7, 333, 699])
def test_chunked_e_step_equals_unchunked(chunk_size):
    x, _, _ = blobs(n=700)
    c_full, a_full = spherical_kmeans(x, 9, generator=seeded(5), chunk_size=len(x))
    c, a = spherical_kmeans(x, 9, generator=seeded(5), chunk_size=chunk_size)
    assert torch.equal(a, a_full)
    assert torch.equal(c, c_full)


def test_default_chunking_covers_every_row(monkeypatch):
    x, _, _ = blobs(n=1001)
    c = F.normalize(torch.randn(40, 16, generator=seeded(2)), dim=1)
    monkeypatch.setattr(km, "E_STEP_MAX_ELEMENTS", 40 * 64)  # 64-row chunks: 16 chunks, a ragged last one
    assert torch.equal(assign(x, c), (x @ c.t()).argmax(1))


def test_bad_inputs_fail_loudly():
    x, _, _ = blobs(n=100)
    with pytest.raises(ValueError, match="L2-normalised"):
        spherical_kmeans(x * 2, 3)
    with pytest.raises(ValueError, match="only 100"):
        spherical_kmeans(x, 101)
    with pytest.raises(ValueError, match="k must be"):
        spherical_kmeans(x, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        spherical_kmeans(x, 3, chunk_size=0)
    with pytest.raises(ValueError, match="init_centroids must have shape"):
        spherical_kmeans(x, 3, init_centroids=x[:2])
    with pytest.raises(ValueError, match="2-D"):
        spherical_kmeans(x[0], 3)
    with pytest.raises(ValueError, match="not initialised"):
        spherical_kmeans(x, 3, group=object())


def test_gather_assignments_single_process():
    table = gather_assignments(torch.tensor([3, 1, 4, 1]), torch.tensor([5, 0, 2, 5]), 7)
    # Index 5 appears twice: the last occurrence wins. Indices 1, 3, 4, 6 are held by nobody.
    assert table.tolist() == [1, IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX, 1, IGNORE_INDEX]
    assert table.dtype == torch.int64
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        gather_assignments(torch.tensor([1]), torch.tensor([7]), 7)
    with pytest.raises(ValueError, match="equal length"):
        gather_assignments(torch.tensor([1, 2]), torch.tensor([0]), 7)


# ---- two processes over gloo --------------------------------------------------------------------

N_TOTAL, SPLIT, K = 2600, 1150, 8  # 2000 rows on two ranks (1150 + 850); 600 dataset indices unheld


def _dist_data():
    x, _, _ = blobs(n=2000)
    dataset_idx = torch.randperm(N_TOTAL, generator=seeded(9))[:2000]
    return x, dataset_idx


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # One thread per process: two ranks on two cores with full thread pools each (plus gloo's
    # polling) slow the collectives down by an order of magnitude.
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        # Loopback only: gloo otherwise picks the interface of the hostname, which sandboxes may lack.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, dataset_idx = _dist_data()
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        xs, idx = x[part], dataset_idx[part]
        # Rank 1's generator is seeded differently on purpose: only rank 0's init counts.
        c, a = spherical_kmeans(xs, K, generator=seeded(7 if rank == 0 else 1000 + rank))
        table = gather_assignments(a, idx, N_TOTAL)
        # An explicit subgroup and rank-dependent init_centroids: rank 0's are broadcast.
        group = dist.new_group([0, 1])
        init = F.normalize(torch.randn(K, 16, generator=seeded(rank)), dim=1)
        c_group, a_group = spherical_kmeans(xs, K, iters=4, group=group, init_centroids=init)
        # Both ranks hold dataset index 0 (with labels 10 and 11): the higher rank wins.
        dup = gather_assignments(torch.tensor([10 + rank, 20 + rank]), torch.tensor([0, 1 + rank]), 4, group=group)
        # A bad input on one rank must raise on both, not hang the other in a collective.
        try:
            spherical_kmeans(xs * (2.0 if rank == 1 else 1.0), K)
            error = ""
        except ValueError as e:
            error = str(e)
        torch.save(dict(c=c, a=a, table=table, c_group=c_group, a_group=a_group, dup=dup, error=error),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, deadline_s: float = 120.0) -> None:
    """Run `_worker` on ranks 0 and 1 and wait, failing (not hanging) past the deadline.

    On Linux the ranks are forked: a spawned rank re-imports torch, which doubles the test's CPU
    time. Forking is safe here for the reason it is in DataLoader workers: the child drops to one
    thread before any parallel op, and the parent never initialised torch.distributed.
    """
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False,
                             start_method=method)
    start = time.monotonic()
    while not ctx.join(timeout=1.0):  # raises if a rank failed
        if time.monotonic() - start > deadline_s:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the two gloo ranks did not finish within {deadline_s:.0f} s")


def test_two_process_gloo_equals_single_process(tmp_path):
    run_two_ranks(tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    x, dataset_idx = _dist_data()

    # Same init as rank 0 drew from its own rows, on the concatenated data in one process.
    init = x[:SPLIT][init_indices(SPLIT, K, seeded(7))]
    c, a = spherical_kmeans(x, K, init_centroids=init)
    assert torch.equal(r0["c"], r1["c"])
    torch.testing.assert_close(r0["c"], c, atol=1e-5, rtol=0)
    assert torch.equal(torch.cat([r0["a"], r1["a"]]), a)

    expected = torch.full((N_TOTAL,), IGNORE_INDEX, dtype=torch.int64)
    expected[dataset_idx] = a
    assert torch.equal(r0["table"], expected) and torch.equal(r1["table"], expected)
    assert (expected == IGNORE_INDEX).sum() == N_TOTAL - 2000

    init0 = F.normalize(torch.randn(K, 16, generator=seeded(0)), dim=1)  # what rank 0 passed
    c_g, a_g = spherical_kmeans(x, K, iters=4, init_centroids=init0)
    torch.testing.assert_close(r1["c_group"], c_g, atol=1e-5, rtol=0)
    assert torch.equal(torch.cat([r0["a_group"], r1["a_group"]]), a_g)

    assert r0["dup"].tolist() == [11, 20, 21, IGNORE_INDEX] == r1["dup"].tolist()
    assert "another rank" in r0["error"] and "L2-normalised" in r1["error"]
