"""bench/throughput.py: the smoke mode runs end to end and writes sane, positive numbers, a JSON and
a PNG. Never a speed threshold: CI machines differ, and throughput is judged from bench/out runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO, build_small

PIPELINES = ("multicrop", "jigsaw", "colorization", "jigclu", "eval")


def test_throughput_smoke(tmp_path):
    data = str(tmp_path / "shards")
    build_small(data, sources=("sample:64",))
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    # One DALI thread / one worker process: the fewest processes, so the test stays quick on a small,
    # busy CI machine (the multi-thread path is the same code).
    cmd = [sys.executable, os.path.join(REPO, "bench", "throughput.py"), "--data", data, "--smoke",
           "--pipelines", ",".join(PIPELINES), "--mode", "decode,loader,baseline,train", "--threads", "1",
           "--json", str(out_json), "--plot", str(out_png)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]

    doc = json.loads(out_json.read_text())
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
    # Families still being written are reported, not crashed on; everything measured is sane.
    assert all(r["status"] in ("ok", "not available") for r in loaders.values())
    assert all(loaders[n]["status"] == "ok" for n in ("multicrop", "eval_train", "eval_val"))
    measured = [r for r in results if r["status"] == "ok" and r["mode"] != "train"]
    assert all(r["status"] == "ok" for r in baselines.values())
    for r in measured:
        s = r["images_per_s"]
        assert all(math.isfinite(v) and v > 0 for v in s.values()), r
        assert s["min"] <= s["median"] <= s["max"]
        assert len(r["rounds"]) == 1 and r["rounds"][0]["images"] > 0 and r["rounds"][0]["seconds"] > 0
        assert r["megapixels_per_s"] > 0 and r["x_decode"] > 0
        if r["impl"] == "dali":  # every DALI row has its PIL peer in the same run
            assert r["x_baseline"] > 0
    # the trainer step, fed by the loader and by a batch already on the device
    train = [r for r in results if r["mode"] == "train"]
    assert len(train) == 1 and train[0]["status"] == "ok", train
    sps = train[0]["steps_per_s"]
    assert sps["real"] > 0 and sps["synthetic"] > 0 and 0 <= train[0]["data_stall_pct"] <= 100
    assert train[0]["images_per_s"]["median"] > 0 and train[0]["arch"] == "resnet_tiny"

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000
    # The table names every pipeline.
    for name in expected | {"decode"}:
        assert name in proc.stdout


def test_throughput_rejects_bad_arguments(tmp_path):
    base = [sys.executable, os.path.join(REPO, "bench", "throughput.py")]
    cases = [
        (["--data", str(tmp_path), "--pipelines", "nope"], "unknown pipeline 'nope'"),
        (["--data", str(tmp_path), "--hw-decoder-load", "0.5"], "--device gpu only"),
        (["--data", str(tmp_path), "--threads", "two"], "comma-separated integers"),
        (["--data", str(tmp_path / "missing"), "--pipelines", "eval"], "error"),
    ]
    for args, message in cases:
        proc = subprocess.run(base + args, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
