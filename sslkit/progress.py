"""Progress of a long step, on a terminal and off it.

On a terminal it is a tqdm bar. Anywhere else (Slurm, nohup, a pipe) tqdm either prints nothing
(`disable=None`) or one ever-growing line of carriage returns, so there `Progress` writes a plain
line when it starts, every `every` seconds while it runs, and when it ends:

    features fm-test: 4,096/10,000 img (41%) | 152 img/s | 0:00:27 elapsed | eta 0:00:39 | loss 0.1234

The rate counts only this process' work (a resumed step's `initial` is excluded), and the ETA is the
remaining count at that rate. Display only: nothing that decides whether a collective runs may
depend on it, since each rank has its own terminal or none.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

DEFAULT_EVERY = 60.0   # seconds between lines off a terminal


def hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """`update(n)` after each piece of work; `close()` (or a `with` block) at the end.

    `enabled=False` shows nothing; `tty` overrides the terminal test (for tests and for callers that
    know better); `clock` is the time source (tests pass a fake one)."""

    def __init__(self, total: int | None, desc: str, unit: str = "img", initial: int = 0, enabled: bool = True,
                 every: float = DEFAULT_EVERY, stream: TextIO | None = None, tty: bool | None = None,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.n = self.initial = initial
        self.postfix: dict = {}
        self.clock = clock
        self.t0 = self.last = clock()
        self.closed = not enabled
        self.bar = None
        if not enabled:
            return
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)
        else:
            self._line("started")

    def update(self, n: int = 1, **postfix) -> None:
        if self.closed:
            return
        self.n += n
        if postfix:
            self.set_postfix(**postfix)
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def set_postfix(self, **postfix) -> None:
        """Values shown after the counts (a loss, say); kept until replaced."""
        self.postfix.update(postfix)
        if self.bar is not None and not self.closed:
            self.bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)

    def close(self, note: str = "done") -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(note)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # a step left by an exception (a preemption, an error) did not finish: say so
        self.close("done" if exc_type is None else "stopped")

    def status(self, note: str = "") -> str:
        """The line written off a terminal."""
        elapsed = self.clock() - self.t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n:,}/{self.total:,} {self.unit}" if self.total else f"{self.n:,} {self.unit}"
        if self.total:
            count += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc}: {count}", f"{rate:,.3g} {self.unit}/s", f"{hms(elapsed)} elapsed"]
        if self.total and note != "done":
            parts.append(f"eta {hms((self.total - self.n) / rate)}" if rate > 0 else "eta ?")
        parts += [f"{k} {_fmt(v)}" for k, v in self.postfix.items()]
        if note:
            parts.append(note)
        return " | ".join(parts)

    def _line(self, note: str = "") -> None:
        print(self.status(note), file=self.stream, flush=True)
