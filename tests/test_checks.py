"""The shared argument predicates (mim.checks): bools and floats are not counts."""

from __future__ import annotations

import numpy as np
import pytest

from mim.checks import is_int, is_positive_int


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(1)])
def test_counts(value):
    assert is_int(value) and is_positive_int(value)


@pytest.mark.parametrize("value", [0, -2, True, np.bool_(True), 1.0, "3", None, np.float32(2)])
def test_not_counts(value):
    assert not is_positive_int(value)
    assert is_int(value) == (value in (0, -2) and not isinstance(value, (bool, np.bool_)))
