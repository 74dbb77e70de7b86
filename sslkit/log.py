"""Rank-aware logging, the epoch's metric sums, and the run's JSON-lines log.

- `get_logger(rank)`: rank 0 talks, other ranks only warn and fail (so their errors still reach the
  console).
- `MetricLogger`: running sums of the step outputs as device tensors (no host sync per step), read only
  at log steps and epoch ends; its state is checkpointed per rank, so a resumed epoch's summary equals
  an uninterrupted one's.
- `JsonLog`: rank 0 appends every record to `<out>/log.jsonl`; on resume the records after the resumed
  step are dropped first, so the log reads as one uninterrupted run. Dropping them replaces the file,
  so it is only done while holding the run folder's lock (`sslkit.runlock`): never under another run's
  open handle. A record that cannot be written (full disk) is a one-line warning, not a crash of
  rank 0 alone; the next checkpoint then stops every rank together.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time

import torch

from .files import atomic_write, json_lines
from .runlock import RunFolderError, os_reason


class StderrHandler(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a record is written, not the one it was made with: a
    library caller (a notebook, pytest's capture) that swaps stderr after `get_logger` would otherwise
    leave the "sslkit" logger writing to a closed stream. An explicit `stream` is used as given."""

    def __init__(self, stream=None):
        self._fixed = stream     # a stream of the caller's (tests); None: the current sys.stderr
        super().__init__(stream)

    @property
    def stream(self):
        return self._fixed or sys.stderr

    @stream.setter
    def stream(self, value):   # StreamHandler.__init__ sets it; the property always answers sys.stderr
        pass


class BarSafeHandler(StderrHandler):
    """Log lines on a terminal go through tqdm, which clears the progress bars (the step bar, the memory
    bank's, k-means') and draws them again below the line, instead of the line breaking a bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 -- logging's own convention: report, never raise
            self.handleError(record)


def get_logger(rank: int) -> logging.Logger:
    log = logging.getLogger("sslkit")
    log.handlers.clear()
    h = BarSafeHandler() if sys.stderr.isatty() else StderrHandler()
    h.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(h)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    return log


class MetricLogger:
    """One epoch's running sums: every scalar tensor a step returns (float64, on its device), the
    number of steps, and the wall time spent waiting for data vs in whole iterations."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.data_s = 0.0
        self.step_s = 0.0
        self.elapsed_before = 0.0           # seconds of this epoch spent before a resume
        self.t0 = time.perf_counter()
        self._window = (0, 0.0, 0.0)        # (steps, data_s, step_s) at the last log step

    def update(self, out: dict, data_s: float, step_s: float):
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1:
                v = v.detach().to(torch.float64).reshape(())
                self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1
        self.data_s += data_s
        self.step_s += step_s

    def means(self) -> dict[str, float]:
        """Epoch means of every metric so far (one host sync)."""
        return {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}

    def window(self) -> tuple[int, float, float]:
        """(steps, data seconds, iteration seconds) since the previous call."""
        steps, data_s, step_s = self._window
        self._window = (self.steps, self.data_s, self.step_s)
        return self.steps - steps, self.data_s - data_s, self.step_s - step_s

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def state_dict(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps, "data_s": self.data_s,
                "step_s": self.step_s, "elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict, device: torch.device):
        self.reset()
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in state["sums"].items()}
        self.steps, self.data_s, self.step_s = state["steps"], state["data_s"], state["step_s"]
        self.elapsed_before = state["elapsed_s"]
        self._window = (self.steps, self.data_s, self.step_s)


class StepLog:
    """What the trainer shows and records at a log step: a JSON-lines record (rank 0), and a tqdm bar
    when rank 0 has a terminal, else a log line. Display only: nothing that decides whether a
    collective runs depends on it."""

    def __init__(self, jlog: "JsonLog", log: logging.Logger, is_main: bool, total_steps: int, step: int,
                 global_batch: int, device: torch.device):
        self.jlog, self.log, self.total, self.global_batch, self.device = jlog, log, total_steps, global_batch, device
        self.bar = None
        if is_main and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def record(self, out: dict, epoch: int, step: int, loss: float, lr: float, window: tuple[int, float, float]):
        steps, data_s, step_s = window
        img_s = self.global_batch * steps / max(step_s, 1e-9)
        rec = {"kind": "step", "epoch": epoch, "step": step, "loss": loss, "lr": lr, "img_per_s": img_s,
               "data_s": data_s / max(steps, 1), "step_s": step_s / max(steps, 1), "mem_mb": memory_mb(self.device)}
        rec.update({k: float(v) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1})
        self.jlog.write(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}", refresh=False)
        else:
            eta = (self.total - step) * step_s / max(steps, 1)
            self.log.info("epoch %d step %d/%d loss %.4f lr %.4g grad norm %.3g | %.0f img/s | data %.0f ms step %.0f "
                          "ms | mem %.0f MB | eta %s", epoch, step, self.total, loss, lr, rec.get("grad_norm", 0.0),
                          img_s, 1000 * rec["data_s"], 1000 * rec["step_s"], rec["mem_mb"], hms(eta))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def memory_mb(device: torch.device) -> float:
    """Peak memory: the GPU's allocator on CUDA, the process' resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class JsonLog:
    """Append-only JSON lines (rank 0 only); optional TensorBoard mirror. `resume_step`: records of
    steps after it (written before a crash, after the checkpoint resumed from) are dropped first, which
    needs `lock`, the `sslkit.runlock.RunLock` held on the log's folder."""

    def __init__(self, path: str | None, tensorboard_dir: str | None = None, resume_step: int | None = None,
                 lock=None):
        self.f, self.path, self.failed = None, path, False
        if path:
            if resume_step is not None and os.path.exists(path):
                if lock is None or not lock.holds(path):
                    raise RuntimeError(f"{path}: records are dropped on resume only under the run folder's lock")
                _truncate(path, resume_step)
            self.f = open(path, "a")
        self.tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from e
            self.tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict):
        if self.f:
            try:
                self.f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
                self.f.flush()
            except OSError as e:
                if not self.failed:  # once: the next checkpoint write stops the run with the same cause
                    logging.getLogger("sslkit").warning("%s: record of step %s not written: %s", self.path,
                                                        record.get("step"), os_reason(e))
                self.failed = True
        if self.tb and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self):
        if self.f:
            try:
                self.f.close()
            except OSError:
                pass  # already reported by write()
            self.f = None
        if self.tb:
            self.tb.close()


def open_run_files(out: str, config_text: str, resume_step: int, lock, tensorboard: bool) -> JsonLog:
    """Rank 0, holding `lock` on `out`: `<out>/config.json` (replaced atomically) and the run's JsonLog
    (records after `resume_step` dropped). A file that cannot be written is a one-line RunFolderError."""
    path = os.path.join(out, "config.json")
    try:
        atomic_write(path, config_text + "\n", tmp=path + ".tmp", durable=False)
        path = os.path.join(out, "log.jsonl")
        return JsonLog(path, os.path.join(out, "tb") if tensorboard else None, resume_step, lock)
    except OSError as e:
        try:
            os.remove(os.path.join(out, "config.json.tmp"))
        except OSError:
            pass  # never written, or the folder refuses even that
        raise RunFolderError(f"cannot write {e.filename or path}: {os_reason(e)}") from None


def _truncate(path: str, step: int):
    """Keep the records up to `step` (a resumed run's; a torn last line from a kill goes too)."""
    keep = [json.dumps(rec) + "\n" for rec in json_lines(path) if rec.get("step", 0) <= step]
    atomic_write(path, "".join(keep), tmp=path + ".tmp")
