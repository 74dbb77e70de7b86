"""train.py end to end: 2 gloo ranks under a pseudo-terminal, preemption on an epoch's last step and in
the middle of one (step AND epoch records equal an uninterrupted run's), a SIGKILL + an unreadable
newest checkpoint + moved run and shard folders (resume falls back, says so, takes over the killed
run's lock, continues exactly), a hung rank (one-line error after the collective timeout), one-line
config errors. More faults (a second run, dead ranks, full disks, corrupt files): test_faults.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from sslkit.config import TrainConfig, apply_overrides
from sslkit.dist import Preempted
from sslkit.methods import RunContext, method_entry
from sslkit.methods.deepclusterv2 import IGNORE, dcv2_loss

from conftest import REPO, build_small, descendants, environ

PY = sys.executable
# 192 images: 12 steps per epoch at 2 ranks x 8 or 1 rank x 16.
TINY = ["--method", "deepclusterv2", "--preset", "tiny", "--set", "method_options.n_prototypes=[8,8,8]",
        "--set", "shuffle_buffer=64", "--set", "log_every=3", "--epochs", "2",
        # the torch colour stage instead of the fused numba kernel: identical views
        # (tests/test_pipelines.py), and one numba compilation less in every test process
        "--set", "method_options.kernel=torch"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "s")
    build_small(out, sources=("sample:192",), max_count=64)
    return out


def torchrun(nproc: int, args: list[str]) -> list[str]:
    port = str(29500 + (os.getpid() * 7 + len(args) * 13 + nproc) % 400)
    if nproc == 1:
        return [PY, "train.py", *args]
    return [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", port, "train.py", *args]


def run_train(args, nproc=1, check=True, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(torchrun(nproc, args), capture_output=True, text=True, cwd=REPO, env=env, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


def start_train(args, nproc=1) -> subprocess.Popen:
    return subprocess.Popen(torchrun(nproc, args), cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def records(out: str, kind: str) -> dict[int, dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    by_step = {}
    for r in recs:
        if r["kind"] == kind:
            assert r["step"] not in by_step, f"step {r['step']} logged twice"
            by_step[r["step"]] = r
    return by_step


def wait_for_step(out: str, step: int, proc, timeout=240):
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-3000:]}")
        if os.path.exists(log) and any(json.loads(line).get("step", 0) >= step for line in open(log) if line.strip()):
            return
        time.sleep(0.03)
    raise AssertionError(f"no step {step} within {timeout} s")


def assert_same_records(ref: str, out: str):
    for kind in ("step", "epoch"):
        want, got = records(ref, kind), records(out, kind)
        assert sorted(got) == sorted(want), (kind, sorted(got), sorted(want))
        for s in want:
            assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5), (kind, s, want[s], got[s])


# -- method-level -----------------------------------------------------------------------------------

def tiny_method(n=32, check_stop=lambda: None):
    entry = method_entry("deepclusterv2")
    cfg = apply_overrides(TrainConfig(method="deepclusterv2", method_options=entry.meta["options"]()),
                          entry.meta["presets"]["tiny"].overrides)
    ctx = RunContext(dataset_size=n, steps_per_epoch=1, batch_size=n, check_stop=check_stop)
    return entry.factory(cfg, ctx)


def test_dcv2_loss_is_cross_entropy_over_heads_and_crops():
    z = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)  # 3 views x 2 images
    protos = [torch.nn.functional.normalize(torch.randn(5, 4), dim=1) for _ in range(2)]
    targets = torch.tensor([[1, 3], [IGNORE, 0]])
    loss = dcv2_loss(z, protos, targets, n_views=3, temperature=0.1)
    by_hand = (torch.nn.functional.cross_entropy(z @ protos[0].t() / 0.1, torch.tensor([1, 3] * 3)) +
               torch.nn.functional.cross_entropy(z @ protos[1].t() / 0.1, torch.tensor([IGNORE, 0] * 3),
                                                 ignore_index=IGNORE)) / 2
    assert torch.allclose(loss, by_hand)


def tiny_batch(n=32):
    torch.manual_seed(0)
    return {"views": [torch.randn(n, 3, 64, 64), torch.randn(n, 3, 64, 64), torch.randn(n, 3, 32, 32),
                      torch.randn(n, 3, 32, 32)], "index": torch.arange(n)}


def test_dcv2_loss_falls_on_a_tiny_model():
    method, batch = tiny_method(), tiny_batch()
    method.on_train_start([batch])
    method.on_epoch_start(0)
    assert (method.assignments >= 0).all()  # every sample got a cluster
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        method.bank_ptr = 0  # every step is a one-batch "epoch" for the memory bank
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_dcv2_long_hooks_stop_on_a_preemption_signal():
    """The memory-bank pass and k-means poll the (collective) stop check, so a signal during either
    stops the job within one batch / one k-means round instead of waiting for torchrun's SIGKILL."""
    calls = []

    def check_stop():
        calls.append(1)
        if len(calls) >= 2:
            raise Preempted("SIGTERM")

    method, batch = tiny_method(n=16, check_stop=check_stop), tiny_batch(16)
    method.on_train_start([batch])          # one batch: below the polling interval, completes
    with pytest.raises(Preempted):
        method.on_epoch_start(0)            # k-means polls before every round
    assert len(calls) == 2


# -- gradient accumulation and clipping through the trainer's step ---------------------------------

class PerSampleMethod(torch.nn.Module):
    """A method without batch-dependent layers (per-sample MSE of an MLP); records DDP's grad-sync flag
    at every forward and counts its after_backward calls."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.hooks, self.syncs, self.ddp = 0, [], []

    def forward(self, batch):
        self.syncs += [ddp.require_backward_grad_sync for ddp in self.ddp]
        return {"loss": torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"]), "n": batch["x"].new_tensor(1.0)}

    def after_backward(self):
        self.hooks += 1


def step_run(method, optimizer="sgd", clip_grad=0.0, model=None, scaler=None):
    import contextlib
    from dataclasses import replace

    from sslkit.optim import build_optimizer, param_groups
    from sslkit.train import Run
    opt = build_optimizer(optimizer, param_groups(method, 1e-3), lr=0.5, momentum=0.9, weight_decay=1e-3)
    return Run(replace(TrainConfig(), clip_grad=clip_grad), None, None, method, model or method, None, opt,
               scaler or torch.amp.GradScaler("cpu", enabled=False), None, contextlib.nullcontext)


def xy(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 6, generator=g), "y": torch.randn(n, 3, generator=g)}


@pytest.mark.parametrize("optimizer,ddp", [("sgd", False), ("lars", False), ("sgd", True)])
def test_two_micro_batches_step_as_one_batch_of_both(optimizer, ddp, tmp_path):
    """accum_steps=2 at batch 4 == one step at batch 8 (two steps, so momentum counts too): the same
    parameters to 1e-6, one after_backward per optimiser step; under DDP the first micro-batch runs
    without the all-reduce and the last with it."""
    import torch.distributed as dist
    from sslkit.optim import MicroBatches
    from sslkit.train import train_step
    torch.manual_seed(0)
    big, micro = PerSampleMethod(), PerSampleMethod()
    micro.load_state_dict(big.state_dict())
    if ddp:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(micro) if ddp else None
        micro.ddp = [model] if ddp else []
        run_big, run_micro = step_run(big, optimizer), step_run(micro, optimizer, model=model)
        for seed in (1, 2):
            batch = xy(8, seed)
            halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
            out_big = train_step(run_big, batch, 0.5)
            out_micro = train_step(run_micro, MicroBatches(iter(halves), 2), 0.5)
            assert float(out_micro["loss"]) == pytest.approx(float(out_big["loss"].detach()), rel=1e-6)
            assert float(out_micro["grad_norm"]) == pytest.approx(float(out_big["grad_norm"]), rel=1e-5)
            assert float(out_micro["n"]) == 1.0   # scalars are averaged over the micro-batches
    finally:
        if ddp:
            dist.destroy_process_group()
    for a, b in zip(big.parameters(), micro.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert not torch.equal(big.net[0].weight, PerSampleMethod().net[0].weight)
    assert big.hooks == micro.hooks == 2
    assert micro.syncs == ([False, True, False, True] if ddp else [])


@pytest.mark.parametrize("fp16_scaler", [False, True])
def test_clipping_bounds_the_update_and_logs_the_pre_clip_norm(fp16_scaler):
    """Plain SGD at lr 1: the update is the clipped gradient, of norm clip_grad; grad_norm is what
    torch.nn.utils.clip_grad_norm_ returns on the same gradients (unscaled first under a GradScaler)."""
    from sslkit.train import train_step
    torch.manual_seed(0)
    method, ref = PerSampleMethod(), PerSampleMethod()
    ref.load_state_dict(method.state_dict())
    batch = xy(8, 3)
    ref(batch)["loss"].backward()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if fp16_scaler else None
    for clip in (0.05, 0.0):
        run = step_run(method, clip_grad=clip, scaler=scaler)
        run.optimizer = torch.optim.SGD(method.parameters(), lr=1.0)
        before = [p.detach().clone() for p in method.parameters()]
        out = train_step(run, batch, 1.0)
        moved = [(p.detach() - b).flatten() for p, b in zip(method.parameters(), before)]
        update = torch.linalg.vector_norm(torch.cat(moved))
        if clip:   # the reference's gradients, clipped
            assert float(want) > 0.05 and float(update) == pytest.approx(0.05, rel=1e-4)
            assert float(out["grad_norm"]) == pytest.approx(float(want), rel=1e-6)
        else:      # a later step's gradients, logged and not clipped
            assert float(out["grad_norm"]) > 0.05 and float(update) == pytest.approx(float(out["grad_norm"]), rel=1e-5)


def test_swavs_prototype_freeze_counts_optimiser_steps_under_accumulation():
    """freeze_prototypes_niters=2 with 2 micro-batches per step: the prototypes stay put for 2
    optimiser steps (4 forwards) and move at the third; the count is of optimiser steps."""
    from test_method_swav import correlated_views, tiny_swav

    from sslkit.optim import MicroBatches, param_groups
    from sslkit.train import train_step
    torch.manual_seed(0)
    method = tiny_swav(n=8, freeze_prototypes_niters=2)
    run = step_run(method)
    run.optimizer = torch.optim.SGD(param_groups(method, 0.0), lr=0.1)
    moved = []
    for step in range(3):
        method.normalize_prototypes()   # as every training forward does: the freeze keeps them unit rows
        before = method.prototypes.weight.detach().clone()
        train_step(run, MicroBatches(iter([correlated_views(8, 2 * step), correlated_views(8, 2 * step + 1)]), 2), 0.1)
        moved.append(not torch.allclose(before, method.prototypes.weight, rtol=0, atol=1e-6))
    assert moved == [False, False, True] and int(method.steps) == 3


# -- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted 2-rank run, started from a pseudo-terminal (rank 0 then has a progress bar:
    the case that deadlocked when logging decided whether a collective ran)."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    cmd = " ".join(torchrun(2, [*TINY, "--batch-size", "8", "--data", shards, "--out", out]))
    r = subprocess.run(["script", "-qec", f"OMP_NUM_THREADS=1 {cmd}", "/dev/null"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "done: 2 epochs, 24 steps" in r.stdout
    # the thread plan is logged once, by rank 0; OMP_NUM_THREADS sets torch's threads
    assert r.stdout.count("threads: DALI") == 1 and "torch 1 (OMP_NUM_THREADS is set)" in r.stdout, r.stdout[-3000:]
    return out


def test_two_ranks_from_a_terminal_complete(reference):
    steps, epochs = records(reference, "step"), records(reference, "epoch")
    assert sorted(steps) == list(range(3, 25, 3)) and sorted(epochs) == [12, 24]
    latest = os.path.join(reference, "checkpoints", "step-00000024")
    assert {"global.pt", "rank0.pt", "rank1.pt", "COMPLETE", "KEEP"} <= set(os.listdir(latest))
    rank0 = torch.load(os.path.join(latest, "rank0.pt"), weights_only=False)
    rank1 = torch.load(os.path.join(latest, "rank1.pt"), weights_only=False)
    # per-rank memory banks hold disjoint samples
    assert not set(rank0["method"]["bank_index"].tolist()) & set(rank1["method"]["bank_index"].tolist())
    g = torch.load(os.path.join(latest, "global.pt"), weights_only=False)
    assert (g["model"]["assignments"] >= 0).all()  # every sample of the dataset is assigned
    assert g["config"]["method_options"]["n_prototypes"] == [8, 8, 8]
    assert g["trunk"] == {"arch": "resnet_tiny", "kwargs": {}, "input": "rgb"}


def test_preempted_on_an_epochs_last_step_and_mid_epoch_resumes_exactly(shards, reference, tmp_path):
    """SIGTERM is acted on at the next log step (every 3 steps, and at each epoch's end): a signal
    after step 9 stops at step 12, the last step of epoch 0 (an epoch with nothing left to run after
    the resume); one after step 15 stops at step 18, inside epoch 1. Both resumes continue exactly,
    step AND epoch records."""
    out = str(tmp_path / "pre")
    args = [*TINY, "--batch-size", "8", "--data", shards, "--out", out]
    for after, stops_at in ((9, 12), (15, 18)):
        proc = start_train(args, nproc=2)
        wait_for_step(out, after, proc)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole job, as a scheduler's preemption does
        _, err = proc.communicate(timeout=120)
        assert "preempted (SIGTERM)" in err, err[-3000:]
        assert f"checkpoint saved at epoch {(stops_at - 1) // 12} step {stops_at}" in err, err[-3000:]
        state = torch.load(os.path.join(out, "checkpoints", f"step-{stops_at:08d}", "rank1.pt"), weights_only=False)
        assert state["loader"]["position"] == (stops_at - 1) % 12 + 1
    r = run_train(args, nproc=2)
    assert "resumed from" in r.stderr and "done: 2 epochs, 24 steps" in r.stderr
    assert_same_records(reference, out)


def test_gradient_accumulation_end_to_end_and_a_preemption_between_micro_batches(shards, tmp_path, monkeypatch,
                                                                                 capsys):
    """accum_steps=2 at 1 x 16: 12 loader batches per epoch are 6 optimiser steps (the log, the
    schedule and the checkpoints count those), the lr is scaled to the global batch of 32, grad_norm
    is in every step record. A SIGTERM between the two micro-batches of step 2 stops at step 3 (a log
    step) with the loader after 6 batches; the resume reproduces the uninterrupted run's records."""
    import train
    from sslkit.optim import scaled_lr, warmup_cosine
    args = [*TINY, "--batch-size", "16", "--data", shards, "--set", "accum_steps=2"]
    ref = str(tmp_path / "ref")
    assert train.main([*args, "--out", ref]) == 0
    err = capsys.readouterr().err
    assert "6 steps/epoch, global batch 32 (1 ranks x 16 x 2 micro-batches)" in err
    assert "done: 2 epochs, 12 steps" in err
    steps = records(ref, "step")
    assert sorted(steps) == [3, 6, 9, 12] and sorted(records(ref, "epoch")) == [6, 12]
    peak = scaled_lr(0.6, 32)   # the tiny preset's lr per 256 at 1 rank x 16 x 2
    schedule = warmup_cosine(peak, peak * 0.001, 2, 6)
    assert [steps[s]["lr"] for s in (3, 6, 9, 12)] == pytest.approx([schedule[s - 1] for s in (3, 6, 9, 12)])
    assert all(0 < steps[s]["grad_norm"] < float("inf") for s in steps)

    real_step, calls = train.train_step, []

    class SignalAfterFirst(list):   # the step's micro-batches; SIGTERM once the first has been read
        def __iter__(self):
            for i, batch in enumerate(list.__iter__(self)):
                yield batch
                if i == 0:
                    os.kill(os.getpid(), signal.SIGTERM)

    def step_then_signal(run, batches, lr):
        calls.append(len(batches))
        return real_step(run, SignalAfterFirst(batches) if len(calls) == 2 else batches, lr)

    out = str(tmp_path / "pre")
    monkeypatch.setattr(train, "train_step", step_then_signal)
    assert train.main([*args, "--out", out]) == 0
    assert "checkpoint saved at epoch 0 step 3" in capsys.readouterr().err and calls == [2, 2, 2]
    state = torch.load(os.path.join(out, "checkpoints", "step-00000003", "rank0.pt"), weights_only=False)
    assert state["loader"]["position"] == 6
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.main([*args, "--out", out]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert_same_records(ref, out)


def test_killed_run_falls_back_past_an_unreadable_checkpoint_after_moving(shards, tmp_path):
    """SIGKILL after epoch 2's checkpoint, the newest checkpoint truncated, then the run folder and
    the shards moved (other spellings, trailing slash): the resume takes the newest readable
    checkpoint, says why in one line naming the file, notices the move, and continues exactly."""
    args = [*TINY, "--batch-size", "16", "--epochs", "3"]
    ref = str(tmp_path / "ref")
    run_train([*args, "--data", shards, "--out", ref])
    out = str(tmp_path / "killed")
    proc = start_train([*args, "--data", shards, "--out", out])
    wait_for_step(out, 25, proc)  # epoch 2 has begun: checkpoints at steps 12 and 24 exist
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = os.path.join(out, "checkpoints")
    assert {"step-00000012", "step-00000024"} <= set(os.listdir(ckpts))
    newest = os.path.join(ckpts, "step-00000024", "global.pt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    os.remove(os.path.join(ckpts, "latest"))
    moved_out, moved_data = str(tmp_path / "moved" / "run"), str(tmp_path / "elsewhere" / "shards")
    shutil.copytree(out, moved_out)
    shutil.copytree(shards, moved_data)
    r = run_train([*args, "--data", moved_data + "/", "--out", moved_out + "/"])
    warning = [line for line in r.stderr.splitlines() if "not from the newer" in line]
    assert len(warning) == 1 and "step-00000024/global.pt: unreadable" in warning[0], r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step-00000012" in r.stderr and "data moved" in r.stderr
    # the killed run never released its folder: its lock (copied along) is taken over, in one line
    stale = [line for line in r.stderr.splitlines() if "taking over the stale lock" in line]
    assert len(stale) == 1 and f"pid {proc.pid}" in stale[0], r.stderr[-3000:]
    assert_same_records(ref, moved_out)


def test_a_hung_rank_fails_the_job_after_the_collective_timeout(shards, tmp_path):
    """Rank 1 stopped (SIGSTOP): rank 0's next collective times out after dist_timeout_s and it exits
    with one line saying so, instead of gloo's/NCCL's default 30 minutes."""
    out = str(tmp_path / "hung")
    proc = start_train([*TINY, "--batch-size", "8", "--epochs", "20", "--data", shards, "--out", out,
                        "--set", "dist_timeout_s=8"], nproc=2)
    try:
        wait_for_step(out, 3, proc)
        rank1 = next(pid for pid in descendants(proc.pid) if environ(pid).get("RANK") == "1")
        os.kill(rank1, signal.SIGSTOP)
        t0 = time.time()
        while time.time() < t0 + 60 and any(environ(p).get("RANK") == "0" for p in descendants(proc.pid)):
            time.sleep(0.2)
        waited = time.time() - t0
        os.kill(rank1, signal.SIGKILL)  # torchrun's own SIGTERM would wait 30 s on a stopped process
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in err.splitlines() if "another rank is hung" in line]
    assert len(lines) == 1 and "rank 0" in lines[0] and "timeout 8 s" in lines[0], err[-3000:]
    assert waited < 40, waited


# -- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args,env,words", [
    (["--method", "simclr"], {}, "unknown method"),
    (["--preset", "huge"], {}, "unknown preset"),
    (["--data", "/nonexistent/shards"], {}, "no such shard folder"),
    (["--set", "method_options.crops_for_assign=[-1]"], {}, "crops_for_assign"),
    (["--set", "method_options.multicrop=3x500"], {}, "unknown multi-crop preset"),
    (["--set", "learning_rate=1"], {}, "unknown option"),
    (["--set", "epochs=two"], {}, "expected int"),
    (["--global-batch-size", "33"], {"WORLD_SIZE": "2"}, "not divisible by the world size"),
    (["--epochs", "1", "--set", "warmup_epochs=10"], {}, "warmup_epochs 10 must be below epochs 1"),
    (["--set", "accum_steps=0"], {}, "accum_steps must be positive"),
    (["--set", "clip_grad=-1"], {}, "clip_grad=-1.0"),
    (["--global-batch-size", "64", "--set", "accum_steps=3"], {"WORLD_SIZE": "2"}, "x accum_steps 3"),
])
def test_config_errors_are_one_line_and_early(shards, tmp_path, args, env, words, monkeypatch, capsys):
    import train
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "o"
    code = train.main(["--preset", "tiny", "--data", shards, "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error" in line.lower()]) == 1, err
    assert not out.exists()  # nothing left behind, not even the folder the run's lock created


def test_help_and_presets_answer_without_loading_dali():
    for args in (["--help"], ["--list-presets"]):
        r = subprocess.run([PY, "-X", "importtime", "train.py", *args], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip()
        imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}
        assert not {"nvidia.dali", "pipelines", "numba"} & imported, args
    assert "deepclusterv2:" in r.stdout and "tiny" in r.stdout


def test_resume_refuses_a_different_config(shards, tmp_path):
    out = str(tmp_path / "run")
    args = [*TINY, "--batch-size", "16", "--data", shards, "--out", out]
    run_train([*args, "--epochs", "1"])
    r = run_train([*args, "--epochs", "2", "--lr", "0.1"], check=False)
    assert r.returncode == 2 and "different config" in r.stderr and "lr" in r.stderr
    # more epochs with the same recipe continue the run
    r = run_train([*args, "--epochs", "2"])
    assert "resumed from" in r.stderr and "done: 2 epochs" in r.stderr
    # the run's own config.json re-runs it (its run folder, data and recipe), flags on top: it resumes
    r = run_train(["--config", os.path.join(out, "config.json"), "--epochs", "3"])
    assert "resumed from" in r.stderr and "done: 3 epochs" in r.stderr
    r = run_train(["--config", os.path.join(out, "config.json"), "--epochs", "3", "--lr", "0.1"], check=False)
    assert r.returncode == 2 and "different config" in r.stderr


# -- the package's trainer: threads, config printing and re-running, dependencies, loader settings ---

def test_resume_check_refuses_another_accum_steps_and_takes_older_runs_without_the_fields():
    """accum_steps changes the global batch (like batch_size) and clip_grad the recipe: both refused;
    a run saved before those fields existed had their defaults and resumes."""
    import logging
    from dataclasses import replace

    from sslkit.config import ConfigError, to_dict
    from sslkit.train import check_resume_compatible, parse_config
    cfg = parse_config([*TINY, "--data", "d", "--out", "o"])
    older = {k: v for k, v in to_dict(cfg).items() if k not in ("accum_steps", "clip_grad")}
    g = {"config": older, "data": {"identity": "x", "path": os.path.abspath("d")}}
    check_resume_compatible(g, cfg, "x", logging.getLogger("test"))
    for field, value in (("accum_steps", 2), ("clip_grad", 1.0)):
        with pytest.raises(ConfigError, match=f"{field}: "):
            check_resume_compatible(g, replace(cfg, **{field: value}), "x", logging.getLogger("test"))
    assert parse_config([*TINY, "--data", "d", "--global-batch-size", "64", "--set", "accum_steps=4"]).batch_size == 16



def test_print_config_prints_the_resolved_config_and_imports_no_dali(tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([PY, "-X", "importtime", "-m", "sslkit.train", "--preset", "tiny", "--out", str(out),
                        "--epochs", "3", "--set", "use_mmap=false", "--set", "hw_decoder_load=0.5",
                        "--set", "method_options.n_prototypes=[8,8]", "--print-config"],
                       cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads(r.stdout)
    assert (cfg["method"], cfg["preset"], cfg["arch"], cfg["epochs"], cfg["use_mmap"], cfg["hw_decoder_load"]) == \
        ("deepclusterv2", "tiny", "resnet_tiny", 3, False, 0.5)
    assert cfg["method_options"]["n_prototypes"] == [8, 8] and cfg["out"] == str(out)
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}
    assert not {"nvidia", "nvidia.dali", "pipelines", "numba"} & imported
    assert os.listdir(tmp_path) == []   # nothing written, not even the run folder


def test_a_saved_config_reruns_with_flags_and_set_on_top(tmp_path, capsys):
    from sslkit.config import dumps
    from sslkit.train import load_config, parse_config
    saved = parse_config([*TINY, "--batch-size", "8", "--data", "d", "--out", "o"])
    path = tmp_path / "config.json"
    path.write_text(dumps(saved))
    assert load_config(str(path)) == saved
    again = parse_config(["--config", str(path), "--epochs", "5", "--set", "lr=0.25", "--set", "use_mmap=false"])
    assert again == replace_fields(saved, epochs=5, lr=0.25, use_mmap=False)
    # a config saved before a field existed keeps that field's default
    old = json.loads(dumps(saved))
    del old["loader_prefetch"], old["method_options"]["kernel"]
    path.write_text(json.dumps(old))
    assert parse_config(["--config", str(path)]) == replace_fields(saved, method_options=replace_fields(
        saved.method_options, kernel=None))
    import train
    for text, words in [('{"method": "deepclusterv2", "learning_rate": 1}', "unknown option 'learning_rate'"),
                        ("{not json", "not JSON"), ('{"epochs": 3}', 'with a "method"'),
                        ('{"method": "deepclusterv2", "epochs": "x"}', "epochs: expected int")]:
        path.write_text(text)
        assert train.main(["--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --config") and words in err and "\n" not in err, err
    assert train.main(["--config", str(tmp_path / "none.json")]) == 2
    assert "cannot read it" in capsys.readouterr().err
    path.write_text(dumps(saved))
    assert train.main(["--config", str(path), "--preset", "tiny"]) == 2
    assert "drop --method/--preset" in capsys.readouterr().err


def replace_fields(obj, **kw):
    from dataclasses import replace
    return replace(obj, **kw)


def test_the_trainer_passes_every_loader_setting_to_the_loader(monkeypatch):
    import pipelines
    from sslkit import dist
    from sslkit.log import get_logger
    from sslkit.train import build, parse_config
    seen = {}

    class Built(Exception):
        pass

    def fake_make_loader(name, data, **kw):
        seen.update(kw)
        raise Built

    monkeypatch.setattr(pipelines, "make_loader", fake_make_loader)
    cfg = parse_config([*TINY, "--data", "d", "--device", "cpu", "--set", "use_mmap=false", "--set", "loader_threads=3",
                        "--set", "loader_prefetch=5", "--set", "hw_decoder_load=0.25", "--set", "shuffle_buffer=7"])
    with pytest.raises(Built):
        build(cfg, dist.init("cpu"), get_logger(0))
    assert {k: seen[k] for k in ("use_mmap", "num_threads", "prefetch", "hw_decoder_load", "shuffle_buffer")} == \
        dict(use_mmap=False, num_threads=3, prefetch=5, hw_decoder_load=0.25, shuffle_buffer=7)
    with pytest.raises(Built):   # the planned DALI threads win over the setting (the trainer passes its plan)
        build(cfg, dist.init("cpu"), get_logger(0), dali_threads=2)
    assert seen["num_threads"] == 2


@pytest.mark.parametrize("missing,args,words", [
    ("dali", [], ["needs NVIDIA DALI", "sslkit[cuda13]", "sslkit[cuda12]"]),
    ("tensorboard", ["--set", "tensorboard=true"], ["tensorboard=true needs the tensorboard package",
                                                     "sslkit[tensorboard]"]),
])
def test_a_missing_optional_package_is_one_line_before_any_work(missing, args, words, shards, tmp_path, monkeypatch,
                                                                 capsys):
    import sys as _sys

    import sslkit.train
    from sslkit import deps
    if missing == "dali":
        monkeypatch.setattr(deps, "_installed", lambda module: False)
    else:
        monkeypatch.setitem(_sys.modules, "tensorboard", None)   # `import tensorboard` fails, find_spec says None
    monkeypatch.setattr(sslkit.train, "fit", lambda *a, **k: pytest.fail("the run started"))
    out = tmp_path / "o"
    assert sslkit.train.main([*TINY, "--data", shards, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and all(w in err for w in words), err
    assert not out.exists()


def test_epoch_records_count_this_epochs_corrupt_samples_over_every_rank(shards, tmp_path):
    """Two truncated JPEGs, read by whichever rank: each epoch record says 2 (this epoch's count summed
    over ranks), not rank 0's running total."""
    from sslkit.shard.tarwriter import read_index
    from sslkit.shard.manifest import load
    data = str(tmp_path / "corrupt")
    shutil.copytree(shards, data)
    shard = load(data)["shards"][1]
    samples = read_index(os.path.join(data, shard["index"]))
    with open(os.path.join(data, shard["path"]), "r+b") as f:
        for j in (3, 10):
            off, size, _ = samples[j]["jpg"]
            f.seek(off + size // 2)
            f.write(b"\0" * (size - size // 2))
    out = str(tmp_path / "run")
    run_train([*TINY, "--batch-size", "8", "--data", data, "--out", out, "--set", "log_every=12"], nproc=2)
    assert [(r["epoch"], r["corrupt_samples"]) for r in records(out, "epoch").values()] == [(0, 2), (1, 2)]


def test_the_online_knn_monitor_logs_top1_and_its_cost_on_two_ranks(shards, tmp_path):
    """`monitor.data` on 2 ranks (rank 0 evaluates, rank 1 waits in the same collective): a record of
    kind "monitor" after every `monitor.every` epochs and after the last, with kNN top-1 in [0, 1] and
    its seconds; the training records are those of a run without the monitor (it changes nothing)."""
    out = str(tmp_path / "run")
    run_train([*TINY, "--batch-size", "8", "--epochs", "3", "--data", shards, "--out", out, "--set", "log_every=12",
               "--set", f"monitor.data={shards}", "--set", "monitor.every=2", "--set", "monitor.size=32",
               "--set", "monitor.resize=32", "--set", "monitor.k=5"], nproc=2)
    mon = records(out, "monitor")
    assert sorted(mon) == [24, 36] and [m["epoch"] for m in mon.values()] == [1, 2]
    for m in mon.values():
        assert 0.0 <= m["knn_top1"] <= m["knn_top5"] <= 1.0 and m["monitor_s"] > 0 and m["k"] == 5
        assert m["queries"] + m["neighbours"] == 192 and m["queries"] == 96   # the odd sample indices
    assert sorted(records(out, "epoch")) == [12, 24, 36]
    # an unlabelled or missing monitor folder is one line before the build
    r = run_train([*TINY, "--data", shards, "--out", str(tmp_path / "bad"), "--set", "monitor.data=/nonexistent"],
                  check=False)
    assert r.returncode == 2 and "/nonexistent" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "building the" not in r.stderr


def test_ddp_does_not_broadcast_the_dcv2_assignment_table(tmp_path):
    """The per-sample table is the same on every rank; DDP's buffer broadcast before every forward
    would send it from rank 0 each step (2.4 GB at 100M samples)."""
    import torch.distributed as torch_dist
    method = tiny_method(n=32)
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(method)
        kept = {id(b) for b in ddp.modules_buffers}
        assert id(method.assignments) not in kept
        assert id(method.prototypes0) in kept            # the other buffers are still kept in step
    finally:
        torch_dist.destroy_process_group()
