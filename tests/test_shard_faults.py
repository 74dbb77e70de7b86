"""Nothing lost, in `python -m sslkit.shard`: output folders are owned (someone else's files are never
deleted or overwritten, a second build into the same folder is refused), malformed manifests and inputs
are one-line errors naming the field or file, merges of overlapping inputs are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, build_small
from sslkit.shard import load
from test_adopt import snapshot

PY = sys.executable


def cli(*args, check=False, **kw):
    r = subprocess.run([PY, "-m", "sslkit.shard", *args], capture_output=True, text=True, cwd=REPO, **kw)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def one_line_error(r, *words):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def test_build_never_deletes_or_overwrites_what_it_did_not_write(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "draft.tmp").write_text("x\n")
    (d / "shard-000000.tar").write_text("y\n")
    before = snapshot(str(d))
    one_line_error(cli("build", "sample:8", "--out", str(d), "--no-progress"), "is not empty", "--overwrite")
    assert snapshot(str(d)) == before
    # explicitly asked: the build writes its own names and leaves the rest alone
    r = cli("build", "sample:8", "--out", str(d), "--no-progress", "--overwrite", check=True)
    assert (d / "draft.tmp").read_text() == "x\n" and load(str(d))["total"] == 8
    # a folder holding another dataset is refused too, and a re-run of the same build is a no-op
    one_line_error(cli("build", "sample:9", "--out", str(d), "--no-progress"), "already holds a different build")
    r = cli("build", "sample:8", "--out", str(d), "--no-progress", "--overwrite", check=True)
    assert "already complete" in r.stderr


def test_a_second_build_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    out = str(tmp_path / "busy")
    first = subprocess.Popen([PY, "-m", "sslkit.shard", "build", "sample:400", "--out", out, "--workers", "1",
                              "--no-progress"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = os.path.join(out, ".build", ".lock")
    deadline = time.time() + 60
    while not (os.path.exists(lock) and os.path.getsize(lock)) and time.time() < deadline:
        time.sleep(0.05)
    try:
        err = one_line_error(cli("build", "sample:400", "--out", out, "--workers", "1", "--no-progress"), "in use")
        assert f"pid {first.pid}" in err
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()
    assert load(out)["total"] == 400 and not os.path.exists(os.path.join(out, ".build"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("faults") / "s")
    build_small(out, sources=("sample:16",), max_count=8)
    return out


MALFORMED = {
    "count missing": (lambda m: m["shards"][0].pop("count"), "shards[0] lacks 'count'"),
    "shards a string": (lambda m: m.update(shards="shard-000000.tar"), "'shards' must be a list"),
    "a null shard": (lambda m: m["shards"].__setitem__(1, None), "shards[1] must be an object"),
    "classes an integer": (lambda m: m.update(classes=3), "'classes' must be an object"),
    "total a string": (lambda m: m.update(total="16"), "'total' must be a non-negative integer"),
    "not an object": (lambda m: m.clear() or m.update(x=1), "missing field 'format_version'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifests_are_one_line_errors_naming_the_field(small, tmp_path, case):
    d = str(tmp_path / "m")
    shutil.copytree(small, d)
    path = os.path.join(d, "manifest.json")
    m = json.load(open(path))
    spoil, words = MALFORMED[case]
    spoil(m)
    json.dump(m, open(path, "w"))
    for cmd in ("verify", "info"):
        one_line_error(cli(cmd, d), "manifest.json", words)


def test_a_manifest_that_is_not_utf8_and_a_file_list_that_is_not(small, tmp_path):
    d = str(tmp_path / "m")
    shutil.copytree(small, d)
    with open(os.path.join(d, "manifest.json"), "r+b") as f:
        f.seek(5)
        f.write(b"\xff\xfe")
    one_line_error(cli("verify", d), "not UTF-8")
    lst = tmp_path / "list.tsv"
    lst.write_bytes(b"path\nok.jpg\n\xff\xfebad.jpg\n")
    one_line_error(cli("build", str(lst), "--out", str(tmp_path / "o"), "--no-progress"), "list.tsv: not UTF-8")
    assert not os.path.exists(tmp_path / "o")


def test_an_output_that_cannot_be_written_is_one_line(tmp_path):
    one_line_error(cli("build", "sample:4", "--out", "/sys/sslkit-cannot-write-here", "--no-progress"),
                   "/sys/sslkit-cannot-write-here")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    one_line_error(cli("build", "sample:4", "--out", str(blocker / "out"), "--no-progress"), str(blocker))
    assert blocker.read_text() == "a file, not a folder"


def test_merge_refuses_inputs_that_share_samples(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    build_small(a, sources=("sample:64",), limit=48, shuffle=False)
    build_small(b, sources=("sample:64",), skip=16, limit=48, shuffle=False)
    build_small(c, sources=("sample:64",), skip=48, limit=16, shuffle=False)
    one_line_error(cli("merge", a, b, "--out", str(tmp_path / "ab")), "share samples", "is a sample of both")
    one_line_error(cli("merge", a, a, "--out", str(tmp_path / "aa")), "given twice")
    shutil.copytree(a, str(tmp_path / "a2"))
    one_line_error(cli("merge", a, str(tmp_path / "a2"), "--out", str(tmp_path / "aa2")), "the same tar")
    assert cli("merge", a, c, "--out", str(tmp_path / "ac"), "--no-progress").returncode == 0
    assert load(str(tmp_path / "ac"))["total"] == 64
    r = cli("merge", a, b, "--out", str(tmp_path / "ab2"), "--allow-duplicates", "--no-progress")
    assert r.returncode == 0 and load(str(tmp_path / "ab2"))["total"] == 96
    # merge writes only into an empty or new folder
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    one_line_error(cli("merge", a, c, "--out", str(tmp_path / "full")), "is not empty")


def test_info_into_a_closed_pipe_says_nothing_more(small):
    r = subprocess.run(f"{PY} -m sslkit.shard info {small} | head -1", shell=True, capture_output=True, text=True,
                       cwd=REPO)
    assert r.stdout.strip() == small and r.stderr == ""


def test_the_trainer_names_the_manifest_field_too(small, tmp_path):
    d = str(tmp_path / "m")
    shutil.copytree(small, d)
    m = json.load(open(os.path.join(d, "manifest.json")))
    m["shards"][0].pop("count")
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    r = subprocess.run([PY, "train.py", "--preset", "tiny", "--data", d, "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "manifest.json: shards[0] lacks 'count'" in r.stderr.strip().splitlines()[-1]
