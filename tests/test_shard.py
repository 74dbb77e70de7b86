"""sslkit.shard: build -> verify -> read back with webdataset and DALI; conversions; resume; parts."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sslkit.shard import (BuildError, BuildOptions, ImageOptions, ManifestError, VerifyError,
                          build, collect_info, load, shard_paths, verify)
from sslkit.shard.images import Accepted, Rejected, convert
from sslkit.shard.tarwriter import read_index

from conftest import (REPO, build_small, exif_rotated_jpeg, fashion_mnist_dir, jpeg_bytes, png_bytes, write_idx)

PY = sys.executable


def run_cli(*args, check=True, **kw):
    r = subprocess.run([PY, "-m", "sslkit.shard", *args], capture_output=True, text=True, cwd=REPO, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"sslkit.shard {' '.join(args)} failed:\n{r.stderr}")
    return r


def read_with_webdataset(directory: str) -> list[dict]:
    tars, _ = shard_paths(directory, load(directory))
    return list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))


def read_with_dali(directory: str, batch_size: int = 7) -> list[int]:
    """One epoch of sample indices through DALI's CPU webdataset reader with the index files."""
    from nvidia.dali import fn, pipeline_def
    m = load(directory)
    tars, idxs = shard_paths(directory, m)

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def pipe():
        jpg, idx = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "index"], name="Reader",
                                         missing_component_behavior="error")
        img = fn.decoders.image(jpg, device="cpu")
        return img.shape(), idx

    p = pipe()
    p.build()
    size = p.reader_meta("Reader")["epoch_size"]
    seen = []
    while len(seen) < size:
        shapes, idx = p.run()
        for k in range(min(batch_size, size - len(seen))):
            assert np.array(shapes[k])[2] == 3
            seen.append(int(np.array(idx[k]).tobytes()))
    return seen


# ------------------------------------------------------------------------------------------------
# Conversions of odd inputs (unit level)
# ------------------------------------------------------------------------------------------------

def _decode(res) -> Image.Image:
    assert isinstance(res, Accepted), res
    im = Image.open(io.BytesIO(res.jpg))
    assert im.format == "JPEG" and im.mode == "RGB"
    return im


def test_rgb_jpeg_passes_through_untouched(photos):
    data = jpeg_bytes(photos["coffee"])
    res = convert(data, "x.jpg", ImageOptions())
    assert isinstance(res, Accepted) and res.jpg == data and not res.meta["reencoded"]


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "I;16"])
def test_odd_modes_become_rgb_jpeg(photos, mode):
    cat = photos["cat"]
    if mode == "I;16":
        im = Image.fromarray(np.asarray(Image.fromarray(cat).convert("L"), dtype=np.uint16) * 257)
        data = png_bytes(im)
    elif mode == "CMYK":
        buf = io.BytesIO()
        Image.fromarray(cat).convert("CMYK").save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
    else:
        data = png_bytes(Image.fromarray(cat).convert(mode))
    out = np.asarray(_decode(convert(data, "x", ImageOptions())), dtype=np.float32)
    assert out.shape == cat.shape
    ref = np.asarray(Image.fromarray(cat).convert("L").convert("RGB") if mode in ("L", "LA", "I;16")
                     else Image.fromarray(cat), dtype=np.float32)
    # The content survives conversion: close to the original (JPEG + palette quantisation error only).
    assert np.abs(out - ref).mean() < (12 if mode == "P" else 4), mode


def test_16bit_gray_keeps_full_range():
    ramp = (np.linspace(0, 65535, 256)[None].repeat(64, 0)).astype(np.uint16)
    out = np.asarray(_decode(convert(png_bytes(Image.fromarray(ramp)), "x", ImageOptions(quality=100))))
    assert out[..., 0].max() >= 250 and out[..., 0].min() <= 5  # not clipped to 255 for values > 255


def test_16bit_rgb_png(photos):
    cat16 = photos["cat"].astype(np.uint16) * 257
    import cv2
    ok, buf = cv2.imencode(".png", cat16[..., ::-1])
    out = np.asarray(_decode(convert(buf.tobytes(), "x", ImageOptions())), dtype=np.float32)
    assert np.abs(out - photos["cat"]).mean() < 4


def test_alpha_is_composited_on_white(photos):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = 30  # dark colour, fully transparent: must come out white
    out = np.asarray(_decode(convert(png_bytes(Image.fromarray(rgba, "RGBA")), "x", ImageOptions(quality=100))))
    assert out.min() >= 250


@pytest.mark.parametrize("orientation,swap", [(3, False), (6, True), (8, True)])
def test_exif_orientation_is_applied(photos, orientation, swap):
    img = photos["coffee"]
    res = convert(exif_rotated_jpeg(img, orientation), "x", ImageOptions())
    im = _decode(res)
    h, w = img.shape[:2]
    assert im.size == ((h, w) if swap else (w, h))
    assert res.meta["reencoded"] and res.meta["orig_size"] == [w, h]
    expected = {3: np.rot90(img, 2), 6: np.rot90(img, -1), 8: np.rot90(img, 1)}[orientation]
    assert np.abs(np.asarray(im, np.float32) - expected).mean() < 6


def test_resize_max_keeps_aspect(photos):
    img = photos["retina"]  # 1411 x 1411
    res = convert(jpeg_bytes(img[:, :1000]), "x", ImageOptions(resize_max=300))
    im = _decode(res)
    assert max(im.size) == 300 and abs(im.size[0] / im.size[1] - 1000 / 1411) < 0.01


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"hello, not an image", "not an image"),
    (jpeg_bytes(np.zeros((64, 64, 3), np.uint8))[:300], "truncated"),
])
def test_broken_inputs_are_rejected(data, reason):
    res = convert(data, "x", ImageOptions())
    assert isinstance(res, Rejected) and reason in res.reason


def test_small_and_bomb_rejected_from_header(photos):
    res = convert(jpeg_bytes(photos["cat"][:10, :200]), "x", ImageOptions(min_size=16))
    assert isinstance(res, Rejected) and "too small" in res.reason
    res = convert(jpeg_bytes(photos["cat"]), "x", ImageOptions(max_pixels=10_000))
    assert isinstance(res, Rejected) and "decompression bomb" in res.reason


# ------------------------------------------------------------------------------------------------
# Whole builds
# ------------------------------------------------------------------------------------------------

def test_folder_round_trip_webdataset_and_dali(photo_folder, tmp_path):
    root, expected = photo_folder
    out = str(tmp_path / "photos")
    r = run_cli("build", root, "--out", out, "--labels", "dirs", "--max-count", "8", "--shuffle", "--seed", "3",
                "--workers", "2", "--no-progress")
    assert "rejected" in r.stderr.splitlines()[-1]  # one-line summary
    m = load(out)
    assert m["total"] == expected["good"] and m["rejected"] == len(expected["rejected"])
    assert m["ignored"] == expected["ignored"]
    assert len(m["shards"]) == -(-expected["good"] // 8) >= 3
    assert sorted(m["classes"]) == expected["classes"]
    assert sum(m["class_counts"].values()) == m["total"]
    for s in m["shards"]:
        assert os.path.exists(os.path.join(out, s["index"]))
    # rejected.tsv names each broken file with its reason
    with open(os.path.join(out, "rejected.tsv")) as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["source", "reason"]
    got = {os.path.basename(src): reason for src, reason in rows[1:]}
    assert set(got) == set(expected["rejected"])
    for name, word in expected["rejected"].items():
        assert word in got[name], (name, got[name])

    assert "OK" in run_cli("verify", out, "--full").stdout

    samples = read_with_webdataset(out)
    assert sorted(s["index"] for s in samples) == list(range(m["total"]))
    for s in samples:
        assert s["jpg"].mode == "RGB" and "." not in s["__key__"]
        assert s["__key__"] == f"{s['index']:010d}"
        assert m["classes"][s["json"]["label"]] == s["cls"]
        assert s["json"]["source"].startswith(root)
        assert os.path.basename(os.path.dirname(s["json"]["source"])) == s["json"]["label"]
    # Shuffled: the stored order is not the sorted walk order.
    sources = [s["json"]["source"] for s in samples]
    assert sources != sorted(sources)

    dali = read_with_dali(out)
    assert sorted(dali) == list(range(m["total"]))  # every sample exactly once per epoch


def test_index_files_match_dalis_wds2idx(sample_shards, tmp_path):
    tars, idxs = shard_paths(sample_shards, load(sample_shards))
    wds2idx = os.path.join(os.path.dirname(PY), "wds2idx")
    for tar, idx in zip(tars, idxs):
        ref = str(tmp_path / "ref.idx")
        subprocess.run([wds2idx, tar, ref], check=True, capture_output=True)
        with open(idx) as a, open(ref) as b:
            assert a.read() == b.read()


def test_sample_corpus_is_deterministic_and_distinct(tmp_path):
    a = build_small(str(tmp_path / "a"), sources=("sample:40",), max_count=20)
    b = build_small(str(tmp_path / "b"), sources=("sample:40",), max_count=20, workers=2)
    c = build_small(str(tmp_path / "c"), sources=("sample:40",), max_count=20, seed=1)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]  # workers don't matter
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]
    samples = read_with_webdataset(str(tmp_path / "a"))
    arrays = [np.asarray(s["jpg"]) for s in samples]
    assert len({a.tobytes() for a in arrays}) == len(arrays)  # distinct images
    longs = [max(s["jpg"].size) for s in samples]
    assert all(l == 500 for l in longs)  # ImageNet-like longer side
    assert len(set(s["cls"] for s in samples)) == 12


def test_file_list_sources(photo_folder, tmp_path):
    root, expected = photo_folder
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                   if f.endswith((".JPEG", ".png")) and not f.startswith(("tiny", "rgba", "gray16", "palette")))
    # A YFCC-style wide TSV with a header, relative paths, a label column and a missing file.
    tsv = tmp_path / "list.tsv"
    with open(tsv, "w") as f:
        f.write("id\tuser\tphoto_path\ttags\tlicense\n")
        for i, rel in enumerate(files):
            f.write(f"{i}\tu{i}\t{rel}\t{rel.split(os.sep)[0]}\tcc-by\n")
        f.write(f"{len(files)}\tux\tmissing/gone.jpg\tthings\tcc-by\n")
    out = str(tmp_path / "tsv")
    run_cli("build", str(tsv), "--out", out, "--path-column", "photo_path", "--label-column", "tags", "--root", root,
            "--no-progress")
    m = load(out)
    assert m["total"] == len(files) and m["rejected"] == 1 and sorted(m["classes"]) == expected["classes"]
    with open(os.path.join(out, "rejected.tsv")) as f:
        assert "cannot read" in f.read()
    # Headerless CSV, columns by number, paths relative to the list's own folder.
    shutil.copytree(root, tmp_path / "imgs")
    csv_path = tmp_path / "list.csv"
    with open(csv_path, "w") as f:
        for rel in files:
            f.write(f"imgs/{rel},{rel.split(os.sep)[0]}\n")
    out2 = str(tmp_path / "csv")
    run_cli("build", str(csv_path), "--out", out2, "--path-column", "0", "--label-column", "1", "--no-progress")
    assert load(out2)["total"] == len(files)
    samples = read_with_webdataset(out2)
    assert {s["json"]["label"] for s in samples} == set(expected["classes"])


def test_fashion_mnist_idx(tmp_path):
    d = fashion_mnist_dir()
    out = str(tmp_path / "fmnist")
    run_cli("build", os.path.join(d, "t10k-images-idx3-ubyte.gz"), "--out", out, "--max-count", "4000",
            "--workers", "2", "--no-progress")
    m = load(out)
    assert m["total"] == 10_000 and m["rejected"] == 0 and len(m["shards"]) == 3
    assert list(m["classes"]) == [str(i) for i in range(10)]
    assert set(m["class_counts"].values()) == {1000}  # the test split is balanced
    with gzip.open(os.path.join(d, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(os.path.join(d, "t10k-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    samples = read_with_webdataset(out)
    assert len(samples) == 10_000
    for s in samples[::97]:
        rec = int(s["json"]["source"].rsplit("#", 1)[1])
        assert s["cls"] == labels[rec] and s["jpg"].size == (28, 28)
        assert np.abs(np.asarray(s["jpg"].convert("L"), np.float32) - images[rec]).mean() < 8
    assert "OK" in run_cli("verify", out).stdout
    assert sorted(read_with_dali(out, batch_size=500)) == list(range(10_000))


def test_idx_without_labels_file(tmp_path, photos):
    arr = np.stack([np.asarray(Image.fromarray(photos["cat"]).convert("L").resize((32, 32)))] * 5)
    write_idx(str(tmp_path / "x-images-idx3-ubyte"), arr)
    r = run_cli("build", str(tmp_path / "x-images-idx3-ubyte"), "--out", str(tmp_path / "o"), check=False)
    assert r.returncode == 2 and "no labels file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    run_cli("build", str(tmp_path / "x-images-idx3-ubyte"), "--out", str(tmp_path / "o"), "--labels", "none",
            "--no-progress")
    m = load(str(tmp_path / "o"))
    assert m["total"] == 5 and m["classes"] is None and "cls" not in m["components"]


def test_max_size_closes_shards(tmp_path):
    m = build_small(str(tmp_path / "s"), sources=("sample:30",), max_count=1000, max_size=300_000)
    assert len(m["shards"]) > 2
    assert all(s["bytes"] <= 300_000 + 10_240 for s in m["shards"])  # tar end-of-archive padding aside
    assert sum(s["count"] for s in m["shards"]) == 30


def test_killed_build_resumes_to_identical_result(tmp_path):
    args = ["build", "sample:240", "--max-count", "16", "--shuffle", "--seed", "5", "--workers", "1",
            "--no-progress"]
    ref = str(tmp_path / "ref")
    run_cli(*args, "--out", ref)
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([PY, "-m", "sslkit.shard", *args, "--out", out], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = os.path.join(out, ".build", "shards.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(journal) and sum(1 for _ in open(journal)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json")), "the build finished before it was killed"
    with pytest.raises(ManifestError, match="interrupted"):
        load(out)
    r = run_cli(*args, "--out", out)
    assert "resuming after" in r.stderr
    a, b = load(ref), load(out)
    assert a["shards"] == b["shards"] and a["total"] == b["total"] == 240
    with open(os.path.join(ref, "manifest.json")) as f1, open(os.path.join(out, "manifest.json")) as f2:
        ja, jb = json.load(f1), json.load(f2)
    ja["build"].pop("sources"), jb["build"].pop("sources")
    assert ja == jb
    assert not os.path.exists(os.path.join(out, ".build"))
    # Running the finished command again is a no-op; other options are refused.
    assert "nothing to do" in run_cli(*args, "--out", out).stderr
    r = run_cli("build", "sample:240", "--out", out, "--quality", "50", check=False)
    assert r.returncode == 2 and "different build" in r.stderr


def test_parts_merge_into_one_dense_dataset(tmp_path):
    full = build_small(str(tmp_path / "full"), sources=("sample:90",), max_count=20)
    parts = []
    for i in range(3):
        d = str(tmp_path / f"part{i}")
        build_small(d, sources=("sample:90",), max_count=20, part=(i, 3))
        parts.append(d)
    assert sum(load(p)["total"] for p in parts) == 90
    r = run_cli("merge", parts[2], parts[0], parts[1], "--out", str(tmp_path / "merged"), "--no-progress")
    merged = str(tmp_path / "merged")
    m = load(merged)
    assert m["total"] == 90 and m["classes"] == full["classes"]
    assert "OK" in run_cli("verify", merged, "--full").stdout
    a = read_with_webdataset(str(tmp_path / "full"))
    b = read_with_webdataset(merged)
    # Same samples in the same global order, with the same dense indices.
    assert [s["json"]["source"] for s in a] == [s["json"]["source"] for s in b]
    assert [s["index"] for s in b] == list(range(90))
    # A missing part is refused.
    r = run_cli("merge", parts[0], parts[2], "--out", str(tmp_path / "bad"), check=False)
    assert r.returncode == 2 and "missing" in r.stderr


def test_verify_detects_damage(sample_shards, tmp_path):
    d = str(tmp_path / "copy")
    shutil.copytree(sample_shards, d)
    m = load(d)
    verify(d, full=True)
    tar = os.path.join(d, m["shards"][1]["path"])
    idx = os.path.join(d, m["shards"][1]["index"])
    original = open(idx).read()
    # 1. an index file that does not match its tar
    lines = original.splitlines()
    lines[3] = lines[3].replace(" 512 ", " 1024 ", 1) if " 512 " in lines[3] else lines[4]
    open(idx, "w").write("\n".join(lines) + "\n")
    with pytest.raises(VerifyError):
        verify(d)
    open(idx, "w").write(original)
    # 2. a flipped byte inside an image
    off, size, _ = read_index(idx)[2]["jpg"]
    with open(tar, "r+b") as f:
        f.seek(off + size // 2)
        b = f.read(1)
        f.seek(off + size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    r = run_cli("verify", d, check=False)
    assert r.returncode == 2 and "sha256" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # 3. a missing shard
    os.remove(tar)
    with pytest.raises(ManifestError, match="missing"):
        load(d)
    # 4. no manifest at all
    os.remove(os.path.join(d, "manifest.json"))
    r = run_cli("verify", d, check=False)
    assert r.returncode == 2 and "manifest.json: missing" in r.stderr


def test_info_reports_counts_and_sizes(sample_shards):
    info = collect_info(sample_shards)
    assert info["sampled"] == 96 and info["longer_side"][50] == 500
    r = run_cli("info", sample_shards)
    assert "96 in 3 shard(s)" in r.stdout and "classes   12" in r.stdout and "shorter side" in r.stdout


def test_cli_errors_are_one_line(tmp_path):
    for args, words in [
        (["build", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no such file"),
        (["build", "sample:10", "--out", str(tmp_path / "o"), "--part", "3/2"], "--part"),
        (["build", "sample:x", "--out", str(tmp_path / "o")], "sample:N"),
        (["info", str(tmp_path / "missing")], "no such shard folder"),
    ]:
        r = run_cli(*args, check=False)
        assert r.returncode != 0 and words in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_all_rejected_is_an_error_that_lists_every_reason(tmp_path, photos):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "a.jpg").write_text("nope")
    (d / "b.jpg").write_bytes(b"")
    (d / "c.png").write_bytes(png_bytes(Image.fromarray(photos["cat"][:8, :8])))
    out = tmp_path / "o"
    with pytest.raises(BuildError, match="all 3 inputs were rejected; every reason is in"):
        build(BuildOptions(sources=(str(d),), out=str(out), workers=1, progress=False))
    with open(out / "rejected.tsv") as f:
        rows = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in csv.DictReader(f, delimiter="\t")}
    assert set(rows) == {"a.jpg", "b.jpg", "c.png"} and "empty" in rows["b.jpg"] and "too small" in rows["c.png"]
    assert not (out / ".build").exists() and not (out / "manifest.json").exists()


@pytest.mark.parametrize("make", ["missing", "empty", "no_images"])
def test_a_build_that_fails_before_writing_leaves_nothing_behind(tmp_path, make):
    src = tmp_path / "src"
    if make != "missing":
        src.mkdir()
    if make == "no_images":
        (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    r = run_cli("build", str(src), "--out", str(out), "--no-progress", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists(), os.listdir(out)
    # an output folder that existed before keeps existing, without build state in it
    out.mkdir()
    run_cli("build", str(src), "--out", str(out), "--no-progress", check=False)
    assert out.exists() and os.listdir(out) == []


def test_a_malformed_manifest_in_out_is_a_one_line_error(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text('{"format_version": 1, "total": ')
    r = run_cli("build", "sample:10", "--out", str(out), "--no-progress", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "manifest.json: not a readable manifest" in r.stderr
    assert sorted(os.listdir(out)) == ["manifest.json"]


def test_skip_and_limit_take_contiguous_items_of_the_sources(tmp_path):
    d = fashion_mnist_dir()
    out = str(tmp_path / "fm100")
    run_cli("build", os.path.join(d, "train-images-idx3-ubyte.gz"), "--out", out, "--limit", "100", "--shuffle",
            "--workers", "1", "--no-progress")
    m = load(out)
    assert m["total"] == 100 and m["build"]["limit"] == 100
    with gzip.open(os.path.join(d, "train-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:100]
    got = {int(s["json"]["source"].rsplit("#", 1)[1]): s["cls"] for s in read_with_webdataset(out)}
    assert sorted(got) == list(range(100)) and all(got[i] == labels[i] for i in got)
    # --skip + --limit: the next items, disjoint from the first split
    out2 = str(tmp_path / "fm-next")
    run_cli("build", os.path.join(d, "train-images-idx3-ubyte.gz"), "--out", out2, "--skip", "100", "--limit", "50",
            "--workers", "1", "--no-progress")
    got = sorted(int(s["json"]["source"].rsplit("#", 1)[1]) for s in read_with_webdataset(out2))
    assert got == list(range(100, 150))
    r = run_cli("build", "sample:10", "--out", str(tmp_path / "x"), "--limit", "0", check=False)
    assert r.returncode == 2 and "--limit 0" in r.stderr
