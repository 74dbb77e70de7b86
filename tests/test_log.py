"""Log lines and progress bars on one terminal: a line never breaks a bar."""

from __future__ import annotations

import io
import logging

from tqdm import tqdm

from sslkit.log import BarSafeHandler


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_line_clears_the_bar_and_the_bar_comes_back_below_it():
    term = Terminal()
    bar = tqdm(total=10, file=term, desc="train", ncols=60, mininterval=0)
    bar.update(3)
    log = logging.getLogger("sslkit.test_log")
    log.handlers.clear()
    log.addHandler(BarSafeHandler(term))
    log.propagate = False
    log.warning("epoch 0 done: loss 1.2345")
    bar.update(1)
    bar.close()
    lines = term.getvalue().replace("\r", "\n").split("\n")
    message = [line for line in lines if "epoch 0 done" in line]
    assert message == ["epoch 0 done: loss 1.2345"]          # a line of its own, no bar text glued to it
    after = lines[lines.index(message[0]) + 1:]
    assert any("train" in line and "4/10" in line for line in after)   # the bar is drawn again below it
