"""Time Hamming permutation-set generation (sslkit.permutations.generate) for the jigsaw sizes.

    python bench/permutations.py [--sizes 100,2000,10000] [--methods max_avg,max_min] [--rounds 3]

Reports the first call (numba compile or cache load included) and the median of --rounds warm calls,
with the set's min/mean pairwise Hamming distance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sslkit.permutations import generate, hamming_stats  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,2000,10000")
    p.add_argument("--methods", default="max_avg,max_min")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    print(f"{'n':>6} {'method':<8} {'first s':>8} {'warm s (median)':>16} {'min':>4} {'mean':>7}")
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        generate(10, method)
        first = time.perf_counter() - t0
        for n in (int(x) for x in args.sizes.split(",")):
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                perms = generate(n, method)
                times.append(time.perf_counter() - t0)
            stats = hamming_stats(perms)
            row = {"n": n, "method": method, "first_call_s": first, "warm_s": statistics.median(times),
                   "rounds_s": times, "hamming_min": stats["min"], "hamming_mean": stats["mean"]}
            rows.append(row)
            print(f"{n:>6} {method:<8} {first:>8.2f} {row['warm_s']:>16.2f} {stats['min']:>4} {stats['mean']:>7.3f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": os.cpu_count(), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
