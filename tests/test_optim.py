"""Parameter groups, LARS/LARC (apex semantics, as swav uses it) against hand computations, resume,
GradScaler, and the per-iteration schedules with the DCv2 and jigsaw numbers.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslkit.models import create
from sslkit.optim import (LARC, LARS, NORM_OR_BIAS, build_optimizer, multistep, param_groups, scaled_lr,
                          warmup_cosine)


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: a thread pool's barriers would cost more than the maths (far more
    on a busy machine). Restored after each test so other test files keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def names_in(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ---- param groups ------------------------------------------------------------------------------

def test_param_groups_split_resnet():
    model = create("resnet_tiny", num_classes=10)
    decay, no_decay = param_groups(model, 1e-6)
    params = dict(model.named_parameters())
    norms = {f"{m}.{n}" for m, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)
             for n, _ in mod.named_parameters(recurse=False)}
    # resnet_tiny: 1 stem + 8 block convs + 3 projection convs + fc weight; 12 BNs x 2 + fc bias.
    assert len(decay["params"]) == 13 and len(no_decay["params"]) == 25
    assert len(decay["params"]) + len(no_decay["params"]) == len(params) == 38
    assert names_in(model, no_decay["params"]) == norms | {"fc.bias"}
    assert all(params[n].ndim in (2, 4) and not n.endswith("bias") for n in names_in(model, decay["params"]))
    assert decay["weight_decay"] == 1e-6 and no_decay["weight_decay"] == 0.0
    assert decay[NORM_OR_BIAS] is False and no_decay[NORM_OR_BIAS] is True
    # Same split after converting to SyncBatchNorm (what the DDP trainer does).
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(create("resnet_tiny", num_classes=10))
    assert [len(g["params"]) for g in param_groups(sync, 1e-6)] == [13, 25]


def test_param_groups_without_exclusion_and_frozen_params():
    model = create("resnet_tiny", num_classes=10)
    model.fc.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 1e-6, exclude_norm_and_bias=False)
    assert len(decay["params"]) == 37 and no_decay["params"] == []  # DCv2: every param decays
    assert id(model.fc.weight) not in {id(p) for p in decay["params"]}
    # Empty groups are fine for torch optimizers and keep the state-dict layout fixed.
    LARS([decay, no_decay], 0.1).step()


def test_param_groups_detect_norms_by_type():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm((4, 5))  # 2-D weight: only the module type marks it as a norm
            self.gn = nn.GroupNorm(2, 4)
            self.lin = nn.Linear(5, 5)
            self.scale = nn.Parameter(torch.ones(()))  # 0-D: no decay
            self.shared = self.lin  # shared module: its parameters appear once

    net = Net()
    decay, no_decay = param_groups(net, 0.1)
    assert names_in(net, decay["params"]) == {"lin.weight"}
    assert names_in(net, no_decay["params"]) == {"ln.weight", "ln.bias", "gn.weight", "gn.bias", "lin.bias", "scale"}
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(net, -1.0)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(nn.ReLU(), 0.1)


# ---- LARS against hand computations ------------------------------------------------------------

def lars_reference(p: np.ndarray, g: np.ndarray, lr: float, wd: float, clip: bool, tc: float = 1e-3,
                   eps: float = 1e-8) -> np.ndarray:
    """The adapted gradient of apex LARC, in float64."""
    pn, gn = np.linalg.norm(p), np.linalg.norm(g)
    if pn == 0 or gn == 0:
        return g
    ratio = tc * pn / (gn + wd * pn + eps)
    if clip:
        ratio = min(ratio / lr, 1.0)
    return (g + wd * p) * ratio


def tiny_linear() -> nn.Linear:
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]))
        lin.bias.zero_()  # zero norm: apex leaves it unadapted
    return lin


GRADS = [(torch.tensor([[0.1, 0.2, -0.3], [0.05, -0.4, 0.2]]), torch.tensor([0.3, -0.1])),
         (torch.tensor([[-0.2, 0.1, 0.1], [0.3, 0.0, -0.1]]), torch.tensor([0.2, 0.4]))]


@pytest.mark.parametrize("clip, lr", [(False, 0.5), (True, 0.5), (True, 1e-4)])
def test_lars_two_steps_match_hand_computation(clip, lr):
    wd, mom = 0.01, 0.9
    lin = tiny_linear()
    opt = LARS(lin.parameters(), lr, momentum=mom, weight_decay=wd, clip=clip)
    w, b = lin.weight.detach().double().numpy().copy(), lin.bias.detach().double().numpy().copy()
    buf_w = buf_b = None
    for gw, gb in GRADS:
        lin.weight.grad, lin.bias.grad = gw.clone(), gb.clone()
        opt.step()
        aw = lars_reference(w, gw.double().numpy(), lr, wd, clip)
        ab = lars_reference(b, gb.double().numpy(), lr, wd, clip)
        buf_w = aw if buf_w is None else mom * buf_w + aw
        buf_b = ab if buf_b is None else mom * buf_b + ab
        w, b = w - lr * buf_w, b - lr * buf_b
        np.testing.assert_allclose(lin.weight.detach().numpy(), w, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(lin.bias.detach().numpy(), b, rtol=1e-6, atol=1e-7)
        assert opt.param_groups[0]["weight_decay"] == wd  # restored after the step
    if not clip:
        # Step 1 of the weight, written out: lr * 0.001 * ||w|| / (||g|| + wd ||w|| + eps) * (g + wd w).
        w0 = tiny_linear().weight.detach().double().numpy()
        g0 = GRADS[0][0].double().numpy()
        ratio = 1e-3 * np.linalg.norm(w0) / (np.linalg.norm(g0) + wd * np.linalg.norm(w0) + 1e-8)
        assert ratio > 1e-3  # no min(ratio, 1) involved: the trust ratio itself scales the lr
        lin = tiny_linear()
        opt = LARC(lin.parameters(), lr, weight_decay=wd)
        lin.weight.grad, lin.bias.grad = GRADS[0][0].clone(), GRADS[0][1].clone()
        opt.step()
        np.testing.assert_allclose(lin.weight.detach().numpy(), w0 - lr * ratio * (g0 + wd * w0), rtol=1e-6)
        # The zero-norm bias moved by the raw gradient, without decay or scaling.
        np.testing.assert_allclose(lin.bias.detach().numpy(), -lr * GRADS[0][1].numpy(), rtol=1e-6)


def test_lars_excluded_group_is_plain_sgd():
    lin = tiny_linear()
    with torch.no_grad():
        lin.bias.fill_(0.5)
    groups = [{"params": [lin.weight], "weight_decay": 0.01, NORM_OR_BIAS: False},
              {"params": [lin.bias], "weight_decay": 0.02, NORM_OR_BIAS: True}]
    opt = LARS(groups, 0.5, exclude_norm_and_bias=True)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.weight.grad, lin.bias.grad = GRADS[0][0].clone(), GRADS[0][1].clone()
    opt.step()
    aw = lars_reference(w0.double().numpy(), GRADS[0][0].double().numpy(), 0.5, 0.01, False)
    np.testing.assert_allclose(lin.weight.detach().numpy(), w0.numpy() - 0.5 * aw, rtol=1e-6)
    torch.testing.assert_close(lin.bias.detach(), b0 - 0.5 * (GRADS[0][1] + 0.02 * b0))
    # Zero gradient on a non-zero weight: no adaptation, so no decay sneaks in; params without grad skip.
    opt.zero_grad(set_to_none=True)
    assert lin.weight.grad is None
    lin.weight.grad = torch.zeros_like(lin.weight)
    w1, b1 = lin.weight.detach().clone(), lin.bias.detach().clone()
    buf = opt.state[lin.weight]["momentum_buffer"].clone()
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), w1 - 0.5 * 0.9 * buf)
    assert torch.equal(lin.bias.detach(), b1)


def small_problem(seed: int = 0):
    """4 Gaussian classes in 10-D and an MLP with BatchNorm (biases and norms in the mix)."""
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(4, 10, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    x = centers[y] + torch.randn(256, 10, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    return model, x, y


def train(model: nn.Module, opt: torch.optim.Optimizer, x, y, schedule: np.ndarray, steps: range) -> list[float]:
    losses = []
    for it in steps:
        for group in opt.param_groups:
            group["lr"] = float(schedule[it])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lars_loss_decreases_with_dcv2_settings():
    model, x, y = small_problem()
    opt = build_optimizer("lars", param_groups(model, 1e-6, exclude_norm_and_bias=False), 4.8, 0.9, 1e-6)
    # DCv2's shape in miniature: warm-up from 0.3 to 4.8, cosine to 4.8 / 1000.
    losses = train(model, opt, x, y, warmup_cosine(4.8, 0.0048, 3, 10, 1, 0.3), range(30))
    assert losses[-1] < 0.1 * losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_lars_state_dict_round_trip_resumes_identically():
    schedule = warmup_cosine(2.0, 0.02, 4, 5, 1, 0.1)
    model_a, x, y = small_problem(1)
    opt_a = LARS(param_groups(model_a, 1e-4), 2.0, clip=True)
    losses_a = train(model_a, opt_a, x, y, schedule, range(20))

    model_b, _, _ = small_problem(1)
    opt_b = LARS(param_groups(model_b, 1e-4), 2.0, clip=True)
    losses_b = train(model_b, opt_b, x, y, schedule, range(10))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model_c, _, _ = small_problem(2)  # different init: everything must come from the checkpoint
    opt_c = LARS(param_groups(model_c, 0.5), 9.0)  # different hyper-parameters too
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.param_groups[0]["clip"] is True and opt_c.param_groups[0]["weight_decay"] == 1e-4
    losses_c = train(model_c, opt_c, x, y, schedule, range(10, 20))
    assert losses_b + losses_c == losses_a
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)


def test_lars_with_grad_scaler():
    model_a, x, y = small_problem(3)
    model_b, _, _ = small_problem(3)
    opt_a = LARS(param_groups(model_a, 1e-6, False), 4.8, weight_decay=1e-6)
    opt_b = LARS(param_groups(model_b, 1e-6, False), 4.8, weight_decay=1e-6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        opt_a.zero_grad(set_to_none=True)
        F.cross_entropy(model_a(x), y).backward()
        opt_a.step()
        opt_b.zero_grad(set_to_none=True)
        scaler.scale(F.cross_entropy(model_b(x), y)).backward()
        scaler.step(opt_b)  # unscales first, so LARS sees true gradients
        scaler.update()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # A non-finite gradient: the scaler skips the step and halves its scale.
    before = [p.detach().clone() for p in model_b.parameters()]
    opt_b.zero_grad(set_to_none=True)
    scaler.scale(F.cross_entropy(model_b(x), y)).backward()
    next(model_b.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt_b)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(before, model_b.parameters()))
    assert scaler.get_scale() == 2.0**11


def test_build_optimizer_and_bad_arguments():
    model = nn.Linear(3, 2)
    sgd = build_optimizer("sgd", model.parameters(), 0.1, 0.9, 1e-4, nesterov=True)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["nesterov"] is True
    lars = build_optimizer("lars", model.parameters(), 0.1, 0.9, 1e-4, trust_coefficient=0.02)
    assert isinstance(lars, LARS) and lars.param_groups[0]["trust_coefficient"] == 0.02
    assert lars.param_groups[0]["clip"] is False and lars.param_groups[0]["eps"] == 1e-8
    # Switching a run from SGD to LARS: the momentum buffers carry over, the trust defaults are added.
    model(torch.ones(1, 3)).sum().backward()
    sgd.step()
    lars.load_state_dict(sgd.state_dict())
    assert lars.param_groups[0]["trust_coefficient"] == 0.02 and lars.param_groups[0]["nesterov"] is True
    assert torch.equal(lars.state[model.weight]["momentum_buffer"], sgd.state[model.weight]["momentum_buffer"])
    lars.step()
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; choose one of sgd, lars"):
        build_optimizer("adam", model.parameters(), 0.1, 0.9, 0.0)
    with pytest.raises(ValueError, match="'lars' only"):
        build_optimizer("sgd", model.parameters(), 0.1, 0.9, 0.0, clip=True)
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS(model.parameters(), 0.1, trust_coefficient=0.0)
    with pytest.raises(ValueError, match="lr"):
        LARS(model.parameters(), -1.0)


# ---- schedules ---------------------------------------------------------------------------------

def test_warmup_cosine_dcv2():
    base = scaled_lr(0.3, 4096)
    assert base == 4.8
    epochs, ipe, warm = 400, 313, 10
    lr = warmup_cosine(base, 0.0048, epochs, ipe, warmup_epochs=warm, start_warmup_lr=0.3)
    assert lr.shape == (epochs * ipe,) and lr.dtype == np.float64
    assert lr[0] == 0.3
    end = warm * ipe - 1
    assert lr[end] == pytest.approx(4.8, abs=1e-12) and lr[end + 1] == 4.8  # swav: base twice
    assert np.all(np.diff(lr[: end + 1]) > 0)
    assert np.all(np.diff(lr[end + 1:]) < 0)
    assert lr[-1] == pytest.approx(0.0048, rel=1e-6) and lr[-1] > 0.0048
    # Half-way through the cosine part: the mean of base and final.
    assert lr[end + 1 + (epochs - warm) * ipe // 2] == pytest.approx((4.8 + 0.0048) / 2)


def test_warmup_cosine_edges_and_errors():
    no_warm = warmup_cosine(1.0, 0.0, 2, 5)
    assert len(no_warm) == 10 and no_warm[0] == 1.0 and no_warm[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.9)))
    all_warm = warmup_cosine(1.0, 0.0, 2, 5, warmup_epochs=2, start_warmup_lr=0.5)
    np.testing.assert_allclose(all_warm, np.linspace(0.5, 1.0, 10))
    with pytest.raises(ValueError, match="warmup_epochs"):
        warmup_cosine(1.0, 0.0, 2, 5, warmup_epochs=3)
    with pytest.raises(ValueError, match="iters_per_epoch"):
        warmup_cosine(1.0, 0.0, 2, 0)
    with pytest.raises(ValueError, match="base_lr"):
        warmup_cosine(float("nan"), 0.0, 2, 5)
    with pytest.raises(ValueError, match="global_batch"):
        scaled_lr(0.3, 0)
    assert scaled_lr(0.1, 256) == 0.1 and scaled_lr(0.1, 1024) == pytest.approx(0.4)


def test_multistep_jigsaw():
    ipe = 4
    # VISSL jigsaw, 105 epochs, milestones [30, 60, 90, 100]: 0.1, 0.01, 0.001, 1e-4, 1e-5.
    lr = multistep(0.1, [30, 60, 90, 100], 105, ipe)
    per_epoch = lr[::ipe]
    assert len(lr) == 105 * ipe and np.all(lr.reshape(105, ipe) == per_epoch[:, None])
    for first, last, value in [(0, 29, 0.1), (30, 59, 0.01), (60, 89, 0.001), (90, 99, 1e-4), (100, 104, 1e-5)]:
        np.testing.assert_allclose(per_epoch[first:last + 1], value, rtol=1e-12)
    # 5-epoch warm-up 0.025 -> 0.1, updated per epoch as VISSL's "epoch" interval does.
    warm = multistep(0.1, [30, 60, 90, 100], 105, ipe, warmup_epochs=5, start_warmup_lr=0.025, per_epoch=True)
    np.testing.assert_allclose(warm[::ipe][:7], [0.025, 0.04, 0.055, 0.07, 0.085, 0.1, 0.1])
    np.testing.assert_array_equal(warm[5 * ipe:], lr[5 * ipe:])
    # Per-step warm-up (4-node variant): linear in the step, reaching base on the first step after it.
    step = multistep(0.4, [30, 60, 90, 100], 105, ipe, warmup_epochs=5, start_warmup_lr=0.1)
    np.testing.assert_allclose(step[:20], 0.1 + 0.3 * np.arange(20) / 20)
    assert step[20] == 0.4 and step[30 * ipe] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="increase strictly"):
        multistep(0.1, [30, 30], 105, ipe)
    with pytest.raises(ValueError, match="increase strictly"):
        multistep(0.1, [30, 106], 105, ipe)
    with pytest.raises(ValueError, match="first milestone"):
        multistep(0.1, [3], 105, ipe, warmup_epochs=5)


# ---- gradient accumulation and clipping helpers ---------------------------------------------------

class CountingLoader:
    """The loader's contract `accumulate` relies on: len, position (batches yielded this epoch), and
    its end-of-epoch bookkeeping run only when its iterator is exhausted."""

    def __init__(self, n: int):
        self.n, self.position, self.epoch = n, 0, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        while self.position < self.n:
            self.position += 1
            yield self.epoch * 100 + self.position - 1
        self.epoch += 1
        self.position = 0


def test_accumulate_splits_an_epoch_into_steps_aligned_to_its_start():
    from sslkit.optim import accumulate, optimizer_steps
    loader = CountingLoader(7)
    steps, ends = [], []
    for micro in accumulate(loader, 3):
        assert loader.position == len(steps) * 3   # lazy: nothing read before the step consumes it
        steps.append(list(micro))
        ends.append(loader.position == len(loader))  # what the trainer's end-of-epoch log check sees
    assert steps == [[0, 1, 2], [3, 4, 5], [6]] and ends == [False, False, True]
    assert (loader.epoch, loader.position) == (1, 0)   # the loader's epoch was finished
    assert optimizer_steps(7, 3) == 3 and optimizer_steps(6, 3) == 2 and optimizer_steps(7, 1) == 7
    loader.position = 3   # resumed after step 1 of epoch 1
    assert [list(m) for m in accumulate(loader, 3)] == [[103, 104, 105], [106]]
    assert [len(m) for m in accumulate(loader, 1) if list(m)] == [1] * 7   # each step consumed before the next
    with pytest.raises(ValueError, match="accum_steps"):
        optimizer_steps(7, 0)


def test_no_grad_sync_turns_off_ddps_all_reduce_also_through_compile(tmp_path):
    import torch.distributed as dist
    from sslkit.optim import no_grad_sync
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
        for wrapped in (ddp, torch.compile(ddp)):   # compile is lazy: nothing is compiled here
            with no_grad_sync(wrapped):
                assert ddp.require_backward_grad_sync is False
            assert ddp.require_backward_grad_sync is True
        with no_grad_sync(nn.Linear(2, 2)):   # a plain module: nothing to turn off
            pass
    finally:
        dist.destroy_process_group()


def test_clip_gradients_returns_the_pre_clip_norm_and_clips_only_when_asked():
    from sslkit.optim import clip_gradients
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m(torch.ones(4, 3)).pow(2).sum().backward()
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a.parameters()]))
    grads = [p.grad.clone() for p in a.parameters()]
    assert float(clip_gradients(a.parameters(), 0.0)) == pytest.approx(float(want), rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(a.parameters(), grads))   # 0: not clipped
    assert float(clip_gradients(b.parameters(), 0.5)) == pytest.approx(float(want), rel=1e-6)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in b.parameters()]))
    assert float(want) > 0.5 and float(clipped) == pytest.approx(0.5, rel=1e-5)
