"""Exact inner-product top-k search over a gallery of L2-normalised embeddings.

One search serves the CPU and the GPU: the gallery lives on the device (float32 on the CPU, float16 on a CUDA
device) and a search is one matrix product per large tile of the gallery, one top-(k+1) selection per tile into
a small candidate slab, and one final selection over the slab. Nothing is read back to the host until the
results are copied out, in one copy. It runs on torch on the GPU and on NumPy on the CPU (`default_backend`:
NumPy's BLAS product with a compiled selection was the fastest CPU engine measured; torch stays selectable
there); the algorithm is written once over the few array operations of `_TorchOps` / `_NumpyOps`. On the CPU,
where numba is installed, the tiles are not selected one by one into a slab: each query keeps a running top-k
with a bar that rises tile by tile (`mim.search.topk_kernel.RunningTopk`), so that a tile whose scores all fall
below the bar costs one vectorised pass, as faiss's per-block heaps do. NumPy and CuPy arrays
and torch tensors are accepted as input (CuPy through DLPack, without a copy).

On a CPU with bfloat16 dot-product instructions, searches large enough to gain (`prefilter_gains`) find their
candidates with a bfloat16 product at about twice the float32 product's rate, and rank them in float32
(`mim.search.prefilter`): a bound on the bfloat16 error says which items can still be in the float32 top k+1,
and those are scored again in float32, so the results are the float32 search's. Queries whose candidates the
bound cannot settle (dense clusters of near-equal scores) are searched again in float32 alone.

Search contract (pinned by tests/test_knn.py):

* Scores are inner products in float32: FP32 accumulation and output. On the GPU the gallery is stored in FP16
  and the queries are rounded to FP16 for the tensor-core product. ``search`` returns host arrays
  ``(scores, ids)`` of shape ``(Q, k)``, best first.
* Tie order is deterministic: equal scores are ordered by ascending id, whatever the tile sizes and whatever
  top-k selection method is used. (The gallery is stored sorted by id, so "ascending id" is "ascending row".)
  Each tile keeps k+1 candidates by score alone. When no two of a row's k+1 best scores are equal, its top-k
  set and order are unique, hence exact. Ties among the k best are put in row order on the k candidates; only a
  row whose k-th and (k+1)-th candidates tie may have lost a tied item of a lower row in some tile, so only such
  rows (duplicate images, quantised data) are searched again with the exact rule: every tile then ranks by a
  64-bit key (score, then row) without ties.
* With a category filter, items that do not match are never returned; if fewer than ``k`` items match, the
  missing columns are padded with id ``-1`` and score ``-inf``. ids must therefore be non-negative. The filter
  is a device-side mask applied to each score tile, or, for a selective filter (at most 1/8 of the gallery), a
  cached compacted copy of the matching rows.
* Memory is bounded at any gallery size: queries are scored in batches of ``query_batch_size`` rows and the
  gallery in tiles of ``chunk_size`` rows (by default as many rows as keep one float32 score tile within
  `SCORE_TILE_BYTES`); the candidate slab holds k+1 columns per tile.

Persistence is one safetensors file (no pickle): tensors ``embeddings`` (N, dim), ``ids`` (N,) and
``item_metadata`` (UTF-8 JSON bytes as uint8); the header metadata holds the format name and version, dim,
model_id, the item count and a SHA-256 of the tensor bytes. Per-item metadata lives in a tensor rather than in
the header because safetensors refuses headers over 100 MB, which a gallery of ~1M titles and paths reaches.
Saves are atomic: temp file in the same directory, fsync, ``os.replace``, fsync of the directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mim.atomic import atomic_write
from mim.search import prefilter, topk_kernel

FORMAT_NAME = "mim-knn-index"
FORMAT_VERSION = 1

# |norm - 1| allowed by `add` for rows it does not normalise itself. fp32 rows normalised in fp32 sit within
# ~1e-7 of 1; fp16 rows within ~1e-3.
DEFAULT_NORM_TOL = 1e-3

# Bytes of one float32 score tile (query batch x gallery tile) when chunk_size is not given. GPU: 1 GiB, so a
# batch of 256 scores 1M rows per product and a batch of 1 scores a whole 10M gallery at once. CPU: 16 MiB keeps
# each tile below glibc's mmap threshold (a fresh mmap per tile would page-fault every score) and in the caches.
SCORE_TILE_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}
# The NumPy engine writes each product into a score buffer it keeps (per thread), so no tile page-faults, and its
# tiles can be wide: every tile costs a thread handoff and a pass of the selector, so fewer, wider tiles are
# cheaper. 100k x 256 (2 cores) took 1.02 times the product alone's time on 64 MiB tiles, 1.06 on 16 MiB.
NUMPY_TILE_BYTES = 64 << 20
# NumPy score tiles with at least this many scores are selected in row blocks on a thread per core: NumPy's
# partition and reductions release the GIL, and one 256 x 100k tile took 51 ms on one thread, 25 on two.
PARALLEL_SELECT_SCORES = 1 << 20
# The compiled selector's work in score-equivalents (`_NumpyOps.compiled_cost`): a score costs one element of a
# vectorised pass (~0.15 ns), each of a row's k kept items about COMPILED_ITEM_COST of them (its scan, cut and
# sort: ~0.1 us). One thread, 256 rows: 5k scores and k = 11 took 0.38 ms, k = 101 2.15 ms; 65k, 2.7 and 5.1 ms.
COMPILED_ITEM_COST = 650
# Selections of at least this much work are split over a thread per core. Just after a product one core may
# still be busy with an idle BLAS thread's spin, so a handoff pays off late: 256 x 5k right after its product
# selected k = 11 in 0.40-0.47 ms on one thread and 0.39-0.61 on two, k = 101 in 2.2 ms on one and 1.3 on two.
COMPILED_PARALLEL_SCORES = 1 << 22
# NumPy searches of at least this many multiply-adds and QUERY_BLOCK_ROWS queries per core run as one search per
# core over its block of queries, each on one BLAS thread (`_NumpyOps.query_blocks`); smaller ones as one search
# whose product uses BLAS's threads. Measured side by side on 2 idle cores against faiss: blocks took 256 queries
# over 5k rows from 0.77 to 0.96 of faiss's speed, and cost 32 queries a third (5k and 100k rows).
QUERY_BLOCK_MACS = 1 << 26
QUERY_BLOCK_ROWS = 64
# CPU searches of several queries with fewer multiply-adds (queries x rows x dim) than this run on one intra-op
# thread: below ~1G multiply-adds a product takes a few ms, and a second thread's fork/join, or its stall when the
# scheduler takes its core away, costs as much as it saves. Measured side by side on the 2-core dev machine under
# the load of other jobs: 5k x 32 and 5k x 256 (x 512) took 1.5-6x as long on two threads as on one; 100k x 256
# took half as long on a quiet machine. One query (a memory-bound matrix-vector product) gained from two threads.
CPU_ONE_THREAD_MACS = 1 << 30
# The NumPy engine (NumPy's OpenBLAS pool) keeps every thread: on idle cores two threads took half the time of one
# at every shape measured, 5k and 100k rows x 1, 32 and 256 queries (0.11 against 0.19 ms for one 5k-row query).
# On cores other processes keep busy the opposite holds for small products (that query: 4 to 7 ms on two threads),
# so a host that shares its cores can set a limit here: products below it run on one thread.
NUMPY_ONE_THREAD_MACS = 0
# A filter matching at most this fraction of the gallery is searched on a cached compacted copy of its rows;
# a broader one as a mask over the whole gallery. The copies of all cached filters stay under half the gallery.
COMPACT_FRACTION = 1 / 8
_CACHED_FILTERS = 8
# `prefilter='auto'` takes searches of several queries over at least PREFILTER_ROWS_PER_ITEM rows per item kept
# (k + 1): it halves the product's time and adds a selection and a rescoring that grow with k. One query stays in
# float32: a bfloat16 matrix-vector product gained 1.1-1.3x alone (100k and 1M rows) but swung from 0.60 to 1.30
# of the float32 engine in benchmark rounds shared with other thread pools, and lost where the gallery fits the
# caches. Measured on 2 cores of an AVX512_BF16 CPU (32 MiB L3), bfloat16 against float32 engine (speed ratio),
# k = 10 / 100:
#   10k rows x 2 / 32 / 256 queries: 1.98 / 1.64 / 1.35 and 1.60 / 0.96 / 0.69;
#   30k rows: 2.48 / 2.25 / 1.54 and 2.49 / 1.50 / 0.97; 100k rows: 3.19 / 2.18 / 1.71 and 3.12 / 1.75 / 1.26;
#   5k rows x 256: 1.02 and 0.48; 8k x 256, k = 10: 1.20; 60k x 256, k = 100: 1.30;
#   one query: 6k and 12k rows, k = 10: 0.62 and 0.35; 60k, k = 100: 1.00; 100k: 1.30 / 1.29; 1M: 1.33 / 1.10.
PREFILTER_ROWS_PER_ITEM = 512
# Galleries of dense clusters (hundreds of near-duplicates scoring within the bound of each other) leave most
# queries unsettled, and each is then searched twice: 100k rows in 200 such clusters x 256 queries took 241 ms
# through bfloat16 against 153 in float32. So after a search in which at least PREFILTER_DENSE_FRACTION of the
# queries fell back, 'auto' searches that view in float32 for the next PREFILTER_RETRY_AFTER searches, then tries
# bfloat16 again.
PREFILTER_DENSE_FRACTION = 0.25
PREFILTER_RETRY_AFTER = 32

_PAD_ID = -1
_INT64_MAX = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------------------------------------
# Device selection
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """None when torch can run a kernel on a CUDA device, else a one-line reason (for skips and logs)."""
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken CUDA library underneath it
        return f"torch is not importable ({type(exc).__name__}: {exc})"
    try:
        if not torch.cuda.is_available():
            built = "" if torch.version.cuda else " (a CPU-only build)"
            return f"torch {torch.__version__} sees no CUDA device{built}"
        # A device can be visible and still unusable (driver mismatch, exclusive mode): run one tiny kernel.
        float((torch.arange(4, device="cuda", dtype=torch.float32) * 2).sum())
    except Exception as exc:
        return f"CUDA is not usable ({type(exc).__name__}: {exc})"
    return None


def resolve_device(device: str) -> str:
    """Map "auto" | "cpu" | "cuda" to the device that will be used ("cpu" or "cuda")."""
    if device == "cpu":
        return "cpu"
    if device not in ("auto", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    reason = cuda_unavailable_reason()
    if reason is None:
        return "cuda"
    if device == "cuda":
        raise RuntimeError(f"device='cuda' was requested but {reason}; use device='cpu' or device='auto'")
    return "cpu"


def _array_module(device: str):
    """NumPy on the CPU, CuPy on the GPU: what the array-module selectors below run on."""
    if device == "cuda":
        try:
            import cupy
        except Exception as exc:
            raise RuntimeError(
                f"this top-k selector runs on CuPy on the GPU, and cupy is not importable ({exc}); "
                "use topk='torch' (the default) or install cupy for this CUDA version"
            ) from None
        return cupy
    return np


# ----------------------------------------------------------------------------------------------------------
# Array-module top-k selectors. Each returns, for every row of `scores` (B, c) (NumPy or CuPy), the column
# indices (B, k) of SOME valid top-k set in any order. The index runs them on its score tiles through DLPack
# (topk="argpartition" | "two_stage"); the exact tie rule is applied afterwards, so any valid set will do.
# `_lowest_columns_on_ties` makes such a choice canonical for callers that hold a whole score block.
# ----------------------------------------------------------------------------------------------------------


def select_argpartition(xp, scores, k: int):
    """(a) ``xp.argpartition``. NumPy's introselect is O(c) per row. CuPy's argpartition falls back to a full
    sort for k >= 1024, so on the GPU it is only a candidate for small k."""
    c = scores.shape[1]
    if k == c:
        return xp.broadcast_to(xp.arange(c), scores.shape).copy()
    # Ascending partition around position c-k: the last k columns hold the k largest scores.
    return xp.argpartition(scores, c - k, axis=1)[:, c - k :]


def select_torch(xp, scores, k: int):
    """(b) ``torch.topk`` on a zero-copy DLPack view (NumPy -> CPU tensor, CuPy -> CUDA tensor). On the GPU this
    needs a CUDA build of torch."""
    import torch

    _, idx = torch.topk(torch.from_dlpack(scores), k, dim=1, largest=True, sorted=False)  # (B, k) int64
    return xp.from_dlpack(idx)


def select_two_stage(xp, scores, k: int):
    """(c) Two-stage selection built from reductions, a compaction and a small sort (no partition kernel).

    Stage 1: split each row into >= 4k blocks and take each block's max. The k-th largest block max is a lower
    bound on the k-th largest score (the k blocks it ranks over each hold an element at least that large), so
    every top-k element survives ``scores >= threshold``. Stage 2: compact the survivors (typically a little over
    k per row) into a (B, m) array and sort only that.
    """
    b, c = scores.shape
    if k == c:
        return xp.broadcast_to(xp.arange(c), scores.shape).copy()
    block = max(1, c // (4 * k))
    n_blocks = c // block  # >= 4k >= k; a ragged tail is left out of stage 1, which only loosens the bound
    block_max = scores[:, : n_blocks * block].reshape(b, n_blocks, block).max(axis=2)  # (B, n_blocks)
    threshold = xp.sort(block_max, axis=1)[:, n_blocks - k : n_blocks - k + 1]  # (B, 1)
    survive = scores >= threshold  # (B, c), >= k True per row
    counts = survive.sum(axis=1)  # (B,)
    rows, cols = xp.nonzero(survive)  # row-major order, so each row's survivors are contiguous
    starts = xp.cumsum(counts) - counts
    slot = xp.arange(rows.shape[0]) - starts[rows]
    m = int(counts.max())
    cand_vals = xp.full((b, m), -xp.inf, dtype=scores.dtype)
    cand_cols = xp.zeros((b, m), dtype=xp.int64)
    cand_vals[rows, slot] = scores[rows, cols]
    cand_cols[rows, slot] = cols
    best = xp.argsort(-cand_vals, axis=1)[:, :k]  # padding (-inf) sorts last and is never needed: counts >= k
    return xp.take_along_axis(cand_cols, best, axis=1)


def select_groups(xp, scores, k: int):
    """(d) Group maxima, then two small partitions: the CPU's selector for wide rows (NumPy, one thread).

    With L = c // G, group l holds the G columns l, l + L, l + 2L, ...: one pass of element-wise maxima over the
    row's G contiguous slices of length L gives every group's max at once. The k groups with the largest maxima
    hold a valid top-k set: an element left out lies in a group whose max is at most each of the k chosen
    maxima, k distinct elements at least as large, so the k best scores (as values) are all among the chosen
    groups' columns. Those k*G columns, and the < G columns past G*L, are partitioned once more. Cost: one max
    pass over c, a partition over c/G and one over k*G, with G about sqrt(c/k), against a partition over all c
    for `select_argpartition` (2 to 10 times faster on 5k- to 100k-wide rows).
    """
    b, c = scores.shape
    g = int(math.isqrt(max(1, c // max(1, k))))
    n_groups = c // max(1, g)
    if g < 2 or n_groups < k:  # narrow rows: one partition is as cheap
        return select_argpartition(xp, scores, k)
    head = scores[:, : g * n_groups].reshape(b, g, n_groups)
    group_max = head.max(axis=1)  # (B, L): element-wise over g slices
    groups = select_argpartition(xp, group_max, k)  # (B, k) group numbers
    cols = (groups[:, None, :] + (n_groups * xp.arange(g))[None, :, None]).reshape(b, g * k)
    if g * n_groups < c:  # the ragged tail: always a candidate
        tail = xp.broadcast_to(xp.arange(g * n_groups, c), (b, c - g * n_groups))
        cols = xp.concatenate([cols, tail], axis=1)
    best = select_argpartition(xp, xp.take_along_axis(scores, cols, axis=1), k)
    return xp.take_along_axis(cols, best, axis=1)


def select_compiled(xp, scores, k: int):
    """(e) The compiled kernel of `mim.search.topk_kernel` (numba, host arrays only): the argument of (d) run per
    row in compiled code, with bisection instead of partitions. Several times faster than (d) on every tile
    shape measured (`benchmarks.knn_bench`), and the NumPy engine's selector wherever numba is installed."""
    if xp is not np:
        raise ValueError("topk='compiled' runs on host (NumPy) arrays only; use topk='torch' or 'auto' on the GPU")
    return topk_kernel.topk(scores, k)[1]


TOPK_METHODS: dict[str, Callable] = {
    "argpartition": select_argpartition,
    "torch": select_torch,
    "two_stage": select_two_stage,
    "groups": select_groups,
    "compiled": select_compiled,
}


def numpy_topk_method(batch: int, c: int, k: int) -> str:
    """The NumPy backend's selector for a (batch, c) score tile: the compiled kernel wherever numba is installed;
    without it, group maxima where rows are wide next to k and the tile is large, else one partition. Never
    torch.topk: handing NumPy's scores to torch makes the two libraries' thread pools compete for the cores
    (one 5k-row query took 4 ms instead of 0.1 on 2 cores)."""
    if topk_kernel.unavailable_reason() is None:
        return "compiled"
    return "groups" if c >= 16 * k and batch * c >= 1 << 16 else "argpartition"


@functools.lru_cache(maxsize=1)
def _torch_status() -> tuple[bool, bool]:
    """(torch importable, torch has a usable CUDA device)."""
    try:
        import torch
    except Exception:
        return False, False
    try:
        return True, bool(torch.cuda.is_available())
    except Exception:
        return True, False


def default_topk_method(device: str, k: int) -> str:
    """Selector of the torch engine's ``topk="auto"``: torch.topk wherever torch imports, else NumPy's
    argpartition. (The NumPy engine picks its own: `numpy_topk_method`.)

    CPU (2-core dev machine, (B, 65536) fp32 score blocks): torch.topk 0.15 / 5.6 / 44 / 158 ms against
    np.argpartition 0.9 / 23 / 190 / 203 ms for (B, k) = (1, 10) / (32, 100) / (256, 100) / (256, 1024).
    GPU: torch.topk is a radix select on the scores where they are; CuPy's argpartition sorts the whole row.
    ``benchmarks.knn_bench.bench_gpu`` times the selectors on the GPU side by side.
    """
    return "torch" if device == "cuda" or _torch_status()[0] else "argpartition"


def _lowest_columns_on_ties(xp, scores, idx):
    """Make a top-k column choice canonical: among columns tied with the k-th score, keep the lowest ones.

    Any selector may pick an arbitrary subset of the columns tied at the boundary. Rows where it took all of
    them are already canonical (cheap check: one comparison pass); only the remaining rows are recomputed.
    """
    k = idx.shape[1]
    if k == scores.shape[1]:
        return idx
    vals = xp.take_along_axis(scores, idx, axis=1)  # (B, k)
    kth = vals.min(axis=1, keepdims=True)  # (B, 1): the k-th largest score
    tied_taken = (vals == kth).sum(axis=1)
    tied_all = (scores == kth).sum(axis=1)
    rows = xp.nonzero(tied_all != tied_taken)[0]
    if rows.shape[0] == 0:
        return idx
    sub, t = scores[rows], kth[rows]
    above = sub > t
    tied = sub == t
    need = k - above.sum(axis=1, keepdims=True)
    keep = above | (tied & (xp.cumsum(tied, axis=1) <= need))  # exactly k True per row
    idx = idx.copy()
    idx[rows] = xp.nonzero(keep)[1].reshape(rows.shape[0], k)
    return idx


# ----------------------------------------------------------------------------------------------------------
# Array operations of the search core. One search algorithm (KnnIndex._scan and search) runs on these few
# operations: on torch (CPU and CUDA, the default wherever torch imports) or on NumPy (the CPU without torch,
# so that a client can search a gallery file without installing torch).
# ----------------------------------------------------------------------------------------------------------

_LOW32 = (1 << 32) - 1
_NO_CONTEXT = contextlib.nullcontext()
_NEG_INF = float("-inf")


def _row_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of up to `parts` consecutive, near-equal, non-empty ranges covering n rows."""
    parts = min(parts, n)
    if parts < 1:
        return []
    bounds = [i * n // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@functools.cache
def _cores() -> int:
    # Read once: os.cpu_count() cost ~10 us a call here, a tenth of a one-query search over 5k rows.
    return os.cpu_count() or 1


def _by_rows(fn: Callable, rows: int, workers: int) -> list:
    """fn((start, end)) for up to `workers` near-equal row ranges covering `rows`: side by side in the select pool
    when there are several, else inline. Results in row order."""
    if workers < 2 or rows < 2:
        return [fn((0, rows))]
    return [f.result() for f in [_select_pool().submit(fn, r) for r in _row_ranges(rows, workers)]]


def _in_select_pool() -> bool:
    return threading.current_thread().name.startswith("knn-select")


@functools.cache
def _select_pool():
    """Threads for row-parallel selection on NumPy score tiles (one per core; created on first use)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="knn-select")


@functools.cache
def _numpy_blas() -> tuple:
    """threadpoolctl's controllers of NumPy's BLAS (empty without threadpoolctl): how a search sets its threads."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return ()
    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    return tuple(lib for lib in libs if "numpy" in lib.filepath) or tuple(libs)


@contextlib.contextmanager
def _blas_threads(n: int | None):
    """Run the enclosed NumPy products on at most n BLAS threads (None: as configured). The pool size is one
    setting for the whole process: a search running beside this one may run on n threads too, never wrongly."""
    libs = _numpy_blas() if n is not None else ()
    before = [lib.num_threads for lib in libs]
    if not libs or all(n >= b for b in before):
        yield
        return
    for lib in libs:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, b in zip(libs, before):
            lib.set_num_threads(b)


class _NumpyOps:
    """The core's operations on NumPy arrays (host memory): the CPU's engine.

    The product runs on NumPy's BLAS (OpenBLAS in NumPy's wheels) into a score buffer kept per thread, and the
    selection on NumPy alone (`numpy_topk_method`), in row blocks on a thread per core for large tiles."""

    name = "numpy"
    tile_bytes = NUMPY_TILE_BYTES

    def __init__(self, device: str = "cpu") -> None:
        if device != "cpu":
            raise RuntimeError("the NumPy backend runs on the CPU only; use backend='torch' for device='cuda'")
        self.device = device
        self.storage_dtype = np.dtype(np.float32)
        self._scratch = threading.local()  # .buf: the float32 score buffer of this thread's searches

    # -- conversion
    def matrix(self, a: Any, dim: int, what: str) -> np.ndarray:
        if not isinstance(a, np.ndarray) and hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
            a = np.from_dlpack(a)  # a host tensor of another library; device arrays raise here
        arr = np.asarray(a)
        _check_shape(arr.ndim, tuple(arr.shape), arr.dtype.kind == "f", arr.dtype, dim, what)
        return arr

    def to_compute(self, a):
        return np.asarray(a, dtype=np.float32)

    def to_storage(self, a):
        return np.asarray(a, dtype=np.float32)

    def host(self, a) -> np.ndarray:
        return a

    def host_view(self, a) -> np.ndarray | None:
        return a

    def from_host(self, a: np.ndarray):
        return np.ascontiguousarray(a, dtype=np.float32)

    def empty_gallery(self, dim: int):
        return np.zeros((0, dim), dtype=np.float32)

    def layout(self, emb):
        # Rows (N, dim): OpenBLAS's q @ g.T on rows was as fast as on a feature-major copy for one query and
        # faster for 32 and more (see `benchmarks.knn_bench`).
        return np.ascontiguousarray(emb)

    def rows(self, a, rows: np.ndarray):
        return a[rows]

    def cat(self, parts, axis: int = 0):
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)

    def first_true(self, mask) -> int | None:
        hits = np.flatnonzero(mask)
        return int(hits[0]) if hits.size else None

    # -- search
    def threads(self, n: int | None):
        return contextlib.nullcontext() if n is None else _blas_threads(n)

    def one_thread(self, nq: int, macs: int) -> bool:
        return macs < NUMPY_ONE_THREAD_MACS

    @staticmethod
    def compiled(method: str) -> bool:
        """Whether a search with this topk setting selects with the compiled kernel."""
        return method == "compiled" or (method == "auto" and topk_kernel.unavailable_reason() is None)

    def query_blocks(self, nq: int, macs: int, method: str = "auto") -> list[tuple[int, int]] | None:
        """Row ranges of the queries, one per core, when a search is large enough to run as that many
        one-thread searches side by side (product and selection in each thread, as faiss parallelises over
        queries), else None: one search whose product uses BLAS's own threads.

        Only for the NumPy selectors, whose selection was worth spreading that way. The compiled one costs a few
        percent of the product, and one product on every BLAS thread beat one-thread products side by side:
        1M x 256 ran at 0.93-0.97 of the product alone's speed as one search, at 0.88-0.94 in query blocks."""
        workers = _cores()
        if workers < 2 or nq < QUERY_BLOCK_ROWS * workers or macs < QUERY_BLOCK_MACS or _in_select_pool():
            return None
        if self.compiled(method):
            return None
        return _row_ranges(nq, workers)

    def mm(self, q, g):
        """(b, c) float32 scores in this thread's buffer: valid until its next product."""
        b, c = q.shape[0], g.shape[0]
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.size < b * c:
            buf = self._scratch.buf = np.empty(b * c, dtype=np.float32)
        return np.matmul(q, g.T, out=buf[: b * c].reshape(b, c))

    def masked_fill(self, s, mask) -> None:
        s[:, mask] = _NEG_INF

    def topk(self, s, k: int, *, sort: bool, method: str):
        if method == "auto":
            method = numpy_topk_method(s.shape[0], s.shape[1], k)
        if method == "compiled":  # values, columns and the order come out of the kernel
            return self._compiled_topk(s, k, sort, self._workers(self.compiled_cost(*s.shape, k)))
        # One thread in a query block's own search: the pool's threads are all taken.
        workers = 1 if method == "torch" else self._workers(s.size, PARALLEL_SELECT_SCORES)
        select = TOPK_METHODS[method]
        parts = _by_rows(lambda r: np.asarray(select(np, s[r[0] : r[1]], k), dtype=np.int64), s.shape[0], workers)
        cols = parts[0] if len(parts) == 1 else np.concatenate(parts)
        vals = np.take_along_axis(s, cols, axis=1)
        if sort:
            order = np.argsort(vals, axis=1)[:, ::-1]  # descending; ties in any order (the caller checks)
            vals, cols = np.take_along_axis(vals, order, axis=1), np.take_along_axis(cols, order, axis=1)
        return vals, cols

    def running(self, rows: int, want: int, method: str):
        """The compiled selector's running top-k over a search's tiles (`topk_kernel.RunningTopk`), or None
        where the tiles are selected one by one into a candidate slab (the other selectors)."""
        return topk_kernel.RunningTopk(rows, want) if self.compiled(method) else None

    @staticmethod
    def compiled_cost(rows: int, cols: int, k: int) -> int:
        """The compiled kernel's work on (rows, cols) scores keeping k per row, in score-equivalents."""
        return rows * (cols + COMPILED_ITEM_COST * k)

    @staticmethod
    def _workers(size: int, enough: int | None = None) -> int:
        """Threads for a selection of `size` work: one per core from `enough` (default COMPILED_PARALLEL_SCORES,
        in score-equivalents) on, and one inside the select pool."""
        enough = COMPILED_PARALLEL_SCORES if enough is None else enough
        return 1 if size < enough or _in_select_pool() else _cores()

    def spread(self, fn: Callable, rows: int, work: int) -> list:
        """fn over row ranges of `rows` rows: on a thread per core when `work` (score-equivalents) pays."""
        return _by_rows(fn, rows, self._workers(work))

    def fold(self, running, s, start: int) -> None:
        # Once the bars have risen a tile costs its vectorised pass, a score-equivalent per score.
        self.spread(lambda r: running.add(s, start, r), s.shape[0], s.size)

    def finish(self, running):
        out = (np.empty((running.rows, running.k), np.float32), np.empty((running.rows, running.k), np.int64))
        work = self.compiled_cost(running.rows, 0, running.k)  # the final cut and sort of each kept item
        self.spread(lambda r: running.result(r, out), running.rows, work)
        return out

    @staticmethod
    def _compiled_topk(s, k: int, sort: bool, workers: int):
        s = np.ascontiguousarray(s, dtype=np.float32)
        vals, cols = np.empty((s.shape[0], k), np.float32), np.empty((s.shape[0], k), np.int64)
        _by_rows(lambda r: topk_kernel.select_rows(s, k, r, sort, vals, cols), s.shape[0], workers)
        return vals, cols

    def keyed_topk(self, keys, k: int, *, sort: bool):
        cols = select_argpartition(np, keys, k)
        if sort:  # keys are distinct: ascending then reversed is exactly descending
            order = np.argsort(np.take_along_axis(keys, cols, axis=1), axis=1)[:, ::-1]
            cols = np.take_along_axis(cols, order, axis=1)
        return cols

    def gather(self, a, cols):
        return np.take_along_axis(a, cols, axis=1)

    def arange(self, c: int):
        return np.arange(c, dtype=np.int64)

    def order_keys(self, scores, rows):
        bits = (scores + np.float32(0.0)).view(np.int32)
        bits = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)
        return bits.astype(np.int64) * (1 << 32) + (_LOW32 - rows)

    def flags(self, q, half: bool):
        return _query_flags(np, q, half)

    def to_host(self, *arrays):
        return list(arrays)

    # -- filters
    def codes(self, codes: np.ndarray):
        return codes

    def isin(self, codes, wanted: list[int]):
        return np.isin(codes, np.asarray(wanted, dtype=codes.dtype))

    def nonzero(self, mask) -> np.ndarray:
        return np.flatnonzero(mask)


class _TorchOps:
    """The core's operations on torch tensors, on the CPU or on one CUDA device."""

    name = "torch"

    def __init__(self, device: str = "cpu") -> None:
        import torch

        self.torch = torch
        self.device = device
        # An explicit device index: "cuda" alone would follow whatever device is current at each later call.
        self.tdevice = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        self.tdtype = torch.float16 if device == "cuda" else torch.float32
        self.storage_dtype = np.dtype(np.float16 if device == "cuda" else np.float32)
        self._numpy_floats = (torch.float16, torch.float32, torch.float64)

    # -- conversion
    def matrix(self, a: Any, dim: int, what: str):
        """A NumPy array (or list), a CuPy array (or another DLPack producer) or a torch tensor -> a torch
        tensor where the data is, without a copy where possible; checked 2-D (n, dim) and real float."""
        torch = self.torch
        if isinstance(a, torch.Tensor):
            t = a
        elif not isinstance(a, np.ndarray) and hasattr(a, "__dlpack__"):
            t = torch.from_dlpack(a)  # CuPy: shares the device memory
        else:
            arr = np.asarray(a)
            _check_shape(arr.ndim, tuple(arr.shape), arr.dtype.kind == "f", arr.dtype, dim, what)
            return torch.from_numpy(np.ascontiguousarray(arr))
        _check_shape(t.ndim, tuple(t.shape), t.is_floating_point(), t.dtype, dim, what)
        return t

    def to_compute(self, t):
        return t.to(self.tdevice, self.torch.float32)

    def to_storage(self, t):
        return t.to(self.tdevice, self.tdtype)

    def host(self, t) -> np.ndarray:
        return t.cpu().numpy()

    def from_host(self, a: np.ndarray):
        t = self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        return t if self.device == "cpu" else t.to(self.tdevice, self.tdtype)

    def host_view(self, t) -> np.ndarray | None:
        """A NumPy view of a host tensor that NumPy can represent, else None (device tensors, bfloat16)."""
        if t.device.type == "cpu" and t.dtype in self._numpy_floats:
            return t.detach().numpy()
        return None

    def empty_gallery(self, dim: int):
        return self.torch.zeros((0, dim), dtype=self.tdtype, device=self.tdevice)

    def layout(self, emb):
        return _gallery_layout(emb)

    def rows(self, t, rows: np.ndarray):
        return t[self.index(rows)]

    def index(self, rows: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.tdevice)

    def cat(self, parts, axis: int = 0):
        return parts[0] if len(parts) == 1 else self.torch.cat(parts, dim=axis)

    def first_true(self, mask) -> int | None:
        hits = self.torch.nonzero(mask).flatten()
        return int(hits[0]) if hits.numel() else None

    # -- search
    def threads(self, n: int | None):
        if n is None or self.device != "cpu":
            return _NO_CONTEXT
        return _cpu_threads(self.torch, n)

    def one_thread(self, nq: int, macs: int) -> bool:
        return 1 < nq and macs < CPU_ONE_THREAD_MACS

    def query_blocks(self, nq: int, macs: int, method: str = "auto") -> None:
        return None  # torch parallelises inside its own ops

    def mm(self, q, g):
        return _scores(self.torch, q, g) if self.device == "cuda" else self.torch.mm(q, g.T)

    def masked_fill(self, s, mask) -> None:
        s.masked_fill_(mask, _NEG_INF)

    def topk(self, s, k: int, *, sort: bool, method: str):
        torch = self.torch
        if method == "auto":
            method = default_topk_method(self.device, k)
        if method == "torch":
            return torch.topk(s, k, dim=1, sorted=sort)
        xp = _array_module(self.device)  # an array-module selector on a zero-copy view of the tile
        block = s.numpy() if xp is np else xp.from_dlpack(s)
        cols = TOPK_METHODS[method](xp, block, k)
        cols = (torch.from_numpy(np.ascontiguousarray(cols)) if xp is np else torch.from_dlpack(cols)).long()
        vals = s.gather(1, cols)
        if sort:
            vals, j = torch.sort(vals, dim=1, descending=True)
            cols = cols.gather(1, j)
        return vals, cols

    def running(self, rows: int, want: int, method: str) -> None:
        return None  # torch selects each tile into the candidate slab

    def keyed_topk(self, keys, k: int, *, sort: bool):
        return self.torch.topk(keys, k, dim=1, sorted=sort)[1]

    def gather(self, t, cols):
        return t.gather(1, cols)

    def arange(self, c: int):
        return self.torch.arange(c, device=self.tdevice)

    def order_keys(self, scores, rows):
        torch = self.torch
        bits = (scores + 0.0).view(torch.int32)
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return bits.to(torch.int64) * (1 << 32) + (_LOW32 - rows)

    def flags(self, q, half: bool):
        return _query_flags(self.torch, q, half)

    def to_host(self, *tensors):
        """Device tensors (each (Q,) or (Q, w), float32 / int64 / bool) -> host arrays. From a GPU they
        travel packed as one int64 tensor in ONE copy (one synchronisation); on the CPU they are views."""
        torch = self.torch
        if self.device == "cpu":
            return [t.numpy() for t in tensors]
        cols = [(t if t.ndim == 2 else t[:, None]) for t in tensors]
        ints = [c.view(torch.int32).long() if c.dtype == torch.float32 else c.long() for c in cols]
        host = torch.cat(ints, dim=1).cpu().numpy()
        out, at = [], 0
        for t, c in zip(tensors, cols):
            part = host[:, at : at + c.shape[1]]
            at += c.shape[1]
            if t.dtype == torch.float32:
                part = part.astype(np.int32).view(np.float32)
            elif t.dtype == torch.bool:
                part = part != 0
            out.append(part if t.ndim == 2 else part[:, 0])
        return out

    # -- filters
    def codes(self, codes: np.ndarray):
        return self.torch.from_numpy(codes).to(self.tdevice)

    def isin(self, codes, wanted: list[int]):
        return self.torch.isin(codes, self.torch.tensor(wanted, dtype=codes.dtype, device=self.tdevice))

    def nonzero(self, mask) -> np.ndarray:
        return self.torch.nonzero(mask).flatten().cpu().numpy()


def _ops(backend: str, device: str):
    if backend == "auto":
        backend = default_backend(device)
    if backend == "torch":
        if not _torch_status()[0]:
            raise RuntimeError("backend='torch' was requested but torch is not importable; use backend='numpy'")
        return _TorchOps(device)
    if backend == "numpy":
        return _NumpyOps(device)
    raise ValueError(f"backend must be 'auto', 'torch' or 'numpy'; got {backend!r}")


def default_backend(device: str) -> str:
    """The engine of ``backend="auto"``: torch on the GPU, NumPy on the CPU.

    On the CPU NumPy's own BLAS product beat torch's at every shape measured side by side (5k and 100k rows x
    512, 1 to 256 queries; e.g. 0.08 against 0.25 ms for one query over 5k rows), and a search that stays in
    one library keeps one thread pool on the cores (`benchmarks/results/knn_cpu`)."""
    return "torch" if device == "cuda" else "numpy"


def _query_flags(xp, q, half: bool):
    """(Q,) int64 per query row (xp: NumPy or torch): 0 ok, 1 holds NaN/inf, 2 beyond FP16's range."""
    flags = ~xp.isfinite(q).all(1)
    flags = flags.astype(np.int64) if xp is np else flags.long()
    if half:
        flags = xp.where((flags == 0) & (abs(q) > 65504).any(1), 2, flags)
    return flags


def _gallery_layout(emb):
    """The (N, dim) gallery in the memory layout its products are fastest on. CPU: feature-major, a transposed
    view of a contiguous (dim, N) tensor: MKL's product with one query ran 2x faster on it than on (N, dim)
    rows (0.45 against 1.0 ms for 5k x 512 on the 2-core dev machine; even at 32 and 256 queries). GPU: rows,
    so that both operands of the FP16 product are contiguous along dim, the tensor cores' native layout."""
    if emb.device.type == "cpu":
        return emb.T.contiguous().T
    return emb.contiguous()


@contextlib.contextmanager
def _cpu_threads(torch, n: int | None):
    """Run the enclosed torch ops on at most n intra-op threads (None: as configured). torch keeps the count
    for the calling thread (OpenMP's and MKL's settings are per thread) and restores it afterwards."""
    before = torch.get_num_threads()
    if n is None or n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _fp32_out_supported(torch, device) -> bool:
    """Whether torch.mm takes FP16 operands with an FP32 result (``out_dtype``; CUDA builds of torch >= 2.8)."""
    a = torch.ones((2, 8), dtype=torch.float16, device=device)
    try:
        return torch.mm(a, a.T, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _scores(torch, q, g):
    """(b, c) float32 = q (b, d) @ g (c, d).T. FP16 operands (the GPU) run on tensor cores with FP32
    accumulation and an FP32 result; where torch lacks that, the tile is upcast to FP32 first."""
    if g.dtype == torch.float16:
        if _fp32_out_supported(torch, g.device):
            return torch.mm(q, g.T, out_dtype=torch.float32)
        return torch.mm(q.float(), g.T.float())
    return torch.mm(q, g.T)


@dataclass(frozen=True)
class _View:
    """The rows a search scans: the gallery, or for a category filter the gallery with the other rows
    ``blocked`` (a device mask), or a compacted copy of the matching rows (``rows``: their gallery rows)."""

    emb: Any  # (m, dim) on the device; None when nothing matches
    n_match: int  # items the filter lets through
    blocked: Any = None  # (m,) bool, True = excluded
    rows: np.ndarray | None = None  # (m,) gallery row of each compacted row, ascending
    # "bf16": its `prefilter.Shadow`, made on first use; "dense": float32 searches left after many fell back
    shadow: dict = field(default_factory=dict, compare=False)

    @property
    def compact_rows(self) -> int:
        return 0 if self.rows is None else int(self.rows.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Input validation: public, so every store (mim.search.stores) refuses the same input with the same words
# ----------------------------------------------------------------------------------------------------------


def check_ids(ids: Any, what: str = "ids") -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D; got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"{what} must be integers (int64 ids); got dtype {arr.dtype}. Convert with np.asarray(ids, dtype=np.int64)."
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _INT64_MAX):
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise ValueError(f"{what} must lie in [0, 2**63-1] (-1 marks padding in search results); got {bad}")
    arr = arr.astype(np.int64, copy=False)
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.size != arr.size:
        raise ValueError(f"duplicate id {int(uniq[counts > 1][0])} in {what}; each id must appear once")
    return arr


def _first_true(xp, mask) -> int | None:
    hits = xp.nonzero(mask)[0]
    return int(hits[0]) if hits.shape[0] else None


def _check_shape(ndim: int, shape: tuple, is_float: bool, dtype: Any, dim: int, what: str) -> None:
    if ndim != 2:
        raise ValueError(f"{what} must be 2-D (n, {dim}); got shape {shape}. For a single vector pass x[None, :].")
    if not is_float:
        raise TypeError(f"{what} must be a float array; got dtype {dtype}")
    if shape[1] != dim:
        raise ValueError(
            f"{what} have dim {shape[1]}, expected {dim} (the index dim); check the embedding model matches the index"
        )


def check_matrix(xp, a: Any, dim: int, what: str):
    """Common checks for embeddings and queries: real float, 2-D (n, dim), finite. Returns an xp array."""
    arr = xp.asarray(a)
    _check_shape(arr.ndim, tuple(arr.shape), arr.dtype.kind == "f", arr.dtype, dim, what)
    row = _first_true(xp, ~xp.isfinite(arr).all(axis=1))
    if row is not None:
        raise ValueError(f"{what} row {row} contains NaN or inf; only finite values can be searched")
    return arr


def check_metadata(metadata: Any, n: int) -> list[dict]:
    if metadata is None:
        return [{} for _ in range(n)]
    if isinstance(metadata, Mapping) or not isinstance(metadata, Sequence):
        raise TypeError(f"metadata must be a list of dicts (one per id); got {type(metadata).__name__}")
    if len(metadata) != n:
        raise ValueError(f"metadata has {len(metadata)} entries but {n} ids were given; pass one dict per id")
    out = []
    for i, m in enumerate(metadata):
        if not isinstance(m, Mapping):
            raise TypeError(f"metadata[{i}] must be a dict; got {type(m).__name__}")
        try:  # the JSON round trip both validates and deep-copies (tuples become lists)
            out.append(json.loads(json.dumps(dict(m), allow_nan=False)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata[{i}] is not JSON-serialisable: {exc}") from None
        cat = out[-1].get("category")
        if cat is not None and not isinstance(cat, str):
            raise TypeError(f"metadata[{i}]['category'] must be a str; got {type(cat).__name__}")
    return out


def check_categories(categories: str | Iterable[str]) -> set[str]:
    if isinstance(categories, str):
        return {categories}
    cats = set(categories)
    bad = [c for c in cats if not isinstance(c, str)]
    if bad:
        raise TypeError(f"categories must be a str or a set of str; got element {bad[0]!r}")
    return cats


# ----------------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------------


PREFILTER_MODES = ("auto", "bf16", "off")


def _check_prefilter(mode: str, engine: str) -> str:
    """The mode an index runs: 'auto' turns 'off' where the bfloat16 search cannot run; 'bf16' is refused there."""
    if mode not in PREFILTER_MODES:
        raise ValueError(f"prefilter must be one of {PREFILTER_MODES}; got {mode!r}")
    if mode == "off":
        return mode
    why = f"it runs on the NumPy engine, not {engine}" if engine != "numpy" else prefilter.unavailable_reason()
    if why is None:
        return mode
    if mode == "auto":
        return "off"
    raise ValueError(f"prefilter={mode!r} cannot be used: {why}; use prefilter='auto' or 'off'")


def prefilter_gains(nq: int, m: int, k: int) -> bool:
    """Whether `prefilter='auto'` searches nq queries for their top k over m rows through bfloat16: where the CPU
    has bfloat16 dot instructions, nq >= 2 and m >= `PREFILTER_ROWS_PER_ITEM` (k + 1)."""
    return nq >= 2 and m >= PREFILTER_ROWS_PER_ITEM * (k + 1) and prefilter.cpu_has_bf16_dot()


class KnnIndex:
    """Exact inner-product top-k index over L2-normalised embeddings with int64 ids and per-item metadata.

    Args:
        dim: embedding width.
        device: "cpu" (float32 storage), "cuda" (float16 storage on the current CUDA device, FP32 accumulation)
            or "auto" (cuda when torch can run on a CUDA device, else cpu).
        chunk_size: gallery rows per score tile; None (the default) picks as many as keep one float32 score
            tile of a query batch within `SCORE_TILE_BYTES`.
        model_id: the embedding model the gallery came from; checked by ``load(expected_model_id=...)``.
        topk: the per-tile candidate selector: "auto" (`numpy_topk_method` on the NumPy engine,
            `default_topk_method` on torch), "torch", or the array-module selectors "argpartition", "groups" and
            "two_stage" (NumPy on the CPU, CuPy on the GPU, through DLPack).
        query_batch_size: queries scored per product.
        backend: "auto" (`default_backend`: NumPy on the CPU, torch on the GPU), "torch" or "numpy" (CPU only).
            Both run the same search with the same results; NumPy also lets a client search without torch.
        prefilter: the NumPy engine's bfloat16 candidate search (`mim.search.prefilter`), same results: "auto"
            (where the CPU has bfloat16 dot instructions and the search is large enough to gain,
            `prefilter_gains`), "bf16" (every search it can take), or "off". It keeps a bfloat16 copy of the
            gallery, made on first use: half the float32 gallery's memory.

    Not safe for concurrent mutation and search from several threads.
    """

    def __init__(
        self,
        dim: int,
        *,
        device: str = "auto",
        chunk_size: int | None = None,
        model_id: str | None = None,
        topk: str = "auto",
        query_batch_size: int = 256,
        backend: str = "auto",
        prefilter: str = "auto",
    ) -> None:
        for name, value in (("dim", dim), ("chunk_size", chunk_size), ("query_batch_size", query_batch_size)):
            if name == "chunk_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if model_id is not None and not isinstance(model_id, str):
            raise TypeError(f"model_id must be a str or None; got {type(model_id).__name__}")
        if topk != "auto" and topk not in TOPK_METHODS:
            raise ValueError(f"topk must be 'auto' or one of {sorted(TOPK_METHODS)}; got {topk!r}")
        self._dim = int(dim)
        self._device = resolve_device(device)
        if topk == "compiled" and (self._device != "cpu" or topk_kernel.unavailable_reason() is not None):
            why = topk_kernel.unavailable_reason() or f"it runs on host arrays, and this index is on {self._device}"
            raise ValueError(f"topk='compiled' cannot be used: {why}; use topk='auto'")
        self._ops = _ops(backend, self._device)
        self._dtype = self._ops.storage_dtype
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.query_batch_size = int(query_batch_size)
        self.topk = topk
        self.prefilter = _check_prefilter(prefilter, self._ops.name)
        self._shadow_lock = threading.Lock()
        self._model_id = model_id
        # Rows are kept sorted by id so that "ties by ascending id" is "ties by ascending row".
        self._ids = np.zeros(0, dtype=np.int64)  # (N,) host
        self._emb = self._ops.empty_gallery(self._dim)  # (N, dim) on the device, see `_gallery_layout`
        self._meta: dict[int, dict] = {}  # id -> metadata; items without metadata are absent
        self._cat_codes = np.zeros(0, dtype=np.int32)  # (N,) code of metadata["category"], -1 for none
        self._cat_vocab: dict[str, int] = {}
        self._codes_on_device: Any = None  # (N,) int32 copy of _cat_codes, made on first filter
        self._views: dict[frozenset[int], _View] = {}  # filter (category codes) -> rows to scan, LRU order
        self._views_lock = threading.Lock()
        self._all_rows = _View(self._emb, 0)  # the view without a filter

    # ---- properties -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def __repr__(self) -> str:
        return (
            f"KnnIndex(dim={self._dim}, n={len(self)}, device={self._device!r}, dtype={self._dtype}, "
            f"model_id={self._model_id!r})"
        )

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def device(self) -> str:
        """The resolved device: "cpu" or "cuda"."""
        return self._device

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype of the gallery: float32 on the CPU, float16 on the GPU."""
        return self._dtype

    @property
    def model_id(self) -> str | None:
        return self._model_id

    @property
    def ids(self) -> np.ndarray:
        """All ids, ascending (a copy)."""
        return self._ids.copy()

    def get_metadata(self, id: int) -> dict:
        """A copy of the metadata dict stored for ``id`` ({} if none was given). Unknown id -> KeyError."""
        key = int(id)
        pos = int(np.searchsorted(self._ids, key))
        if pos >= len(self) or self._ids[pos] != key:
            raise KeyError(f"id {key} is not in the index")
        return json.loads(json.dumps(self._meta.get(key, {})))

    def embeddings(self) -> np.ndarray:
        """Stored embeddings on the host, rows in ascending-id order (matching ``ids``), storage dtype."""
        return self._ops.host(self._emb).copy()

    # ---- mutation ---------------------------------------------------------------------------------------

    def add(
        self,
        ids: Any,
        embeddings: Any,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        *,
        normalize: bool = False,
        norm_tol: float = DEFAULT_NORM_TOL,
    ) -> None:
        """Add items.

        Args:
            ids: (n,) non-negative integers, unique within the call and not already in the index.
            embeddings: (n, dim) float array: NumPy, CuPy or a torch tensor on any device. Rows must be unit
                norm within ``norm_tol`` unless ``normalize=True``, in which case they are divided by their norm
                here (an all-zero row is then an error).
            metadata: optional list of n JSON-serialisable dicts (e.g. title, category, image_path). The
                ``category`` key, if present, is what ``search(categories=...)`` filters on.
        """
        ops = self._ops
        ids = check_ids(ids)
        emb = ops.to_compute(ops.matrix(embeddings, self._dim, "embeddings"))  # float32 on the device
        row = ops.first_true(~(abs(emb) < float("inf")).all(1))
        if row is not None:
            raise ValueError(f"embeddings row {row} contains NaN or inf; only finite values can be searched")
        if emb.shape[0] != ids.shape[0]:
            raise ValueError(f"got {ids.shape[0]} ids but {emb.shape[0]} embedding rows; pass one row per id")
        metas = check_metadata(metadata, ids.shape[0])
        if ids.size == 0:
            return
        clash = ids[np.isin(ids, self._ids)]
        if clash.size:
            raise ValueError(f"id {int(clash[0])} is already in the index; remove it first or use a new id")
        emb = self._normalised_rows(emb, normalize, norm_tol)  # norms in fp32, also for fp16 input

        all_ids = np.concatenate([self._ids, ids])
        all_emb = ops.cat([self._emb, ops.to_storage(emb)])
        codes = np.array([self._category_code(m.get("category")) for m in metas], dtype=np.int32)
        all_codes = np.concatenate([self._cat_codes, codes])
        if all_ids.size > 1 and not bool((all_ids[1:] > all_ids[:-1]).all()):
            order = np.argsort(all_ids, kind="stable")
            all_ids, all_codes = all_ids[order], all_codes[order]
            all_emb = ops.rows(all_emb, order)
        self._set_rows(all_ids, all_emb, all_codes)
        for i, m in zip(ids.tolist(), metas):
            if m:
                self._meta[i] = m

    def _set_rows(self, ids: np.ndarray, emb: Any, codes: np.ndarray) -> None:
        self._ids, self._emb, self._cat_codes = ids, self._ops.layout(emb), codes
        self._all_rows = _View(self._emb, len(ids))
        self._codes_on_device = None  # filters are rebuilt for the new rows
        self._views.clear()

    def _normalised_rows(self, emb: Any, normalize: bool, norm_tol: float) -> Any:
        norms = (emb * emb).sum(1) ** 0.5  # (n,)
        if normalize:
            row = self._ops.first_true(norms == 0)
            if row is not None:
                raise ValueError(f"embeddings row {row} is all zeros and cannot be normalised")
            return emb / norms[:, None]
        row = self._ops.first_true(abs(norms - 1) > norm_tol)
        if row is not None:
            raise ValueError(
                f"embeddings row {row} has L2 norm {float(norms[row]):.6g}; expected unit norm "
                f"(|norm - 1| <= {norm_tol:g}). Normalise rows first or pass normalize=True."
            )
        return emb

    def _category_code(self, category: str | None) -> int:
        if category is None:
            return -1
        return self._cat_vocab.setdefault(category, len(self._cat_vocab))

    def remove(self, ids: Any) -> None:
        """Remove items by id. An id not in the index raises KeyError naming it (nothing is removed then)."""
        ids = check_ids(ids)
        if ids.size == 0:
            return
        n = len(self)
        pos = np.searchsorted(self._ids, ids)
        found = np.zeros(ids.shape, dtype=bool)
        inside = pos < n
        found[inside] = self._ids[pos[inside]] == ids[inside]
        if not found.all():
            missing = int(ids[~found][0])
            raise KeyError(f"id {missing} is not in the index; nothing was removed")
        keep = np.ones(n, dtype=bool)
        keep[pos] = False
        rows = np.nonzero(keep)[0]
        self._set_rows(self._ids[rows], self._ops.rows(self._emb, rows), self._cat_codes[rows])
        for i in ids.tolist():
            self._meta.pop(i, None)

    # ---- search -----------------------------------------------------------------------------------------

    def search(
        self, queries: Any, k: int, *, categories: str | Iterable[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product.

        Args:
            queries: (Q, dim) float array (NumPy, CuPy or a torch tensor on any device); need not be normalised
                (inner product is what is ranked).
            k: 1 <= k <= len(index).
            categories: optional str or set of str; only items whose metadata["category"] is one of them are
                returned. If fewer than k items match, trailing columns hold id -1 and score -inf.

        Returns:
            host arrays: scores float32 (Q, k) descending and ids int64 (Q, k); equal scores ordered by
            ascending id.
        """
        n = len(self)
        if n == 0:
            raise ValueError("the index is empty; add items before searching")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int; got {k!r}")
        k = int(k)
        if k > n:
            raise ValueError(
                f"k={k} is larger than the index ({n} items); expected 1 <= k <= {n}. Lower k or add items."
            )
        q, flags = self._queries(queries)
        view = self._view(categories)
        nq = q.shape[0]
        if view.emb is None or nq == 0:  # nothing matches the filter (or no query): all padding
            if flags is not None:
                self._raise_for_bad_queries(self._ops.host(flags))
            return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), _PAD_ID, dtype=np.int64)

        ops = self._ops
        macs = nq * view.emb.shape[0] * self._dim
        threads = 1 if ops.one_thread(nq, macs) else None
        blocks = ops.query_blocks(nq, macs, self.topk) if threads is None else None
        if self._prefilter_applies(q, k, view):  # candidates by a bfloat16 product, ranked in float32
            with ops.threads(threads):  # BLAS: the float32 search of queries the bound cannot settle
                vals, rows = self._scan_prefiltered(q, k, view)
        elif blocks is not None:  # each block of queries searched whole in its own thread, one BLAS thread each
            with ops.threads(1):
                parts = [_select_pool().submit(self._scan, q[a:b], k, view, exact=False) for a, b in blocks]
                done = [f.result() for f in parts]
            vals, rows = ops.cat([v for v, _ in done]), ops.cat([r for _, r in done])
        else:
            with ops.threads(threads):
                vals, rows = self._scan(q, k, view, exact=False)  # (Q, min(k+1, m)) by score, best first
        checks = [] if flags is None else [flags]  # device queries: their check travels with the results
        pos, scores, *bad = ops.to_host(rows, vals, *checks)  # the one copy out: (Q, k+1) and the checks
        if bad:
            self._raise_for_bad_queries(bad[0])
        # A row is exact unless two of its k+1 best scores tie (ties at -inf are excluded rows and padding).
        # - A tie of the k-th and (k+1)-th candidates: which of the tied items are in the top k, and which a tile
        #   kept at its boundary, was the selector's choice. Those rows are searched again with the exact rule.
        # - A tie above it: every item with that score is among the candidates (fewer than k+1 score at least as
        #   much, in the whole gallery and so in every tile), so only their order was the selector's: sorted here
        #   by (score, row). With k = 100 most batches of float32 scores have such a tie somewhere.
        w = min(k, scores.shape[1])
        redo = inner = ()
        if not (scores[:, :-1] > scores[:, 1:]).all():  # some row has ties (or -inf padding)
            tied = (scores[:, 1:] == scores[:, :-1]) & (scores[:, 1:] > -np.inf)  # column j: j ties j + 1
            boundary = tied[:, w - 1] if scores.shape[1] > w else np.zeros(nq, dtype=bool)
            redo = np.flatnonzero(boundary)
            inner = np.flatnonzero(tied[:, : w - 1].any(axis=1) & ~boundary)
        pos, scores = pos[:, :w], scores[:, :w]
        if len(inner):
            order = np.lexsort((pos[inner], -scores[inner]), axis=-1)  # score descending, then row ascending
            scores, pos = scores.copy(), pos.copy()
            scores[inner] = np.take_along_axis(scores[inner], order, axis=1)
            pos[inner] = np.take_along_axis(pos[inner], order, axis=1)
        if len(redo):  # only rows tied at the boundary pay for the exact rule: a second pass by (score, row) keys
            with ops.threads(threads):
                v2, r2 = self._scan(ops.rows(q, redo), k, view, exact=True)
            v2, r2 = ops.to_host(v2, r2)
            scores, pos = scores.copy(), pos.copy()
            scores[redo], pos[redo] = v2, r2
        if w < k:  # a compacted filter view holds fewer than k rows
            scores = np.concatenate([scores, np.full((nq, k - w), -np.inf, dtype=np.float32)], axis=1)
            pos = np.concatenate([pos, np.full((nq, k - w), _PAD_ID, dtype=np.int64)], axis=1)
        if view.rows is not None:
            pos = np.where(pos >= 0, view.rows[np.maximum(pos, 0)], _PAD_ID)
        if view.n_match < k or w < k:
            ids = np.where(pos >= 0, self._ids[np.maximum(pos, 0)], _PAD_ID)
            # Columns past the number of matching items hold padding or rows the filter excluded; both already
            # score -inf, and the excluded rows' ids must not leak out.
            ids[:, view.n_match :] = _PAD_ID
        else:
            ids = self._ids[pos]
        return np.ascontiguousarray(scores, dtype=np.float32), ids

    def _queries(self, queries: Any) -> tuple[Any, Any]:
        """Queries on the device in the gallery's dtype, checked where they are: host queries now, device
        queries by a (Q,) flag per row (0 ok, 1 NaN/inf, 2 beyond FP16's range) that travels back with the
        results, so that the check does not synchronise with the device."""
        ops = self._ops
        half = self._dtype == np.float16
        if isinstance(queries, np.ndarray) and queries.dtype == np.float32 and queries.ndim == 2:
            t = host = queries  # the usual input: no conversion before the checks
            _check_shape(2, queries.shape, True, queries.dtype, self._dim, "queries")
        else:
            t = ops.matrix(queries, self._dim, "queries")
            host = ops.host_view(t)
        if host is not None:
            # One reduction when all is well (the usual case); the per-row flags only to name the bad row.
            if not np.isfinite(host).all() or (half and np.abs(host).max() > 65504):
                self._raise_for_bad_queries(_query_flags(np, host, half))
            return ops.from_host(host), None
        t = ops.to_compute(t)
        return ops.to_storage(t), ops.flags(t, half)

    def _raise_for_bad_queries(self, flags: np.ndarray) -> None:
        if not flags.any():
            return
        row = int(np.flatnonzero(flags)[0])
        if flags[row] == 1:
            raise ValueError(f"queries row {row} contains NaN or inf; only finite values can be searched")
        raise ValueError(
            f"queries row {row} has values beyond the FP16 range (|x| > 65504) of the GPU gallery; scale the "
            "queries down (a positive scale does not change the ranking) or use device='cpu'"
        )

    def _tile_rows(self, batch: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        budget = getattr(self._ops, "tile_bytes", None) or SCORE_TILE_BYTES[self._device]
        return max(1, budget // (4 * batch))

    def _scan(self, q: Any, k: int, view: _View, *, exact: bool) -> tuple[Any, Any]:
        """Device arrays (Q, w) of scores and view rows: each query's w best candidates, best first.

        Fast (exact=False): w = min(k+1, m), ordered by score; each tile is one product and one selection into
        the candidate slab, then one selection over the slab. Among tied scores both the order and, at a
        tile's boundary, which tied items were kept are the selector's choice. Exact: w = min(k, m), ordered by
        (score desc, row asc): every tile ranks by `order_keys`, which have no ties."""
        ops = self._ops
        emb, blocked = view.emb, view.blocked
        m = emb.shape[0]
        want = min(k if exact else k + 1, m)
        out_v, out_r = [], []
        for qs in range(0, q.shape[0], self.query_batch_size):
            qb = q if q.shape[0] <= self.query_batch_size else q[qs : qs + self.query_batch_size]
            tile = self._tile_rows(qb.shape[0])
            # One tile: one selection call. Several: a running top-k per query across them (compiled selector).
            running = None if exact or tile >= m else ops.running(qb.shape[0], want, self.topk)
            slab_v, slab_r = [], []
            for start in range(0, m, tile):
                s = ops.mm(qb, emb if tile >= m else emb[start : start + tile])  # (b, c) float32
                c = s.shape[1]
                if blocked is not None:
                    ops.masked_fill(s, blocked[start : start + c])
                if running is not None:  # no slab: each row's running best, with a bar that rises
                    ops.fold(running, s, start)
                    continue
                kt = min(want, c)
                if exact:
                    i = ops.keyed_topk(ops.order_keys(s, ops.arange(c)), kt, sort=False)
                    v = ops.gather(s, i)
                else:
                    v, i = ops.topk(s, kt, sort=c >= m, method=self.topk)  # one tile: the final selection
                slab_v.append(v)
                slab_r.append(i + start if start else i)
            if running is not None:
                v, r = ops.finish(running)
            else:
                v, r = ops.cat(slab_v, axis=1), ops.cat(slab_r, axis=1)
            if exact:
                j = ops.keyed_topk(ops.order_keys(v, r), want, sort=True)
                v, r = ops.gather(v, j), ops.gather(r, j)
            elif len(slab_v) > 1 and running is None:
                v, j = ops.topk(v, want, sort=True, method="torch" if ops.name == "torch" else self.topk)
                r = ops.gather(r, j)
            out_v.append(v)
            out_r.append(r)
        return ops.cat(out_v), ops.cat(out_r)

    def _prefilter_applies(self, q: Any, k: int, view: _View) -> bool:
        if self.prefilter == "off":
            return False
        if self.prefilter == "auto":
            if not prefilter_gains(q.shape[0], view.emb.shape[0], k):
                return False
            if view.shadow.get("dense", 0) > 0:  # recent searches of this view mostly fell back
                view.shadow["dense"] -= 1
                return False
        return prefilter.applies(q)

    def _scan_prefiltered(self, q: np.ndarray, k: int, view: _View) -> tuple[np.ndarray, np.ndarray]:
        """`_scan`'s fast result, (Q, min(k+1, m)), through `prefilter.scan`; queries it cannot settle (dense
        clusters of near-equal scores) are searched again by `_scan`."""
        shadow = self._shadow(view)
        kk = min(k + 1, view.emb.shape[0])
        out_v, out_r, again = [], [], 0
        for qs in range(0, q.shape[0], self.query_batch_size):
            qb = q[qs : qs + self.query_batch_size]
            tile = self._tile_rows(qb.shape[0])
            v, r, done = prefilter.scan(self._ops, qb, kk, view.emb, view.blocked, shadow, tile)
            if not done.all():
                redo = np.flatnonzero(~done)
                v[redo], r[redo] = self._scan(qb[redo], k, view, exact=False)
                again += len(redo)
            out_v.append(v)
            out_r.append(r)
        if again >= PREFILTER_DENSE_FRACTION * q.shape[0]:
            view.shadow["dense"] = PREFILTER_RETRY_AFTER
        return self._ops.cat(out_v), self._ops.cat(out_r)

    def _shadow(self, view: _View) -> prefilter.Shadow:
        with self._shadow_lock:  # searches from several threads make one copy
            shadow = view.shadow.get("bf16")
            if shadow is None:
                shadow = view.shadow["bf16"] = prefilter.Shadow.of(view.emb)
            return shadow

    def warm_up(self) -> None:
        """Compile the CPU's kernels and make the gallery's bfloat16 copy now where searches may use it, so that
        a server's first request does not pay for them (seconds the first time on a machine, about a second for
        the copy of 1M x 512)."""
        if self._device != "cpu" or not topk_kernel.warm_up():
            return
        may_use = self.prefilter == "auto" and prefilter_gains(2, len(self), 1)
        if len(self) and (self.prefilter == "bf16" or may_use):
            self._shadow(self._all_rows)

    def _view(self, categories: str | Iterable[str] | None) -> _View:
        """The rows a filter lets through, cached per set of categories until the gallery changes. Building a
        filter's view reads its match count back from the device once."""
        n = len(self)
        if categories is None:
            return self._all_rows
        codes = frozenset(self._cat_vocab[c] for c in check_categories(categories) if c in self._cat_vocab)
        with self._views_lock:  # searches from several threads share the cache
            cached = self._views.pop(codes, None)
            view = cached if cached is not None else self._build_view(codes)
            self._views[codes] = view  # most recently used last
            while len(self._views) > _CACHED_FILTERS or sum(v.compact_rows for v in self._views.values()) > n // 2:
                oldest = next(iter(self._views))
                if oldest == codes:
                    break
                del self._views[oldest]
        return view

    def _build_view(self, codes: frozenset[int]) -> _View:
        ops, n = self._ops, len(self)
        if not codes:
            return _View(None, 0)
        if self._codes_on_device is None:
            self._codes_on_device = ops.codes(self._cat_codes)
        allowed = ops.isin(self._codes_on_device, sorted(codes))  # (N,) bool on the device
        n_match = int(allowed.sum())
        if n_match == 0:
            return _View(None, 0)
        if n_match == n:
            return _View(self._emb, n)
        if n_match <= n * COMPACT_FRACTION:
            rows = ops.nonzero(allowed)  # ascending, so ties still go to the lower gallery row
            return _View(ops.layout(ops.rows(self._emb, rows)), n_match, rows=rows)
        return _View(self._emb, n_match, blocked=~allowed)

    # ---- persistence ------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ONE safetensors file atomically (temp file + fsync + os.replace + dir fsync).

        A crash at any point leaves either the previous file or the new one at ``path``, never a mix, and the
        temp file is removed on failure.
        """
        path = Path(path)
        emb = np.ascontiguousarray(self._ops.host(self._emb))
        ids = np.ascontiguousarray(self._ids)
        items = [self._meta.get(i, {}) for i in ids.tolist()]
        meta_bytes = np.frombuffer(json.dumps(items, allow_nan=False).encode("utf-8"), dtype=np.uint8)
        tensors = {"embeddings": emb, "ids": ids, "item_metadata": meta_bytes}
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "dim": str(self._dim),
            "count": str(len(self)),
            "model_id": json.dumps(self._model_id),
            "sha256": _digest(emb, ids, meta_bytes),
        }
        _atomic_write_safetensors(path, tensors, header)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        expected_model_id: str | None = None,
        device: str = "auto",
        chunk_size: int | None = None,
        topk: str = "auto",
        query_batch_size: int = 256,
        backend: str = "auto",
        prefilter: str = "auto",
    ) -> KnnIndex:
        """Load a file written by `save`. With ``expected_model_id``, a file from another model is refused
        (ValueError naming both ids). A file that is not a valid index raises ValueError."""
        path = Path(path)
        header, tensors = _read_safetensors(path)
        model_id = _validate_file(path, header, tensors)
        if expected_model_id is not None and model_id != expected_model_id:
            raise ValueError(
                f"{path} was built with model_id={model_id!r} but expected_model_id={expected_model_id!r}; "
                "re-embed the gallery with the expected model or load with the matching model"
            )
        index = cls(
            int(header["dim"]),
            device=device,
            chunk_size=chunk_size,
            model_id=model_id,
            topk=topk,
            query_batch_size=query_batch_size,
            backend=backend,
            prefilter=prefilter,
        )
        ids = tensors["ids"]
        items = _parse_items(path, tensors["item_metadata"], ids.shape[0])
        emb = index._ops.matrix(tensors["embeddings"], index.dim, "embeddings")
        codes = np.array([index._category_code(m.get("category")) for m in items], dtype=np.int32)
        index._set_rows(ids.copy(), index._ops.to_storage(emb), codes)
        index._meta = {i: m for i, m in zip(ids.tolist(), items) if m}
        return index


# ----------------------------------------------------------------------------------------------------------
# File helpers
# ----------------------------------------------------------------------------------------------------------


def read_model_id(path: str | os.PathLike) -> str | None:
    """The model_id a saved index records, read from the file header alone (no tensor is loaded). Raises
    ValueError for a file that is not a KnnIndex file; `load` checks the rest."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(path, framework="np") as f:
            header = dict(f.metadata() or {})
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"header format={header.get('format')!r}, expected {FORMAT_NAME!r}")
        return json.loads(header["model_id"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a readable KnnIndex file: {exc}") from None


def _digest(emb: np.ndarray, ids: np.ndarray, meta_bytes: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (emb, ids, meta_bytes):
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.hexdigest()


def _atomic_write_safetensors(path: Path, tensors: dict[str, np.ndarray], header: dict[str, str]) -> None:
    import safetensors.numpy  # looked up at call time, so tests can make the writer fail halfway

    atomic_write(path, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=header))


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise FileNotFoundError(f"no index file at {path}")
    try:
        with safe_open(path, framework="np") as f:
            header = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable KnnIndex file (corrupted or not safetensors): {exc}") from None
    return header, tensors


def _validate_file(path: Path, header: dict[str, str], tensors: dict[str, np.ndarray]) -> str | None:
    """Check a loaded file against the format; returns its model_id."""
    if header.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not a KnnIndex file: header format={header.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    version = header.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} has KnnIndex format version {version!r}; this code reads version {FORMAT_VERSION}. "
            "Rebuild the index or upgrade the code."
        )
    missing = {"embeddings", "ids", "item_metadata"} - tensors.keys()
    if missing or not {"dim", "count", "model_id", "sha256"} <= header.keys():
        raise ValueError(f"{path} is a damaged KnnIndex file: missing tensors {sorted(missing)} or header keys")
    emb, ids, meta = tensors["embeddings"], tensors["ids"], tensors["item_metadata"]
    try:
        dim, count = int(header["dim"]), int(header["count"])
        model_id = json.loads(header["model_id"])
    except ValueError as exc:
        raise ValueError(f"{path} is a damaged KnnIndex file: bad header value ({exc})") from None
    if (
        emb.ndim != 2
        or emb.shape != (count, dim)
        or emb.dtype not in (np.float16, np.float32)
        or ids.shape != (count,)
        or ids.dtype != np.int64
        or meta.dtype != np.uint8
    ):
        raise ValueError(
            f"{path} is a damaged KnnIndex file: embeddings {emb.shape} {emb.dtype}, ids {ids.shape} {ids.dtype} "
            f"do not match header dim={dim}, count={count}"
        )
    if _digest(emb, ids, meta) != header["sha256"]:
        raise ValueError(f"{path} is corrupted: the SHA-256 of its tensors does not match its header")
    if count > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError(f"{path} is a damaged KnnIndex file: ids are not strictly ascending")
    if model_id is not None and not isinstance(model_id, str):
        raise ValueError(f"{path} is a damaged KnnIndex file: model_id {model_id!r} is not a string")
    if not bool(np.isfinite(emb).all()):
        raise ValueError(f"{path} is a damaged KnnIndex file: embeddings contain NaN or inf")
    return model_id


def _parse_items(path: Path, meta: np.ndarray, count: int) -> list[dict]:
    try:
        items = json.loads(meta.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is a damaged KnnIndex file: item metadata is not JSON ({exc})") from None
    if not isinstance(items, list) or len(items) != count or not all(isinstance(m, dict) for m in items):
        raise ValueError(f"{path} is a damaged KnnIndex file: item metadata is not a list of {count} dicts")
    if not all(isinstance(m.get("category", ""), str) for m in items):
        raise ValueError(f"{path} is a damaged KnnIndex file: a metadata category is not a string")
    return items
