"""Every registered method, through the real trainer: a 2-rank gloo run of its `tiny` preset completes,
and a run stopped by SIGTERM in the middle of an epoch resumes to identical step and epoch records.
Parametrised over the registry, so a new method is tested the day it is registered (DeepClusterV2
has the fuller version of these tests in test_train.py)."""

from __future__ import annotations

import os
import signal

import pytest

from sslkit import registry
from sslkit.methods import method_entry

from conftest import build_small
from test_train import assert_same_records, records, run_train, start_train, wait_for_step

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


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_train_and_resume_exactly_after_sigterm(method, shards, tmp_path):
    # 96 images, 2 ranks x 8: 6 steps per epoch; records every 2 steps and at epoch ends.
    args = ["--method", method, "--preset", "tiny", "--batch-size", "8", "--epochs", "2", "--data", shards,
            "--set", "log_every=2", "--set", "shuffle_buffer=32"]
    ref = str(tmp_path / "ref")
    r = run_train([*args, "--out", ref], nproc=2)
    assert "done: 2 epochs, 12 steps" in r.stderr
    assert sorted(records(ref, "epoch")) == [6, 12]
    out = str(tmp_path / "pre")
    proc = start_train([*args, "--out", out], nproc=2)
    wait_for_step(out, 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "checkpoint saved at epoch 0 step 4" in err, err[-3000:]
    run_train([*args, "--out", out], nproc=2)
    assert_same_records(ref, out)
