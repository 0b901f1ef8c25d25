"""Progress bars that read well both on a terminal and in a log.

On a terminal `progress_bar()` is a plain tqdm bar, redrawn in place. Anywhere else (CI, `make demo | tee log`, a
file) tqdm's in-place redraws would land as thousands of partial lines, so there it prints one complete line
every `interval` seconds and one when it finishes, with tqdm's own counters:

    train 3tower:  45% 270/600 [01:05<01:20,  4.12it/s, loss=2.113, scale=17.3]

Both kinds support what the code uses: iterating, `update(n)`, `set_postfix(**values)`, `close()` and `with`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

DEFAULT_INTERVAL = 5.0  # seconds between lines when the output is not a terminal
_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    initial: int = 0,
    unit: str = "it",
    leave: bool = True,
    enabled: bool = True,
    file: TextIO | None = None,
    interval: float = DEFAULT_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
) -> tqdm | LineProgress:
    """A progress bar over `iterable` (or one driven by `update()` when it is None) written to `file` (stderr).

    `enabled=False` gives a silent pass-through. `leave` only matters on a terminal, where a bar with
    leave=False is erased when it closes; in a log the final line is always kept."""
    stream = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not enabled or _is_terminal(stream):
        return tqdm(
            iterable, desc=desc, total=total, initial=initial, unit=unit, leave=leave, file=stream, disable=not enabled
        )
    return LineProgress(
        iterable, desc=desc, total=total, initial=initial, unit=unit, file=stream, interval=interval, clock=clock
    )


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's counters as whole lines, at most one per `interval` seconds plus a final one at `close()`."""

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        *,
        desc: str,
        total: int | None,
        initial: int,
        unit: str,
        file: TextIO,
        interval: float,
        clock: Callable[[], float],
    ):
        if interval <= 0:
            raise ValueError(f"interval={interval!r}; expected seconds > 0 between progress lines")
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = self.initial = initial
        self.file, self.interval, self.clock = file, interval, clock
        self.postfix = ""
        self.start = self.last_print = clock()
        self.printed: tuple[int, str] | None = None  # (n, postfix) of the last line, so close() does not repeat it
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar has no iterable; call update(n) instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last_print >= self.interval:
            self._print(now)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the counters, like tqdm's set_postfix (numbers and strings as given)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.printed != (self.n, self.postfix):
                self._print(self.clock())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self, now: float) -> str:
        return tqdm.format_meter(
            self.n,
            self.total,
            now - self.start,
            prefix=self.desc,
            unit=self.unit,
            postfix=self.postfix or None,
            initial=self.initial,
            bar_format=_FORMAT if self.total else _FORMAT_NO_TOTAL,
        )

    def _print(self, now: float) -> None:
        self.last_print, self.printed = now, (self.n, self.postfix)
        print(self.line(now), file=self.file, flush=True)
