"""The compiled kernels of `mim.search.topk_kernel` (numba). Imported on first use only, so that importing the
search does not import numba; every kernel is a module-level function, which numba caches on disk (nested
functions would be compiled again in every process)."""

from __future__ import annotations

import numba
import numpy as np

# Element-wise maxima vectorise with no-NaN / no-signed-zero semantics; "ninf" is left out because -inf is data.
_FASTMATH = {"nnan", "nsz"}
MIN_BUFFER = 1024  # a row's candidate buffer in `select_rows`
INSERTION_MAX = 128  # the final sort: insertion sort up to this many items

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
def bar_for(a, n, k):
    """A value v with k <= count(a[:n] >= v): bisection over order keys, one vectorised count per step (at most
    32 steps). The items >= v are exactly k when no tie straddles the cut, else v is the k-th largest value
    itself (the keys end adjacent)."""
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
            if c == k:
                break
        else:
            hi = mid
    return value(lo)


@jit
def keep_best(bv, bi, n, k):
    """Cut bv[:n] / bi[:n] to k items with the k largest values (in place, any order); returns a value at most
    the smallest of them, so that nothing above it was cut."""
    kth = bar_for(bv, n, k)
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
    """out_v / out_i = bv[:k] / bi[:k] by value, best first (ties in any order). Up to INSERTION_MAX items an
    insertion sort in place (256 rows of 101: 0.64 ms, against 1.0 for np.sort of 64-bit (value, position)
    keys and 0.9 for a merge sort, whose branches on random values mispredict as often); beyond, those keys."""
    if k <= INSERTION_MAX:
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
def push(rv, ri, n, bar, x, col, k):
    """Append (x, col) to the buffer; a full buffer is cut to its k best and the bar raised just above the cut.
    Returns (n, bar)."""
    rv[n] = x
    ri[n] = col
    n += 1
    if n == rv.shape[0]:
        return k, np.nextafter(keep_best(rv, ri, n, k), np.float32(np.inf))
    return n, bar


@jit
def gather(row, start, g, n_groups, gm, bar, rv, ri, n, k):
    """Append the row's items >= bar to rv / ri[n:] (columns offset by start): those of the groups whose maximum
    reaches the bar, then the ragged tail past g * n_groups. Returns (n, bar)."""
    for j in range(n_groups):
        if gm[j] >= bar:
            for col in range(j, g * n_groups, n_groups):
                if row[col] >= bar:
                    n, bar = push(rv, ri, n, bar, row[col], col + start, k)
    for col in range(g * n_groups, row.shape[0]):
        if row[col] >= bar:
            n, bar = push(rv, ri, n, bar, row[col], col + start, k)
    return n, bar


@jit
def select_rows(s, k, g, r0, r1, sort, out_v, out_i):
    n_groups = s.shape[1] // g  # >= k: g <= sqrt(c / k)
    gm = np.empty(n_groups, np.float32)
    cap = max(4 * k, MIN_BUFFER)
    bv, bi = np.empty(cap, np.float32), np.empty(cap, np.int64)
    keys = np.empty(k, np.int64)
    for r in range(r0, r1):
        group_maxima(s[r], g, n_groups, gm)
        # The k-th largest group maximum itself: a looser bar (any count up to 2k) scanned twice the columns and
        # cost 20% more at k = 101 (256 x 5,000: 2.66 ms against 2.17 on one thread).
        n, _ = gather(s[r], 0, g, n_groups, gm, bar_for(gm, n_groups, k), bv, bi, 0, k)
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
    n_groups = s.shape[1] // g
    gm = np.empty(n_groups, np.float32)
    for r in range(r0, r1):
        group_maxima(s[r], g, n_groups, gm)
        bar = bars[r]
        if n_groups >= k and count_at_least(gm, n_groups, bar) > 2 * k:
            # This tile alone has k items >= its own bar, so none below it can be among the row's k best.
            bar = max(bar, bar_for(gm, n_groups, k))
        counts[r], bars[r] = gather(s[r], start, g, n_groups, gm, bar, bv[r], bi[r], counts[r], k)


@jit
def finish_rows(k, r0, r1, bv, bi, counts, out_v, out_i):
    keys = np.empty(k, np.int64)
    for r in range(r0, r1):
        if counts[r] > k:
            keep_best(bv[r], bi[r], counts[r], k)
        sort_best_first(bv[r], bi[r], k, keys, out_v[r], out_i[r])


# Dot products may be summed in any order (vectorised); one compiled loop sums every row the same way, so equal
# rows get equal scores.
_DOT_FASTMATH = {"nnan", "nsz", "reassoc", "contract"}
dot_fast = numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=_DOT_FASTMATH)


@dot_fast
def dot(a, b):
    acc = np.float32(0.0)
    for t in range(a.shape[0]):
        acc += a[t] * b[t]
    return acc


@jit
def rescore_rows(q, g, cols, approx, lower, r0, r1, out):
    """out[r, j] = q[r] . g[cols[r, j]] in float32 for the kept items whose approximate score reaches the
    row's lower bound, -inf for the others (and for -inf approximations: rows a filter excludes)."""
    for r in range(r0, r1):
        lo = lower[r]
        for j in range(cols.shape[1]):
            a = approx[r, j]
            if a >= lo and a > -np.inf:
                out[r, j] = dot(q[r], g[cols[r, j]])
            else:
                out[r, j] = -np.inf
