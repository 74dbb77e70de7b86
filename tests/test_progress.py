"""sslkit.progress: plain lines with rate and ETA off a terminal, a tqdm bar on one, nothing when off."""

from __future__ import annotations

import io

from sslkit.progress import Progress, hms


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_lines_every_interval_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    p = Progress(1000, "features x", unit="img", every=10, stream=out, tty=False, clock=clock)
    for _ in range(9):      # 100 img per 2 s for 18 s: one line at 10 s, then the closing line
        clock.t += 2
        p.update(100, loss=0.5)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "features x: 0/1,000 img (0%) | 0 img/s | 0:00:00 elapsed | eta ? | started"
    assert lines[1] == "features x: 500/1,000 img (50%) | 50 img/s | 0:00:10 elapsed | eta 0:00:10 | loss 0.5"
    assert lines[2] == "features x: 900/1,000 img (90%) | 50 img/s | 0:00:18 elapsed | loss 0.5 | done"
    assert len(lines) == 3


def test_resumed_count_is_not_in_the_rate_and_unknown_total():
    out, clock = io.StringIO(), Clock()
    p = Progress(100, "teacher", initial=60, every=5, stream=out, tty=False, clock=clock)
    clock.t += 5
    p.update(10)
    assert "70/100 img (70%) | 2 img/s" in out.getvalue() and "eta 0:00:15" in out.getvalue()
    q = Progress(None, "scan", unit="file", every=1, stream=out, tty=False, clock=clock)
    clock.t += 2
    q.update(4)
    assert "scan: 4 file | 2 file/s" in out.getvalue().splitlines()[-1]


def test_disabled_prints_nothing_and_terminal_uses_a_bar():
    out = io.StringIO()
    with Progress(10, "quiet", enabled=False, stream=out, tty=False) as p:
        p.update(10, loss=1.0)
    assert out.getvalue() == ""
    bar_out = io.StringIO()
    with Progress(10, "bar", stream=bar_out, tty=True) as p:
        p.update(10, loss=0.25)
    assert "\r" in bar_out.getvalue() and "10/10" in bar_out.getvalue() and "loss=0.25" in bar_out.getvalue()
    assert hms(3725) == "1:02:05"
