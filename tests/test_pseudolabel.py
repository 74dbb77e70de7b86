"""sslkit.pseudolabel: top-P / top-K selection against a brute-force reference (ties included), the
bounded selector equal to the in-memory one, a run killed in the teacher pass and in the writing
stage resumed to the identical output, student shards that verify, copy the source bytes and read
back with their labels through DALI, 2 torchrun ranks equal to 1, the random-label control, a
classifier's top-1, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from sslkit import ckpt, models
from sslkit.dist import DistInfo
from sslkit.pseudolabel import (Options, PseudolabelError, TopKSelector, evaluate, load_teacher, pseudolabel,
                                random_labels, select_topk, top_p)
from sslkit.pseudolabel.cli import main
from sslkit.pseudolabel.select import SelectionError, records
from sslkit.shard import manifest as mf
from sslkit.shard import verify
from sslkit.shard.access import SampleReader

from conftest import REPO, build_small

PY = sys.executable
N_IMAGES, BATCH, CHUNK, TOP_P, TOP_K = 64, 8, 16, 3, 4


# ------------------------------------------------------------------------------------------------
# Selection: pure functions against brute force
# ------------------------------------------------------------------------------------------------

def brute_force_topk(cls, score, index, k):
    """Per class: sort (score desc, index asc) with Python's sort, keep k."""
    out = []
    for c in sorted(set(cls.tolist())):
        rows = [(float(s), int(i)) for cc, s, i in zip(cls, score, index) if cc == c]
        rows.sort(key=lambda r: (-r[0], r[1]))
        out += [(c, s, i) for s, i in rows[:k]]
    return out


def tied_scores(rng, n_images, n_classes, levels=7):
    """Probabilities with many exact ties: a few distinct values per row, normalised."""
    raw = rng.integers(1, levels, size=(n_images, n_classes)).astype(np.float32)
    return raw / raw.sum(1, keepdims=True)


def test_top_p_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    probs = tied_scores(rng, 50, 9, levels=3)
    scores, classes = top_p(torch.from_numpy(probs), 4)
    for row in range(50):
        expected = sorted(range(9), key=lambda c: (-probs[row, c], c))[:4]
        assert classes[row].tolist() == expected
        assert scores[row].tolist() == [float(probs[row, c]) for c in expected]


def test_select_topk_matches_brute_force_with_ties():
    rng = np.random.default_rng(1)
    n, C, P, K = 300, 11, 4, 7
    probs = tied_scores(rng, n, C)
    s, c = top_p(torch.from_numpy(probs), P)
    index = rng.permutation(10 * n)[:n]                    # sparse, unordered sample indices
    cls, score, idx = records(c.numpy(), s.numpy(), index)
    perm = rng.permutation(cls.size)                       # records arrive in any order
    cls, score, idx = cls[perm], score[perm], idx[perm]
    expected = brute_force_topk(cls, score, idx, K)
    got = select_topk(cls, score, idx, K)
    assert list(zip(got[0].tolist(), got[1].tolist(), got[2].tolist())) == expected
    # ties really happened, inside the kept set and at the cut
    assert len({(c_, s_) for c_, s_, _ in expected}) < len(expected)
    assert all(np.bincount(got[0], minlength=C) <= K)


def test_select_topk_orders_any_float_scores():
    """Signed scores with ties, zeros and -0.0 (the sort key maps float32 to ordered integers)."""
    rng = np.random.default_rng(4)
    n = 500
    score = np.round(rng.normal(size=n), 1).astype(np.float32)
    score[:20] = -0.0
    score[20:40] = 0.0
    cls, idx = rng.integers(0, 3, n).astype(np.int32), rng.permutation(n)
    got = select_topk(cls, score, idx, 60)
    assert list(zip(got[0].tolist(), got[1].tolist(), got[2].tolist())) == brute_force_topk(cls, score, idx, 60)


@pytest.mark.parametrize("piece", [1, 17, 500])
def test_bounded_selector_equals_in_memory(piece):
    rng = np.random.default_rng(2)
    n, C, P, K = 2000, 13, 5, 9
    probs = tied_scores(rng, n, C, levels=20)
    s, c = top_p(torch.from_numpy(probs), P)
    cls, score, idx = records(c.numpy(), s.numpy(), rng.permutation(n))
    reference = select_topk(cls, score, idx, K)
    sel = TopKSelector(C, K, buffer=64)                    # far below the record count: many compactions
    for a in range(0, cls.size, piece):
        sel.add(cls[a:a + piece], score[a:a + piece], idx[a:a + piece])
    got = sel.result()
    for g, r in zip(got, reference):
        np.testing.assert_array_equal(g, r)
    # memory: never more than the kept set (<= C*K) + the buffer + one piece, not all n*P records
    assert sel.peak_records <= C * K + 64 + piece < cls.size
    assert sel.seen == cls.size


def test_selector_rejects_bad_records_in_one_line():
    sel = TopKSelector(3, 2)
    with pytest.raises(SelectionError, match="sample 7: class 5 outside 0..2"):
        sel.add(np.array([5]), np.array([0.5], np.float32), np.array([7]))
    with pytest.raises(SelectionError, match="sample 9: score nan"):
        select_topk(np.array([0]), np.array([np.nan], np.float32), np.array([9]), 1)
    with pytest.raises(SelectionError, match="sample 4: score nan"):   # not dropped by the threshold filter
        sel.add(np.array([1, 2]), np.array([0.5, np.nan], np.float32), np.array([3, 4]))


# ------------------------------------------------------------------------------------------------
# The job, on a tiny teacher
# ------------------------------------------------------------------------------------------------

def make_teacher(run: str, data: str, width: int = 8, size: int = 32, seed: int = 0, classifier: bool = True):
    """A `supervised` checkpoint in the trainer's layout: resnet_tiny trunk + classifier."""
    torch.manual_seed(seed)
    m = mf.load(data)
    backbone = models.create("resnet_tiny", num_classes=0, width=width)
    state = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    if classifier:
        lin = nn.Linear(backbone.num_features, len(m["classes"]))
        state.update({"classifier." + k: v for k, v in lin.state_dict().items()})
    g = {"config": {"method": "supervised" if classifier else "deepclusterv2", "arch": "resnet_tiny", "data": data,
                    "method_options": {"size": size}},
         "model": state, "trunk": {"arch": "resnet_tiny", "kwargs": {"width": width}, "input": "rgb"},
         "data": {"identity": mf.identity(m), "path": os.path.abspath(data)}, "epoch": 1}
    ckpt.save(run, 1, g, {}, DistInfo(0, 1, 0, torch.device("cpu"), None), keep=True, keep_last=1)
    return run


def options(base, out: str, **kw) -> Options:
    o = dict(teacher=base["teacher"], data=base["data"], out=out, top_p=TOP_P, top_k=TOP_K, batch_size=BATCH,
             chunk=CHUNK, device="cpu", max_count=10, io_threads=2, loader_threads=1, progress=False)
    o.update(kw)
    return Options(**o)


def manifest_of(out: str) -> dict:
    with open(os.path.join(out, mf.MANIFEST)) as f:
        return json.load(f)


def identical_outputs(a: str, b: str):
    ma, mb = manifest_of(a), manifest_of(b)
    assert ma["shards"] == mb["shards"]                  # sha256 of every tar, counts, sizes
    assert ma["classes"] == mb["classes"] and ma["class_counts"] == mb["class_counts"]
    for s in ma["shards"]:
        with open(os.path.join(a, s["index"])) as fa, open(os.path.join(b, s["index"])) as fb:
            assert fa.read() == fb.read()


def chunk_records(out: str):
    """Every image's stored top-P (from the committed chunk files), keyed by sample index."""
    tops = {}
    layout_root = os.path.join(out, ".pseudolabel")
    for root, _, files in os.walk(layout_root):
        for name in sorted(files):
            if name.startswith("chunk-"):
                with np.load(os.path.join(root, name)) as z:
                    for i, c, s in zip(z["index"], z["classes"], z["scores"]):
                        tops[int(i)] = (c.astype(np.int64), s)
    return tops


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # the same arithmetic as the 1-thread torchrun ranks below
    root = tmp_path_factory.mktemp("pl")
    data = str(root / "pool")
    build_small(data, sources=(f"sample:{N_IMAGES}",), max_count=24)
    teacher = make_teacher(str(root / "teacher"), data)
    b = {"root": root, "data": data, "teacher": teacher}
    out = str(root / "full")
    b["summary"] = pseudolabel(options(b, out))
    b["full"] = out
    yield b
    torch.set_num_threads(threads)


def test_student_shards_verify_and_copy_the_source_bytes(base):
    out, data = base["full"], base["data"]
    s = verify(out, full=True)
    m = manifest_of(out)
    src_m = mf.load(data)
    assert m["classes"] == src_m["classes"]                 # the teacher's classes, from its training manifest
    assert m["components"] == ["jpg", "index", "cls", "json"]
    assert s["decoded"] == m["total"] == base["summary"]["total"]
    names = sorted(m["classes"], key=m["classes"].get)
    src, got = SampleReader(data), SampleReader(out)
    tops = chunk_records(out)
    assert sorted(tops) == list(range(N_IMAGES))            # every image scored exactly once
    seen = []
    for i in range(m["total"]):
        meta = json.loads(got.component(i, "json"))
        j, c = meta["source_index"], int(got.component(i, "cls"))
        assert got.component(i, "jpg") == src.component(j, "jpg")      # byte for byte, not re-encoded
        assert got.component(i, "index") == mf.key_for(i).encode()
        assert meta["label"] == names[c] and meta["size"] == json.loads(src.component(j, "json"))["size"]
        classes, scores = tops[j]
        assert c in classes.tolist() and meta["score"] == float(scores[classes.tolist().index(c)])
        seen.append((c, j))
    # the selection equals brute force over the stored top-P scores; an image can appear under several classes
    cls, score, idx = records(np.stack([tops[i][0] for i in range(N_IMAGES)]),
                              np.stack([tops[i][1] for i in range(N_IMAGES)]), np.arange(N_IMAGES))
    expected = brute_force_topk(cls, score, idx, TOP_K)
    assert sorted(seen) == sorted((c, i) for c, _, i in expected)
    assert len(seen) == len(set(seen)) and len({j for _, j in seen}) <= len(seen)


def test_teacher_scores_are_the_softmax_top_p_of_the_teacher(base):
    from pipelines import make_loader
    teacher = load_teacher(base["teacher"])
    loader = make_loader("eval_val", base["data"], batch_size=32, device="cpu", shuffle_buffer=1, size=32,
                         resize=37, num_threads=1)
    tops = chunk_records(base["full"])
    with torch.inference_mode():
        for batch in loader:
            probs = torch.softmax(teacher.model(batch["views"][0]), 1)
            for row, i in enumerate(batch["index"].tolist()):
                classes, scores = tops[i]
                order = sorted(range(probs.shape[1]), key=lambda c: -float(probs[row, c]))[:TOP_P]
                assert classes.tolist() == order
                np.testing.assert_allclose(scores, probs[row, order].numpy(), rtol=1e-5)


def test_student_shards_train_with_labels_through_dali(base):
    from pipelines import make_loader
    out = base["full"]
    got = SampleReader(out)
    loader = make_loader("eval_train", out, batch_size=5, device="cpu", shuffle_buffer=1, size=32, num_threads=1)
    n = 0
    for batch in loader:
        assert batch["views"][0].shape[1:] == (3, 32, 32)
        for i, label in zip(batch["index"].tolist(), batch["label"].tolist()):
            assert label == int(got.component(i, "cls"))
            n += 1
    assert n == manifest_of(out)["total"] // 5 * 5        # training drops the last partial batch


def test_killed_run_resumes_to_the_identical_output(base):
    out = str(base["root"] / "killed")
    # kill 1: after 1 committed chunk of the teacher pass (of 4)
    assert pseudolabel(options(base, out, stop_after_chunks=1)) is None
    rank_dir = next(os.path.join(r, d) for r, ds, _ in os.walk(out) for d in ds if d == "rank0")
    assert sorted(os.listdir(rank_dir)) == ["chunk-000000.npz", "state.pt"]
    assert not os.path.exists(os.path.join(out, mf.MANIFEST))
    # kill 2: the pass finishes, writing stops after 1 output shard
    assert pseudolabel(options(base, out, stop_after_shards=1)) is None
    with open(os.path.join(rank_dir, "DONE")) as f:
        done = json.load(f)
    assert done["chunks"] == N_IMAGES // CHUNK and done["new_samples"] == N_IMAGES - CHUNK   # chunk 0 not redone
    assert not os.path.exists(os.path.join(out, mf.MANIFEST))
    # the last run: no teacher pass at all, the remaining shards written
    summary = pseudolabel(options(base, out))
    assert summary["teacher_pass_this_run"] is None
    identical_outputs(out, base["full"])
    assert verify(out)["total"] == manifest_of(base["full"])["total"]
    # and once complete, a re-run does nothing
    assert pseudolabel(options(base, out))["total"] == summary["total"]


def test_two_torchrun_ranks_equal_one_rank(base):
    out = str(base["root"] / "two-ranks")
    port = str(29500 + (os.getpid() * 11) % 400)
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", port, "-m", "sslkit.pseudolabel",
           "--teacher", base["teacher"], "--data", base["data"], "--out", out, "--top-p", str(TOP_P), "--top-k",
           str(TOP_K), "--batch-size", str(BATCH), "--chunk", str(CHUNK), "--device", "cpu", "--max-count", "10",
           "--io-threads", "2", "--loader-threads", "1", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    layout = os.path.join(out, ".pseudolabel", os.listdir(os.path.join(out, ".pseudolabel"))[0], "w2-b8-c2")
    for rank in (0, 1):   # each rank wrote its own half
        with open(os.path.join(layout, f"rank{rank}", "DONE")) as f:
            assert json.load(f)["samples"] == N_IMAGES // 2
    identical_outputs(out, base["full"])


def test_bf16_autocast_path(base):
    """The GPU path's autocast (bf16), exercised on the CPU: a separate set of scores, close to fp32's."""
    out = str(base["root"] / "bf16")
    pseudolabel(options(base, out, precision="bf16"))
    assert verify(out)["total"] > 0
    t16, t32 = chunk_records(out), chunk_records(base["full"])
    diff = max(float(np.abs(t16[i][1] - t32[i][1]).max()) for i in range(N_IMAGES))
    assert 0 < diff < 0.05
    assert np.mean([t16[i][0][0] == t32[i][0][0] for i in range(N_IMAGES)]) > 0.8


def test_random_label_control(base):
    out = str(base["root"] / "random")
    m = random_labels(base["full"], out, seed=3, progress=False)
    src_m = manifest_of(base["full"])
    assert verify(out, full=True)["total"] == src_m["total"] == m["total"]
    assert m["class_counts"] == src_m["class_counts"]            # a permutation: the same class counts
    a, b = SampleReader(base["full"]), SampleReader(out)
    changed = 0
    for i in range(m["total"]):
        assert a.component(i, "jpg") == b.component(i, "jpg")
        meta = json.loads(b.component(i, "json"))
        assert meta["original_label"] == json.loads(a.component(i, "json"))["label"]
        changed += a.component(i, "cls") != b.component(i, "cls")
    assert changed > m["total"] // 2


def test_evaluate_gives_the_classifier_top1(base):
    r = evaluate(base["teacher"], base["data"], size=32, resize=37, batch_size=16, device="cpu", progress=False)
    tops = chunk_records(base["full"])
    truth = SampleReader(base["data"])
    expected = np.mean([tops[i][0][0] == int(truth.component(i, "cls")) for i in range(N_IMAGES)])
    assert r["samples"] == N_IMAGES and r["top1"] == pytest.approx(expected)


def test_class_names_fall_back_to_ids_when_the_training_data_is_gone(base, tmp_path):
    data = str(tmp_path / "gone")
    build_small(data, sources=("sample:24",), max_count=24)
    run = make_teacher(str(tmp_path / "t"), data)
    for name in os.listdir(data):
        os.remove(os.path.join(data, name))
    t = load_teacher(run)
    assert t.classes == [str(i) for i in range(12)] and "no class names" in t.classes_from


def test_one_line_errors(base, tmp_path, capsys):
    no_cls = make_teacher(str(tmp_path / "ssl"), base["data"], classifier=False)
    with pytest.raises(PseudolabelError, match=r"global\.pt: no classifier\.weight .*supervised") as e:
        pseudolabel(options(base, str(tmp_path / "o1"), teacher=no_cls))
    assert "\n" not in str(e.value)
    with pytest.raises(PseudolabelError, match="no such shard folder"):
        pseudolabel(options(base, str(tmp_path / "o2"), data=str(tmp_path / "missing")))
    with pytest.raises(PseudolabelError, match="already holds a different dataset"):
        pseudolabel(options(base, base["full"], top_k=2))
    with pytest.raises(PseudolabelError, match="--top-p 13: the teacher has only 12 classes"):
        pseudolabel(options(base, str(tmp_path / "o3"), top_p=13))
    # the command line: `error: <one line>` and exit status 2 (a bad input)
    assert main(["--teacher", str(tmp_path / "nothing"), "--data", base["data"], "--out", str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and err[-1].endswith("nothing: no such file or folder")


def test_progress_lines_off_a_terminal(base, capsys):
    """The teacher pass, the student write, evaluate and the random-label copy: plain lines with rate and
    ETA off a terminal (pytest's stderr), never tqdm's carriage returns."""
    out = str(base["root"] / "progress")
    pseudolabel(options(base, out, progress=True, progress_every=1e-9))
    evaluate(base["teacher"], base["data"], size=32, resize=37, batch_size=16, device="cpu", progress_every=1e-9)
    random_labels(out, str(base["root"] / "progress-random"), seed=3, progress_every=1e-9)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    n_out = manifest_of(out)["total"]
    for desc, total in (("teacher (rank 0 of 1)", N_IMAGES), ("write", n_out), ("evaluate pool", N_IMAGES),
                        ("random labels", n_out)):
        mine = [ln for ln in lines if ln.startswith(desc + ": ")]
        assert mine[0].endswith("| started") and mine[-1].endswith("| done"), (desc, mine)
        assert f"{total}/{total} img (100%)" in mine[-1], (desc, mine[-1])
        assert any(" img/s | " in ln and "| eta " in ln for ln in mine[1:-1]), (desc, mine)
    assert "top1 " in [ln for ln in lines if ln.startswith("evaluate pool: ")][-1]
