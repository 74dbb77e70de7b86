"""bench/scaling.py: a 2-point study of the `tiny` preset, interrupted after its first point and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "scaling.py")


def _study(tmp_path, capsys, monkeypatch, *extra):
    """One invocation of the study, its `main` in this process (pretraining runs are train.py subprocesses
    as always; the evaluations share the torch, DALI and compiled pipeline operators this process has)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        import scaling
    finally:
        sys.path.remove(os.path.join(REPO, "bench"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")      # train.py: tiny models on 2 shared cores
    threads = torch.get_num_threads()                # the evaluations set this process' share
    capsys.readouterr()
    try:
        rc = scaling.main(["--preset", "tiny", "--layers", "res5avg", "--work", str(tmp_path / "work"),
                           "--json", str(tmp_path / "study.json"), *extra])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return capsys.readouterr().out, json.loads((tmp_path / "study.json").read_text())


def test_interrupted_study_resumes_without_recomputing(tmp_path, capsys, monkeypatch):
    out1, rep1 = _study(tmp_path, capsys, monkeypatch, "--max-points", "1")
    assert not rep1["complete"] and rep1["points_done"] == 1 and rep1["points_total"] == 2
    assert "re-run the same command to continue" in out1
    first = rep1["points"][0]
    assert first["config"]["value"] == 10 and "method_options.permutations=10" in first["config"]["sets"]
    done = os.path.join(first["folder"], "point.json")
    stamp = os.stat(done).st_mtime_ns
    ckpts = sorted(os.listdir(os.path.join(first["pretrain"]["run"], "checkpoints")))

    out2, rep2 = _study(tmp_path, capsys, monkeypatch)
    assert rep2["complete"] and [p["config"]["value"] for p in rep2["points"]] == [10, 100]
    # the first point was read back, not recomputed: same record file, same checkpoints, no command of it re-run
    p1, p2 = rep2["points"]
    r1 = p1["results"]
    assert p1["cached"] and not p2["cached"] and "cached (finished earlier)" in out2
    assert os.stat(done).st_mtime_ns == stamp
    assert sorted(os.listdir(os.path.join(p1["pretrain"]["run"], "checkpoints"))) == ckpts
    assert not any(p1["pretrain"]["run"] in c for c in rep2["commands_this_run"])
    # the raw-pixel reference was read back too (its four evaluations), nothing else was reused
    assert len(rep2["reused_this_run"]) == 4 and all("--ckpt pixels" in c for c in rep2["reused_this_run"])
    assert p1["results"] == first["results"]
    # both points hold their commands: the pretraining run and every evaluation of the point
    for p, perms in ((p1, 10), (p2, 100)):
        train = [c for c in p["commands"] if "train.py" in c]
        assert len(train) == 1 and f"method_options.permutations={perms}" in train[0]
        assert p["pretrain"]["run"] in train[0] and p["pretrain"]["steps"] > 0
        kinds = {c.split()[3] for c in p["commands"] if c.startswith("python -m sslkit.eval")}
        assert kinds == {"knn", "linear", "svm", "lowshot"}
        for c in p["commands"]:
            assert c in rep2["commands"]
        r = p["results"]
        for kind, metric in (("knn", "top1"), ("linear", "top1"), ("svm", "mAP")):
            for subject in ("ssl", "random"):
                assert 0.0 <= r[kind]["res5avg"][subject][metric] <= 1.0, (kind, subject, r)
        assert r["lowshot"]["res5avg"]["ssl"]["1"]["mAP"] > 0
    assert 0.0 < rep2["references"]["pixels"]["knn"]["pixels"]["pixels"]["top1"] <= 1.0
    # the two points differ where they should: their own run folders, |P| of the pretext head
    assert p1["folder"] != p2["folder"] and p1["key"] != p2["key"]
    # the printed table: a row per |P| (its kNN cell is the point's own figure), the random trunk, pixels
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in rep2["table"].splitlines()}
    assert rep2["table"] in out2
    assert f"{r1['knn']['res5avg']['ssl']['top1']:.4f}" in rows[("resnet_tiny", "10")]
    assert ("resnet_tiny", "100") in rows and ("resnet_tiny", "random init") in rows and ("raw pixels", "-") in rows
    # the figure: a real plot (a few panels of lines), not an empty canvas
    with Image.open(rep2["plot"]) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[0] >= 300 and rgb.shape[1] >= 800
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50 and rgb.std() > 10


def test_help_is_fast_and_bad_input_is_one_line(tmp_path):
    code = ("import runpy, sys; sys.argv = ['scaling.py', '--help']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')" % SCRIPT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "--axis" in proc.stdout and proc.stdout.strip().endswith("NO-TORCH"), proc.stdout[-500:] + proc.stderr
    for args, message in ((["--preset", "tiny", "--dataset", str(tmp_path / "missing")], "no such file"),
                          (["--method", "jigsaw"], "--train-preset is required"),
                          (["--preset", "tiny", "--values", "10,10"], "distinct"),
                          (["--preset", "tiny", "--eval-train", str(tmp_path), "--eval-test", str(tmp_path)],
                           "no manifest.json"),
                          (["--preset", "tiny", "--set", "method_options.permutations=5"], "what --axis perms varies")):
        proc = subprocess.run([sys.executable, SCRIPT, *args, "--work", str(tmp_path / "w")], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_presets_resolve_to_the_points_the_paper_varies(tmp_path):
    """Pure planning, nothing run: the data axis holds the images seen fixed, the option axes become
    `--set` overrides, every point gets its own folder name and key."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import scaling
    work = ["--work", str(tmp_path)]
    a = scaling.parse_args(["--preset", "cpu-data", *work])
    cfgs = scaling.point_configs(a, {})
    assert [(c["value"], c["epochs"]) for c in cfgs if c["seed"] == 0] == \
        [(1000, 64), (4000, 16), (16000, 4), (60000, 1)]
    assert len(cfgs) == 8 and len({scaling.point_key(c) for c in cfgs}) == 8
    a = scaling.parse_args(["--preset", "cpu-perms", *work])
    assert [(c["value"], c["arch"], c["seed"]) for c in scaling.point_configs(a, {})][:4] == \
        [(10, "resnet_tiny", 0), (10, "resnet_tiny", 1), (10, "resnet18", 0), (10, "resnet18", 1)]
    a = scaling.parse_args(["--preset", "cpu-k", *work])
    assert {tuple(c["sets"]) for c in scaling.point_configs(a, {})} == \
        {("method_options.k=2",), ("method_options.k=10",), ("method_options.k=40",)}
    a = scaling.parse_args(["--preset", "cpu-arch", "--set", "lr=0.05", *work])
    cfgs = scaling.point_configs(a, {})
    assert [c["arch"] for c in cfgs] == ["resnet_tiny", "resnet18", "alexnet_jigsaw"]
    assert cfgs[2]["sets"] == ["method_options.geometry=goyal", "lr=0.05"]
    assert cfgs[2]["eval"]["layers"] == ["conv5", "conv4", "conv3"]
    a = scaling.parse_args(["--method", "jigsaw", "--train-preset", "fmnist", "--axis", "option", "--option",
                            "method_options.patch_scale", "--values", "[0.2,1.0];[0.5,1.0]", *work])
    cfgs = scaling.point_configs(a, {})
    assert [c["sets"][-1] for c in cfgs] == ["method_options.patch_scale=[0.2,1.0]",
                                             "method_options.patch_scale=[0.5,1.0]"]
    assert all("/" not in scaling.point_name(c) and "[" not in scaling.point_name(c) for c in cfgs)
