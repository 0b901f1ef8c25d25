"""What every command line of the project shares: the parser class and the range-checked number types.

The only module under `mim/` that imports argparse: it parses nothing itself, it is the common ground of the
entry points in mimsearch/, client/, export/ and benchmarks/ (which may not import each other's commands).

    ap = CommandParser(prog="mimsearch train", description=__doc__)
    ap.add_argument("--steps", type=at_least(1), default=600, help="optimizer steps")

A parser of this class shows every flag's default in `--help` and reports a wrong flag as one line,
`error: argument --steps: expected an integer >= 1; got '-5' (see `mimsearch train --help`)`, with exit code 2.

May import: nothing of ours.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; each flag's help ends with its default (none for flags without one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "%(default)" not in text
            and default is not argparse.SUPPRESS
            and default is not None
            and default is not False
            and default != []
        ):
            text += " (default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """argparse with defaults in the help and one-line errors (exit code 2)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]  # argparse's error() never returns
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def at_least(low: float, kind: Callable[[str], float] = int) -> Callable[[str], float]:
    """An argparse type: a number of `kind` (int or float) that is >= low."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}; got {text!r}") from None
        if value != value or value < low:  # NaN is refused too
            raise argparse.ArgumentTypeError(f"expected {noun} >= {low}; got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} >= {low}"
    return parse


def in_range(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a float in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a number in [{low}, {high}]; got {text!r}")
        return value

    parse.__name__ = f"number in [{low}, {high}]"
    return parse
