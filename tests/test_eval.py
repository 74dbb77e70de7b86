"""Evaluation: kNN / linear probe / SVM / low-shot against scikit-learn and numpy references, the
feature cache (stored order, invalidation, resume after a kill), and the CLI end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import build_small
from sslkit import models
from sslkit.errors import SslkitError
from sslkit.eval import cli, features, knn, layers, linear, lowshot, svm
from sslkit.eval.encoders import TrunkEncoder, to_trunk_input
from sslkit.trunk import load_trunk, random_trunk

T = 0.07


def blobs(n_per_class=60, classes=4, dim=16, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    x = np.concatenate([centres[c] + spread * rng.normal(size=(n_per_class, dim)) for c in range(classes)])
    y = np.repeat(np.arange(classes), n_per_class)
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


# -- kNN ---------------------------------------------------------------------------------------------
def test_knn_matches_sklearn_weighted_votes():
    from sklearn.neighbors import KNeighborsClassifier
    x, y = blobs(spread=2.5)
    train_x, train_y, q_x, q_y = x[:180], y[:180], x[180:], y[180:]
    ks = (1, 5, 20)
    scores = knn.knn_scores(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(q_x), 4, ks, T)
    for k in ks:
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                   weights=lambda d: np.exp((1 - d) / T)).fit(train_x, train_y)
        np.testing.assert_array_equal(scores[k].argmax(1).numpy(), ref.predict(q_x))
    # numpy reference of the vote sums themselves (DINO: sum of exp(sim/T) per class over the top k)
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = q_x / np.linalg.norm(q_x, axis=1, keepdims=True)
    sims = b @ a.T
    top = np.argsort(-sims, axis=1)[:, :20]
    ref = np.zeros((len(q_x), 4))
    for i in range(len(q_x)):
        for j in top[i]:
            ref[i, train_y[j]] += np.exp(sims[i, j] / T)
    np.testing.assert_allclose(scores[20].numpy(), ref, rtol=1e-4)
    res = knn.knn_eval(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(q_x),
                       torch.from_numpy(q_y), 4, ks)
    assert res["top1"]["20"] == pytest.approx((ref.argmax(1) == q_y).mean())
    assert res["top5"]["20"] == 1.0   # 4 classes: every label is in the top 5


def test_topk_accuracy_matches_sklearn():
    from sklearn.metrics import top_k_accuracy_score
    rng = np.random.default_rng(1)
    scores, labels = rng.normal(size=(100, 10)), rng.integers(0, 10, 100)
    acc = knn.topk_accuracy(torch.from_numpy(scores), torch.from_numpy(labels), ks=(1, 3, 5))
    for k in (1, 3, 5):
        assert acc[k] == pytest.approx(top_k_accuracy_score(labels, scores, k=k, labels=range(10)))


# -- linear probe ------------------------------------------------------------------------------------
def test_lr_schedule_protocol_and_scaled():
    # the protocol: 28 epochs, x0.1 at 8, 16, 24
    lrs = [linear.lr_at(s, 10, 28, 0.01) for s in range(280)]
    assert lrs[79] == pytest.approx(0.01) and lrs[80] == pytest.approx(1e-3)
    assert lrs[159] == pytest.approx(1e-3) and lrs[160] == pytest.approx(1e-4) and lrs[240] == pytest.approx(1e-5)
    # 7 epochs: the same fractions, i.e. drops at epochs 2, 4, 6
    drops = [s for s in range(1, 70) if linear.lr_at(s, 10, 7, 1.0) < linear.lr_at(s - 1, 10, 7, 1.0)]
    assert drops == [20, 40, 60]
    assert linear.scaled_lr(0.01, 512) == pytest.approx(0.02)


def test_linear_probe_reaches_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    x, y = blobs(n_per_class=100, spread=2.0, seed=3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    tr, te = slice(0, 300), slice(300, 400)
    ref = LogisticRegression(max_iter=2000).fit(x[tr], y[tr]).score(x[te], y[te])
    torch.manual_seed(0)
    probe = linear.LinearProbe(16, 16, 4)
    batches, steps = linear.cached_batches(xt[tr], yt[tr], 32, seed=0)
    # lr 0.1 (x 32/256): the protocol's 0.01 is tuned for 5k-class ImageNet runs of 140k steps
    losses = linear.train_probe(probe, batches, 28, steps, lr=linear.scaled_lr(0.1, 32), weight_decay=1e-4)
    assert losses[-1] < losses[0]
    acc = linear.evaluate(probe, xt[te], yt[te])["top1"]
    assert acc >= ref - 0.04, (acc, ref)
    # BN without affine, then Linear: the only parameters are the Linear's
    assert [n for n, _ in probe.named_parameters()] == ["fc.weight", "fc.bias"]


# -- SVM ---------------------------------------------------------------------------------------------
def test_voc_ap_hand_example_and_envelope():
    # ranks: +, -, +, -  -> precision 1, .5, .667, .5 at recall .5, .5, 1, 1 -> .5 * 1 + .5 * 2/3
    assert svm.voc_ap(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert svm.voc_ap(np.array([0.9, 0.8]), np.array([1, 1])) == pytest.approx(1.0)
    assert np.isnan(svm.voc_ap(np.array([0.1]), np.array([0])))
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=200), rng.integers(0, 2, 200)
    ref = average_precision_score(t, s)        # non-interpolated: the envelope can only raise it
    assert svm.voc_ap(s, t) >= ref - 1e-12
    # brute force: integral over recall of the best precision at that recall or beyond
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(t[order]); prec = tp / np.arange(1, 201); rec = tp / t.sum()
    brute = sum((rec[i] - (rec[i - 1] if i else 0)) * prec[i:].max() for i in range(200))
    assert svm.voc_ap(s, t) == pytest.approx(brute)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_svm_cost_selection_is_the_cv_best():
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    # dim 0 separates the classes with a small margin; dim 1 differs more between the class means but
    # overlaps widely. A small cost follows the means (poor AP); a large one finds the margin (AP 1).
    rng = np.random.default_rng(0)
    y = np.repeat([1, -1], 60)
    x = np.stack([np.where(y > 0, 1.0, -1.0) + 0.3 * rng.normal(size=120),
                  np.where(y > 0, 3.0, -3.0) + 12 * rng.normal(size=120), np.full(120, 30.0)], 1)
    x = svm.svm_normalize(x)
    costs = (1e-4, 1e-2, 1.0, 100.0, 1e4)
    best, scores = svm.choose_cost(x, y, costs)
    ref = [cross_val_score(svm.make_svm(c), x, y, cv=StratifiedKFold(3), scoring="average_precision").mean()
           for c in costs]
    np.testing.assert_allclose(scores, ref)
    assert best == costs[int(np.argmax(ref))] == 100.0   # the first of the CV-best costs
    assert max(ref[:2]) < 0.8 and ref[3] == pytest.approx(1.0)
    # one positive cannot be cross-validated: the fallback cost
    assert svm.choose_cost(x[:10], np.array([1] + [-1] * 9), costs) == (svm.FALLBACK_COST, None)


def test_svm_eval_separable_classes():
    x, y = blobs(n_per_class=30, classes=3, spread=0.3, seed=2)
    res = svm.svm_eval(x[:60], y[:60], x[60:], y[60:], 3, costs=(0.1, 1.0))
    assert res["mAP"] > 0.95 and res["top1"] > 0.9
    assert all(c in (0.1, 1.0) for c in res["cost"])


# -- low-shot ----------------------------------------------------------------------------------------
def test_lowshot_sampling_deterministic_and_balanced():
    labels = np.repeat(np.arange(5), [10, 20, 7, 30, 12])
    np.random.default_rng(0).shuffle(labels)
    for k in (1, 2, 4):
        a = lowshot.sample_lowshot(labels, k, seed=3)
        assert np.array_equal(a, lowshot.sample_lowshot(labels, k, seed=3))
        assert np.bincount(labels[a], minlength=5).tolist() == [k] * 5
        assert len(np.unique(a)) == len(a)
    assert not np.array_equal(lowshot.sample_lowshot(labels, 4, 0), lowshot.sample_lowshot(labels, 4, 1))
    with pytest.raises(ValueError):
        lowshot.sample_lowshot(labels, 8, 0)
    x, y = blobs(n_per_class=20, classes=3, spread=0.5)
    r = lowshot.lowshot_eval(x, y, x, y, 3, shots=(1, 2, 64), draws=3, classifier="knn")
    assert set(r["shots"]) == {"1", "2"}   # 64 shots: more than a class holds, skipped
    assert len(r["shots"]["2"]["top1"]["draws"]) == 3


# -- layers and inputs -------------------------------------------------------------------------------
def test_pools_reference_and_other_sizes():
    m = models.create("resnet_tiny", num_classes=0, width=8)
    assert layers.choose_pool(m, "res4", 14).fixed == (8, 3, 0)        # 224 input: the table's pool
    assert layers.choose_pool(m, "res5", 14).fixed == (12, 2, 0)       # stride-1 res5 (colorization)
    assert layers.choose_pool(m, "res4", 4) == layers.Pool(3)           # 64 input: adaptive to 3x3
    assert layers.choose_pool(m, "res5", 1) == layers.Pool(1)           # 32 input: 1x1 stays 1x1
    model, spec = random_trunk("resnet_tiny", {"width": 8})
    enc = TrunkEncoder(model, spec, "res4", size=64)
    assert enc.channels == 32 and enc(torch.zeros(2, 3, 64, 64)).shape == (2, 32 * 9)
    with pytest.raises(SslkitError, match="not a feature layer"):
        TrunkEncoder(model, spec, "fc")


def test_colorization_trunk_gets_L_minus_50():
    white = (torch.ones(1, 3, 4, 4) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = to_trunk_input(white, "L")
    assert x.shape == (1, 1, 4, 4) and torch.allclose(x, torch.full_like(x, 50.0), atol=1e-3)
    model, spec = random_trunk("resnet_tiny", {"width": 8, "in_channels": 1})
    assert spec.input == "L"
    assert TrunkEncoder(model, spec, size=32).channels == 64


# -- feature cache -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards64(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "s64")
    build_small(out, sources=("sample:64",))
    return out


class Counting:
    """Wraps an encoder and counts the images it encodes."""

    def __init__(self, enc):
        self.enc, self.seen = enc, 0

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def __call__(self, views):
        self.seen += views.shape[0]
        return self.enc(views)


def _encoder(seed=1):
    model, spec = random_trunk("resnet_tiny", {"width": 8}, seed=seed)
    return TrunkEncoder(model, spec, size=32)


def _ckpt_encoder(run: str) -> Counting:
    model, spec = load_trunk(run)
    return Counting(TrunkEncoder(model, spec, size=32))


def test_features_stored_order_cache_reuse_and_invalidation(shards64, tmp_path):
    kw = dict(size=32, resize=32, batch_size=16, cache_dir=str(tmp_path / "cache"), progress=False)
    run = write_checkpoint(str(tmp_path / "run"), seed=1)
    enc = _ckpt_encoder(run)
    fs = features.extract(enc, shards64, **kw)
    assert enc.seen == 64 and torch.equal(fs.index, torch.arange(64)) and fs.x.shape == (64, 64)
    assert fs.meta["stored_order"]   # eval_val with shuffle_buffer=1 gave stored order: nothing was re-sorted
    meta = json.load(open(os.path.join(shards64, "manifest.json")))
    names = sorted(meta["classes"], key=meta["classes"].get)
    assert fs.classes == names and 0 <= fs.labels.min() and fs.labels.max() < len(names)
    # the same checkpoint again: read from the cache, nothing encoded
    again = _ckpt_encoder(run)
    fs2 = features.extract(again, shards64, **kw)
    assert again.seen == 0 and torch.equal(fs2.x, fs.x) and fs2.meta["cache"] == fs.meta["cache"]
    # the checkpoint at the same path now holds other weights: new features
    write_checkpoint(run, seed=2)
    changed = _ckpt_encoder(run)
    fs3 = features.extract(changed, shards64, **kw)
    assert changed.seen == 64 and fs3.meta["cache"] != fs.meta["cache"] and not torch.equal(fs3.x, fs.x)
    # other crop options are other features too
    other = _ckpt_encoder(run)
    features.extract(other, shards64, **{**kw, "size": 28})
    assert other.seen == 64 and len(os.listdir(tmp_path / "cache")) == 3


def test_features_resume_after_kill(shards64, tmp_path):
    kw = dict(size=32, resize=32, batch_size=8, chunk=16, cache_dir=str(tmp_path), progress=False)
    first = Counting(_encoder())
    assert features.extract(first, shards64, max_chunks=2, **kw) is None   # "killed" after 2 of 4 chunks
    assert first.seen == 32
    folder = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    assert sorted(f for f in os.listdir(folder) if f.startswith("chunk-")) == ["chunk-000000.pt", "chunk-000001.pt"]
    resumed = Counting(_encoder())
    fs = features.extract(resumed, shards64, **kw)
    assert resumed.seen == 32   # only the missing half
    assert fs.meta["resumed_by"] == "loader state"   # the DALI state restored, nothing decoded twice
    ref = features.extract(_encoder(), shards64, **{**kw, "cache_dir": None})
    assert torch.equal(fs.index, torch.arange(64)) and torch.allclose(fs.x, ref.x, atol=1e-5)
    assert torch.equal(fs.labels, ref.labels)


def test_assemble_sorts_by_index_and_refuses_gaps():
    info = {"dir": "d", "total": 4, "classes": ["a", "b"]}
    part = {"x": torch.arange(4.0).view(4, 1), "labels": torch.tensor([0, 1, 0, 1]),
            "index": torch.tensor([2, 0, 3, 1]), "corrupt": 0}
    fs = features._assemble([part], {"channels": 1}, info)
    assert fs.index.tolist() == [0, 1, 2, 3] and fs.x.view(-1).tolist() == [1.0, 3.0, 0.0, 2.0]
    assert fs.meta["stored_order"] is False
    with pytest.raises(SslkitError, match="distinct indices"):
        features._assemble([{**part, "index": torch.tensor([0, 1, 1, 2])}], {"channels": 1}, info)


# -- the command line, end to end --------------------------------------------------------------------
def write_checkpoint(out: str, seed: int = 1) -> str:
    """A run folder in train.py's contract: checkpoints/step-N/global.pt with backbone.* weights."""
    torch.manual_seed(seed)
    trunk = models.create("resnet_tiny", num_classes=0, width=8)
    state = {"backbone." + k: v for k, v in trunk.state_dict().items()}
    state["projection.0.weight"] = torch.randn(8, 64)     # method parts beside the trunk are ignored
    d = os.path.join(out, "checkpoints", "step-00000012")
    os.makedirs(d, exist_ok=True)
    torch.save({"version": 1, "step": 12, "epoch": 2, "world_size": 2, "model": state,
                "config": {"arch": "resnet_tiny", "method": "deepclusterv2", "method_options": {}},
                "trunk": {"arch": "resnet_tiny", "kwargs": {"width": 8}, "input": "rgb"}},
               os.path.join(d, "global.pt"))
    open(os.path.join(d, "COMPLETE"), "w").close()
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("step-00000012")
    return out


@pytest.mark.parametrize("kind,extra", [
    ("knn", ["--k", "5,10"]),
    ("linear", ["--epochs", "2", "--batch-size", "16"]),
    ("svm", ["--costs", "0.1,1"]),
    ("lowshot", ["--shots", "1,2", "--draws", "2", "--costs", "1"]),
])
def test_cli_end_to_end(shards64, tmp_path, kind, extra, capsys):
    run = write_checkpoint(str(tmp_path / "run"))
    out = str(tmp_path / f"{kind}.json")
    argv = [kind, "--ckpt", run, "--train", shards64, "--val", shards64, "--size", "32", "--resize", "32",
            "--cache-dir", str(tmp_path / "cache"), "--out", out, "--no-progress", *extra]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "random-init" in printed and f"wrote {out}" in printed
    rep = json.load(open(out))
    assert rep["eval"] == kind and set(rep["results"]) == {"ckpt", "random"}
    assert rep["subjects"]["ckpt"]["step"] == 12 and rep["subjects"]["random"]["source"] == "random"
    assert rep["val"]["total"] == 64 and rep["command"].startswith("python -m sslkit.eval " + kind)
    r = rep["results"]["ckpt"]
    if kind == "knn":
        assert set(r["top1"]) == {"5", "10"} and 0 <= r["top1"]["5"] <= 1
    elif kind == "linear":
        assert r["mode"].startswith("protocol") and len(r["train_loss"]) == 2 and 0 <= r["top1"] <= 1
    elif kind == "svm":
        assert 0 <= r["mAP"] <= 1 and len(r["ap"]) == len(rep["classes"])
    else:
        assert set(r["shots"]) == {"1", "2"} and len(r["shots"]["1"]["mAP"]["draws"]) == 2


def test_cli_errors_are_one_line(shards64, tmp_path, capsys):
    assert cli.main(["knn", "--ckpt", str(tmp_path), "--train", shards64, "--val", shards64]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert cli.main(["knn", "--ckpt", "random", "--train", shards64, "--val", shards64]) == 2
    assert "--arch" in capsys.readouterr().err
    unlabelled = str(tmp_path / "unl")
    build_small(unlabelled, sources=("sample:8",), source=__import__("sslkit.shard", fromlist=["SourceOptions"])
                .SourceOptions(labels="none"))
    assert cli.main(["knn", "--ckpt", "pixels", "--train", unlabelled, "--val", unlabelled, "--size", "32",
                     "--resize", "32"]) == 2
    assert "unlabelled" in capsys.readouterr().err


def test_cli_pixels_and_fast_linear(shards64, tmp_path, capsys):
    out = str(tmp_path / "p.json")
    assert cli.main(["linear", "--fast", "--epochs", "3", "--ckpt", "pixels", "--train", shards64, "--val", shards64,
                     "--size", "16", "--resize", "16", "--no-cache", "--out", out, "--no-progress"]) == 0
    rep = json.load(open(out))
    assert list(rep["results"]) == ["pixels"] and rep["results"]["pixels"]["dims"] == 3 * 16 * 16
    assert rep["results"]["pixels"]["mode"].startswith("fast")
    assert "fast: cached centre-crop features" in capsys.readouterr().out
    model, spec = load_trunk("random", arch="resnet_tiny", kwargs={"width": 8}, seed=4)
    model2, spec2 = load_trunk("random", arch="resnet_tiny", kwargs={"width": 8}, seed=4)
    assert spec.identity == spec2.identity   # seeded: the same baseline every time


# -- classes compared before extraction; progress off a terminal ---------------------------------------
def _relabelled_copy(src: str, dst: str, edit) -> str:
    """A copy of a shard folder whose manifest's `classes` went through `edit` (the tars are shared)."""
    import shutil
    shutil.copytree(src, dst)
    path = os.path.join(dst, "manifest.json")
    m = json.load(open(path))
    m["classes"] = edit(m["classes"])
    json.dump(m, open(path, "w"))
    return dst


def test_cli_class_mismatch_is_caught_before_extraction(shards64, tmp_path, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("features were extracted before the classes were compared")

    monkeypatch.setattr(features, "extract", never)
    extra = _relabelled_copy(shards64, str(tmp_path / "extra"), lambda c: {**c, "zebra": len(c)})
    base = ["--ckpt", "pixels", "--train", shards64, "--val", extra, "--size", "16", "--resize", "16", "--no-cache"]
    assert cli.main(["knn", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "different classes" in err
    assert "only in val: zebra" in err and "only in train: -" in err
    # the same names under other ids are different labels too
    names = sorted(json.load(open(os.path.join(shards64, "manifest.json")))["classes"])
    swapped = _relabelled_copy(shards64, str(tmp_path / "swapped"),
                               lambda c: {**c, names[0]: c[names[1]], names[1]: c[names[0]]})
    assert cli.main(["linear", "--fast", *base[:3], shards64, "--val", swapped, *base[6:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the same" in err and "other ids" in err and names[0] in err


def test_progress_lines_off_a_terminal(shards64, tmp_path, capsys):
    # pytest's captured stderr is not a terminal: extraction and the probe print plain lines
    assert cli.main(["linear", "--fast", "--epochs", "2", "--ckpt", "pixels", "--train", shards64, "--val", shards64,
                     "--size", "16", "--resize", "16", "--no-cache", "--batch-size", "16",
                     "--progress-every", "0.001"]) == 0
    lines = capsys.readouterr().err.splitlines()
    feats = [ln for ln in lines if ln.startswith("features pixels s64:")]
    assert feats[0].endswith("started") and feats[-1].endswith("done") and "64/64 img (100%)" in feats[-1]
    assert any("img/s" in ln and "eta" in ln for ln in feats[1:-1])
    probe = [ln for ln in lines if ln.startswith("linear probe pixels (2 epochs):")]
    assert "8/8 step (100%)" in probe[-1] and "epoch 2/2" in probe[-1] and "loss" in probe[-1]
    assert not any("\r" in ln for ln in lines)


@pytest.mark.parametrize("kind,extra,line", [
    ("svm", ["--costs", "1"], "SVMs pixels: {n}/{n} class (100%)"),
    ("lowshot", ["--shots", "1,2,999", "--draws", "2", "--costs", "1"], "low-shot pixels: 4/4 draw (100%)"),
])
def test_svm_and_lowshot_progress_off_a_terminal(shards64, tmp_path, capsys, kind, extra, line):
    assert cli.main([kind, "--ckpt", "pixels", "--train", shards64, "--val", shards64, "--size", "16", "--resize", "16",
                     "--no-cache", *extra]) == 0
    n = len(json.load(open(os.path.join(shards64, "manifest.json")))["classes"])
    done = [ln for ln in capsys.readouterr().err.splitlines() if ln.endswith("| done")]
    assert any(ln.startswith(line.format(n=n)) for ln in done), done
