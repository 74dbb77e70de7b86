"""Jigsaw Clustering (sslkit/methods/jigclu.py): the montage (every patch of the global batch exactly
once, labels naming what was pasted, 2 gloo ranks equal to one process on the concatenated batch),
the SupClu loss and the whole method's loss against brute-force references, the gradient under DDP
equal to one process's, shapes, the loss falling, and the reproducible permutation after a resume."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from sslkit.config import ConfigError, TrainConfig, apply_overrides
from sslkit.methods import RunContext, method_entry
from sslkit.methods.jigclu import make_montages, montage_permutation, quadrant_features, supclu_loss


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def tiny_jigclu(n: int = 8, world_size: int = 1, rank: int = 0, group=None, **options):
    entry = method_entry("jigclu")
    overrides = {**entry.meta["presets"]["tiny"].overrides, **{f"method_options.{k}": v for k, v in options.items()}}
    cfg = apply_overrides(TrainConfig(method="jigclu", method_options=entry.meta["options"]()), overrides)
    ctx = RunContext(dataset_size=4 * n, steps_per_epoch=4, batch_size=n, world_size=world_size, rank=rank,
                     group=group)
    return entry.factory(cfg, ctx)


def check_montages(everything: torch.Tensor, out: dict, perm: torch.Tensor, rank: int, n_local: int):
    """Each quadrant block equals the patch its labels name, and the labels are perm's entries."""
    n, h = everything.shape[0], everything.shape[-1]
    for i in range(n_local):
        m = rank * n_local + i
        for q in range(4):
            row, col = divmod(q, 2)  # quadrant order TL, TR, BL, BR
            block = out["montages"][i, :, row * h:(row + 1) * h, col * h:(col + 1) * h]
            image, location = int(out["image_id"][i, q]), int(out["location"][i, q])
            assert torch.equal(block, everything[image, location])
            assert location * n + image == int(perm[q * n + m])


def test_montages_hold_every_patch_once_with_labels_of_what_was_pasted():
    n = 6
    patches = torch.randn(n, 4, 3, 8, 8)
    perm = montage_permutation(n, seed=3, step=5)
    out = make_montages(patches, perm)
    assert out["montages"].shape == (n, 3, 16, 16)
    assert out["image_id"].dtype == torch.int64 and out["location"].shape == (n, 4)
    used = sorted(zip(out["image_id"].flatten().tolist(), out["location"].flatten().tolist()))
    assert used == [(i, loc) for i in range(n) for loc in range(4)]
    check_montages(patches, out, perm, 0, n)
    # the permutation is a function of (seed, step): a resumed run draws the same ones
    assert sorted(perm.tolist()) == list(range(4 * n))
    assert torch.equal(montage_permutation(n, 3, 5), perm)
    assert not torch.equal(montage_permutation(n, 3, 6), perm) and not torch.equal(montage_permutation(n, 4, 5), perm)
    with pytest.raises(ValueError, match=r"\[N, 4, C, h, w\]"):
        make_montages(patches[:, :3], perm)
    with pytest.raises(ValueError, match="permutation of 4n"):
        make_montages(patches, perm[:-1])


def brute_force_supclu(z: torch.Tensor, labels: list[int], t: float, base_t: float = 0.07) -> float:
    """SupCon (Khosla et al.) as JigClu's SupCluLoss defines it, one anchor and one positive at a time."""
    z = z.double()
    total = 0.0
    for i in range(len(labels)):
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(len(labels)) if a != i)
        pos = [p for p in range(len(labels)) if p != i and labels[p] == labels[i]]
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denom) for p in pos) / len(pos)
    return (t / base_t) * total / len(labels)


def test_supclu_loss_equals_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1)
    labels = [0, 1, 2] * 4                                  # 3 images x 4 patches, interleaved
    for t in (0.3, 0.07):
        got = supclu_loss(z, torch.tensor(labels), t)
        assert got.item() == pytest.approx(brute_force_supclu(z, labels, t), rel=1e-9)


def reference_loss(method, patches: torch.Tensor, step: int) -> float:
    """The method's loss, rebuilt by explicit loops: montage pixels, quadrant vectors (bilinear
    upsampling of the odd res5 map, then the mean of each 2x2 block), heads, SupClu by brute force,
    and the location cross-entropy one patch at a time."""
    n, h = patches.shape[0], patches.shape[-1]
    perm = montage_permutation(n, method.ctx.seed, step)
    montages = torch.zeros(n, 3, 2 * h, 2 * h)
    labels = {}
    for m, q in itertools.product(range(n), range(4)):
        s = int(perm[q * n + m])
        row, col = divmod(q, 2)
        montages[m, :, row * h:(row + 1) * h, col * h:(col + 1) * h] = patches[s % n, s // n]
        labels[m, q] = (s % n, s // n)
    with torch.no_grad():
        fmap = method.backbone.feature_maps(montages, ["res5"])["res5"]
        assert fmap.shape[-1] % 2 == 1  # the upsampling path (3 -> 4 here, as 7 -> 8 at 224)
        up = F.interpolate(fmap, size=fmap.shape[-1] + 1, mode="bilinear", align_corners=False)
        half = up.shape[-1] // 2
        zs, locs, images, places = [], [], [], []
        for m, q in itertools.product(range(n), range(4)):
            row, col = divmod(q, 2)
            v = up[m, :, row * half:(row + 1) * half, col * half:(col + 1) * half].mean(dim=(1, 2))
            zs.append(F.normalize(method.clu_head(v), dim=0))
            locs.append(method.loc_head(v))
            images.append(labels[m, q][0])
            places.append(labels[m, q][1])
    clu = brute_force_supclu(torch.stack(zs), images, method.o.temperature)
    loc = sum(-float(torch.log_softmax(lg.double(), 0)[p]) for lg, p in zip(locs, places)) / len(places)
    return clu + loc


def test_method_loss_equals_the_brute_force_reference_and_shapes():
    torch.manual_seed(0)
    method = tiny_jigclu(n=4).eval()               # eval: BN does not depend on the batch
    patches = torch.randn(4, 4, 3, 48, 48)
    method.load_state_dict({**method.state_dict(), "steps": torch.tensor(7)})   # as a resume at step 7
    out = method({"patches": patches})
    assert set(out) == {"loss", "loss_clu", "loss_loc", "loc_acc"} and all(v.ndim == 0 for v in out.values())
    assert out["loss"].item() == pytest.approx(reference_loss(method, patches, 7), rel=1e-5)
    assert int(method.steps) == 7                 # eval forwards are not steps
    # shapes: 96 px montages -> res5 3x3 -> 4x4 -> one vector per quadrant
    fmap = torch.arange(2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3)
    q = quadrant_features(fmap)
    assert q.shape == (1, 4, 2)
    assert q[0, 0, 0] < q[0, 1, 0] < q[0, 3, 0] and q[0, 0, 0] < q[0, 2, 0] < q[0, 3, 0]  # TL, TR, BL, BR
    assert quadrant_features(torch.randn(2, 5, 8, 8)).shape == (2, 4, 5)
    with pytest.raises(ConfigError, match="patch_size 16: need >= 32"):
        tiny_jigclu(patch_size=16)


def structured_patches(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """The 4 overlapping 0.8 boxes (TL, BL, TR, BR) of n smooth random images of distinct mean colours,
    each patch with its own noise: patches of one image share a colour and some pixels."""
    g = torch.Generator().manual_seed(seed)
    side = int(size / 0.8)
    images = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=side, mode="bilinear", align_corners=False)
    images = images + 1.5 * torch.randn(n, 3, 1, 1, generator=g)
    boxes = [(0, 0), (side - size, 0), (0, side - size), (side - size, side - size)]  # (y, x) of TL, BL, TR, BR
    out = torch.stack([images[:, :, y:y + size, x:x + size] for y, x in boxes], dim=1)
    return out + 0.2 * torch.randn(out.shape, generator=g)


def train_tiny(steps: int, resume_at: int | None = None) -> list[tuple[float, float]]:
    """(loss, loss_clu) of `steps` SGD steps on one batch; at `resume_at` a fresh method and optimiser
    load the state dicts, as a resumed run does."""
    torch.manual_seed(0)
    method = tiny_jigclu(n=16, patch_size=32)
    batch = {"patches": structured_patches(16)}
    opt = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        if step == resume_at:
            state, opt_state = method.state_dict(), opt.state_dict()
            torch.manual_seed(123)  # nothing of the step may depend on the global RNG
            method = tiny_jigclu(n=16, patch_size=32)
            method.load_state_dict(state)
            opt = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
            opt.load_state_dict(opt_state)
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        method.after_backward()
        opt.step()
        losses.append((out["loss"].item(), out["loss_clu"].item()))
    assert int(method.steps) == steps
    return losses


def test_the_loss_falls_on_a_tiny_model_and_a_resume_continues_exactly():
    losses = train_tiny(20)
    assert losses[-1][0] < 0.75 * losses[0][0] and losses[-1][1] < 0.75 * losses[0][1], losses
    assert train_tiny(13, resume_at=10) == losses[:13]  # the same montages after the resume: identical losses


def _worker(rank: int, world: int, init: str, out_dir: str):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        group = dist.group.WORLD
        # the montage alone: 3 images per rank, small patches
        small = torch.randn(6, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        perm = montage_permutation(6, seed=2, step=9)
        out = make_montages(small[rank * 3:(rank + 1) * 3], perm, group=group)
        # the method under DDP, each rank half of the batch
        torch.manual_seed(0)
        method = tiny_jigclu(n=2, world_size=2, rank=rank, group=group).eval()
        ddp = torch.nn.parallel.DistributedDataParallel(method)
        patches = torch.randn(4, 4, 3, 48, 48, generator=torch.Generator().manual_seed(2))
        res = ddp({"patches": patches[rank * 2:(rank + 1) * 2]})
        res["loss"].backward()
        grads = {k: p.grad for k, p in method.named_parameters()}
        torch.save({**out, "loss": res["loss"].detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """Montages, loss and DDP-averaged gradients of 2 ranks x half the batch equal one process with
    all of it (the all-gathered rows carry this rank's gradient x world, as a differentiable gather
    would under DDP's averaging)."""
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    small = torch.randn(6, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    perm = montage_permutation(6, seed=2, step=9)
    single = make_montages(small, perm)
    for key in ("montages", "image_id", "location"):
        assert torch.equal(torch.cat([r[key] for r in res]), single[key]), key
    used = []
    for rank, r in enumerate(res):
        check_montages(small, r, perm, rank, 3)
        used += zip(r["image_id"].flatten().tolist(), r["location"].flatten().tolist())
    assert sorted(used) == [(i, loc) for i in range(6) for loc in range(4)]

    torch.manual_seed(0)
    method = tiny_jigclu(n=4).eval()
    patches = torch.randn(4, 4, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    out = method({"patches": patches})
    out["loss"].backward()
    for r in res:
        torch.testing.assert_close(r["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-6)
    for name, p in method.named_parameters():
        torch.testing.assert_close(res[0]["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(res[1]["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
