"""Compiled top-k selection over float32 score rows: the NumPy engine's selector wherever numba is installed.

NumPy's own selections (`np.argpartition`, and `knn.select_groups` built from it) pay a few microseconds of
per-row call cost, which at 256 queries x 5,000 items was a third of a whole search. This kernel runs the group
maxima argument of `knn.select_groups` per row in compiled code (numba, released GIL), one row at a time:

1. With g = isqrt(c // k) and L = c // g, group l holds the columns l, l + L, ..., l + (g - 1) L. All L group
   maxima come from one element-wise pass over the row's g slices of length L, which the compiler vectorises.
2. t = the k-th largest group maximum. Those k groups each hold an item scoring >= t, so the k-th best score of
   the row is >= t, and every item of any top-k set scores >= t.
3. Only groups whose maximum is >= t can hold such items: about k of them. Their columns, and the ragged tail
   past g * L, are scanned and the items scoring >= t go to a small buffer.
4. The buffer is cut to its k best, sorted best first when asked.

Every "k-th largest value" here (the bar of step 2, the cut of step 4) is found by bisection over the floats'
order keys with one vectorised count per step, not by a partition: a partition's data-dependent branches cost
about 10 ns per item on random scores, several times the whole rest of the kernel.

The buffer has a fixed size. When ties fill it (a row of one value, or a filter's -inf rows), it is cut to its
k best and the bar rises to just above their k-th score: the buffer already holds k items at least that good,
so an item that only equals it is not needed. Which of several items tied at the k-th score are kept is
arbitrary, as for every selector of the index; the index's tie rule settles those rows afterwards.

``-inf`` scores (rows a filter excludes) are ordinary values here; NaN never reaches a search (queries and
gallery are checked finite). The fast-math flags allow no-NaN arithmetic only, never "no infinities".
"""

from __future__ import annotations

import functools
import importlib.util
import math

import numpy as np


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba); the NumPy selectors are used instead"
    return None


def kernel(name: str = "select_rows"):
    """A compiled kernel (`mim.search._topk_jit`): compiled on first use in a process and cached on disk beside
    the module where the folder is writable (else in numba's user cache), so later processes load it."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"topk='compiled' cannot run: {reason}")
    return _compiled(name)


@functools.cache
def _compiled(name: str):
    from mim.search import _topk_jit

    return getattr(_topk_jit, name)


def warm_up() -> bool:
    """Compile (or load from the disk cache) every kernel now, the bfloat16 search's rescoring
    (`mim.search.prefilter`) included, on tiny inputs, so that a server's first search does not pay for it:
    seconds the first time on a machine, a fraction of a second later. False without numba."""
    if unavailable_reason() is not None:
        return False
    s = np.arange(8, dtype=np.float32).reshape(2, 4)
    topk(s, 2, sort=True)
    running = RunningTopk(2, 2)
    running.add(s, 0)
    running.result()
    cols, lower = np.zeros((2, 2), np.int64), np.zeros(2, np.float32)
    kernel("rescore_rows")(s, s, cols, s[:, :2].copy(), lower, 0, 2, np.empty((2, 2), np.float32))
    return True


def _groups(c: int, k: int) -> int:
    return max(1, math.isqrt(c // k))


def select_rows(scores: np.ndarray, k: int, rows: tuple[int, int], sort: bool, out_v, out_i) -> None:
    """Write the top k of rows [r0, r1) of a C-contiguous float32 (B, c) array into out_v / out_i (B, k)."""
    kernel("select_rows")(scores, k, _groups(scores.shape[1], k), rows[0], rows[1], sort, out_v, out_i)


def topk(scores: np.ndarray, k: int, *, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(values, columns) of shape (B, k) of a valid top-k set per row of a float32 (B, c) array, 1 <= k <= c;
    best first with ``sort``, else in any order. One thread; `knn._NumpyOps.topk` spreads rows over cores."""
    s = np.ascontiguousarray(scores, dtype=np.float32)
    b, c = s.shape
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}] for rows of {c} scores; got {k}")
    out_v, out_i = np.empty((b, k), np.float32), np.empty((b, k), np.int64)
    select_rows(s, k, (0, b), sort, out_v, out_i)
    return out_v, out_i


class RunningTopk:
    """The k best items of each of B rows over a sequence of score tiles (the columns of a gallery in tiles),
    without a candidate slab: each row keeps a small buffer and a bar that rises as tiles come in, so that once
    a few tiles have been seen most groups of a new tile fall below the bar and cost one vectorised pass.

    Rows are independent: `add` and `result` take a row range, so that threads can share one instance.
    """

    def __init__(self, rows: int, k: int) -> None:
        if rows < 0 or k < 1:
            raise ValueError(f"RunningTopk needs rows >= 0 and k >= 1; got rows={rows}, k={k}")
        cap = max(4 * k, 32)
        self.k = k
        self._vals = np.empty((rows, cap), np.float32)
        self._cols = np.empty((rows, cap), np.int64)
        self._counts = np.zeros(rows, np.int64)
        self._bars = np.full(rows, -np.inf, np.float32)

    @property
    def rows(self) -> int:
        return self._counts.shape[0]

    def add(self, scores: np.ndarray, start: int, rows: tuple[int, int] | None = None) -> None:
        """Fold a C-contiguous float32 (B, c) tile whose column j is gallery column start + j."""
        r0, r1 = (0, self.rows) if rows is None else rows
        g = _groups(scores.shape[1], self.k)  # 1 for a tile narrower than k: every column is scanned
        kernel("add_rows")(scores, start, self.k, g, r0, r1, self._vals, self._cols, self._counts, self._bars)

    def result(self, rows: tuple[int, int] | None = None, out=None) -> tuple[np.ndarray, np.ndarray]:
        """(values, columns) (B, k), best first, of the rows given (all by default): every row must have seen at
        least k columns."""
        r0, r1 = (0, self.rows) if rows is None else rows
        if r1 > r0 and int(self._counts[r0:r1].min()) < self.k:
            raise ValueError(f"RunningTopk: a row has seen fewer than k={self.k} columns")
        if out is None:
            out = (np.empty((self.rows, self.k), np.float32), np.empty((self.rows, self.k), np.int64))
        kernel("finish_rows")(self.k, r0, r1, self._vals, self._cols, self._counts, out[0], out[1])
        return out
