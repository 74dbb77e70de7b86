"""Two "nodes" on one machine: two torchrun processes, one rank each, meeting through a c10d rendezvous,
run the trainer with the same torchrun flags as docs/CLUSTER.md's Slurm script: through an epoch and
its checkpoint into the next, where SIGUSR1 reaches both torchruns (as srun passes on Slurm's warning
before the time limit) and every rank saves one checkpoint; then, as the requeued job, the same command
with one more epoch on both nodes resumes it and finishes.

What a real multi-node job gets wrong and this checks:
- data follows the GLOBAL rank: rank0.pt and rank1.pt are both written, their loader states name ranks
  0 and 1 of 2, and the two ranks' memory banks hold disjoint halves that together are the dataset;
- device and threads follow the LOCAL rank: each node's worker has LOCAL_RANK 0 and LOCAL_WORLD_SIZE
  1, so its thread plan is the whole machine's share (the DALI thread count rank 0 logs);
- one process writes the shared files: the run folder's lock names the global-rank-0 worker's pid,
  log.jsonl holds each record once, the other node's worker logs nothing but warnings, and the run
  folder holds nothing else (no second config, no stray .tmp).

Which node gets ranks 0..G-1 is decided by the rendezvous (c10d orders the nodes by host and pid;
--node_rank is only read by the static rendezvous), so the test finds the head node from the workers'
environment instead of assuming it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import torch

from sslkit.threads import machine_cores, plan_threads

from conftest import REPO, build_small, descendants, environ

PY = sys.executable
CLUSTER_DOC = os.path.join(REPO, "docs", "CLUSTER.md")
# 64 images, 2 ranks x 8: 4 steps per epoch, a log record every 2 steps
ARGS = ["--method", "deepclusterv2", "--preset", "tiny", "--set", "method_options.n_prototypes=[8,8,8]",
        "--set", "shuffle_buffer=64", "--set", "log_every=2", "--set", "method_options.kernel=torch",
        "--batch-size", "8", "--device", "cpu"]
STEPS_PER_EPOCH = 4


def torchrun_flags(nnodes: str, nproc_per_node: str, head: str, port: str, job_id: str) -> list[str]:
    """torchrun's flags in docs/CLUSTER.md's sbatch script (there: $SLURM_NNODES, $GPUS, $HEAD, $PORT,
    $SLURM_JOB_ID); SIGUSR1 is forwarded to the workers (Slurm's warning before the time limit) and
    they get 240 s to write their checkpoint before torchrun kills them."""
    return [f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={head}:{port}", f"--rdzv-id={job_id}",
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=240", "-m", "sslkit.train"]


def test_the_cluster_doc_runs_the_tested_torchrun_line():
    line = "torchrun " + " ".join(torchrun_flags("$SLURM_NNODES", "$GPUS", "$HEAD", "$PORT", "$SLURM_JOB_ID"))
    with open(CLUSTER_DOC) as f:
        assert line in f.read(), f"docs/CLUSTER.md does not contain the tested line:\n{line}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def lock_holder(out: str) -> dict:
    try:
        with open(os.path.join(out, ".lock")) as f:
            text = f.read().strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def torchrun_pids(pid: int) -> list[int]:
    """The torchrun processes among `pid` and its descendants: `torch.distributed.run` must be an argument of
    its own, so `script -qec "<command line>"` and the shell it starts, which carry the whole command line as
    one argument, are not signalled (SIGUSR1 kills them and hangs up the pseudo-terminal under torchrun)."""
    found = []
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"torch.distributed.run" in f.read().split(b"\0"):
                    found.append(p)
        except OSError:
            pass
    return found


def last_step(out: str) -> int:
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            return max([json.loads(line).get("step", 0) for line in f if line.endswith("\n")] or [0])
    except OSError:
        return 0


def run_two_nodes(args: list[str], out: str, tty_node: str | None = None, usr1_after: int | None = None,
                  timeout: float = 240):
    """Start nodes "a" and "b" together (node `tty_node` under a pseudo-terminal) and wait for both;
    `usr1_after`: once log.jsonl has a record past that step, SIGUSR1 to both torchrun processes, as
    srun passes on Slurm's warning before the time limit. Returns ({node: output}, {node: {worker
    pid: its torchrun environment}}, lock holders seen)."""
    port, job = str(free_port()), f"sslkit-test-{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for node in ("a", "b"):
        cmd = [PY, "-m", "torch.distributed.run", *torchrun_flags("2", "1", "localhost", port, job), *args]
        if node == tty_node:
            cmd = ["script", "-qec", shlex.join(cmd), "/dev/null"]
        procs[node] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, start_new_session=True)
    workers, holders, signalled = {"a": {}, "b": {}}, set(), usr1_after is not None
    outputs = {}
    try:
        readers = {}
        for node, p in procs.items():  # drain the pipes while watching, so no process blocks on a full one
            readers[node] = threading.Thread(target=lambda n=node, q=p: outputs.__setitem__(n, q.stdout.read()))
            readers[node].start()
        deadline = time.time() + timeout
        while any(p.poll() is None for p in procs.values()):
            assert time.time() < deadline, f"the two nodes did not finish within {timeout} s"
            for node, p in procs.items():
                for pid in descendants(p.pid):
                    if pid not in workers[node]:
                        env_ = environ(pid)
                        if "RANK" in env_ and "LOCAL_RANK" in env_:
                            workers[node][pid] = env_
            holder = lock_holder(out)
            if holder:
                holders.add((holder["host"], holder["pid"]))
            if usr1_after is not None and last_step(out) > usr1_after:
                for p in procs.values():
                    for pid in torchrun_pids(p.pid):
                        os.kill(pid, signal.SIGUSR1)
                usr1_after = None
            time.sleep(0.05)
        for t in readers.values():
            t.join(timeout=30)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert usr1_after is None, "no log record past the step to signal after"
    for node, p in procs.items():
        # a torchrun that passed a signal on exits 1 (SignalException) once its worker has ended
        ok = (0, 1) if signalled else (0,)
        assert p.returncode in ok, f"node {node} failed ({p.returncode}):\n{outputs.get(node, '')[-4000:]}"
    return outputs, workers, holders


def records(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_nodes(outputs: dict, workers: dict, holders: set) -> str:
    """What every two-node run must show about ranks, threads and writers; returns the head's output."""
    # one worker per node, LOCAL_RANK 0 of 1 on both, global ranks 0 and 1 of 2
    assert all(len(w) == 1 for w in workers.values()), workers
    env = {node: next(iter(w.values())) for node, w in workers.items()}
    pid = {node: next(iter(w)) for node, w in workers.items()}
    for e in env.values():
        assert (e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"], e["WORLD_SIZE"]) == ("0", "1", "2"), e
        assert e["GROUP_RANK"] == e["RANK"] and e["GROUP_WORLD_SIZE"] == "2", e
    assert sorted(e["RANK"] for e in env.values()) == ["0", "1"]
    head = next(node for node, e in env.items() if e["RANK"] == "0")
    other = "b" if head == "a" else "a"
    # threads follow the local world: the head's logged plan is the whole machine's share
    plan = plan_threads("cpu", environ=env[head])
    assert plan.processes == 1 and plan.dali == machine_cores(), plan
    assert plan.describe() in outputs[head], outputs[head][-3000:]
    # only global rank 0 holds the run folder and talks; rank 1 logs warnings and errors only
    assert holders == {(socket.gethostname(), pid[head])}, (holders, pid)
    assert "threads: DALI" not in outputs[other] and " INFO " not in outputs[other], outputs[other][-3000:]
    return outputs[head]


def check_folder(out: str, step: int, last_epoch: int, keep: bool):
    """The shared run folder after a run that ended at `step`, epochs 0..last_epoch-1 complete."""
    # each record once: one writer (records past a resumed checkpoint are dropped on resume)
    recs = records(out)
    steps = [r["step"] for r in recs if r["kind"] == "step"]
    assert steps == list(range(2, step + 1, 2)), steps
    assert [r["step"] for r in recs if r["kind"] == "epoch"] == \
        [STEPS_PER_EPOCH * (e + 1) for e in range(last_epoch)], recs
    # the shared folder holds the shared files once and nothing else
    assert sorted(os.listdir(out)) == [".lock", "checkpoints", "config.json", "log.jsonl"], os.listdir(out)
    for root, _, files in os.walk(out):
        assert not [f for f in files if f.endswith(".tmp")], (root, files)
    # the checkpoint: global.pt once, a file per GLOBAL rank, loader states naming ranks 0 and 1 of 2
    d = os.path.join(out, "checkpoints", f"step-{step:08d}")
    assert sorted(os.listdir(d)) == ["COMPLETE", *(["KEEP"] if keep else []), "global.pt", "rank0.pt",
                                     "rank1.pt"], os.listdir(d)
    assert torch.load(os.path.join(d, "global.pt"), weights_only=False)["world_size"] == 2
    banks = []
    for r in (0, 1):
        state = torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False)
        fp = state["loader"]["fingerprint"]
        assert (state["loader"]["rank"], state["loader"]["world_size"], fp["total"]) == (r, 2, 64), state["loader"]
        bank = state["method"]["bank_index"][:state["method"]["bank_ptr"]].tolist()
        assert len(bank) == len(set(bank)), bank
        banks.append(set(bank))
    # each sample on one rank; an epoch's end: together the whole dataset
    assert not banks[0] & banks[1], banks
    if step % STEPS_PER_EPOCH == 0:
        assert banks[0] | banks[1] == set(range(64)), banks


def test_two_nodes_train_checkpoint_preempt_and_resume(tmp_path):
    data = str(tmp_path / "shards")
    build_small(data, sources=("sample:64",), max_count=16)
    out = str(tmp_path / "run")
    args = [*ARGS, "--data", data, "--out", out]
    # 3 epochs, node "a" on a pseudo-terminal (its rank 0 may show a progress bar); once step 6 is
    # logged (epoch 0 and its checkpoint done), SIGUSR1 to both torchruns as srun passes on Slurm's
    # warning: torchrun passes it to its worker (--signals-to-handle), every rank stops at the same log
    # step and they save one checkpoint together
    outputs, workers, holders = run_two_nodes([*args, "--epochs", "3"], out, tty_node="a", usr1_after=4)
    head = check_nodes(outputs, workers, holders)
    saved = re.findall(r"preempted \(SIGUSR1\): checkpoint saved at epoch \d+ step (\d+)", head)
    assert len(saved) == 1 and 6 <= int(saved[0]) <= 3 * STEPS_PER_EPOCH, head[-3000:]
    step = int(saved[0])
    check_folder(out, step, last_epoch=(step - 1) // STEPS_PER_EPOCH, keep=False)
    assert os.path.exists(os.path.join(out, "checkpoints", "step-00000004", "COMPLETE"))  # epoch 0's
    # the requeued job, one epoch more (4): every rank resumes from its own file of that checkpoint
    outputs, workers, holders = run_two_nodes([*args, "--epochs", "4"], out)
    head = check_nodes(outputs, workers, holders)
    assert f"resumed from {out}/checkpoints/step-{step:08d}" in head, head[-3000:]
    assert f"done: 4 epochs, {4 * STEPS_PER_EPOCH} steps" in head, head[-3000:]
    check_folder(out, 4 * STEPS_PER_EPOCH, last_epoch=4, keep=True)
