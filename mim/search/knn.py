"""Exact inner-product top-k search over a gallery of L2-normalised embeddings.

One search loop serves both array modules: NumPy on the CPU (fp32 storage, because NumPy has no fp16 BLAS path
and is ~40x slower in fp16) and CuPy on the GPU (fp16 storage, each chunk upcast to fp32 before the matmul so
scores are accumulated in fp32). The loop takes the array module ``xp`` and never asks which one it got; the
only module-specific code is a host-transfer helper and the optional ``torch.topk`` selection.

Search contract (pinned by tests/test_knn.py):

* Scores are inner products in float32; ``search`` returns ``(scores, ids)`` of shape ``(Q, k)``, best first.
* Tie order is deterministic: equal scores are ordered by ascending id, whatever the chunk size and whatever
  top-k selection method is used. (The gallery is stored sorted by id, so "ascending id" is "ascending row".)
* With a category filter, items that do not match are never returned; if fewer than ``k`` items match, the
  missing columns are padded with id ``-1`` and score ``-inf``. ids must therefore be non-negative.
* Memory is bounded at any gallery size: the gallery is scanned in chunks of ``chunk_size`` rows and queries in
  batches of ``query_batch_size`` rows; each chunk keeps its own top-k and is merged into a running top-k.

Persistence is one safetensors file (no pickle): tensors ``embeddings`` (N, dim), ``ids`` (N,) and
``item_metadata`` (UTF-8 JSON bytes as uint8); the header metadata holds the format name and version, dim,
model_id, the item count and a SHA-256 of the tensor bytes. Per-item metadata lives in a tensor rather than in
the header because safetensors refuses headers over 100 MB, which a gallery of ~1M titles and paths reaches.
Saves are atomic: temp file in the same directory, fsync, ``os.replace``, fsync of the directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mim.atomic import atomic_write

FORMAT_NAME = "mim-knn-index"
FORMAT_VERSION = 1

# |norm - 1| allowed by `add` for rows it does not normalise itself. fp32 rows normalised in fp32 sit within
# ~1e-7 of 1; fp16 rows within ~1e-3.
DEFAULT_NORM_TOL = 1e-3

_PAD_ID = -1
_INT64_MAX = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------------------------------------
# Device / array-module selection
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """None when CuPy imports and can run a kernel on a CUDA device, else a one-line reason (for skips/logs)."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA library underneath it
        return f"cupy is not importable ({type(exc).__name__}: {exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
        # A device can be visible and still unusable (driver mismatch, exclusive mode): run one tiny kernel.
        float((cupy.arange(4, dtype=cupy.float32) * 2).sum())
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
    if device == "cuda":
        import cupy

        return cupy
    return np


def _to_host(xp, a) -> np.ndarray:
    """Device array -> NumPy array (no copy on the CPU path)."""
    return a if xp is np else xp.asnumpy(a)


# ----------------------------------------------------------------------------------------------------------
# Top-k selection. Each selector returns, for every row of `scores` (B, c), the column indices (B, k) of SOME
# valid top-k set in any order; `_lowest_columns_on_ties` then makes the choice among boundary ties canonical.
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


TOPK_METHODS: dict[str, Callable] = {
    "argpartition": select_argpartition,
    "torch": select_torch,
    "two_stage": select_two_stage,
}


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
    """Selector used by ``topk="auto"``.

    CPU: torch.topk when torch imports. Measured on the 2-core dev machine on (B, 65536) fp32 score blocks:
    torch.topk 0.15 / 5.6 / 44 / 158 ms against np.argpartition 0.9 / 23 / 190 / 203 ms for
    (B, k) = (1, 10) / (32, 100) / (256, 100) / (256, 1024). Without torch: argpartition.
    GPU: torch.topk when torch has CUDA (radix select), else argpartition for k < 1024 and the two-stage
    selector for k >= 1024, where cupy.argpartition degrades to a full sort. The GPU choice is UNMEASURED (no
    GPU was available when this was written); benchmarks/knn_bench.py times it.
    """
    has_torch, torch_cuda = _torch_status()
    if device == "cpu":
        return "torch" if has_torch else "argpartition"
    if torch_cuda:
        return "torch"
    return "argpartition" if k < 1024 else "two_stage"


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


def _merge_topk(xp, best_s, best_p, new_s, new_p, k: int):
    """Merge a running top-k (sorted by score desc, then position asc) with a chunk's candidates.

    The chunk's candidates must be in ascending position order and lie after every position in the running
    top-k, so a stable sort on the score alone yields the (score desc, position asc) order.
    """
    if best_s is None:
        s, p = new_s, new_p
    else:
        s = xp.concatenate([best_s, new_s], axis=1)
        p = xp.concatenate([best_p, new_p], axis=1)
    # `0.0 - s` negates and also maps -0.0 to +0.0, so radix sorts (CuPy) treat the two zeros as a tie.
    order = xp.argsort(0.0 - s, axis=1, kind="stable")[:, :k]
    return xp.take_along_axis(s, order, axis=1), xp.take_along_axis(p, order, axis=1)


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------


def _check_ids(ids: Any, what: str = "ids") -> np.ndarray:
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


def _check_matrix(xp, a: Any, dim: int, what: str):
    """Common checks for embeddings and queries: real float, 2-D (n, dim), finite. Returns an xp array."""
    arr = xp.asarray(a)
    if arr.ndim != 2:
        raise ValueError(
            f"{what} must be 2-D (n, {dim}); got shape {tuple(arr.shape)}. For a single vector pass x[None, :]."
        )
    if arr.dtype.kind != "f":
        raise TypeError(f"{what} must be a float array; got dtype {arr.dtype}")
    if arr.shape[1] != dim:
        raise ValueError(
            f"{what} have dim {arr.shape[1]}, expected {dim} (the index dim); "
            "check the embedding model matches the index"
        )
    row = _first_true(xp, ~xp.isfinite(arr).all(axis=1))
    if row is not None:
        raise ValueError(f"{what} row {row} contains NaN or inf; only finite values can be searched")
    return arr


def _check_metadata(metadata: Any, n: int) -> list[dict]:
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


def _check_categories(categories: str | Iterable[str]) -> set[str]:
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


class KnnIndex:
    """Exact inner-product top-k index over L2-normalised embeddings with int64 ids and per-item metadata.

    Args:
        dim: embedding width.
        device: "cpu" (NumPy, fp32 storage), "cuda" (CuPy, fp16 storage, fp32 accumulation) or "auto" (cuda
            when CuPy can run on a device, else cpu).
        chunk_size: gallery rows scored per step; the score block is (query_batch_size, chunk_size) fp32.
        model_id: the embedding model the gallery came from; checked by ``load(expected_model_id=...)``.
        topk: top-k selector: "auto" (see `default_topk_method`), "argpartition", "torch" or "two_stage".
        query_batch_size: queries scored per step.

    Not safe for concurrent mutation and search from several threads.
    """

    def __init__(
        self,
        dim: int,
        *,
        device: str = "auto",
        chunk_size: int = 65536,
        model_id: str | None = None,
        topk: str = "auto",
        query_batch_size: int = 256,
    ) -> None:
        for name, value in (("dim", dim), ("chunk_size", chunk_size), ("query_batch_size", query_batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if model_id is not None and not isinstance(model_id, str):
            raise TypeError(f"model_id must be a str or None; got {type(model_id).__name__}")
        if topk != "auto" and topk not in TOPK_METHODS:
            raise ValueError(f"topk must be 'auto' or one of {sorted(TOPK_METHODS)}; got {topk!r}")
        self._dim = int(dim)
        self._device = resolve_device(device)
        self._xp = _array_module(self._device)
        self._dtype = np.dtype(np.float16 if self._device == "cuda" else np.float32)
        self.chunk_size = int(chunk_size)
        self.query_batch_size = int(query_batch_size)
        self.topk = topk
        self._model_id = model_id
        # Rows are kept sorted by id so that "ties by ascending id" is "ties by ascending row".
        self._ids = np.zeros(0, dtype=np.int64)  # (N,) host
        self._emb = self._xp.zeros((0, self._dim), dtype=self._dtype)  # (N, dim) on the device
        self._meta: dict[int, dict] = {}  # id -> metadata; items without metadata are absent
        self._cat_codes = np.zeros(0, dtype=np.int32)  # (N,) code of metadata["category"], -1 for none
        self._cat_vocab: dict[str, int] = {}

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
        return _to_host(self._xp, self._emb).copy()

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
            embeddings: (n, dim) float array (NumPy, or CuPy on the GPU). Rows must be unit norm within
                ``norm_tol`` unless ``normalize=True``, in which case they are divided by their norm here
                (an all-zero row is then an error).
            metadata: optional list of n JSON-serialisable dicts (e.g. title, category, image_path). The
                ``category`` key, if present, is what ``search(categories=...)`` filters on.
        """
        xp = self._xp
        ids = _check_ids(ids)
        emb = _check_matrix(xp, embeddings, self._dim, "embeddings")
        if emb.shape[0] != ids.shape[0]:
            raise ValueError(f"got {ids.shape[0]} ids but {emb.shape[0]} embedding rows; pass one row per id")
        metas = _check_metadata(metadata, ids.shape[0])
        if ids.size == 0:
            return
        clash = ids[np.isin(ids, self._ids)]
        if clash.size:
            raise ValueError(f"id {int(clash[0])} is already in the index; remove it first or use a new id")
        if emb.dtype == np.float16:  # norms of fp16 rows are computed in fp32
            emb = emb.astype(np.float32)
        emb = self._normalised_rows(emb, normalize, norm_tol)

        all_ids = np.concatenate([self._ids, ids])
        all_emb = xp.concatenate([self._emb, emb.astype(self._dtype)])
        codes = np.array([self._category_code(m.get("category")) for m in metas], dtype=np.int32)
        all_codes = np.concatenate([self._cat_codes, codes])
        if all_ids.size > 1 and not bool((all_ids[1:] > all_ids[:-1]).all()):
            order = np.argsort(all_ids, kind="stable")
            all_ids, all_codes = all_ids[order], all_codes[order]
            all_emb = all_emb[xp.asarray(order)]
        self._ids, self._emb, self._cat_codes = all_ids, all_emb, all_codes
        for i, m in zip(ids.tolist(), metas):
            if m:
                self._meta[i] = m

    def _normalised_rows(self, emb, normalize: bool, norm_tol: float):
        xp = self._xp
        norms = xp.sqrt((emb * emb).sum(axis=1))  # (n,)
        if normalize:
            row = _first_true(xp, norms == 0)
            if row is not None:
                raise ValueError(f"embeddings row {row} is all zeros and cannot be normalised")
            return emb / norms[:, None]
        row = _first_true(xp, xp.abs(norms - 1) > norm_tol)
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
        ids = _check_ids(ids)
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
        self._ids, self._cat_codes = self._ids[rows], self._cat_codes[rows]
        self._emb = self._emb[self._xp.asarray(rows)]
        for i in ids.tolist():
            self._meta.pop(i, None)

    # ---- search -----------------------------------------------------------------------------------------

    def search(
        self, queries: Any, k: int, *, categories: str | Iterable[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product.

        Args:
            queries: (Q, dim) float array; need not be normalised (inner product is what is ranked).
            k: 1 <= k <= len(index).
            categories: optional str or set of str; only items whose metadata["category"] is one of them are
                returned. If fewer than k items match, trailing columns hold id -1 and score -inf.

        Returns:
            scores float32 (Q, k) descending and ids int64 (Q, k); equal scores ordered by ascending id.
        """
        xp = self._xp
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
        q = _check_matrix(xp, queries, self._dim, "queries").astype(xp.float32, copy=False)

        row_mask = None  # host (N,) bool: rows allowed by the category filter
        n_match = n
        if categories is not None:
            wanted = [self._cat_vocab[c] for c in _check_categories(categories) if c in self._cat_vocab]
            row_mask = np.isin(self._cat_codes, np.asarray(wanted, dtype=np.int32))
            n_match = int(row_mask.sum())

        method = self.topk if self.topk != "auto" else default_topk_method(self._device, k)
        select = TOPK_METHODS[method]
        out_s, out_p = [], []
        for qs in range(0, q.shape[0], self.query_batch_size):
            s, p = self._search_batch(q[qs : qs + self.query_batch_size], k, row_mask, select)
            out_s.append(_to_host(xp, s))
            out_p.append(_to_host(xp, p))
        scores = np.concatenate(out_s).astype(np.float32, copy=False)
        pos = np.concatenate(out_p)
        ids = np.where(pos >= 0, self._ids[np.maximum(pos, 0)], _PAD_ID)
        # Columns past the number of matching items hold padding or rows the filter excluded; both already
        # score -inf, and the excluded rows' ids must not leak out.
        ids[:, n_match:] = _PAD_ID
        return scores, ids.astype(np.int64, copy=False)

    def _search_batch(self, q, k: int, row_mask: np.ndarray | None, select: Callable):
        """One query batch q (B, dim) fp32 against every chunk; returns (scores, rows) (B, k) on the device."""
        xp = self._xp
        n = len(self)
        best_s = best_p = None
        for start in range(0, n, self.chunk_size):
            stop = min(start + self.chunk_size, n)
            drop = None  # (n_drop,) device int: chunk columns excluded by the category filter
            if row_mask is not None:
                allowed = row_mask[start:stop]
                if not allowed.any():
                    continue
                if not allowed.all():
                    drop = xp.asarray(np.nonzero(~allowed)[0])
            chunk = self._emb[start:stop].astype(xp.float32, copy=False)  # (c, dim); fp16 -> fp32 on GPU
            scores = q @ chunk.T  # (B, c) fp32
            if drop is not None:
                scores[:, drop] = -xp.inf
            kc = min(k, stop - start)
            cols = _lowest_columns_on_ties(xp, scores, select(xp, scores, kc))
            cols = xp.sort(cols, axis=1)  # ascending rows, as _merge_topk expects
            vals = xp.take_along_axis(scores, cols, axis=1)
            best_s, best_p = _merge_topk(xp, best_s, best_p, vals, cols + start, k)
        b = q.shape[0]
        if best_s is None:  # no chunk had a matching row
            best_s = xp.full((b, 0), -xp.inf, dtype=xp.float32)
            best_p = xp.zeros((b, 0), dtype=xp.int64)
        if best_s.shape[1] < k:  # skipped chunks can leave fewer than k candidates
            pad = k - best_s.shape[1]
            best_s = xp.concatenate([best_s, xp.full((b, pad), -xp.inf, dtype=best_s.dtype)], axis=1)
            best_p = xp.concatenate([best_p, xp.full((b, pad), _PAD_ID, dtype=best_p.dtype)], axis=1)
        return best_s, best_p

    # ---- persistence ------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ONE safetensors file atomically (temp file + fsync + os.replace + dir fsync).

        A crash at any point leaves either the previous file or the new one at ``path``, never a mix, and the
        temp file is removed on failure.
        """
        path = Path(path)
        emb = np.ascontiguousarray(_to_host(self._xp, self._emb))
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
        chunk_size: int = 65536,
        topk: str = "auto",
        query_batch_size: int = 256,
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
        )
        ids = tensors["ids"]
        items = _parse_items(path, tensors["item_metadata"], ids.shape[0])
        index._ids = ids.copy()
        index._emb = index._xp.asarray(tensors["embeddings"], dtype=index._dtype)
        index._cat_codes = np.array([index._category_code(m.get("category")) for m in items], dtype=np.int32)
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
