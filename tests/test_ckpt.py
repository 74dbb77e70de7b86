"""sslkit.ckpt on its own (one process): retention, skipping incomplete, unreadable or corrupt (checksum)
checkpoints with a one-line reason, older checkpoints without checksums, refusing to start over when
none is usable, checkpoints of another world size, a write that fails (full disk, read-only) in one line."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os

import pytest
import torch

from sslkit import ckpt
from sslkit.dist import DistInfo

from test_faults import flip_tensor_byte

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


def test_a_checkpoint_of_another_world_size_resumes_with_every_rank_file(tmp_path):
    """Written by 2 ranks, read by 1 (or 3): this rank gets old rank `rank % 2`'s state, `rank_states`
    every old rank's (verified); with an old rank's file missing, the checkpoint is skipped."""
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend=None)
    save(tmp_path, 1, info=two)
    d = tmp_path / "checkpoints" / "step-00000001"
    sums = json.loads((d / "COMPLETE").read_text())
    sums["files"]["rank1.pt"] = ckpt._atomic_save({"version": ckpt.VERSION, "step": 1, "loader": 101}, str(d / "rank1.pt"))
    (d / "COMPLETE").write_text(json.dumps(sums))
    where, g, r = ckpt.load_agreed(str(tmp_path), ONE)
    assert g["world_size"] == 2 and r["loader"] == 1
    third = DistInfo(rank=3, world_size=4, local_rank=0, device=torch.device("cpu"), backend=None)
    assert ckpt._try_load(str(d), third)[1]["loader"] == 101     # new rank 3 of 4 starts from old rank 1
    assert [s["loader"] for s in ckpt.rank_states(where, 2)] == [1, 101]
    (d / "rank1.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"rank1.pt: missing \(one of the 2 ranks' files"):
        ckpt.load_agreed(str(tmp_path), ONE)


# -- checksums and failed writes (issue 19) ------------------------------------------------------------

def test_complete_lists_every_files_size_and_sha256(tmp_path):
    save(tmp_path, 1)
    d = tmp_path / "checkpoints" / "step-00000001"
    sums = json.loads((d / "COMPLETE").read_text())["files"]
    assert set(sums) == {"global.pt", "rank0.pt"}
    for name, want in sums.items():
        data = (d / name).read_bytes()
        assert want == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_flipped_byte_falls_back_in_the_trainer_and_in_tools(tmp_path, caplog):
    for s in (1, 2):
        save(tmp_path, s)
    bad = tmp_path / "checkpoints" / "step-00000002" / "global.pt"
    flip_tensor_byte(str(bad))                       # still loads: only the checksum tells
    log = logging.getLogger("test-ckpt")
    with caplog.at_level(logging.WARNING, logger="test-ckpt"):
        d, g, _ = ckpt.load_agreed(str(tmp_path), ONE, log)
    assert d.endswith("step-00000001") and float(g["model"]["w"][0]) == 1
    [msg] = [rec.getMessage() for rec in caplog.records]
    assert "step-00000002/global.pt: corrupt" in msg
    notes = []
    assert ckpt.global_file(str(tmp_path), notes.append).endswith("step-00000001/global.pt")
    assert len(notes) == 1 and "step-00000002/global.pt: corrupt" in notes[0]
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):   # named explicitly: no substitute
        ckpt.global_file(str(bad))


def test_checkpoints_without_checksums_load_with_a_note_and_their_crc_still_catches_damage(tmp_path, caplog):
    """Written before checksums existed (an empty COMPLETE): accepted with one note; the CRC-32 that
    torch's zip format keeps per member still rejects a flipped byte."""
    for s in (1, 2):
        save(tmp_path, s)
        (tmp_path / "checkpoints" / f"step-{s:08d}" / "COMPLETE").write_text("")
    log = logging.getLogger("test-ckpt")
    with caplog.at_level(logging.WARNING, logger="test-ckpt"):
        d, _, _ = ckpt.load_agreed(str(tmp_path), ONE, log)
    assert d.endswith("step-00000002")
    [msg] = [rec.getMessage() for rec in caplog.records]
    assert "no checksum list" in msg
    flip_tensor_byte(str(tmp_path / "checkpoints" / "step-00000002" / "global.pt"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test-ckpt"):
        d, _, _ = ckpt.load_agreed(str(tmp_path), ONE, log)
    assert d.endswith("step-00000001")
    assert "fails its CRC-32" in caplog.records[0].getMessage()


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on device"),
                                        (errno.EROFS, "read-only file system")])
def test_a_failed_write_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, code, words):
    """The file system refuses global.pt's bytes (after rank0.pt was written): one line naming the file
    and the cause, no .tmp, nothing of the failed checkpoint left, `latest` and the previous one intact."""
    save(tmp_path, 1)
    write = ckpt._HashingWriter.write

    def refuse(self, b):
        if self.f.name.endswith("global.pt.tmp"):
            raise OSError(code, os.strerror(code))
        return write(self, b)

    monkeypatch.setattr(ckpt._HashingWriter, "write", refuse)
    with pytest.raises(ckpt.CheckpointError) as e:
        save(tmp_path, 2)
    msg = str(e.value)
    assert "\n" not in msg and f"step-00000002/global.pt: {words}" in msg and "step-00000001, is intact" in msg
    assert steps(tmp_path) == [1]
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp")]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000001"
    monkeypatch.undo()
    assert ckpt.load_agreed(str(tmp_path), ONE)[1]["step"] == 1
