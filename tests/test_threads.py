"""sslkit.threads: torch's intra-op threads from the process' share of the cores beside DALI's, and the
command lines that set them (eval, pseudolabel). bench/threads.py measures why (docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import logging
from argparse import Namespace

import pytest
import torch

from sslkit import threads
from sslkit.threads import plan_threads


@pytest.fixture
def torch_threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_share_minus_dali_threads_at_least_one():
    # a CPU pipeline takes the whole share: torch gets the one thread left at least
    p = plan_threads("cpu", cores=8, environ={})
    assert (p.processes, p.dali, p.torch, p.torch_from) == (1, 8, 1, "share")
    # torchrun: 16 cores, 2 ranks per machine -> 8 each; a GPU pipeline takes 4 of them, torch the other 4
    p = plan_threads("gpu", cores=16, environ={"LOCAL_WORLD_SIZE": "2"})
    assert (p.processes, p.dali, p.torch) == (2, 4, 4)
    # explicit DALI threads leave the rest of the share to torch
    p = plan_threads("cpu", dali=2, cores=8, environ={"LOCAL_WORLD_SIZE": "1"})
    assert (p.dali, p.torch) == (2, 6)
    # more processes than cores: one thread each, never zero
    p = plan_threads("cpu", cores=2, environ={"LOCAL_WORLD_SIZE": "8"})
    assert (p.dali, p.torch) == (1, 1)
    assert plan_threads("cpu", cores=4, environ={"LOCAL_WORLD_SIZE": "junk"}).processes == 1
    assert "its share of 8 cores for 1 process(es) per machine, minus 2 DALI thread(s)" in \
        plan_threads("cpu", dali=2, cores=8, environ={}).describe()


def test_overrides_option_then_environment():
    env = {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}
    p = plan_threads("cpu", cores=16, environ=env)
    assert (p.dali, p.torch, p.torch_from) == (8, 3, "OMP_NUM_THREADS")
    assert "OMP_NUM_THREADS is set" in p.describe()
    assert plan_threads("cpu", cores=16, environ={"MKL_NUM_THREADS": "5"}).torch == 5
    p = plan_threads("cpu", torch_threads=6, cores=16, environ=env)     # the option wins
    assert (p.torch, p.torch_from) == (6, "option")
    for bad in ("", "0", "two", "-1"):                                    # not a count: the share decides
        assert plan_threads("cpu", dali=1, cores=4, environ={"OMP_NUM_THREADS": bad}).torch == 3
    with pytest.raises(ValueError, match=">= 0"):
        plan_threads("cpu", torch_threads=-1, cores=4, environ={})


def test_loader_default_threads_is_the_same_share(monkeypatch):
    from pipelines.loader import default_threads
    monkeypatch.setattr(threads, "machine_cores", lambda: 16)
    assert default_threads(2, "cpu") == plan_threads("cpu", environ={"LOCAL_WORLD_SIZE": "2"}).dali == 8
    assert default_threads(1, "gpu") == plan_threads("gpu", environ={}).dali == threads.GPU_THREADS


def _spy_loader_threads(monkeypatch) -> list[int]:
    """The num_threads every eval loader is built with."""
    from sslkit.eval import features
    seen, real = [], features.make_loader

    def spy(*a, **kw):
        seen.append(kw["num_threads"])
        return real(*a, **kw)

    monkeypatch.setattr(features, "make_loader", spy)
    return seen


def test_eval_cli_sets_torch_threads_from_the_share(sample_shards, tmp_path, monkeypatch, torch_threads_restored):
    """python -m sslkit.eval, in process, on a pretend 4-core machine: DALI takes 1 thread (--threads 1),
    torch the other 3; then OMP_NUM_THREADS=2 is respected; the report records the plan."""
    from sslkit.eval import cli
    monkeypatch.setattr(threads, "machine_cores", lambda: 4)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    seen = _spy_loader_threads(monkeypatch)
    torch.set_num_threads(1)
    out = tmp_path / "knn.json"
    argv = ["knn", "--ckpt", "pixels", "--train", sample_shards, "--val", sample_shards, "--size", "16",
            "--resize", "16", "--no-cache", "--no-progress", "--k", "5", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    assert torch.get_num_threads() == 3 and seen and set(seen) == {1}
    rep = json.loads(out.read_text())
    assert rep["threads"] == {"dali": 1, "torch": 3, "torch_from": "share", "cores": 4, "processes": 1}

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    seen.clear()
    assert cli.main(argv[:-4] + ["--out", str(out)]) == 0      # default DALI threads: the whole share
    assert torch.get_num_threads() == 2 and set(seen) == {4}
    assert json.loads(out.read_text())["threads"]["torch_from"] == "OMP_NUM_THREADS"


def test_pseudolabel_cli_threads(monkeypatch, torch_threads_restored):
    """Both pseudolabel commands plan through the same helper; --torch-threads wins, negatives are refused."""
    from sslkit.errors import SslkitError
    from sslkit.pseudolabel import cli
    monkeypatch.setattr(threads, "machine_cores", lambda: 6)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    log = logging.getLogger("test_threads")
    plan = cli._threads(Namespace(loader_threads=0, torch_threads=0, device="cpu"), log)
    assert (plan.dali, plan.torch) == (3, 1) and torch.get_num_threads() == 1
    plan = cli._threads(Namespace(loader_threads=1, torch_threads=2, device="auto"), log)
    assert (plan.dali, plan.torch, plan.torch_from) == (1, 2, "option") and torch.get_num_threads() == 2
    with pytest.raises(SslkitError, match="--torch-threads"):
        cli._threads(Namespace(loader_threads=0, torch_threads=-2, device="cpu"), log)
    assert cli.evaluate_parser().parse_args(["--ckpt", "c", "--data", "d", "--torch-threads", "2"]).torch_threads == 2


def test_bench_threads_runs_every_row(sample_shards, tmp_path):
    """bench/threads.py end to end at its smallest: both thread counts, alone and beside a busy loop,
    a JSON with one timed round per row (the figures themselves are docs/BENCHMARKS.md's, not a test's)."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    out = tmp_path / "threads.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    argv = [sys.executable, "bench/threads.py", "--data", sample_shards, "--rounds", "1", "--steps", "1",
            "--batch-size", "8", "--json", str(out),
            "--train-set", "method_options.kernel=torch"]     # the torch colour stage: no numba compilation
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert [(row["label"], row["hog"]) for row in rep["rows"]] == [
        ("torch default", 0), ("sslkit.threads share", 0), ("torch default", 1), ("sslkit.threads share", 1)]
    assert rep["rows"][1]["torch_threads"] == plan_threads("cpu", environ={}).torch
    assert all(len(row["rounds"]) == 1 and row["s_per_step"]["median"] > 0 for row in rep["rows"])
    assert "s/step" in r.stdout
