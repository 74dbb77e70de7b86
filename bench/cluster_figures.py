"""The two small-scale figures docs/CLUSTER.md's 100M-image estimates need beside docs/BENCHMARKS.md's:
DeepClusterV2's k-means rate (spherical_kmeans, the trainer's code, on a bank of unit vectors) and the
checkpoint write rate (sslkit.ckpt's atomic save: sha256 + fsync + rename) on this machine's disk.

    python bench/cluster_figures.py --json bench/out/cluster-figures.json [--dir /path/on/the/shared/fs]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from sslkit import ckpt
from sslkit.kmeans import spherical_kmeans


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="bank rows (default %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="embedding size (DCv2's feat_dim, default %(default)s)")
    p.add_argument("--k", type=int, default=3000, help="clusters (DCv2's prototypes per head, default %(default)s)")
    p.add_argument("--iters", type=int, default=2, help="k-means rounds (default %(default)s; DCv2 runs 10)")
    p.add_argument("--save-mib", type=int, default=256, help="checkpoint size written (default %(default)s MiB)")
    p.add_argument("--dir", default=None, help="where the checkpoint is written (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(a.rows, a.dim, generator=g), dim=1)
    t = time.perf_counter()
    spherical_kmeans(x, a.k, iters=a.iters, generator=g)
    kmeans_s = time.perf_counter() - t
    flop = 2 * a.rows * a.k * a.dim * (a.iters + 1)  # the scores of every E-step (iters + the final one)
    saves = []
    obj = {"bank": torch.randn(a.save_mib * 2**20 // 4)}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        for _ in range(2):
            t = time.perf_counter()
            size = ckpt._atomic_save(obj, os.path.join(d, "rank0.pt"))["bytes"]
            saves.append(size / 2**20 / (time.perf_counter() - t))
    rec = {"kmeans": {"rows": a.rows, "dim": a.dim, "k": a.k, "iters": a.iters, "threads": a.threads,
                      "seconds": round(kmeans_s, 3), "gflop_per_s": round(flop / kmeans_s / 1e9, 1)},
           "checkpoint_write_mib_per_s": [round(s) for s in saves], "cores": len(os.sched_getaffinity(0)),
           "command": "python bench/cluster_figures.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None)}
    print(json.dumps(rec, indent=1))
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
