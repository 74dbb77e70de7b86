"""train.py + DeepClusterV2: the loss falls, torchrun with 2 gloo ranks completes, exact resume
after a kill and after preemption, one-line config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sslkit.config import TrainConfig, apply_overrides
from sslkit.methods import create_method, method_entry
from sslkit.methods.base import RunContext
from sslkit.methods.deepclusterv2 import IGNORE, dcv2_loss

from conftest import REPO, build_small

PY = sys.executable
TINY = ["--method", "deepclusterv2", "--preset", "tiny", "--batch-size", "16",
        "--set", "method_options.n_prototypes=[8,8,8]", "--set", "log_every=1", "--set", "shuffle_buffer=64",
        # DALI's own ops instead of the numba kernel: identical views (tests/test_pipelines.py), and no
        # kernel compilation in every test process
        "--set", "method_options.kernel=native"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "s")
    build_small(out, sources=("sample:96",))
    return out


def run_train(args, nproc=1, check=True, env=None, **kw):
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", str(29500 + os.getpid() % 500),
           "train.py", *args] if nproc > 1 else [PY, "train.py", *args]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=e, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


def step_losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "step"}


def tiny_method():
    entry = method_entry("deepclusterv2")
    cfg = apply_overrides(TrainConfig(method="deepclusterv2", method_options=entry.options()), entry.presets["tiny"])
    ctx = RunContext(rank=0, world_size=1, device=torch.device("cpu"), seed=0)
    return create_method(cfg, ctx), ctx


def test_dcv2_loss_is_cross_entropy_over_heads_and_crops():
    z = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)  # 3 views x 2 images
    protos = [torch.nn.functional.normalize(torch.randn(5, 4), dim=1) for _ in range(2)]
    targets = torch.tensor([[1, 3], [IGNORE, 0]])
    loss = dcv2_loss(z, protos, targets, n_views=3, temperature=0.1)
    by_hand = (torch.nn.functional.cross_entropy(z @ protos[0].t() / 0.1, torch.tensor([1, 3] * 3)) +
               torch.nn.functional.cross_entropy(z @ protos[1].t() / 0.1, torch.tensor([IGNORE, 0] * 3),
                                                 ignore_index=IGNORE)) / 2
    assert torch.allclose(loss, by_hand)


def test_dcv2_loss_falls_on_a_tiny_model():
    method, ctx = tiny_method()
    torch.manual_seed(0)
    n = 32
    batch = {"views": [torch.randn(n, 3, 64, 64), torch.randn(n, 3, 64, 64), torch.randn(n, 3, 32, 32),
                       torch.randn(n, 3, 32, 32)], "index": torch.arange(n)}

    class OneBatch:  # the loader interface the hooks use
        config = type("C", (), {"batch_size": n})
        shards = type("S", (), {"total": n})

        def __len__(self):
            return 1

        def __iter__(self):
            yield batch

    method.on_train_start(OneBatch(), RunContext(rank=0, world_size=1, device=torch.device("cpu"), seed=0,
                                                 autocast=lambda: torch.autocast("cpu", enabled=False)))
    method.on_epoch_start(0, ctx)
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


def test_torchrun_two_gloo_ranks_complete_an_epoch(shards, tmp_path):
    out = str(tmp_path / "ddp")
    r = run_train([*TINY, "--data", shards, "--out", out, "--epochs", "1"], nproc=2)
    assert "done: 1 epochs" in r.stderr
    losses = step_losses(out)
    assert len(losses) == 96 // 2 // 16  # 3 steps: each rank reads half the data
    latest = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    files = os.listdir(os.path.join(out, "checkpoints", latest))
    assert {"global.pt", "rank0.pt", "rank1.pt", "COMPLETE"} <= set(files)
    rank0 = torch.load(os.path.join(out, "checkpoints", latest, "rank0.pt"), weights_only=False)
    rank1 = torch.load(os.path.join(out, "checkpoints", latest, "rank1.pt"), weights_only=False)
    # per-rank memory banks hold disjoint samples
    assert not set(rank0["method"]["bank_index"].tolist()) & set(rank1["method"]["bank_index"].tolist())
    g = torch.load(os.path.join(out, "checkpoints", latest, "global.pt"), weights_only=False)
    assert (g["model"]["assignments"] >= 0).all()  # every sample of the dataset is assigned
    assert g["config"]["method_options"]["n_prototypes"] == [8, 8, 8]


def test_killed_after_epoch_resumes_exactly(shards, tmp_path):
    args = [*TINY, "--data", shards, "--epochs", "3"]
    ref = str(tmp_path / "ref")
    run_train([*args, "--out", ref], nproc=2)
    out = str(tmp_path / "killed")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(29000 + os.getpid() % 500),
           "train.py", *args, "--out", out]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = os.path.join(out, "checkpoints", "latest")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(latest) and "step-00000003" in open(latest).read()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole torchrun job, as a node failure would
    proc.wait()
    assert os.path.exists(latest), "no checkpoint before the kill"
    assert len(step_losses(out)) < 9, "the run finished before it was killed"
    r = run_train([*args, "--out", out], nproc=2)
    assert "resumed from" in r.stderr
    want, got = step_losses(ref), step_losses(out)
    assert sorted(want) == list(range(1, 10)) and sorted(got) == list(range(1, 10))
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-4), (s, want[s], got[s])


def test_preemption_signal_checkpoints_mid_epoch_and_resumes_exactly(shards, tmp_path):
    args = [*TINY, "--data", shards, "--epochs", "2", "--batch-size", "8"]
    ref = str(tmp_path / "ref")
    run_train([*args, "--out", ref])
    out = str(tmp_path / "pre")
    proc = subprocess.Popen([PY, "train.py", *args, "--out", out], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "preempted (SIGTERM)" in err
    stopped_at = max(step_losses(out))
    assert stopped_at < 24
    run_train([*args, "--out", out])
    want, got = step_losses(ref), step_losses(out)
    assert sorted(got) == sorted(want) == list(range(1, 25))
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-4), (s, want[s], got[s])


@pytest.mark.parametrize("args,env,words", [
    (["--method", "simclr"], {}, "unknown method"),
    (["--preset", "huge"], {}, "unknown preset"),
    (["--data", "/nonexistent/shards"], {}, "no such shard folder"),
    (["--set", "method_options.crops_for_assign=[0,9]"], {}, "crops_for_assign"),
    (["--set", "method_options.multicrop=3x500"], {}, "unknown multi-crop preset"),
    (["--set", "learning_rate=1"], {}, "unknown option"),
    (["--set", "epochs=two"], {}, "expected int"),
    (["--global-batch-size", "33"], {"WORLD_SIZE": "2"}, "not divisible by the world size"),
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
    assert not (out / "checkpoints").exists()


def test_resume_refuses_a_different_config(shards, tmp_path):
    out = str(tmp_path / "run")
    run_train([*TINY, "--data", shards, "--out", out, "--epochs", "1"])
    r = run_train([*TINY, "--data", shards, "--out", out, "--epochs", "2", "--lr", "0.1"], check=False)
    assert r.returncode == 2 and "different config" in r.stderr and "lr" in r.stderr
    # more epochs with the same recipe continue the run
    r = run_train([*TINY, "--data", shards, "--out", out, "--epochs", "2"])
    assert "resumed from" in r.stderr and "done: 2 epochs" in r.stderr
