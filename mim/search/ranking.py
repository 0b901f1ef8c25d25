"""Ranking in plain NumPy: normalise, fuse, exact top-k, refine, and the parity of two embedding sets.

Evaluation (mim.training.evaluate), the served `fuse` model (mim.serving.backends), the search client
(client.search) and the benchmarks all rank with these functions, so offline metrics, served results and client
results cannot disagree on how a score is computed. The module needs NumPy only (no torch), so the search path
loads on a machine without torch.

Multimodal search has two modes (docs/METHOD.md, "Multimodal search"):
- fusion: one kNN on normalize(a * image + (1 - a) * text); `a` is `contract.DEFAULT_IMAGE_WEIGHT` unless a
  request sets it;
- refine: image kNN for the top N products, re-ranked by cos(q, p) + b * cos(s, p).

Shapes: queries (Q, D), gallery (N, D); top-k results are gallery ROWS (Q, k), best first, equal scores in
ascending row order. `mim.search.knn.KnnIndex` is the fast, chunked version of `exact_top_k` (tests/test_knn.py checks
it against this one, ties included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mim import contract
from mim.checks import is_positive_int

# Floor on the SQUARED norm in `l2_normalize`, the same as mim.model.towers.l2_normalize's, so a served (NumPy) and an
# in-process (torch) normalisation agree even on near-zero rows, and a zero row stays finite (all zeros).
NORM_EPS = 1e-12

# refine: b, the weight of the text similarity cos(s, p), and N, the image candidates it re-ranks.
DEFAULT_REFINE_WEIGHT = 1.0
REFINE_TOP_N = 50


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows to unit length in float32: x / sqrt(max(|x|^2, NORM_EPS))."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.sqrt(np.maximum((x * x).sum(axis=-1, keepdims=True), NORM_EPS))


def fuse(
    image: np.ndarray, text: np.ndarray, image_weight: float | np.ndarray = contract.DEFAULT_IMAGE_WEIGHT
) -> np.ndarray:
    """normalize(w * image + (1 - w) * text) for (N, D) rows; `image_weight` is a scalar or (N, 1) per row."""
    w = np.asarray(image_weight, dtype=np.float32)
    return l2_normalize(w * np.asarray(image, np.float32) + (1.0 - w) * np.asarray(text, np.float32))


def exact_top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference top-k by inner product: a full sort of every score, nothing clever.

    Returns (scores, rows), each (Q, min(k, N)), best first; equal scores are ordered by ascending row. Scores are
    computed in the inputs' dtype (pass float64 for a reference that float32 code is compared with)."""
    queries, gallery = np.asarray(queries), np.asarray(gallery)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries must be (Q, D) and gallery (N, D); got {queries.shape} and {gallery.shape}")
    if not is_positive_int(k):
        raise ValueError(f"k must be a positive int; got {k!r}")
    scores = queries @ gallery.T  # (Q, N)
    # A stable sort on the negated score keeps equal scores in ascending row order.
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Rows (Q, min(k, N)) of `exact_top_k`."""
    return exact_top_k(queries, gallery, k)[1]


def refine_scores(
    q_img: np.ndarray, q_txt: np.ndarray, candidates: np.ndarray, text_weight: float = DEFAULT_REFINE_WEIGHT
) -> np.ndarray:
    """cos(q, p) + b * cos(s, p) of each query's candidates: q_img, q_txt (Q, D), candidates (Q, N, D) -> (Q, N)."""
    return np.einsum("qd,qnd->qn", q_img, candidates) + text_weight * np.einsum("qd,qnd->qn", q_txt, candidates)


def refine(
    q_img: np.ndarray,
    q_txt: np.ndarray,
    gallery: np.ndarray,
    k: int,
    top_n: int = REFINE_TOP_N,
    text_weight: float = DEFAULT_REFINE_WEIGHT,
) -> np.ndarray:
    """Image top-`top_n` candidates re-ranked by `refine_scores`; returns (Q, min(k, top_n, N)) gallery rows,
    equal scores in ascending row order."""
    cand = top_k(q_img, gallery, min(top_n, len(gallery)))  # (Q, n)
    score = refine_scores(q_img, q_txt, gallery[cand], text_weight)  # (Q, n)
    order = np.lexsort((cand, -score), axis=-1)[:, :k]  # by score, then by row
    return np.take_along_axis(cand, order, axis=1)


# --- parity of two embedding sets -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Parity:
    """How far `got` is from `want`, row for row. A row with NaN or inf has cosine -inf, so no gate passes it."""

    rows: int
    min_cosine: float  # 1.0 for zero rows
    max_abs_diff: float  # 0.0 for zero rows
    worst_row: int  # the row with the lowest cosine (-1 for zero rows)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def row_cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per-row cosine (N,) of two (N, D) arrays in float64, each row normalised as `l2_normalize` does."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or got.ndim != 2:
        raise ValueError(f"embeddings differ in shape: {got.shape} vs {want.shape}; expected two (N, D) arrays alike")
    norms = np.sqrt(np.maximum((got * got).sum(1), NORM_EPS) * np.maximum((want * want).sum(1), NORM_EPS))
    cos = (got * want).sum(1) / norms
    return np.where(np.isfinite(cos), cos, -np.inf)


def parity(got: np.ndarray, want: np.ndarray) -> Parity:
    """Min per-row cosine and max absolute difference of `got` against the reference `want`, both (N, D)."""
    cos = row_cosines(got, want)
    if len(cos) == 0:
        return Parity(0, 1.0, 0.0, -1)
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    max_abs = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    worst = int(np.argmin(cos))
    return Parity(len(cos), float(cos[worst]), max_abs, worst)
