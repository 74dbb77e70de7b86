"""bench/gpu.sh and bench/throughput.py: the smoke mode runs end to end and writes sane, positive numbers, a
JSON and a PNG; the train probe crosses epochs. Never a speed threshold: CI machines differ, and throughput is
judged from bench/out runs."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, build_small, fashion_mnist_dir


def test_gpu_script_smoke_on_cpu(tmp_path):
    """bench/gpu.sh's plumbing (corpus, every pipeline with its decode-only and PIL peers, the
    trainer probe, JSON + PNG + log) in its CPU smoke mode: 1 thread, 2 batches a row."""
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", DEVICE="cpu", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu.sh"), str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert {"gpu.log", "pytest_gpu.txt", "pipelines.json", "pipelines.png", "train.json"} <= set(os.listdir(out))

    doc = json.loads((out / "pipelines.json").read_text())
    assert doc["schema"] == "sslkit.bench.throughput/1"
    env, info, results = doc["env"], doc["data"], doc["results"]
    assert env["cpus_usable"] >= 1 and env["versions"]["dali"] and env["versions"]["torch"]
    assert info["images"] == 64 and info["bytes_per_image"] > 0 and 0 < info["megapixels_per_image"] < 100

    def rows(mode, impl):
        return {r["pipeline"]: r for r in results if r["mode"] == mode and r["impl"] == impl}

    expected = {"multicrop", "jigsaw", "colorization", "jigclu", "eval_train", "eval_val"}
    loaders, baselines = rows("loader", "dali"), rows("baseline", "pil")
    assert set(loaders) == expected and set(baselines) == expected | {"decode"}
    assert rows("decode", "dali")["decode"]["status"] == "ok"
    measured = [r for r in results if r["mode"] != "train"]
    assert all(r["status"] == "ok" for r in measured), [r["note"] for r in measured if r["status"] != "ok"]
    for r in measured:
        s = r["images_per_s"]
        assert all(math.isfinite(v) and v > 0 for v in s.values()), r
        assert s["min"] <= s["median"] <= s["max"]
        assert len(r["rounds"]) == 1 and r["rounds"][0]["images"] > 0 and r["rounds"][0]["seconds"] > 0
        assert r["megapixels_per_s"] > 0 and r["x_decode"] > 0
        # the warm-up drains what the stage prefetched before the clock starts
        assert r["warmup_batches"] >= 2
        if r["impl"] == "dali":  # every DALI row has its PIL peer in the same run
            assert r["x_baseline"] > 0
    assert (out / "pipelines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the trainer step, fed by the loader and by a batch already on the device, across epoch ends
    [train] = json.loads((out / "train.json").read_text())["results"]
    assert train["status"] == "ok", train
    sps = train["steps_per_s"]
    assert sps["real"] > 0 and sps["synthetic"] > 0 and 0 <= train["data_stall_pct"] <= 100
    assert train["images_per_s"]["median"] > 0 and train["arch"] == "resnet_tiny"
    assert "== done (failures: 0)" in (out / "gpu.log").read_text()


def test_train_probe_crosses_epoch_boundaries(tmp_path):
    """More timed steps than an epoch has: the probe calls the method's epoch hook like the trainer
    (a DeepClusterV2 memory bank holds one epoch and overflowed before)."""
    data = str(tmp_path / "shards")
    build_small(data, sources=("sample:24",))    # 3 steps an epoch at batch 8; the probe takes >= 13
    out = tmp_path / "t.json"
    cmd = [sys.executable, os.path.join(REPO, "bench", "throughput.py"), "--data", data, "--mode", "train",
           "--threads", "1", "--batch-size", "8", "--rounds", "1", "--batches", "5", "--warmup", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=200,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [rec] = json.loads(out.read_text())["results"]
    assert rec["status"] == "ok" and rec["epochs_crossed"] >= 2, rec


def bench_module(name: str):
    """bench/NAME.py imported in this process (bench/ is a folder of scripts, not a package)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(REPO, "bench"))


def test_throughput_rejects_bad_arguments(tmp_path, capsys):
    throughput = bench_module("throughput")
    cases = [
        (["--data", str(tmp_path), "--pipelines", "nope"], "unknown pipeline 'nope'"),
        (["--data", str(tmp_path), "--pipelines", "decode"], "unknown pipeline 'decode'"),
        (["--data", str(tmp_path), "--hw-decoder-load", "0.5"], "--device gpu only"),
        (["--data", str(tmp_path), "--threads", "two"], "comma-separated integers"),
        (["--data", str(tmp_path / "missing"), "--pipelines", "eval"], "no such shard folder"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            throughput.main(args)
        err = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
        assert e.value.code != 0 and message in err, (args, err)
        assert "Traceback" not in err


def test_ssl_quality_protocol_end_to_end(tmp_path, monkeypatch):
    """bench/ssl_quality.py at toy size on real Fashion-MNIST: shards with --limit, a one-epoch DCv2 run,
    the supervised reference through train.py, kNN + linear for the four feature sets, and the JSON the
    evaluation issue asks for (fractions; every command recorded). Its `main` runs in this process (its
    shard builds and training runs are subprocesses as always): the evaluations then share the torch,
    DALI and compiled pipeline operators this test process already has."""
    fashion_mnist_dir()   # a clear error when `make test` has not fetched it
    out = tmp_path / "q.json"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")      # the training subprocesses: tiny models, 2 shared cores
    threads = torch.get_num_threads()                # the evaluations set this process' share
    try:
        rc = bench_module("ssl_quality").main([
            "--method", "deepclusterv2", "--preset", "tiny", "--epochs", "1", "--train-images", "128",
            "--test-images", "100", "--sup-epochs", "1", "--sup-batch", "32", "--probe-epochs", "2",
            "--layers", "res5avg,res3", "--work", str(tmp_path / "work"), "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rep = json.loads(out.read_text())
    for name, kinds in (("ssl", ("knn", "linear")), ("random", ("knn", "linear")), ("pixels", ("knn", "linear")),
                        ("supervised", ("knn", "linear"))):
        for kind in kinds:
            assert 0.0 <= rep[name][kind] <= 1.0, (name, kind, rep[name])
    assert rep["data"]["train_images"] == 128 and rep["data"]["test_images"] == 100
    assert rep["layer"] == "res5avg" and set(rep["layers"]) == {"res5avg", "res3"}
    assert rep["layers"]["res5avg"]["ssl"] == rep["ssl"] and rep["layers"]["res5avg"]["random"] == rep["random"]
    assert 0.0 <= rep["layers"]["res3"]["random"]["knn"] <= 1.0
    assert os.path.isdir(rep["ckpt"]) and len(rep["pretrain_epoch_losses"]) == 1
    assert any("--limit 128" in c for c in rep["commands"])
    assert any("--method supervised" in c for c in rep["commands"])
    assert sum(c.startswith("python -m sslkit.eval ") for c in rep["commands"]) == 8   # 4 feature sets x 2
