"""Rank-aware logging: rank 0 talks, other ranks only warn and fail (so their errors still reach the
console), and rank 0 appends every record to `<out>/log.jsonl`."""

from __future__ import annotations

import json
import logging
import sys
import time


def get_logger(rank: int) -> logging.Logger:
    log = logging.getLogger("sslkit")
    log.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(h)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    return log


class JsonLog:
    """Append-only JSON lines (rank 0 only); optional TensorBoard mirror."""

    def __init__(self, path: str | None, tensorboard_dir: str | None = None):
        self.f = open(path, "a") if path else None
        self.tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from e
            self.tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict):
        if self.f:
            self.f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self.f.flush()
        if self.tb and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self):
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()
