"""Small public predicates for validating arguments; each caller raises its own error, saying what it got,
what it expected and what to do, so the messages stay specific while the test is written once."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, and not a bool (True is an int to Python, never a count or an id here)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_positive_int(value: Any) -> bool:
    """An integer (as `is_int`) >= 1: a count, a size, k."""
    return is_int(value) and value >= 1
