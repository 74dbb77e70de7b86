"""Every registered method, through the real trainer: its `tiny` preset completes a 2-rank gloo run, and
a run stopped by SIGTERM in the middle of an epoch resumes to identical step and epoch records.
Parametrised over the registry, so a new method is tested the day it is registered (DeepClusterV2
has the fuller, all-distributed version of these tests in test_train.py).

The resume check runs the trainer in this process (one rank): the pipelines' numba operators are
compiled once for all methods instead of once per process."""

from __future__ import annotations

import os
import signal

import pytest

import train
from sslkit import registry
from sslkit.methods import method_entry

from conftest import build_small
from test_train import assert_same_records, records, run_train

METHODS = [m for m in registry.names("method") if m != "deepclusterv2"]


def test_every_method_has_a_tiny_preset_and_describes_its_presets():
    for name in registry.names("method"):
        presets = method_entry(name).meta["presets"]
        assert "tiny" in presets, name
        assert all(p.description and "\n" not in p.description for p in presets.values()), name


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("methods") / "s")
    build_small(out, sources=("sample:96",))   # labelled by source photo, so `supervised` runs too
    return out


def args_for(method: str, shards: str, batch: int) -> list[str]:
    return ["--method", method, "--preset", "tiny", "--batch-size", str(batch), "--epochs", "2", "--data", shards,
            "--set", "log_every=2", "--set", "shuffle_buffer=32"]


@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_ranks_complete(method, shards, tmp_path):
    out = str(tmp_path / "ddp")
    r = run_train([*args_for(method, shards, 8), "--out", out], nproc=2)   # 96 images, 2 x 8: 6 steps per epoch
    assert "done: 2 epochs, 12 steps" in r.stderr
    assert sorted(records(out, "epoch")) == [6, 12]


@pytest.mark.parametrize("method", METHODS)
def test_sigterm_mid_epoch_resumes_exactly(method, shards, tmp_path, monkeypatch, capsys):
    """One rank of 16 (6 steps per epoch, records every 2): SIGTERM during step 3 stops the run at
    step 4, inside epoch 0; the resume continues to the same step AND epoch records."""
    args = args_for(method, shards, 16)
    ref = str(tmp_path / "ref")
    assert train.main([*args, "--out", ref]) == 0
    real_step, steps = train.train_step, []

    def step_then_signal(run, batch, lr):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # handled by the trainer: it stops at the next log step
        return real_step(run, batch, lr)

    out = str(tmp_path / "pre")
    monkeypatch.setattr(train, "train_step", step_then_signal)
    assert train.main([*args, "--out", out]) == 0
    assert "checkpoint saved at epoch 0 step 4" in capsys.readouterr().err
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.main([*args, "--out", out]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert_same_records(ref, out)
