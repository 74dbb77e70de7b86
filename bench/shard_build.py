"""Shard-builder throughput: images/s per worker for pass-through, re-encode and resize.

    python bench/make_corpus.py --out .cache/bench/photos --count 5000 --originals .cache/bench/originals
    python bench/shard_build.py --photos .cache/bench/photos --originals .cache/bench/originals

Modes (each a full `build` into a scratch folder, median of --rounds):
- passthrough: ImageNet-like RGB JPEGs are decoded once to validate them and stored as they are;
- reencode:    the same images, decoded and re-encoded at quality 90 (`--force-reencode`);
- resize:      the original 2.6-16 MP photographs, decoded with DCT scaling and resized to 500 px.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sslkit.shard import BuildOptions, ImageOptions, build  # noqa: E402


def run(source: str, image: ImageOptions, workers: int, rounds: int) -> dict:
    times, n = [], 0
    for _ in range(rounds):
        out = tempfile.mkdtemp(prefix="shardbench-")
        try:
            t0 = time.perf_counter()
            m = build(BuildOptions(sources=(source,), out=out, image=image, workers=workers, progress=False,
                                   max_count=10_000))
            times.append(time.perf_counter() - t0)
            n = m["inputs"]
        finally:
            shutil.rmtree(out)
    med = statistics.median(times)
    return {"images": n, "workers": workers, "seconds": times, "images_per_s": n / med,
            "images_per_s_per_worker": n / med / workers}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default=".cache/bench/photos")
    p.add_argument("--originals", default=".cache/bench/originals")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    modes = {
        "passthrough": (args.photos, ImageOptions()),
        "reencode": (args.photos, ImageOptions(force_reencode=True)),
        "resize": (args.originals, ImageOptions(resize_max=500)),
    }
    results = []
    print(f"{'mode':<12} {'workers':>7} {'images':>7} {'img/s':>8} {'img/s/worker':>13}")
    for mode, (src, image) in modes.items():
        for w in (int(x) for x in args.workers.split(",")):
            r = {"mode": mode, **run(src, image, w, args.rounds)}
            results.append(r)
            print(f"{mode:<12} {w:>7} {r['images']:>7} {r['images_per_s']:>8.0f} {r['images_per_s_per_worker']:>13.0f}",
                  flush=True)
    env = {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
