"""Progress of DeepClusterV2's long hooks (the memory-bank pass, each epoch's k-means): plain lines with
rate and ETA off a terminal, only on rank 0, display only (the results do not depend on it), and a
stopped hook says "stopped", not "done". The terminal case (a tqdm bar on rank 0 while rank 1 has
none) runs end to end in test_train.py's pseudo-terminal run."""

from __future__ import annotations

import pytest
import torch

from sslkit.config import TrainConfig, apply_overrides
from sslkit.dist import Preempted
from sslkit.kmeans import spherical_kmeans
from sslkit.methods import RunContext, method_entry


def dcv2(rank=0, progress=True, check_stop=lambda: None):
    """DeepClusterV2 `tiny` (3 heads of 16 prototypes, 10 k-means rounds) over 32 samples in 2 steps."""
    entry = method_entry("deepclusterv2")
    cfg = apply_overrides(TrainConfig(method="deepclusterv2", method_options=entry.meta["options"]()),
                          entry.meta["presets"]["tiny"].overrides)
    ctx = RunContext(rank=rank, dataset_size=32, steps_per_epoch=2, batch_size=16, check_stop=check_stop,
                     progress=progress, progress_every=1e-9)   # every update is a line
    torch.manual_seed(0)
    return entry.factory(cfg, ctx)


def batches():
    g = torch.Generator().manual_seed(0)
    return [{"views": [torch.randn(16, 3, s, s, generator=g) for s in (64, 64, 32, 32)],
             "index": torch.arange(16) + 16 * i} for i in range(2)]


def test_bank_pass_and_kmeans_print_rate_and_eta_off_a_terminal(capsys):
    method = dcv2()
    method.on_train_start(batches())
    method.on_epoch_start(0)
    err = capsys.readouterr().err
    assert "\r" not in err                      # pytest's stderr is not a terminal: no carriage returns
    bank = [ln for ln in err.splitlines() if ln.startswith("memory bank: ")]
    assert bank[0].startswith("memory bank: 0/32 img (0%)") and bank[0].endswith("| started")
    assert bank[1].startswith("memory bank: 16/32 img (50%) | ") and " img/s | " in bank[1] and "| eta " in bank[1]
    assert bank[-1].startswith("memory bank: 32/32 img (100%)") and bank[-1].endswith("| done")
    km = [ln for ln in err.splitlines() if ln.startswith("k-means epoch 0 (3 heads): ")]
    assert km[0].endswith("| started") and km[-1].endswith("| done") and "30/30 round (100%)" in km[-1]
    mid = next(ln for ln in km if "11/30 round" in ln)   # the first round of the second head
    assert " round/s | " in mid and "| eta " in mid and "head 2/3" in mid and "k 16" in mid
    assert len(km) == 32                        # started, one line per round, done


def test_only_rank_0_displays_and_display_changes_nothing(capsys):
    shown = dcv2(rank=0)
    shown.on_train_start(batches())
    shown.on_epoch_start(0)
    capsys.readouterr()
    for quiet in (dcv2(rank=1), dcv2(progress=False)):
        quiet.on_train_start(batches())
        quiet.on_epoch_start(0)
        assert capsys.readouterr().err == ""
        assert torch.equal(quiet.assignments, shown.assignments)
        assert torch.equal(quiet.bank, shown.bank)


def test_a_stopped_kmeans_says_stopped(capsys):
    calls = []

    def check_stop():
        calls.append(1)
        if len(calls) == 3:      # the bank pass of 2 batches polls never; k-means before each round
            raise Preempted("SIGTERM")

    method = dcv2(check_stop=check_stop)
    method.on_train_start(batches())
    with pytest.raises(Preempted):
        method.on_epoch_start(0)
    km = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("k-means epoch 0")]
    assert "2/30 round" in km[-1] and km[-1].endswith("| stopped")


def test_kmeans_reports_each_finished_round():
    x = torch.nn.functional.normalize(torch.randn(40, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    events = []
    spherical_kmeans(x, 3, iters=5, on_iteration=lambda: events.append("start"),
                     on_round_done=lambda: events.append("done"))
    assert events == ["start", "done"] * 5
