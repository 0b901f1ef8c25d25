"""The one markdown-table writer of the project: results reports, comparison tables and benchmark summaries."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, label_column: bool = False) -> str:
    """A GitHub markdown table: the header, the separator, one line per row (each cell as `str`).

    With `label_column` the first column is a left-aligned label and every other one a right-aligned number
    (`|---|---:|`); otherwise every column is left-aligned (`|---|---|`)."""
    if label_column:
        separator = "|---|" + "---:|" * (len(header) - 1)
    else:
        separator = "|" + "---|" * len(header)
    lines = ["| " + " | ".join(header) + " |", separator]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells but the header {list(header)} has {len(header)}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)
