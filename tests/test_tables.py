"""The one markdown-table writer (mim.tables): both layouts, and a row that does not fit."""

from __future__ import annotations

import pytest

from mim.tables import markdown_table


def test_label_column_layout_and_plain_layout():
    assert markdown_table(["model", "R@1"], [["dml", "0.500"]], label_column=True) == (
        "| model | R@1 |\n|---|---:|\n| dml | 0.500 |"
    )
    assert markdown_table(["a", "b"], [[1, None]]) == "| a | b |\n|---|---|\n| 1 | None |"
    assert markdown_table(["a"], []) == "| a |\n|---|"


def test_a_row_of_another_width_is_refused():
    with pytest.raises(ValueError, match=r"a table row has 1 cells but the header \['a', 'b'\] has 2"):
        markdown_table(["a", "b"], [["x"]])
