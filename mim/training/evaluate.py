"""Offline evaluation (docs/METHOD.md, "Metrics").

- Image matching: Recall@1/5/10 of the exact product for each test query photo over the whole test gallery.
- False positives: category precision@10, the share of the top 10 that are the same kind of product, and the
  share of queries whose top 1 is another category (other-cat@1) or another model with the same title
  (same-title@1: a look-alike only the image can tell apart).
- Multimodal: query photo of X + reformulation text -> the product that is X with the change; Recall@K by
  fusion (one kNN on normalize(a*img + (1-a)*txt)) and by refine (image top-N re-ranked by
  cos(q, p) + b*cos(s, p)).

    mimsearch evaluate --checkpoint artifacts/checkpoints/3tower [--checkpoint ...] --out results/quality
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mim import tables
from mim.atomic import atomic_write_text
from mim.data.catalog import Catalog
from mim.errors import TrainingError
from mim.search.embedding import Embedder
from mim.search.ranking import fuse, refine, top_k

KS = (1, 5, 10)


# --- metrics (pure NumPy, unit-tested on hand-made rankings; the ranking itself is mim.search.ranking's) ------------
def hits_at_k(ranked: np.ndarray, target: np.ndarray, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Per query, 1.0 if its target is in the top k else 0.0: {"R@k": (Q,)}.

    ranked (Q, K) holds gallery ids best first; target (Q,) the correct id per query."""
    ranked, target = np.asarray(ranked), np.asarray(target)
    if ranked.ndim != 2 or len(ranked) != len(target):
        raise ValueError(f"ranked must be (Q, K) and target (Q,); got {ranked.shape} and {target.shape}")
    if len(target) == 0:
        raise ValueError("no queries to evaluate")
    hit = ranked == target[:, None]
    return {f"R@{k}": hit[:, :k].any(axis=1).astype(np.float64) for k in ks}


def recall_at_k(ranked: np.ndarray, target: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Share of queries whose target is in the top k (the mean of hits_at_k)."""
    return {k: float(v.mean()) for k, v in hits_at_k(ranked, target, ks).items()}


def category_precision_per_query(
    ranked_categories: np.ndarray, query_categories: np.ndarray, k: int = 10
) -> np.ndarray:
    """Per query, the share of its top k results whose category equals the query's: (Q,)."""
    rc, qc = np.asarray(ranked_categories), np.asarray(query_categories)
    if rc.shape[1] < k:
        raise ValueError(f"need at least {k} ranked results per query, got {rc.shape[1]}")
    return (rc[:, :k] == qc[:, None]).mean(axis=1)


def category_precision_at_k(ranked_categories: np.ndarray, query_categories: np.ndarray, k: int = 10) -> float:
    """Mean share of the top k results whose category equals the query's."""
    return float(category_precision_per_query(ranked_categories, query_categories, k).mean())


def require_split(catalog: Catalog, split: str) -> None:
    """Refuse a split with no products or no query photos, naming the splits that have both."""
    if catalog.products_in(split) and catalog.queries_in(split):
        return
    usable = [s for s in ("train", "val", "test") if catalog.products_in(s) and catalog.queries_in(s)]
    raise TrainingError(
        f"the {split} split of {catalog.root} has {len(catalog.products_in(split))} products and "
        f"{len(catalog.queries_in(split))} query photos; expected some of both: use --split "
        + (" or ".join(usable) if usable else "of a catalog that has query photos")
    )


def evaluate_per_query(embedder: Embedder, catalog: Catalog, split: str = "test") -> dict[str, np.ndarray]:
    """Every metric of the module docstring per query, {name: (n,) float array}, for one embedder (in-process,
    ONNX or served) on a catalog split; `evaluate` reports their means.

    image R@k and image catP@10 have one entry per query photo, title R@k one per product, mm-* R@k one per
    reformulation."""
    require_split(catalog, split)
    products = catalog.products_in(split)
    queries = catalog.queries_in(split)
    refs = catalog.reformulations_in(split)
    pid = np.array([p.product_id for p in products])
    pcat = np.array([p.category for p in products])
    gallery = embedder.embed_images([catalog.read_bytes(p.image) for p in products])
    qimg = embedder.embed_images([catalog.read_bytes(q.image) for q in queries])
    kmax = min(max(KS), len(products))  # a gallery smaller than 10 caps every k at its size
    ranked = top_k(qimg, gallery, kmax)
    q_target = np.array([q.product_id for q in queries])
    out = {f"image {k}": v for k, v in hits_at_k(pid[ranked], q_target).items()}
    qprod = [catalog.product(q.product_id) for q in queries]
    qcat = np.array([p.category for p in qprod])
    out["image catP@10"] = category_precision_per_query(pcat[ranked], qcat, kmax)
    # Top-1 mistakes of two kinds: another category (the false positive alignment is meant to remove), and another
    # model carrying the query product's title (which no title can tell apart: the ceiling text cannot lift).
    out["image other-cat@1"] = (pcat[ranked[:, 0]] != qcat).astype(np.float64)
    titles = np.array([p.title for p in products])
    qtitle = np.array([p.title for p in qprod])
    out["image same-title@1"] = ((titles[ranked[:, 0]] == qtitle) & (pid[ranked[:, 0]] != q_target)).astype(np.float64)
    # Text-to-product retrieval with the titles' own words: a sanity check of the alignment. Every model of a
    # combination carries the same title, so any product with the query's title is a hit.
    title_emb = embedder.embed_texts(list(titles))
    out.update({f"title {k}": v for k, v in hits_at_k(titles[top_k(title_emb, gallery, kmax)], titles).items()})
    if refs:
        qi = {q.query_id: i for i, q in enumerate(queries)}
        ref_img = np.stack([qimg[qi[r.query_id]] for r in refs])
        ref_txt = embedder.embed_texts([r.text for r in refs])
        target = np.array([r.target_product_id for r in refs])
        fused = fuse(ref_img, ref_txt)
        out.update({f"mm-fusion {k}": v for k, v in hits_at_k(pid[top_k(fused, gallery, kmax)], target).items()})
        refined = pid[refine(ref_img, ref_txt, gallery, kmax)]
        out.update({f"mm-refine {k}": v for k, v in hits_at_k(refined, target).items()})
    return out


def evaluate(embedder: Embedder, catalog: Catalog, split: str = "test") -> dict[str, float]:
    """The means of evaluate_per_query, plus the gallery, query and reformulation counts."""
    metrics: dict[str, float] = {k: float(v.mean()) for k, v in evaluate_per_query(embedder, catalog, split).items()}
    metrics["n_gallery"] = len(catalog.products_in(split))
    metrics["n_queries"] = len(catalog.queries_in(split))
    metrics["n_reformulations"] = len(catalog.reformulations_in(split))
    return metrics


COLUMNS = [
    "image R@1",
    "image R@5",
    "image R@10",
    "image catP@10",
    "title R@1",
    "mm-fusion R@1",
    "mm-fusion R@10",
    "mm-refine R@1",
    "mm-refine R@10",
]


def markdown_table(rows: dict[str, dict[str, float]], columns: Sequence[str] = COLUMNS) -> str:
    cells = ([name, *(f"{m[c]:.3f}" if c in m else "-" for c in columns)] for name, m in rows.items())
    return tables.markdown_table(["model", *columns], cells, label_column=True)


def write_results(out: str | Path, rows: dict[str, dict[str, float]], header: str) -> None:
    out = Path(out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=2, sort_keys=True))
    atomic_write_text(out.with_suffix(".md"), header.rstrip() + "\n\n" + markdown_table(rows) + "\n")


def evaluate_checkpoints(checkpoints: Mapping[str, str | Path], catalog: Catalog, split: str = "test") -> dict:
    """Name -> `evaluate` of that checkpoint's in-process torch model, in the order given."""
    from mim.model.checkpoint import load_checkpoint  # torch: only checkpoints need it, the metrics above do not
    from mim.search.embedding import TorchEmbedder

    require_split(catalog, split)
    return {name: evaluate(TorchEmbedder(load_checkpoint(path)), catalog, split) for name, path in checkpoints.items()}
