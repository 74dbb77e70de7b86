"""Elastic resume, end to end: a run preempted mid-epoch resumes on another number of ranks (2 -> 1 -> 2
for DeepClusterV2, 1 -> 2 -> 1 for SwAV, on CPU under torchrun), continues the interrupted epoch with
the samples the old ranks had not reached, re-splits the per-rank method state (DCv2's memory bank by
sample index, SwAV's queue newest first) and carries on from the saved step."""

from __future__ import annotations

import collections
import os
import signal

import pytest
import torch

from conftest import build_small
from test_train import records, run_train, start_train, wait_for_step

STEPS = 12   # 192 images at 2 ranks x 8 (or 1 x 16): 12 steps per epoch
COMMON = ["--preset", "tiny", "--epochs", "1", "--set", "log_every=1", "--set", "shuffle_buffer=64",
          "--set", "method_options.kernel=torch"]
DCV2 = ["--method", "deepclusterv2", "--set", "method_options.n_prototypes=[8,8,8]", *COMMON]
SWAV = ["--method", "swav", "--set", "method_options.n_prototypes=8", "--set", "method_options.queue_length=64",
        "--set", "method_options.epoch_queue_starts=0", *COMMON]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("elastic") / "s")
    build_small(out, sources=("sample:192",), max_count=48)
    return out


def preempt(args: list[str], nproc: int, after: int) -> tuple[str, int]:
    """Run until a step past `after` is logged, then SIGTERM the job (a scheduler's preemption): the
    ranks stop together at the next log step. Returns (stderr, the step saved)."""
    proc = start_train(args, nproc=nproc)
    wait_for_step(args[args.index("--out") + 1], after, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # (torchrun itself exits 1 after passing a signal on; its workers saved and exited 0)
    assert proc.returncode in ((0, 1) if nproc > 1 else (0,)) and "preempted (SIGTERM)" in err, err[-3000:]
    out = args[args.index("--out") + 1]
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        return err, int(f.read().strip().split("-")[1])


def rank_files(out: str, step: int) -> list[dict]:
    d = os.path.join(out, "checkpoints", f"step-{step:08d}")
    n = torch.load(os.path.join(d, "global.pt"), weights_only=False)["world_size"]
    return [torch.load(os.path.join(d, f"rank{q}.pt"), weights_only=False) for q in range(n)]


def assert_log_continues(out: str, saved: list[int]):
    """Every step logged once, in order, each resume going on from the step its checkpoint saved."""
    steps = sorted(records(out, "step"))
    assert steps == list(range(1, steps[-1] + 1)), steps
    assert all(s in steps for s in saved)


def test_dcv2_two_ranks_to_one_and_back_covers_the_epoch(shards, tmp_path):
    out = str(tmp_path / "run")
    base = [*DCV2, "--data", shards, "--out", out]
    _, first = preempt([*base, "--batch-size", "8"], nproc=2, after=2)
    assert 0 < rank_files(out, first)[0]["loader"]["position"] < STEPS   # mid-epoch
    err, second = preempt([*base, "--batch-size", "8"], nproc=1, after=first + 2)
    assert "elastic resume: 2 rank(s) x 8 -> 1 rank(s) x 8 (global batch 16 -> 8" in err, err[-3000:]
    assert "memory bank: the" in err and "re-keyed by sample index over 1 rank(s)" in err
    [state] = rank_files(out, second)
    assert state["loader"]["stages"] == [[2, 8, rank_files(out, first)[0]["loader"]["position"]]]
    r = run_train([*base, "--batch-size", "8"], nproc=2)
    assert "elastic resume: 1 rank(s) x 8 -> 2 rank(s) x 8" in r.stderr and "done: 1 epochs" in r.stderr
    # the epoch's memory banks, written over three stages on 2, 1 and 2 ranks: every sample, none twice
    # but the last stage's padding to full batches on both ranks (fewer than 2 x 8 repeats)
    final = int(open(os.path.join(out, "checkpoints", "latest")).read().split("-")[1])
    banks = [s["method"]["bank_index"][:s["method"]["bank_ptr"]].tolist() for s in rank_files(out, final)]
    counts = collections.Counter(banks[0] + banks[1])
    assert set(counts) == set(range(192)), sorted(set(range(192)) - set(counts))
    assert sum(c - 1 for c in counts.values()) < 2 * 8 and max(counts.values()) <= 2
    assert_log_continues(out, [first, second])
    assert records(out, "epoch")[final]["epoch"] == 0


def test_swav_one_rank_to_two_and_back_resplits_the_queue(shards, tmp_path):
    out = str(tmp_path / "run")
    base = [*SWAV, "--data", shards, "--out", out]
    _, first = preempt([*base, "--batch-size", "16"], nproc=1, after=2)
    [one] = rank_files(out, first)
    assert one["method"]["queue_filled"] > 0 and 0 < one["loader"]["position"] < STEPS
    # 2 ranks x 8: the same global batch; the queue's 64 rows become 32 per rank, newest first
    err, second = preempt([*base, "--batch-size", "8"], nproc=2, after=first + 2)
    assert "elastic resume: 1 rank(s) x 16 -> 2 rank(s) x 8 (global batch 16 -> 16" in err, err[-3000:]
    assert "of 32 rows per rank re-split from 1 rank(s), newest first" in err
    two = rank_files(out, second)
    assert [s["method"]["queue"].shape[1] for s in two] == [32, 32]
    assert two[0]["loader"]["stages"] == [[1, 16, one["loader"]["position"]]]
    r = run_train([*base, "--batch-size", "16"], nproc=1)
    assert "elastic resume: 2 rank(s) x 8 -> 1 rank(s) x 16" in r.stderr and "done: 1 epochs" in r.stderr
    # the three stages' batches add up to one epoch of the global batch: 12 optimiser steps
    final = int(open(os.path.join(out, "checkpoints", "latest")).read().split("-")[1])
    assert final == STEPS
    assert_log_continues(out, [first, second])
