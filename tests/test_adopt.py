"""`python -m sslkit.shard index`: tars written by other tools (webdataset's ShardWriter, img2dataset's
layout, ImageNet-22K's per-synset tars, broken ones) adopted in place, then read, verified, trained on,
evaluated and visualised exactly like built shards -- and not one byte of the user's files changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import foreign
from conftest import REPO
from pipelines import make_loader
from sslkit.shard import load
from sslkit.shard import adopt

PY = sys.executable


def cli(*args, check=True, env=None):
    r = subprocess.run([PY, "-m", "sslkit.shard", *args], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, **(env or {})))
    if check and r.returncode != 0:
        raise AssertionError(f"sslkit.shard {' '.join(args)} failed:\n{r.stderr}")
    return r


def snapshot(root: str) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def read_all(data: str, **kw) -> dict[int, dict]:
    """Every sample of an eval_val pass: index -> {label, intact, extras...}; each index exactly once."""
    seen: dict[int, dict] = {}
    loader = make_loader("eval_val", data, batch_size=8, num_threads=1, **kw)
    for b in loader:
        for i, index in enumerate(b["index"].tolist()):
            assert index not in seen, f"sample {index} served twice"
            seen[index] = {"label": int(b["label"][i]) if "label" in b else None, "intact": bool(b["intact"][i]),
                           **{k: b[k][i] for k in kw.get("extra_keys", ())}}
    return seen


@pytest.fixture(scope="module")
def folders(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("foreign")
    return {
        "wds": (str(root / "wds"), foreign.write_shardwriter(str(root / "wds"), photos)),
        "json": (str(root / "json"), foreign.write_shardwriter_json(str(root / "json"), photos)),
        "i2d": (str(root / "i2d"), foreign.write_img2dataset(str(root / "i2d"), photos)),
        "in22k": (str(root / "in22k"), foreign.write_imagenet22k(str(root / "in22k"), photos)),
        "in22k_val": (str(root / "in22k_val"), foreign.write_imagenet22k(str(root / "in22k_val"), photos, 4)),
    }


@pytest.fixture(scope="module")
def adopted(folders):
    """Each folder indexed once, in place, by the command line; the user's files snapshotted around it."""
    args = {"wds": [], "json": ["--label-field", "label"], "i2d": [], "in22k": ["--label", "shard"],
            "in22k_val": ["--label", "shard"]}
    changed = {}
    for name, (d, _) in folders.items():
        before = snapshot(d)
        cli("index", d, "--out", d, "--no-progress", *args[name])
        after = snapshot(d)
        changed[name] = ({k: v for k, v in before.items() if after.get(k) != v},
                         sorted({k.split("/")[0] for k in after if k not in before}))
    return changed


def test_nothing_inside_or_beside_the_tars_changes(folders, adopted):
    for name, (modified, added) in adopted.items():
        assert modified == {}, f"{name}: {modified}"
        assert set(added) <= adopt.OURS, f"{name} gained {added}"
    # img2dataset's parquet and stats files are still there, untouched
    assert adopted["i2d"][0] == {} and os.path.exists(os.path.join(folders["i2d"][0], "00000.parquet"))


def test_shardwriter_jpg_png_webp_with_integer_cls(folders, adopted):
    d, truth = folders["wds"]
    m = load(d)
    assert m["layout"] == "adopted" and m["total"] == len(truth) == 36
    assert m["classes"] == {"0": 0, "1": 1, "2": 2, "3": 3} and m["labels"]["from"] == "cls"
    assert m["image_formats"] == {"jpg": 12, "png": 12, "webp": 12}
    assert {s["path"] for s in m["shards"]} == {f"shard-{k:06d}.tar" for k in range(3)}   # in place: relative
    seen = read_all(d)
    assert sorted(seen) == list(range(36))
    assert all(seen[i]["label"] == truth[i][2] and seen[i]["intact"] for i in seen)
    assert "OK (36 samples in 3 shards, 36 images decoded)" in cli("verify", "--full", d).stdout
    info = cli("info", d).stdout
    assert "PNG" in info and "WEBP" in info and "adopted in place" in info


def test_jpeg_with_a_json_label_field(folders, adopted):
    d, truth = folders["json"]
    m = load(d)
    assert m["classes"] == {c: i for i, c in enumerate(sorted(foreign.CLASSES))}
    assert m["labels"]["from"] == "json:label"
    seen = read_all(d)
    assert [seen[i]["label"] for i in range(len(truth))] == [m["classes"][t[2]] for t in truth]


def test_img2dataset_captions_and_metadata_reach_the_batch_when_asked(folders, adopted):
    d, truth = folders["i2d"]
    m = load(d)
    assert m["total"] == 20 and m["classes"] is None and m["labels"] is None
    seen = read_all(d, extra_keys=("txt", "json"))
    assert [seen[i]["txt"].decode() for i in range(20)] == [t[2] for t in truth]
    assert json.loads(seen[7]["json"])["key"] == truth[7][1]
    assert all(s["label"] is None for s in seen.values())


def test_imagenet22k_labels_come_from_the_tar_names(folders, adopted):
    d, truth = folders["in22k"]
    m = load(d)
    wnids = sorted({t[2] for t in truth})
    assert m["classes"] == {w: i for i, w in enumerate(wnids)} and m["labels"]["from"] == "shard"
    assert m["class_counts"] == {w: 8 for w in wnids}
    seen = read_all(d)
    assert [seen[i]["label"] for i in range(len(truth))] == [m["classes"][t[2]] for t in truth]


def test_broken_tars_are_counted_and_reported_never_fatal(tmp_path, photos):
    d = str(tmp_path / "broken")
    expected = foreign.write_broken(d, photos)
    r = cli("index", d, "--out", str(tmp_path / "idx"), "--no-progress")
    m = load(str(tmp_path / "idx"))
    assert m["total"] == expected["good"] and m["rejected"] == 3
    assert "3 rejected" in r.stderr
    rows = open(tmp_path / "idx" / "rejected.tsv").read().splitlines()[1:]
    for ref, words in expected["rejected"].items():
        assert any(row.split("\t")[0].endswith(ref) and words in row for row in rows), (ref, rows)
    seen = read_all(str(tmp_path / "idx"))
    assert sorted(seen) == list(range(expected["good"]))
    # a tar changed after indexing is caught by verify, naming it
    with open(os.path.join(d, "good.tar"), "r+b") as f:
        f.seek(2000)
        f.write(b"\xff" * 8)
    r = cli("verify", str(tmp_path / "idx"), check=False)
    assert r.returncode == 2 and "good.tar: sha256" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_full_rejects_undecodable_images_and_without_it_the_loader_counts_them(tmp_path, photos, caplog):
    import io
    import tarfile
    d = str(tmp_path / "t")
    os.makedirs(d)
    good = [foreign.encode(img, "jpg") for _, img in foreign.crops(photos, 8, seed=5)]
    bad = good[3][:600] + bytes(len(good[3]) - 600)     # a JPEG whose end was overwritten: no EOI marker
    with tarfile.open(os.path.join(d, "a.tar"), "w") as tar:
        for k, data in enumerate(good[:3] + [bad] + good[4:]):
            info = tarfile.TarInfo(f"k{k}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cli("index", d, "--out", str(tmp_path / "full"), "--full", "--no-progress")
    assert load(str(tmp_path / "full"))["total"] == 7
    assert "k3" in open(tmp_path / "full" / "rejected.tsv").read()
    cli("index", d, "--out", str(tmp_path / "fast"), "--no-progress")
    with caplog.at_level("WARNING", logger="sslkit.loader"):
        seen = read_all(str(tmp_path / "fast"))
    assert len(seen) == 8 and [s["intact"] for _, s in sorted(seen.items())] == [True] * 3 + [False] + [True] * 4
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "1 damaged image(s)" in warning and os.path.join(d, "a.tar") + ":k3.jpg" in warning


def test_interrupted_index_resumes_to_the_same_result(tmp_path, folders, monkeypatch):
    src = folders["in22k"][0]
    ref = adopt.index(adopt.IndexOptions(sources=(src,), out=str(tmp_path / "ref"), label="shard", workers=1,
                                         progress=False))
    calls = []
    real = adopt.index_shard

    def dies_on_the_third(job):
        calls.append(job[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    opts = adopt.IndexOptions(sources=(src,), out=str(tmp_path / "out"), label="shard", workers=1, progress=False)
    monkeypatch.setattr(adopt, "index_shard", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        adopt.index(opts)
    monkeypatch.setattr(adopt, "index_shard", real)
    done = []
    monkeypatch.setattr(adopt, "index_shard", lambda job: done.append(job[0]) or real(job))
    m = adopt.index(opts)
    assert done == [2, 3]                                 # the two finished tars were not read again
    strip = lambda m: {k: v for k, v in m.items() if k != "build"}  # noqa: E731
    assert strip(m) == strip(ref)
    for name in ("offsets.npy", "labels.npy"):
        assert np.array_equal(np.load(tmp_path / "out" / name), np.load(tmp_path / "ref" / name))


def test_parts_from_a_slurm_array_merge_into_the_whole(tmp_path, folders):
    src, truth = folders["in22k"]
    out = str(tmp_path / "idx")
    for task in (3, 4):   # --array=3-4: tasks 0 and 1 of 2
        cli("index", src, "--out", out, "--label", "shard", "--no-progress",
            env={"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "3"})
    parts = sorted(os.path.join(out, p) for p in os.listdir(out))
    assert [os.path.basename(p) for p in parts] == ["part-0000-of-0002", "part-0001-of-0002"]
    assert [len(load(p)["classes"]) for p in parts] == [2, 2]
    r = cli("merge", *parts, "--out", out, "--no-progress")
    m = load(out)
    assert m["total"] == len(truth) and len(m["classes"]) == 4 and "nothing copied" in r.stderr
    seen = read_all(out)
    assert [seen[i]["label"] for i in range(len(truth))] == [m["classes"][t[2]] for t in truth]
    assert "OK" in cli("verify", out).stdout
    r = cli("merge", parts[0], parts[0] + "/", "--out", str(tmp_path / "twice"), check=False)
    assert r.returncode == 2 and "given twice" in r.stderr
    cli("index", src, "--out", str(tmp_path / "again"), "--label", "shard", "--no-progress")
    r = cli("merge", out, str(tmp_path / "again"), "--out", str(tmp_path / "dup"), check=False)
    assert r.returncode == 2 and "share samples" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_output_folder_with_someone_elses_files_is_refused(tmp_path, folders):
    d = str(tmp_path / "theirs")
    shutil.copytree(folders["wds"][0], d, ignore=shutil.ignore_patterns(*adopt.OURS))
    with open(os.path.join(d, "manifest.json"), "w") as f:
        f.write('{"theirs": true}\n')
    before = snapshot(d)
    r = cli("index", d, "--out", d, check=False)
    assert r.returncode == 2 and "already holds another manifest" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and snapshot(d) == before
    r = cli("index", os.path.join(d, "missing"), "--out", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "no such file or folder" in r.stderr


def test_a_folder_of_tars_without_a_manifest_says_how_to_adopt_it(folders, tmp_path):
    d = str(tmp_path / "plain")
    shutil.copytree(folders["in22k"][0], d, ignore=shutil.ignore_patterns(*adopt.OURS))
    r = cli("info", d, check=False)
    assert r.returncode == 2 and "sslkit.shard index" in r.stderr


def test_train_evaluate_and_visualise_on_adopted_folders(folders, adopted, tmp_path, photos):
    """One index over every layout at once (ShardWriter's jpg/png/webp, img2dataset, ImageNet-22K and
    the broken tars), one epoch of a tiny preset on it, its views; kNN of that run on the ImageNet-22K
    layout (train vs val, labels from the tar names) and on ShardWriter's (integer cls)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    every = str(tmp_path / "every")
    broken = foreign.write_broken(str(tmp_path / "broken"), photos)
    cli("index", folders["wds"][0], folders["i2d"][0], folders["in22k"][0], str(tmp_path / "broken"),
        "--out", every, "--label", "none", "--no-progress")
    assert load(every)["total"] == 36 + 20 + 32 + broken["good"]
    run = str(tmp_path / "run")
    r = subprocess.run([PY, "train.py", "--method", "deepclusterv2", "--preset", "tiny", "--data", every,
                        "--out", run, "--epochs", "1", "--batch-size", "8", "--set", "method_options.n_prototypes=[4,4]",
                        "--set", "shuffle_buffer=16", "--set", "method_options.kernel=torch"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    epochs = [json.loads(line) for line in open(os.path.join(run, "log.jsonl")) if '"epoch"' in line]
    assert epochs and all(np.isfinite(e.get("loss", 0.0)) for e in epochs)
    for name, train, val, k in (("in22k", "in22k", "in22k_val", "3"), ("wds", "wds", "wds", "5")):
        out = str(tmp_path / f"knn-{name}.json")
        r = subprocess.run([PY, "-m", "sslkit.eval", "knn", "--ckpt", run, "--train", folders[train][0],
                            "--val", folders[val][0], "--size", "32", "--resize", "36", "--k", k,
                            "--cache-dir", str(tmp_path / "cache"), "--out", out, "--no-progress"],
                           cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        rep = json.load(open(out))
        assert rep["val"]["total"] == len(folders[val][1]) and 0 <= rep["results"]["ckpt"]["top1"][k] <= 1
    # integer cls ids named 0..3 against names from a JSON field: refused before any feature is extracted
    r = subprocess.run([PY, "-m", "sslkit.eval", "knn", "--ckpt", run, "--train", folders["wds"][0], "--val",
                        folders["json"][0], "--cache-dir", str(tmp_path / "cache2"), "--no-progress"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "different classes" in r.stderr and not os.path.exists(tmp_path / "cache2")
    png = str(tmp_path / "views.png")
    r = subprocess.run([PY, "-m", "sslkit.viz", "--pipeline", "multicrop", "--preset", "tiny", "--data", every,
                        "--out", png], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.getsize(png) > 10_000


def test_pseudolabel_over_an_adopted_pool_writes_valid_student_shards(folders, adopted, tmp_path):
    """A teacher trained on the ImageNet-22K layout labels ShardWriter's jpg/png/webp pool: the student
    folder is a built one (RGB JPEGs; PNG and WebP converted) that `verify --full` accepts."""
    from sslkit.pseudolabel.run import Options, pseudolabel
    from sslkit.shard import verify
    from test_pseudolabel import make_teacher
    teacher = make_teacher(str(tmp_path / "teacher"), folders["in22k"][0])
    out = str(tmp_path / "student")
    pseudolabel(Options(teacher=teacher, data=folders["wds"][0], out=out, top_p=1, top_k=4, batch_size=8, chunk=16,
                        device="cpu", max_count=10, io_threads=1, loader_threads=1, progress=False))
    m = load(out)
    assert 0 < m["total"] <= 16 and set(m["classes"]) == {t[2] for t in folders["in22k"][1]}
    assert verify(out, full=True)["decoded"] == m["total"]       # every image an RGB JPEG


def test_adopting_built_shards_finds_the_same_sample_indices(sample_shards, tmp_path):
    """sslkit's own shards, adopted as if another tool wrote them: the sample the loader names by the
    index it derives from DALI's source info is the one the built folder stores at that index."""
    from sslkit.shard.access import SampleReader
    out = str(tmp_path / "adopted")
    adopt.index(adopt.IndexOptions(sources=(sample_shards,), out=out, workers=1, progress=False))
    assert load(out)["total"] == load(sample_shards)["total"] and load(out)["labels"]["from"] == "cls"
    built = SampleReader(sample_shards)
    seen = read_all(out, extra_keys=("json", "cls"))
    assert sorted(seen) == list(range(load(sample_shards)["total"]))
    for i, s in seen.items():
        assert s["json"] == built.component(i, "json")          # the very sample stored at index i
        assert s["label"] == int(s["cls"]) == int(built.component(i, "cls"))


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax", "v7"])
def test_the_tar_scan_agrees_with_tarfile(tmp_path, monkeypatch, fmt):
    """The header walk (tables computed per window with numpy, stretches listed at once) against Python's
    own tarfile: long names (GNU records, PAX paths, ustar prefixes), empty and block-sized members,
    a directory, old v7 headers without the ustar magic; with tiny reads and windows, so members and
    PAX records cross window edges, and a tar stored inside the tar."""
    import io
    import tarfile
    from sslkit.shard import tarscan
    rng = np.random.default_rng(3)
    raw = io.BytesIO()
    form = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "v7": tarfile.USTAR_FORMAT}[fmt]
    with tarfile.open(fileobj=raw, mode="w", format=form) as t:
        for i in range(40):
            name = f"k{i // 2:03d}.{'cls' if i % 2 else 'jpg'}"
            if i % 7 == 3:
                name = ("deep/" * 12 if fmt != "v7" else "d/") + name    # over 100 bytes but for v7
            data = rng.integers(0, 256, int(rng.choice([0, 1, 511, 512, 513, 5000]))).astype(np.uint8).tobytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5          # a fractional mtime: a PAX record in pax format
            t.addfile(info, io.BytesIO(data))
            if i == 20:     # a tar inside the tar: headers with the ustar magic inside a member's data
                inner = io.BytesIO()
                with tarfile.open(fileobj=inner, mode="w", format=tarfile.USTAR_FORMAT) as nested:
                    for j in range(3):
                        nested.addfile(tarfile.TarInfo(f"inner{j}.cls"), io.BytesIO(b""))
                nested_info = tarfile.TarInfo("k999.tar")
                inner_tar = inner.getvalue()[:5 * 512]       # three headers, the end-of-archive blocks
                nested_info.size = len(inner_tar)
                t.addfile(nested_info, io.BytesIO(inner_tar))
            if i == 10:
                folder = tarfile.TarInfo("a-folder")
                folder.type = tarfile.DIRTYPE
                t.addfile(folder)
    blob = bytearray(raw.getvalue())
    if fmt == "v7":         # strip the magic from every header, as tars from before POSIX have none
        pos = 0
        while blob[pos:pos + 512] != bytes(512):
            head = blob[pos:pos + 512]
            size = int(bytes(head[124:136]).strip(b" \0") or b"0", 8)
            head[257:265] = bytes(8)
            head[148:156] = b" " * 8
            head[148:156] = b"%06o\0 " % sum(head)
            blob[pos:pos + 512] = head
            pos += 512 + (size + 511) // 512 * 512
    path = tmp_path / "t.tar"
    path.write_bytes(bytes(blob))
    with tarfile.open(path) as t:
        truth = [(m.name, m.offset_data, m.size) for m in t.getmembers() if m.isfile()]
    for chunk, window in ((tarscan.CHUNK, tarscan.WINDOW), (1536, 4096)):
        monkeypatch.setattr(tarscan, "CHUNK", chunk)
        monkeypatch.setattr(tarscan, "WINDOW", window)
        res = tarscan.scan(str(path), keep={"cls"})
        assert [(m.name, m.offset, m.size) for m in res.members] == truth
        assert all((m.data is not None) == m.name.endswith(".cls") for m in res.members)
        assert all(m.data == bytes(blob[m.offset:m.offset + m.size]) for m in res.members if m.data is not None)
        assert res.damage is None and res.ignored == 1
        assert res.sha256 == hashlib.sha256(blob).hexdigest() and res.bytes == len(blob)
