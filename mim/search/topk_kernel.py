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

# Element-wise maxima vectorise with no-NaN / no-signed-zero semantics; "ninf" is left out because -inf is data.
_FASTMATH = {"nnan", "nsz"}
_MIN_BUFFER = 1024
_INSERTION_MAX = 128  # the final sort: insertion sort up to this many items


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba); the NumPy selectors are used instead"
    return None


def _build():
    import numba

    jit = numba.njit(nogil=True, cache=True, boundscheck=False)
    fast = numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=_FASTMATH)

    @fast
    def group_maxima(row, g, n_groups, gm):
        for j in range(n_groups):
            gm[j] = row[j]
        for t in range(1, g):
            part = row[t * n_groups : (t + 1) * n_groups]
            for j in range(n_groups):
                gm[j] = max(part[j], gm[j])

    @jit
    def key(x):
        """float32 -> int64 with the same order (-0.0 just below +0.0); every key between two floats' keys is a
        float's key, so bisection over keys never meets a NaN."""
        b = np.int64(np.array([x], dtype=np.float32).view(np.int32)[0])
        return b ^ 0x7FFFFFFF if b < 0 else b

    @jit
    def value(kk):
        b = kk ^ 0x7FFFFFFF if kk < 0 else kk
        return np.array([b], dtype=np.int32).view(np.float32)[0]

    @fast
    def count_at_least(a, n, v):
        c = 0
        for t in range(n):
            c += a[t] >= v
        return c

    @jit
    def bar_for(a, n, k, enough):
        """A value v of a[:n] with k <= count(a >= v), and count <= enough where the values allow it: bisection
        over order keys, one vectorised count per step (at most 32 steps). With enough = k it is the k-th
        largest value exactly (the loop runs until the keys are adjacent unless the count hits k first)."""
        lo_v, hi_v = a[0], a[0]
        for t in range(1, n):
            x = a[t]
            lo_v = min(lo_v, x)
            hi_v = max(hi_v, x)
        lo, hi = key(lo_v), key(hi_v) + 1  # count(>= value(lo)) = n >= k; count(>= value(hi)) = 0 < k
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            c = count_at_least(a, n, value(mid))
            if c >= k:
                lo = mid
                if c <= enough:
                    break
            else:
                hi = mid
        return value(lo)

    @jit
    def keep_best(bv, bi, n, k):
        """Cut bv[:n] / bi[:n] to k items with the k largest values (in place, any order); returns the k-th."""
        kth = bar_for(bv, n, k, k)
        ties = k
        for t in range(n):
            ties -= bv[t] > kth
        w = 0
        for t in range(n):
            x = bv[t]
            if x > kth or (x == kth and ties > 0):
                if x == kth:
                    ties -= 1
                bv[w] = x
                bi[w] = bi[t]
                w += 1
        return kth

    @jit
    def sort_best_first(bv, bi, k, keys, out_v, out_i):
        """out_v / out_i = bv[:k] / bi[:k] by value, best first (ties in any order). Up to _INSERTION_MAX items an
        insertion sort in place (256 rows of 101: 0.64 ms, against 1.0 for np.sort of 64-bit (value, position)
        keys and 0.9 for a merge sort, whose branches on random values mispredict as often); beyond, those keys."""
        if k <= _INSERTION_MAX:
            for t in range(1, k):
                x, xi = bv[t], bi[t]
                j = t
                while j > 0 and bv[j - 1] < x:
                    bv[j] = bv[j - 1]
                    bi[j] = bi[j - 1]
                    j -= 1
                bv[j] = x
                bi[j] = xi
            out_v[:k] = bv[:k]
            out_i[:k] = bi[:k]
            return
        for t in range(k):
            keys[t] = (key(bv[t]) << 32) | t
        keys[:k].sort()
        for t in range(k):
            j = keys[k - 1 - t] & 0xFFFFFFFF
            out_v[t] = bv[j]
            out_i[t] = bi[j]

    @jit
    def select_rows(s, k, g, r0, r1, sort, out_v, out_i):
        c = s.shape[1]
        n_groups = c // g  # >= k: g <= sqrt(c / k)
        cap = max(4 * k, _MIN_BUFFER)
        gm = np.empty(n_groups, np.float32)
        bv = np.empty(cap, np.float32)
        bi = np.empty(cap, np.int64)
        keys = np.empty(k, np.int64)
        inf = np.float32(np.inf)
        for r in range(r0, r1):
            row = s[r]
            group_maxima(row, g, n_groups, gm)
            bar = bar_for(gm, n_groups, k, 2 * k)
            n = 0
            for j in range(n_groups):
                if gm[j] >= bar:
                    for col in range(j, g * n_groups, n_groups):
                        x = row[col]
                        if x >= bar:
                            bv[n] = x
                            bi[n] = col
                            n += 1
                            if n == cap:
                                bar = np.nextafter(keep_best(bv, bi, n, k), inf)
                                n = k
            for col in range(g * n_groups, c):
                x = row[col]
                if x >= bar:
                    bv[n] = x
                    bi[n] = col
                    n += 1
                    if n == cap:
                        bar = np.nextafter(keep_best(bv, bi, n, k), inf)
                        n = k
            if n > k:
                keep_best(bv, bi, n, k)
            if sort:
                sort_best_first(bv, bi, k, keys, out_v[r], out_i[r])
            else:
                out_v[r, :k] = bv[:k]
                out_i[r, :k] = bi[:k]

    @jit
    def add_rows(s, start, k, g, r0, r1, bv, bi, counts, bars):
        """Fold a tile's rows [r0, r1) into running buffers: row r keeps counts[r] items in bv[r] / bi[r]
        (columns offset by start) and a bar, bars[r], below which no item can be among its k best."""
        c = s.shape[1]
        n_groups = c // g
        cap = bv.shape[1]
        gm = np.empty(n_groups, np.float32)
        inf = np.float32(np.inf)
        for r in range(r0, r1):
            row = s[r]
            group_maxima(row, g, n_groups, gm)
            bar = bars[r]
            if n_groups >= k and count_at_least(gm, n_groups, bar) > 2 * k:
                # This tile alone has k items >= its own bar, so none below it can be among the row's k best.
                bar = max(bar, bar_for(gm, n_groups, k, 2 * k))
            n = counts[r]
            rv, ri = bv[r], bi[r]
            for j in range(n_groups):
                if gm[j] >= bar:
                    for col in range(j, g * n_groups, n_groups):
                        x = row[col]
                        if x >= bar:
                            rv[n] = x
                            ri[n] = col + start
                            n += 1
                            if n == cap:
                                bar = np.nextafter(keep_best(rv, ri, n, k), inf)
                                n = k
            for col in range(g * n_groups, c):
                x = row[col]
                if x >= bar:
                    rv[n] = x
                    ri[n] = col + start
                    n += 1
                    if n == cap:
                        bar = np.nextafter(keep_best(rv, ri, n, k), inf)
                        n = k
            counts[r] = n
            bars[r] = bar

    @jit
    def finish_rows(k, r0, r1, bv, bi, counts, out_v, out_i):
        keys = np.empty(k, np.int64)
        for r in range(r0, r1):
            if counts[r] > k:
                keep_best(bv[r], bi[r], counts[r], k)
            sort_best_first(bv[r], bi[r], k, keys, out_v[r], out_i[r])

    return {"select_rows": select_rows, "add_rows": add_rows, "finish_rows": finish_rows}


_KERNELS: dict | None = None


def kernel(name: str = "select_rows"):
    """A compiled kernel of this module, compiled on first use (and cached on disk beside this module where the
    folder is writable, else in numba's user cache)."""
    global _KERNELS
    if _KERNELS is None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"topk='compiled' cannot run: {reason}")
        _KERNELS = _build()
    return _KERNELS[name]


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
        self.seen = 0
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
        g = _groups(scores.shape[1], self.k) if scores.shape[1] >= self.k else 1
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
