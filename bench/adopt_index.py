"""Adopting tars in place vs reading them once vs rebuilding them: `shard index` throughput.

    python bench/adopt_index.py --shards 200 --per-shard 25 --json bench/out/adopt.json

1. corpus (cached in --work): ImageNet-like JPEGs of the embedded sample corpus (`shard build sample:N`),
   written again by webdataset's own ShardWriter as --shards tars of --per-shard samples (jpg + cls +
   json, the usual web layout);
2. limit: `cat` of every tar to /dev/null, the sequential read that indexing cannot beat (its rounds
   alternate with those of step 3);
3. index: `python -m sslkit.shard index TARS --out NEW` (headers + sha256 of every byte, no decode);
4. rebuild: unpack every tar (`tar -xf`) and `python -m sslkit.shard build` the files, what the only way
   in used to be; timed as one command, the unpacking included.
Each step runs as a whole process, --rounds times (the rebuild --rebuild-rounds times); the medians and
their ratios are reported. Before every round the files are evicted from the page cache
(posix_fadvise DONTNEED), so each round reads from the disk as a web-scale set would; --warm leaves
them cached (then `cat` measures a memory copy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_corpus(work: str, shards: int, per_shard: int, unique: int) -> str:
    """The folder of tars, reused when already there. Sample i is image i % unique of the sample corpus
    (generating photos is slow; reading them back is what is measured)."""
    tars = os.path.join(work, f"tars-{shards}x{per_shard}-of-{unique}")
    if os.path.exists(os.path.join(tars, "done")):
        return tars
    import webdataset as wds
    from sslkit.shard.access import SampleReader
    built = os.path.join(work, f"built-{unique}")
    if not os.path.exists(os.path.join(built, "manifest.json")):
        subprocess.run([sys.executable, "-m", "sslkit.shard", "build", f"sample:{unique}", "--out", built,
                        "--no-progress"], check=True, cwd=REPO)
    reader = SampleReader(built)
    names = {v: k for k, v in reader.manifest["classes"].items()}
    shutil.rmtree(tars, ignore_errors=True)
    os.makedirs(tars)
    with wds.ShardWriter(os.path.join(tars, "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            jpg, cls = reader.component(i % unique, "jpg"), int(reader.component(i % unique, "cls"))
            sink.write({"__key__": f"{i:09d}", "jpg": jpg, "cls": cls, "json": {"key": f"{i:09d}", "label": names[cls]}})
    open(os.path.join(tars, "done"), "w").close()
    return tars


def evict(paths: list[str]):
    """Drop files from the page cache (clean pages; no privileges needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(cmd: list[str], rounds: int, fresh_out: str | None = None, cold: list[str] = ()) -> list[float]:
    times = []
    for _ in range(rounds):
        if fresh_out:
            shutil.rmtree(fresh_out, ignore_errors=True)
        evict(cold)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=200)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--unique", type=int, default=5000, help="distinct images (sample i is image i %% unique)")
    p.add_argument("--warm", action="store_true",
                   help="leave the tars in the page cache between rounds (default: evict them before every "
                        "round, so each one reads from the disk as a 100M-image set would)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rebuild-rounds", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="index and build processes (0: one per core)")
    p.add_argument("--work", default=os.path.join(REPO, ".cache", "bench", "adopt"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    tars = make_corpus(args.work, args.shards, args.per_shard, args.unique)
    tar_list = sorted(os.path.join(tars, f) for f in os.listdir(tars) if f.endswith(".tar"))
    size = sum(os.path.getsize(t) for t in tar_list)
    images = args.shards * args.per_shard
    scratch = tempfile.mkdtemp(prefix="adoptbench-")
    load_before = os.getloadavg()
    workers = str(args.workers or os.cpu_count() or 1)
    try:
        cold = [] if args.warm else tar_list
        cat, index = [], []
        for _ in range(args.rounds):    # alternated, so a change in the machine's load touches both alike
            cat += timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *tar_list], 1, cold=cold)
            index += timed([sys.executable, "-m", "sslkit.shard", "index", tars, "--out", os.path.join(scratch, "idx"),
                            "--no-progress", "--workers", workers], 1, os.path.join(scratch, "idx"), cold)
        unpacked, built = os.path.join(scratch, "unpacked"), os.path.join(scratch, "built")
        rebuild = (f'mkdir -p "{unpacked}" && for t in "$@"; do tar -xf "$t" -C "{unpacked}"; done && '
                   f'"{sys.executable}" -m sslkit.shard build "{unpacked}" --out "{built}" --no-progress --workers {workers}')
        build = []
        for _ in range(args.rebuild_rounds):
            shutil.rmtree(unpacked, ignore_errors=True)
            build += timed(["sh", "-c", rebuild, "rebuild", *tar_list], 1, built, cold)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in (("cat", cat), ("index", index), ("build", build)) if v}
    report = {
        "shards": len(tar_list), "images": images, "bytes": size, "workers": int(workers), "cores": os.cpu_count(),
        "page_cache": "warm" if args.warm else "evicted before every round",
        # other processes share the cores: the 1-minute load average before and after the runs
        "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
        "seconds": {"cat": cat, "index": index, "build": build},
        "shards_per_s": {k: len(tar_list) / med[k] for k in med},
        "mb_per_s": {k: size / 1e6 / med[k] for k in med},
        "index_vs_read_limit": med["cat"] / med["index"],
        "rebuild_vs_index": med["build"] / med["index"] if "build" in med else None,
        "command": "python bench/adopt_index.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"{len(tar_list)} tars, {images} images, {size / 1e6:.0f} MB, {workers} worker(s), page cache "
          f"{report['page_cache']}; median of {args.rounds} (rebuild: {args.rebuild_rounds}); load average "
          f"{load_before[0]:.1f} before, {report['load_average']['after']:.1f} after")
    for k, label in (("cat", "read limit (cat)"), ("index", "shard index"), ("build", "shard build (rebuild)")):
        if k in med:
            print(f"  {label:24s} {med[k]:7.2f} s  {report['shards_per_s'][k]:8.1f} shards/s  {report['mb_per_s'][k]:8.0f} MB/s")
    print(f"  index at {100 * report['index_vs_read_limit']:.0f}% of the read limit"
          + (f"; rebuilding takes {report['rebuild_vs_index']:.1f}x as long as indexing" if "build" in med else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
