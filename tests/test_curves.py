"""`python -m sslkit.viz --run RUN --out curves.png`: a run's log.jsonl (written here by the trainer's
own JsonLog/StepLog) becomes one PNG with loss, lr, images/s, data stall and every other number."""

from __future__ import annotations

import json
import logging
import os

import torch
from PIL import Image

from sslkit import curves, viz
from sslkit.log import JsonLog, StepLog


def write_log(run: str) -> str:
    os.makedirs(run, exist_ok=True)
    jlog = JsonLog(os.path.join(run, "log.jsonl"))
    steps = StepLog(jlog, logging.getLogger("test"), False, total_steps=40, step=0, global_batch=64,
                    device=torch.device("cpu"))
    for epoch in range(2):
        for step in range(epoch * 20 + 10, epoch * 20 + 21, 10):
            out = {"loss": torch.tensor(5.0 - step / 10), "top1": torch.tensor(step / 40)}
            steps.record(out, epoch, step, 5.0 - step / 10, 0.1 * step / 40, (10, 0.5, 2.0))
        # train.py's epoch record, and a record of another kind (an online monitor)
        jlog.write({"kind": "epoch", "epoch": epoch, "step": epoch * 20 + 20, "loss": 4.0 - epoch, "top1": 0.3,
                    "data_stall_pct": 25.0, "epoch_s": 12.0, "corrupt_samples": 0})
        jlog.write({"kind": "monitor", "epoch": epoch, "step": epoch * 20 + 20, "knn_top1": 0.2 + 0.1 * epoch})
    jlog.close()
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write('{"time": 1, "kind": "step", "ep')       # a record cut short by a kill
    return run


def test_panels_from_the_trainers_records(tmp_path):
    records, bad = curves.read_log(write_log(str(tmp_path / "run")))
    assert bad == 1 and len(records) == 8
    got = {p["title"]: p for p in curves.panels(records)}
    assert list(got) == ["loss", "learning rate", "throughput", "data stall", "peak memory (rank 0)", "top1",
                         "monitor: knn_top1"]
    step_loss, epoch_loss = got["loss"]["lines"]
    assert step_loss[1] == [10, 20, 30, 40] and epoch_loss[1:3] == ([20, 40], [4.0, 3.0])
    assert got["throughput"]["lines"][0][2] == [64 * 10 / 2.0] * 4            # global batch x steps / seconds
    assert got["data stall"]["lines"][0][2] == [25.0] * 4                      # data_s / step_s per window
    assert got["monitor: knn_top1"]["lines"][0][1:3] == ([20, 40], [0.2, 0.30000000000000004])


def test_viz_run_writes_a_png(tmp_path, capsys):
    run = write_log(str(tmp_path / "run"))
    out = str(tmp_path / "plots" / "curves.png")
    assert viz.main(["--run", run, "--out", out]) == 0
    assert "7 panels; skipped 1 unreadable line(s)" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 1000


def test_viz_run_errors_are_one_line(tmp_path, capsys):
    assert viz.main(["--run", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "log.jsonl: no such file" in err and "\n" not in err
    (tmp_path / "log.jsonl").write_text("not json\n" + json.dumps({"kind": "step"}) + "\n")
    assert viz.main(["--run", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    assert "no records with a step (2 unreadable line(s))" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c.png")
