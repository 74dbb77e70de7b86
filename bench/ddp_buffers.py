"""What DeepClusterV2's `assignments` buffer (heads x dataset size, int64, identical on every rank)
costs per step under DDP's default `broadcast_buffers=True`: DDP broadcasts every buffer from rank 0
before each forward. Two gloo ranks on this machine, a tiny model beside the buffer, both settings.

    python bench/ddp_buffers.py --samples 4000000      # docs/CLUSTER.md's figure
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WithAssignments(torch.nn.Module):
    def __init__(self, heads: int, samples: int):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("assignments", torch.full((heads, samples), -100, dtype=torch.long))

    def forward(self, x):
        return self.lin(x).sum()


def rank_main(rank: int, heads: int, samples: int, broadcast: bool, port: int, steps: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(WithAssignments(heads, samples), broadcast_buffers=broadcast)
    x = torch.randn(4, 8)
    model(x).backward()  # untimed: DDP's first step builds its buckets
    t = time.perf_counter()
    for _ in range(steps):
        model(x).backward()
    if rank == 0:
        mb = heads * samples * 8 / 1e6
        print(f"broadcast_buffers={broadcast}: assignments {heads}x{samples} int64 ({mb:.0f} MB): "
              f"{(time.perf_counter() - t) / steps * 1000:.1f} ms/step", flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4_000_000)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--port", type=int, default=29611)
    a = p.parse_args()
    for i, broadcast in enumerate((True, False)):
        mp.spawn(rank_main, args=(a.heads, a.samples, broadcast, a.port + i, a.steps), nprocs=2)


if __name__ == "__main__":
    main()
