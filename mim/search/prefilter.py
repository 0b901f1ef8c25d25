"""Exact CPU search at half the product's cost: a bfloat16 product finds candidates, float32 ranks them.

On the CPU an exact search of many queries is bound by its float32 product (2 cores: ~180 GFLOP/s, about 90% of
their peak), and so is faiss's. CPUs with bfloat16 dot-product instructions (AVX512_BF16, AMX) run the same
product in bfloat16 at twice that rate or more: 256 queries x 65,536 rows x 512 took 45 ms against 95 in float32
(2 cores of an AVX512_BF16 CPU, torch's oneDNN GEMM, including the copy of the scores to float32).

A bfloat16 score is not the float32 score, but how far it can be from it is known, and the search stays exact:

1. The gallery keeps a bfloat16 copy (`Shadow`, half the float32 gallery's memory), made on first use. It records
   G, the largest row norm of the copy, and R, the largest norm of a row's rounding error (row - copy).
2. Each query q is rounded to bfloat16 (q~, error r = q - q~). For every gallery row g (copy g~, error e):
   q.g - q~.g~ = r.g~ + r.e + q~.e, so |q.g - q~.g~| <= |r| G + |r| R + |q~| R (Cauchy-Schwarz). To that come
   the float32 sums' rounding, about d 2^-24 |q| |g| at most, once in the bfloat16 product and once in the float32
   scores that rank the candidates. That sum is the query's `eps`. With the rounding norms measured rather than
   bounded by the worst case (2^-8 of each norm) it is about 0.0036 for unit vectors in 512 dimensions, not 0.008.
3. The product's float32 sums are rounded to bfloat16 on output, a relative error of at most 2^-8 (2^-7 is
   allowed here, which also covers truncation).
4. A running top-M (M = `spare(k + 1)`) keeps each query's best approximate scores. With t the (k+1)-th best of
   them, every item of the float32 top k+1 has an approximate score of at least `lower_bounds(t, eps)`; the
   items kept that reach it are scored again in float32 and ranked.
5. A query whose M-th kept score still reaches its bound (a dense cluster of near-equal scores, many
   duplicates) may have candidates that were not kept: `scan` reports it, and the index searches it again in
   float32 alone.

So the ids are those of the float32 search, up to scores that differ in the last bit (the float32 scores here
are dot products summed in another order than BLAS's). Ties keep the index's rule: every item scoring at least
the (k+1)-th float32 score passes the bound, so `KnnIndex.search`'s tie check sees all of them, as it does
after a float32 scan.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from mim.search import topk_kernel

# Relative error of a product's bfloat16 output: 2^-8 for round-to-nearest, taken twice to cover truncation.
OUTPUT_ROUNDING = 2.0**-7
# Queries with a component this large are searched in float32 alone: bfloat16 shares float32's exponent range,
# and a sum of such products could overflow.
MAX_QUERY_VALUE = 1e30
# Rows converted per step when the copy is made: bounds the float32 temporaries.
SHADOW_CHUNK_ROWS = 1 << 16


@functools.cache
def unavailable_reason() -> str | None:
    """Why the bfloat16 candidate search cannot run here at all (torch or numba missing), or None."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (its CPU GEMM runs the bfloat16 product)"
    return topk_kernel.unavailable_reason()


@functools.cache
def cpu_has_bf16_dot() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX-BF16), without which a
    bfloat16 product is emulated and slower than float32. Read from /proc/cpuinfo: False where that is absent."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _torch():
    import torch

    return torch


def _as_tensor(a: np.ndarray):
    with warnings.catch_warnings():  # read-only arrays (a loaded gallery) are only ever read here
        warnings.simplefilter("ignore", UserWarning)
        return _torch().from_numpy(a)


def _row_norms(x) -> np.ndarray:
    """float64 L2 norms of a (n, d) float32 tensor's rows, rounded up by a relative 1e-9."""
    return x.double().norm(dim=1).numpy() * (1 + 1e-9)


@dataclass(frozen=True)
class Shadow:
    """The bfloat16 copy of a gallery's rows, with the two norms of step 1."""

    emb: Any  # (m, d) torch.bfloat16, C-contiguous
    g_max: float  # largest row norm of the copy
    r_max: float  # largest row norm of (row - copy)

    @classmethod
    def of(cls, emb: np.ndarray) -> Shadow:
        torch = _torch()
        src = _as_tensor(np.ascontiguousarray(emb, dtype=np.float32))
        out = torch.empty(src.shape, dtype=torch.bfloat16)
        g_max = r_max = 0.0
        for a in range(0, src.shape[0], SHADOW_CHUNK_ROWS):
            part = src[a : a + SHADOW_CHUNK_ROWS]
            low = part.to(torch.bfloat16)
            out[a : a + SHADOW_CHUNK_ROWS] = low
            back = low.float()  # row - copy is exact in float32: it holds the bits rounding dropped
            g_max = max(g_max, float(_row_norms(back).max(initial=0.0)))
            r_max = max(r_max, float(_row_norms(part - back).max(initial=0.0)))
        return cls(out, g_max, r_max)


def query_bounds(q: np.ndarray, shadow: Shadow):
    """(q~ as a bfloat16 tensor, eps (B,) float64): the rounded queries and step 2's bound per query."""
    torch = _torch()
    qt = _as_tensor(np.ascontiguousarray(q, dtype=np.float32))
    low = qt.to(torch.bfloat16)
    back = low.float()
    q_norm, r_norm = _row_norms(back), _row_norms(qt - back)
    d = q.shape[1]
    gamma = d * 2.0**-24 / (1 - d * 2.0**-24)  # a float32 sum of d terms: relative to the sum of their sizes
    g, rg = shadow.g_max, shadow.r_max
    accumulation = gamma * q_norm * g + gamma * (q_norm + r_norm) * (g + rg)  # bfloat16 product, float32 rescoring
    # Products and partial sums below float32's normal range may be flushed to zero: d * 2^-126 at most.
    eps = r_norm * g + r_norm * rg + q_norm * rg + accumulation + d * 2.0**-120
    return low, eps


def lower_bounds(t: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """(B,) float32: the approximate score every item of the exact top k+1 reaches, for t (B,) the (k+1)-th
    best approximate score and eps (B,) the queries' bounds.

    With c = OUTPUT_ROUNDING / (1 - OUTPUT_ROUNDING), an item's exact score s and output a satisfy
    |s - a| <= eps + c|a|. The k+1 items with a >= t have s >= t - c|t| - eps, so the (k+1)-th exact score is at
    least that; an item scoring that much has a + c|a| >= t - c|t| - 2 eps, which is solved for a here."""
    c = OUTPUT_ROUNDING / (1 - OUTPUT_ROUNDING)
    t = t.astype(np.float64)
    with np.errstate(invalid="ignore"):  # t = -inf (fewer than k+1 rows pass a filter) gives -inf
        z = t - c * np.abs(t) - 2 * eps
    z = np.where(z >= 0, z / (1 + c), z / (1 - c))
    z = z - 1e-12 * (1 + np.abs(z))  # float64 rounding of the lines above
    out = z.astype(np.float32)
    return np.where(out.astype(np.float64) > z, np.nextafter(out, np.float32(-np.inf)), out)


def spare(k: int) -> int:
    """Kept items per query for a top-k (k includes the tie check's extra item). On unit vectors in 512
    dimensions about 2k fall within the bound at 1M rows and k = 100; 3k + 32 leaves room for denser data."""
    return 3 * k + 32


class _Buffers(threading.local):
    """A thread's product buffers, grown as needed: bfloat16 output and its float32 copy."""

    low: Any = None
    high: np.ndarray | None = None


_buffers = _Buffers()


def product(q_low, g_low, start: int, stop: int) -> np.ndarray:
    """(b, stop - start) float32 approximate scores of rows [start, stop) of the copy, in this thread's
    buffer: valid until its next product."""
    torch = _torch()
    b, c = q_low.shape[0], stop - start
    if _buffers.low is None or _buffers.low.numel() < b * c:
        _buffers.low = torch.empty(b * c, dtype=torch.bfloat16)
        _buffers.high = np.empty(b * c, dtype=np.float32)
    low = _buffers.low[: b * c].view(b, c)
    torch.mm(q_low, g_low[start:stop].T, out=low)
    high = _buffers.high[: b * c].reshape(b, c)
    _as_tensor(high).copy_(low)
    return high


def scan(ops, q: np.ndarray, kk: int, emb: np.ndarray, blocked, shadow: Shadow, tile: int):
    """Each query's kk best gallery rows (kk = the index's k + 1, or fewer rows), best first, by float32 score:
    (scores (B, kk) float32, rows (B, kk) int64, done (B,) bool). Rows not done (step 5) hold nothing useful.

    `ops` is the index's NumPy engine: its `fold` / `finish` spread the running top-M over cores."""
    m = emb.shape[0]
    want = min(m, spare(kk))
    q_low, eps = query_bounds(q, shadow)
    running = topk_kernel.RunningTopk(q.shape[0], want)
    for start in range(0, m, tile):
        stop = min(m, start + tile)
        s = product(q_low, shadow.emb, start, stop)
        if blocked is not None:
            ops.masked_fill(s, blocked[start:stop])
        ops.fold(running, s, start)
    approx, cols = ops.finish(running)  # (B, want), best first
    lower = lower_bounds(approx[:, kk - 1], eps)
    last = approx[:, -1]
    done = (last < lower) | (last == -np.inf) if want < m else np.ones(q.shape[0], dtype=bool)
    exact = np.empty_like(approx)
    rescore = topk_kernel.kernel("rescore_rows")
    q32 = np.ascontiguousarray(q, dtype=np.float32)
    g32 = np.ascontiguousarray(emb)
    work = q.shape[0] * want * q.shape[1] // 2  # a candidate's dot product: about d/2 score-equivalents
    ops.spread(lambda r: rescore(q32, g32, cols, approx, lower, r[0], r[1], exact), q.shape[0], work)
    vals, j = ops.topk(exact, kk, sort=True, method="compiled")
    return vals, np.take_along_axis(cols, j, axis=1), done


def applies(q: np.ndarray) -> bool:
    """Whether these (non-empty) queries can be searched through bfloat16: `MAX_QUERY_VALUE`."""
    return bool(np.abs(q).max() < MAX_QUERY_VALUE)
