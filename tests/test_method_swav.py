"""SwAV (sslkit/methods/swav.py) and distributed Sinkhorn (sslkit/sinkhorn.py): Sinkhorn's marginals
and a float64 reference, 2 gloo ranks with half the batch each equal to one process with all of it,
the swapped-prediction loss by hand, shapes, the loss falling, the prototype freeze, the queue."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkit.config import ConfigError, TrainConfig, apply_overrides
from sslkit.methods import RunContext, method_entry
from sslkit.methods.swav import queue_rows_per_rank, swav_loss
from sslkit.optim import LARS, param_groups
from sslkit.sinkhorn import sinkhorn


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def cosine_scores(b: int, k: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.t()


def sinkhorn_numpy(scores: np.ndarray, epsilon: float, iters: int) -> np.ndarray:
    """swav's first distributed_sinkhorn (r / u and c / column-sum scalings), float64, one process."""
    q = np.exp(scores.astype(np.float64) / epsilon).T
    q /= q.sum()
    k, b = q.shape
    r, c = np.full(k, 1 / k), np.full(b, 1 / b)
    for _ in range(iters):
        q *= (r / q.sum(axis=1))[:, None]
        q *= (c / q.sum(axis=0))[None, :]
    return (q / q.sum(axis=0, keepdims=True)).T


# -- Sinkhorn -------------------------------------------------------------------------------------

def test_sinkhorn_marginals_are_uniform_and_match_a_float64_reference():
    b, k = 64, 10
    s = cosine_scores(b, k)
    q = sinkhorn(s, epsilon=0.05, iters=3)
    assert q.shape == (b, k) and q.dtype == torch.float32 and (q >= 0).all()
    np.testing.assert_allclose(q.numpy(), sinkhorn_numpy(s.numpy(), 0.05, 3), rtol=1e-4, atol=1e-6)
    # before the final rescale (q / B): every sample's column sums to 1/B exactly; the prototypes'
    # rows approach 1/K: 3 iterations (swav's) bring the worst row 10x closer than the raw softmax
    # (max relative error 3.6 -> 0.31 here), and iterating on converges
    np.testing.assert_allclose(q.sum(1).numpy() / b, 1 / b, rtol=1e-5)

    def row_error(q):
        return float((q.sum(0) / b * k - 1).abs().max())
    assert row_error(q) < 0.1 * row_error(sinkhorn(s, epsilon=0.05, iters=0)) and row_error(q) < 0.35
    converged = sinkhorn(s, epsilon=0.05, iters=300)
    assert row_error(sinkhorn(s, epsilon=0.05, iters=30)) < 1e-3 and row_error(converged) < 1e-4
    # the equipartition is what prevents collapse: every sample prefers prototype 0, yet the codes
    # spread over all prototypes
    collapsed = 0.05 * s + F.one_hot(torch.zeros(b, dtype=torch.long), k)
    assert set(collapsed.argmax(1).tolist()) == {0}
    assert set(sinkhorn(collapsed, epsilon=0.05, iters=3).argmax(1).tolist()) == set(range(k))
    # scores far outside [-1, 1] (large / epsilon) still give finite codes (global max subtracted)
    assert torch.isfinite(sinkhorn(s * 100, epsilon=0.05, iters=3)).all()
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(s, epsilon=0.0)


def tiny_swav(n: int = 16, world_size: int = 1, **options):
    entry = method_entry("swav")
    overrides = {**entry.meta["presets"]["tiny"].overrides, **{f"method_options.{k}": v for k, v in options.items()}}
    cfg = apply_overrides(TrainConfig(method="swav", method_options=entry.meta["options"]()), overrides)
    ctx = RunContext(dataset_size=4 * n, steps_per_epoch=4, batch_size=n, world_size=world_size)
    return entry.factory(cfg, ctx)


def correlated_views(n: int = 16, seed: int = 0) -> dict:
    """2x64 + 2x32 views of n random 'images': each view the image plus its own noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, 64, 64, generator=g)
    views = [base + 0.3 * torch.randn(base.shape, generator=g) for _ in range(2)]
    small = F.interpolate(base, size=32, mode="bilinear", align_corners=False)
    views += [small + 0.3 * torch.randn(small.shape, generator=g) for _ in range(2)]
    return {"views": views, "index": torch.arange(n)}


def _sinkhorn_worker(rank: int, world: int, init: str, out_dir: str):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        s = cosine_scores(24, 7)
        mine = s[rank * 12:(rank + 1) * 12]
        q = sinkhorn(mine, epsilon=0.05, iters=3, group=dist.group.WORLD)
        torch.manual_seed(0)
        method = tiny_swav(n=8, world_size=2).eval()  # eval: BN uses its running statistics
        method.ctx = RunContext(dataset_size=32, steps_per_epoch=4, batch_size=8, world_size=2, rank=rank,
                                group=dist.group.WORLD)
        batch = correlated_views(16)
        with torch.no_grad():
            loss = method({"views": [v[rank * 8:(rank + 1) * 8] for v in batch["views"]]})["loss"]
        torch.save({"q": q, "loss": loss}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_sinkhorn_and_swav_loss_equal_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_sinkhorn_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = sinkhorn(cosine_scores(24, 7), epsilon=0.05, iters=3)
    torch.testing.assert_close(torch.cat([r["q"] for r in res]), whole, rtol=1e-5, atol=1e-7)
    # each rank's half alone is NOT the answer: the marginals couple the whole batch
    assert not torch.allclose(sinkhorn(cosine_scores(24, 7)[:12]), whole[:12], atol=1e-4)
    torch.manual_seed(0)
    method = tiny_swav(n=16).eval()
    with torch.no_grad():
        single = method(correlated_views(16))["loss"]
    torch.testing.assert_close((res[0]["loss"] + res[1]["loss"]) / 2, single, rtol=1e-5, atol=1e-6)


# -- the loss and the method ------------------------------------------------------------------------

def test_swapped_prediction_loss_by_hand():
    g = torch.Generator().manual_seed(1)
    n_views, b, k, t = 3, 4, 5, 0.1
    scores = torch.randn(n_views * b, k, generator=g)
    codes = [(crop, torch.softmax(torch.randn(b, k, generator=g), 1)) for crop in (0, 1)]
    want = 0.0
    for crop, q in codes:
        sub = 0.0
        for v in range(n_views):
            if v != crop:
                for i in range(b):
                    p = torch.softmax(scores[v * b + i] / t, 0)
                    sub -= float((q[i] * torch.log(p)).sum()) / b
        want += sub / (n_views - 1)
    assert swav_loss(scores, codes, n_views, t).item() == pytest.approx(want / len(codes), rel=1e-5)


def test_shapes_and_the_loss_falls_on_a_tiny_model():
    torch.manual_seed(0)
    method = tiny_swav(freeze_prototypes_niters=0)
    batch = correlated_views(16)
    z = method.embed(batch["views"])
    assert z.shape == (4 * 16, 64) and torch.allclose(z.norm(dim=1), torch.ones(64))
    assert method.scores(z).shape == (64, 32) and method.prototypes.weight.shape == (32, 64)
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        out = method(batch)
        assert set(out) == {"loss", "queue"} and out["loss"].ndim == 0
        opt.zero_grad()
        out["loss"].backward()
        method.after_backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(method.steps) == 20
    # the prototypes are unit rows at every step start
    method(batch)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(32))


def test_prototypes_do_not_move_during_the_freeze_and_do_after():
    """As the trainer steps: forward, backward, after_backward, LARS step with weight decay. The
    first freeze_prototypes_niters steps leave the (normalised) prototypes exactly where they were
    while the rest of the network moves; then they move. The count survives a state_dict round trip."""
    torch.manual_seed(0)
    method = tiny_swav(freeze_prototypes_niters=3)
    opt = LARS(param_groups(method, 1e-2), lr=0.5, momentum=0.9, weight_decay=1e-2)
    batch = correlated_views(8)
    moved = []
    for step in range(5):
        if step == 2:  # a resume in the middle of the freeze: a fresh method loading the checkpoint
            state, opt_state = method.state_dict(), opt.state_dict()
            method = tiny_swav(freeze_prototypes_niters=3)
            method.load_state_dict(state)
            opt = LARS(param_groups(method, 1e-2), lr=0.5, momentum=0.9, weight_decay=1e-2)
            opt.load_state_dict(opt_state)
        out = method(batch)
        protos, head = method.prototypes.weight.detach().clone(), method.projection[0].weight.detach().clone()
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        method.after_backward()
        opt.step()
        moved.append(not torch.equal(protos, method.prototypes.weight))
        assert not torch.equal(head, method.projection[0].weight)
    assert moved == [False, False, False, True, True]


def test_queue_fills_is_used_when_full_and_round_trips_through_rank_state(tmp_path):
    n = 8
    assert queue_rows_per_rank(3840, 256, 4) == 960 and queue_rows_per_rank(100, 32, 2) == 48
    assert tiny_swav(n=8, world_size=2, queue_length=40).queue_rows == 16  # trimmed to 32 = 2 global batches
    with pytest.raises(ConfigError, match="shorter than the global batch"):
        tiny_swav(n=8, world_size=2, queue_length=8)

    torch.manual_seed(0)
    method = tiny_swav(n=n, queue_length=2 * n, epoch_queue_starts=1)
    batches = [correlated_views(n, seed=s) for s in range(4)]
    method.on_epoch_start(0)
    assert method.queue is None and method(batches[0])["queue"] == 0
    method.on_epoch_start(1)
    assert method.queue.shape == (2, 2 * n, 64) and method.queue_filled == 0
    used = [float(method(b)["queue"]) for b in batches[1:3]]
    assert used == [0.0, 0.0] and method.queue_filled == 2 * n
    # newest first: the last batch's assignment crops, then the one before
    with torch.no_grad():
        z_last, z_prev = method.embed(batches[2]["views"]), method.embed(batches[1]["views"])
    for i, crop in enumerate((0, 1)):
        torch.testing.assert_close(method.queue[i, :n], z_last[crop * n:(crop + 1) * n])
        torch.testing.assert_close(method.queue[i, n:], z_prev[crop * n:(crop + 1) * n])

    # a resume: global state + this rank's state through files, then both continue identically
    torch.save(method.rank_state_dict(), tmp_path / "rank0.pt")
    resumed = tiny_swav(n=n, queue_length=2 * n, epoch_queue_starts=1)
    resumed.load_state_dict(method.state_dict())
    resumed.load_rank_state_dict(torch.load(tmp_path / "rank0.pt", weights_only=False))
    a, b = method(batches[3]), resumed(batches[3])
    assert a["queue"] == 1 and b["queue"] == 1
    assert a["loss"].item() == b["loss"].item()
    torch.testing.assert_close(method.queue, resumed.queue)
    # the queue changes the codes, hence the loss
    fresh = tiny_swav(n=n, queue_length=2 * n, epoch_queue_starts=1)
    fresh.load_state_dict(method.state_dict())
    assert fresh(batches[3])["loss"].item() != pytest.approx(a["loss"].item(), rel=1e-6)
