"""sslkit.ckpt on its own (one process): retention, skipping incomplete or unreadable checkpoints with
a one-line reason, refusing to start over when none is usable, the world-size check."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from sslkit import ckpt
from sslkit.dist import DistInfo

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def save(out, step, keep=False, keep_last=2, info=ONE):
    ckpt.save(str(out), step, {"model": {"w": torch.full((2,), float(step))}, "epoch": step},
              {"loader": step}, info, keep=keep, keep_last=keep_last)


def steps(out) -> list[int]:
    return sorted(int(n.split("-")[1]) for n in os.listdir(out / "checkpoints") if n.startswith("step-"))


def test_retention_keeps_the_newest_and_every_periodic_one(tmp_path):
    for s in range(1, 8):
        save(tmp_path, s, keep=s % 3 == 0)
    assert steps(tmp_path) == [3, 6, 7]            # periodic 3 and 6, plus the newest two (6 and 7)
    save(tmp_path, 8)
    assert steps(tmp_path) == [3, 6, 7, 8]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000008"
    assert ckpt.find_latest(str(tmp_path)).endswith("step-00000008")


def test_resume_takes_the_newest_complete_and_readable_checkpoint(tmp_path, caplog):
    for s in (10, 20, 30, 40):
        save(tmp_path, s, keep=True)
    root = tmp_path / "checkpoints"
    os.remove(root / "step-00000040" / "COMPLETE")                      # interrupted while saving
    g30 = root / "step-00000030" / "global.pt"
    g30.write_bytes(g30.read_bytes()[:100])                             # truncated
    os.remove(root / "step-00000020" / "rank0.pt")                      # a rank's file lost
    os.remove(root / "latest")
    log = logging.getLogger("test-ckpt")
    with caplog.at_level(logging.WARNING, logger="test-ckpt"):
        d, g, r = ckpt.load_agreed(str(tmp_path), ONE, log)
    assert d.endswith("step-00000010") and g["step"] == 10 and r["loader"] == 10
    assert float(g["model"]["w"][0]) == 10
    [msg] = [rec.getMessage() for rec in caplog.records]
    assert "step-00000040 is incomplete" in msg and "step-00000030/global.pt: unreadable" in msg
    assert "step-00000020/rank0.pt: missing" in msg


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    save(tmp_path, 5)
    (tmp_path / "checkpoints" / "step-00000005" / "global.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="none can be resumed") as e:
        ckpt.load_agreed(str(tmp_path), ONE)
    assert "\n" not in str(e.value)
    assert ckpt.load_agreed(str(tmp_path / "fresh"), ONE) is None   # no checkpoints at all: a fresh start


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path):
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend=None)
    save(tmp_path, 1, info=two)
    with pytest.raises(ckpt.CheckpointError, match="written by 2 ranks; resume with the same world size"):
        ckpt.load_agreed(str(tmp_path), ONE)
