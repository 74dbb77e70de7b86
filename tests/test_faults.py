"""Fault injection, end to end: every case asserts the one line the user sees AND that nothing was lost.

- a second run on a held run folder (2 gloo ranks each): refused on every rank, naming the holder; the
  holder's log and checkpoints are untouched and it goes on; then a rank of the holder killed with
  SIGKILL mid-epoch: its peer says which rank died, exits non-zero, no traceback;
- a flipped byte in a rank's checkpoint file: caught by its checksum, the resume falls back and the
  re-run steps equal an uninterrupted run's; then a full disk while that checkpoint is rewritten (rank
  1's file goes to /dev/full, a real ENOSPC): one line naming the file, no .tmp left, the previous
  checkpoint intact and verifiable;
- eval/convert/pseudolabel on a run whose newest checkpoint is corrupt: the previous one, with one line;
- a read-only --out (a read-only mount: root ignores permission bits) and an --out under a file;
- SIGTERM in DeepClusterV2's memory-bank pass: the message does not promise a checkpoint that is not there;
- a lock left by a killed process: taken over with a warning; a held one refused; log.jsonl is never
  rewritten without the lock, and a full disk under it is one warning, not a crash of rank 0 alone.
Shared: one 2-rank, 2-epoch run (checkpoints at steps 12 and 24) that each test copies. The two
2-rank scenarios each inject two faults into one run: every torchrun launch costs ~15 s of start-up
on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

from sslkit import ckpt, runlock
from sslkit.log import JsonLog

from conftest import REPO, build_small, descendants, environ
from test_train import PY, TINY, assert_same_records, records, run_train, start_train, wait_for_step

ARGS = [*TINY, "--batch-size", "8"]   # 2 ranks x 8: 12 steps per epoch over 192 images
OUR_FRAME = re.compile(r'File "[^"]*(train\.py|/sslkit/[^"]*)"')


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("faults") / "s")
    build_small(out, sources=("sample:192",), max_count=64)
    return out


@pytest.fixture(scope="module")
def run2(shards, tmp_path_factory):
    """A finished 2-rank run of 2 epochs: complete checkpoints at steps 12 and 24."""
    out = str(tmp_path_factory.mktemp("run2") / "run")
    run_train([*ARGS, "--data", shards, "--out", out], nproc=2)
    return out


def copy_run(run2: str, dst) -> str:
    out = str(dst / "run")
    shutil.copytree(run2, out)
    return out


def assert_one_line(err: str, words: str) -> str:
    """Exactly one line of `err` holds `words`, and no traceback passes through our code."""
    lines = [line for line in err.splitlines() if words in line]
    assert len(lines) == 1, err[-4000:]
    assert not OUR_FRAME.search(err), err[-4000:]
    return lines[0]


def no_tmp_left(out: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.endswith(".tmp")]


def assert_checkpoint_intact(d: str, ranks: int = 2):
    """Every file of checkpoint folder `d` matches its recorded size and sha256 and loads."""
    sums = ckpt.checksums(d)
    assert sums is not None and set(sums) == {"global.pt", *(f"rank{r}.pt" for r in range(ranks))}
    for name in sums:
        ckpt.verify_file(os.path.join(d, name), sums)
    assert ckpt.read_global(d)["step"] == int(os.path.basename(d).split("-")[1])


def flip_tensor_byte(path: str):
    """Flip one bit inside the largest tensor of a torch checkpoint: the file still loads (what made
    it go unnoticed) but holds other numbers."""
    with zipfile.ZipFile(path) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(member.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    torch.load(path, map_location="cpu", weights_only=False)  # still loads: only a checksum can tell


class Lines(logging.Handler):
    """The messages of the warnings a logger emits."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def rank_pid(proc, rank: int) -> int:
    return next(pid for pid in descendants(proc.pid) if environ(pid).get("RANK") == str(rank))


# -- the run folder's lock ------------------------------------------------------------------------------

def test_a_second_run_is_refused_then_a_killed_rank_is_one_line_on_its_peer(shards, run2, tmp_path):
    """Run A resumes run2 for more epochs. Run B starts on the same --out with another seed (2 ranks
    each): it stops on both ranks with one line naming A's host and pid, and writes nothing. A goes on
    (its log continues, nothing of it replaced); then its rank 1 is killed with SIGKILL: rank 0 says in
    one line which rank died, exits non-zero, and the checkpoints stay intact. (A is paused with
    SIGSTOP while B tries, so that it surely still runs then: a stopped process keeps its lock as a busy
    one does.)"""
    out = copy_run(run2, tmp_path)
    a = start_train([*ARGS, "--epochs", "12", "--data", shards, "--out", out], nproc=2)
    try:
        wait_for_step(out, 27, a)
        holder = rank_pid(a, 0)
        job = [a.pid, *descendants(a.pid)]  # torchrun starts its workers in sessions of their own
        for pid in job:
            os.kill(pid, signal.SIGSTOP)
        try:
            b = run_train([*ARGS, "--epochs", "12", "--seed", "1", "--data", shards, "--out", out], nproc=2,
                          check=False, timeout=120)
        finally:
            for pid in job:
                os.kill(pid, signal.SIGCONT)
        assert b.returncode != 0
        line = assert_one_line(b.stderr, "is in use by another run")
        assert f"pid {holder}" in line and "host " in line and out in line, line
        wait_for_step(out, 39, a)             # A goes on: past its next checkpoint (step 36)
        victim = rank_pid(a, 1)
        os.kill(victim, signal.SIGKILL)
        _, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    assert a.returncode != 0
    line = assert_one_line(err, "died")
    assert f"rank 0: rank 1 (pid {victim}) died" in line and "resume" in line, line
    assert json.load(open(os.path.join(out, "config.json")))["seed"] == 0
    steps = records(out, "step")              # raises on a step logged twice
    assert sorted(steps) == list(range(3, max(steps) + 1, 3)) and max(steps) >= 39
    before = records(run2, "step")
    assert all(steps[s]["loss"] == before[s]["loss"] for s in before)
    for step in (24, 36):
        assert_checkpoint_intact(os.path.join(out, "checkpoints", f"step-{step:08d}"))
    assert open(os.path.join(out, ".lock")).read() == ""    # rank 0 released it on its way out


def test_a_lock_of_a_killed_process_is_taken_over_and_a_live_one_refused(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([PY, "-c", "import sys, time; from sslkit.runlock import RunLock; "
                               f"RunLock.acquire({out!r}); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunFolderError, match=f"in use by another run .*pid {holder.pid}") as e:
            runlock.RunLock.acquire(out)
        assert "\n" not in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    warnings = []
    lock = runlock.RunLock.acquire(out, warnings.append)
    assert len(warnings) == 1 and f"pid {holder.pid}" in warnings[0] and "stale lock" in warnings[0]
    assert json.load(open(os.path.join(out, ".lock")))["pid"] == os.getpid()
    lock.release()
    again = runlock.RunLock.acquire(out, warnings.append)
    assert again.held and len(warnings) == 1  # after a clean release: no warning
    again.release()


def test_the_log_is_never_rewritten_without_the_folders_lock(tmp_path):
    """On resume the log drops the records after the resumed step by replacing the file: only the
    holder of the folder may do that (another run's open handle would write into a deleted file)."""
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"kind": "step", "step": s}) + "\n" for s in (3, 6, 9)))
    other = runlock.RunLock.acquire(str(tmp_path / "other"))
    for lock in (None, other):
        with pytest.raises(RuntimeError, match="only under the run folder's lock"):
            JsonLog(str(log), resume_step=3, lock=lock)
    assert log.read_text().count("\n") == 3
    mine = runlock.RunLock.acquire(str(log.parent))
    JsonLog(str(log), resume_step=3, lock=mine).close()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [3]


def test_a_full_disk_under_the_log_is_one_warning_not_a_crash_of_rank_0(tmp_path):
    """Only rank 0 writes log.jsonl: an exception there would leave the other ranks waiting in their
    next collective. A record that cannot be written is one warning; the run goes on to its next
    checkpoint, which then stops every rank together (tested above)."""
    path = tmp_path / "log.jsonl"
    os.symlink("/dev/full", path)           # every write: ENOSPC
    seen, logger = Lines(), logging.getLogger("sslkit")
    logger.addHandler(seen)
    try:
        log = JsonLog(str(path))
        for step in (3, 6, 9):
            log.write({"kind": "step", "step": step})
        log.close()
    finally:
        logger.removeHandler(seen)
    assert len(seen.lines) == 1 and "no space left on device" in seen.lines[0] and str(path) in seen.lines[0]


# -- dead peers, full disks, read-only folders ---------------------------------------------------------

def read_only(folder: str) -> list[str]:
    """A command prefix under which `folder` is read-only. Root ignores permission bits, so there a
    read-only tmpfs is mounted over it in a private mount namespace; otherwise chmod does it."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return []
    return ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs -o ro,size=1m sslkit-ro "{folder}" && exec "$@"', "sh"]


@pytest.mark.parametrize("where", ["read-only", "under a file"])
def test_an_out_that_cannot_be_written_is_one_line(shards, tmp_path, where):
    folder = tmp_path / "ro"
    folder.mkdir()
    prefix, out = read_only(str(folder)), str(folder / "run")
    if where == "under a file":
        (tmp_path / "file").write_text("x")
        prefix, out = [], str(tmp_path / "file" / "run")
    r = subprocess.run([*prefix, PY, "train.py", *TINY, "--data", shards, "--out", out], cwd=REPO,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    words = "read-only file system" if where == "read-only" else "a part of the path is a file"
    line = assert_one_line(r.stderr, words)
    assert "Traceback" not in r.stderr and "cannot be used as the run folder" in line and str(tmp_path) in line, line


# -- checksums ------------------------------------------------------------------------------------------

def test_a_flipped_byte_is_caught_and_a_full_disk_is_one_line_losing_nothing(shards, run2, tmp_path):
    """Two faults on one resume of run2 (2 ranks):
    1. one bit of rank 1's newest file (step 24) is flipped (the file still loads): its checksum rejects
       it, both ranks resume from step 12, and the re-run steps equal the uninterrupted run's;
    2. rewriting step 24, rank 1's file goes through a link to /dev/full (every write: ENOSPC, as on a
       full file system): one line naming the file, exit non-zero, no .tmp left, the files rank 0
       wrote for that checkpoint removed, `latest` and the step-12 checkpoint intact."""
    out = copy_run(run2, tmp_path)
    failing = os.path.join(out, "checkpoints", "step-00000024")
    flip_tensor_byte(os.path.join(failing, "rank1.pt"))
    os.symlink("/dev/full", os.path.join(failing, "rank1.pt.tmp"))
    r = run_train([*ARGS, "--data", shards, "--out", out], nproc=2, check=False, timeout=240)
    assert r.returncode != 0
    line = assert_one_line(r.stderr, "not from the newer")
    assert "resuming from" in line and "step-00000012" in line, line
    assert "step-00000024/rank1.pt: corrupt (its sha256 differs" in line, line
    assert_same_records(run2, out)   # the step-24 records are written before its checkpoint
    line = assert_one_line(r.stderr, "no space left on device")
    assert "step-00000024/rank1.pt" in line and "step-00000012, is intact" in line, line
    assert no_tmp_left(out) == []
    assert not {"COMPLETE", "global.pt", "rank0.pt"} & set(os.listdir(failing))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000012"
    assert_checkpoint_intact(os.path.join(out, "checkpoints", "step-00000012"))


def test_eval_convert_and_pseudolabel_fall_back_past_a_corrupt_newest_checkpoint(run2, tmp_path):
    from sslkit import convert
    from sslkit.pseudolabel.teacher import PseudolabelError, resolve
    from sslkit.trunk import TrunkError, load_trunk
    out = copy_run(run2, tmp_path)
    bad = os.path.join(out, "checkpoints", "step-00000024", "global.pt")
    flip_tensor_byte(bad)
    seen, logger = Lines(), logging.getLogger("sslkit")
    logger.addHandler(seen)
    try:
        model, spec = load_trunk(out)                                     # what `python -m sslkit.eval` does
        assert convert.main(["export", out, "--out", str(tmp_path / "trunk.pth")]) == 0
        assert resolve(out).endswith("step-00000012/global.pt")           # the pseudolabel teacher
    finally:
        logger.removeHandler(seen)
    assert spec.step == 12
    warnings = seen.lines
    assert len(warnings) == 3 and all("step-00000012" in w and "step-00000024/global.pt: corrupt" in w
                                      for w in warnings), warnings
    g12 = ckpt.read_global(os.path.join(out, "checkpoints", "step-00000012"))
    exported = torch.load(tmp_path / "trunk.pth")
    assert all(torch.equal(v, g12["model"]["backbone." + k]) for k, v in exported.items())
    # named explicitly, a corrupt checkpoint is an error, not a silent substitute
    for named in (bad, os.path.dirname(bad)):
        with pytest.raises(TrunkError, match="corrupt"):
            load_trunk(named)
    with pytest.raises(PseudolabelError, match="corrupt"):
        resolve(bad)


# -- preemption before the first checkpoint -------------------------------------------------------------

def test_sigterm_in_the_memory_bank_pass_does_not_promise_a_checkpoint(shards, tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([PY, "train.py", *TINY, "--batch-size", "16", "--data", shards, "--out", out], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "filling the memory bank" in line:
            proc.send_signal(signal.SIGTERM)
            break
    err = "".join(seen) + proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, err[-3000:]
    line = assert_one_line(err, "preempted (SIGTERM)")
    assert "resumes it" not in line and ("no checkpoint exists yet" in line or "nothing to save" in line), line
    assert ckpt.find_latest(out) is None
