"""bench/loader_memory.py at a tiny size: synthetic shards the reader accepts, one fresh process per
(dataset, world size) point, a JSON with the measured points and the extrapolation, and a rank's share
that shrinks with the world size. Never a speed or memory threshold of the machine: those are bench runs
(docs/BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

POINT_FIELDS = {"world", "total", "shards", "samples_per_rank", "shards_read", "open_s", "prepare_s", "total_s",
                "open_rss", "open_peak", "prepare_rss", "prepare_peak", "rss", "peak", "tables", "peak_reset"}


def test_loader_memory_tiny(tmp_path):
    out = tmp_path / "loader-memory.json"
    cmd = [sys.executable, os.path.join(REPO, "bench", "loader_memory.py"), "--cache", str(tmp_path / "cache"),
           "--samples-per-shard", "2000", "--datasets", "10", "--worlds", "1,4", "--baseline", "",
           "--no-goal-point", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == "sslkit.bench.loader_memory/1" and "goal (" in proc.stdout
    one, four = sorted(doc["points"], key=lambda p: p["world"])
    for p in (one, four):
        assert POINT_FIELDS <= set(p) and p["total"] == 20_000 and p["shards"] == 10
        assert p["total_s"] >= p["prepare_s"] > 0 and p["tables"] > 0 and p["peak"] > 0
    # world 1 reads every shard; a rank of 4 a quarter of the epoch (padded to full batches of 256)
    assert one["shards_read"] == 10 and four["shards_read"] < 10
    assert one["samples_per_rank"] == 20_224 and four["samples_per_rank"] == 5_120
    assert four["tables"] < one["tables"] / 3
    assert four["peak"] <= one["peak"] + 1_000_000   # a rank's memory does not grow with the world size
    ext = doc["extrapolation"]
    assert ext["goal_total"] == 100_000_000 and ext["goal_samples_per_rank"] == 1_562_624
    assert ext["fits"]["tables"]["b"] > 0 and ext["predicted"]["tables"] > four["tables"]
    assert doc["goal_point"] is None and set(doc["verdict"]) >= {"extrapolated_memory_ok", "extrapolated_time_ok"}
    # the cache is reused (nothing re-made), and a folder the bench did not make is refused, untouched
    pool = tmp_path / "cache" / "pool"
    before = {f.name: f.stat().st_mtime_ns for f in pool.iterdir()}
    bench = _bench_module()
    assert bench.open_cache(str(tmp_path / "cache"), 2000) == str(pool)
    bench.fill_pool(str(pool), 10, 2000, progress=lambda line: None)
    assert {f.name: f.stat().st_mtime_ns for f in pool.iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(bench.BenchError, match="not made by this bench"):
        bench.open_cache(str(tmp_path / "other"), 2000)
    with pytest.raises(bench.BenchError, match="pass another --cache"):
        bench.open_cache(str(tmp_path / "cache"), 1000)
    assert os.listdir(tmp_path / "other") == ["keep.txt"]


def _bench_module():
    spec = importlib.util.spec_from_file_location("loader_memory", os.path.join(REPO, "bench", "loader_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
