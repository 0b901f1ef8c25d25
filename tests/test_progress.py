"""Progress bars: whole lines at a bounded rate when the output is not a terminal, tqdm on a terminal."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
from tqdm import tqdm

from mim.progress import LineProgress, progress_bar

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_many_updates_give_few_whole_lines():
    out, clock = io.StringIO(), FakeClock()
    bar = progress_bar(total=100_000, desc="index", unit="img", file=out, interval=5.0, clock=clock)
    assert isinstance(bar, LineProgress)
    for i in range(100_000):
        clock.now += 2**-10  # exact in binary: 97.66 s in all
        bar.update(1)
        if i % 1000 == 0:
            bar.set_postfix(loss=f"{i / 1e5:.3f}")
    bar.close()
    bar.close()  # a second close prints nothing
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert len(lines) == 20, lines  # one every 5 s of 97.66 s, plus the final one
    assert lines[-1] == "index: 100% 100000/100000 [01:37<00:00, 1024.00img/s, loss=0.990]"
    assert all(line.startswith("index: ") for line in lines)


def test_fast_loop_prints_only_the_final_line():
    out = io.StringIO()
    t0 = time.monotonic()
    for _ in progress_bar(range(200_000), desc="catalog", unit="product", file=out):
        pass
    elapsed = time.monotonic() - t0
    lines = out.getvalue().splitlines()
    assert len(lines) <= 1 + int(elapsed / 5.0), lines
    assert lines[-1].startswith("catalog: 100% 200000/200000 ")


def test_iteration_yields_every_item_and_resumed_counts():
    out, clock = io.StringIO(), FakeClock()
    bar = progress_bar(range(40, 100), desc="train", total=100, initial=40, file=out, clock=clock)
    seen = []
    for x in bar:
        clock.now += 0.5
        seen.append(x)
    assert seen == list(range(40, 100))
    lines = out.getvalue().splitlines()
    assert len(lines) == 6  # every 5 s of 30 s (after 10, 20, ... 60 steps); the last one is the final line
    assert lines[0].startswith("train:  50% 50/100 [00:05<00:25,  2.00it/s]")  # rate counts only this run's steps
    assert lines[-1].startswith("train: 100% 100/100 [00:30<00:00")


def test_final_line_is_not_repeated():
    out, clock = io.StringIO(), FakeClock()
    for _ in progress_bar(range(2), desc="train", file=out, clock=clock):
        clock.now += 5.0  # every update prints, the last one too; close() must not print it again
    assert out.getvalue().splitlines() == [
        "train:  50% 1/2 [00:05<00:05,  5.00s/it]",
        "train: 100% 2/2 [00:10<00:00,  5.00s/it]",
    ]


def test_unknown_total():
    out = io.StringIO()
    bar = progress_bar(desc="scan", file=out)
    bar.update(7)
    bar.close()
    assert out.getvalue().startswith("scan: 7 [00:00, ")


def test_terminal_gets_tqdm_and_disabled_prints_nothing():
    assert isinstance(progress_bar(range(3), desc="x", file=Terminal()), tqdm)
    out = io.StringIO()
    assert list(progress_bar(range(3), desc="x", file=out, enabled=False)) == [0, 1, 2]
    assert out.getvalue() == ""


def test_bad_interval():
    with pytest.raises(ValueError, match=r"interval=0; expected seconds > 0"):
        progress_bar(desc="x", file=io.StringIO(), interval=0)


def test_no_module_uses_tqdm_directly():
    """Every progress bar goes through mim.progress, so none prints partial lines into a log."""
    users = [
        str(p.relative_to(REPO))
        for d in ("mim", "client", "export", "benchmarks")
        for p in (REPO / d).rglob("*.py")
        if re.search(r"^\s*(from|import) tqdm\b", p.read_text(encoding="utf-8"), re.MULTILINE)
        and p != REPO / "mim" / "progress.py"
    ]
    assert users == []
