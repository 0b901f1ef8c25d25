"""Offline evaluation (docs/METHOD.md, "Metrics").

- Image matching: Recall@1/5/10 of the exact product for each test query photo over the whole test gallery.
- False positives: category precision@10, the share of the top 10 that are the same kind of product.
- Multimodal: query photo of X + reformulation text -> the product that is X with the change; Recall@K by
  fusion (one kNN on normalize(a*img + (1-a)*txt)) and by refine (image top-N re-ranked by
  cos(q, p) + b*cos(s, p)).

    python -m mim.evaluate --checkpoint artifacts/checkpoints/3tower [--checkpoint ...] --out results/quality
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write_text
from .catalog import Catalog, load_catalog
from .checkpoint import Checkpoint, load_checkpoint
from .preprocess import preprocess_image_bytes

KS = (1, 5, 10)
DEFAULT_FUSION_WEIGHT = 0.5  # a: weight of the image embedding in fusion
DEFAULT_REFINE_WEIGHT = 1.0  # b: weight of the text similarity in refine
REFINE_TOP_N = 50


# --- metrics (pure NumPy, unit-tested on hand-made rankings) --------------------------------------------------
def recall_at_k(ranked: np.ndarray, target: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Share of queries whose target is in the top k.

    ranked (Q, K) holds gallery ids best first; target (Q,) the correct id per query."""
    ranked, target = np.asarray(ranked), np.asarray(target)
    if ranked.ndim != 2 or len(ranked) != len(target):
        raise ValueError(f"ranked must be (Q, K) and target (Q,); got {ranked.shape} and {target.shape}")
    if len(target) == 0:
        raise ValueError("no queries to evaluate")
    hit = ranked == target[:, None]
    return {f"R@{k}": float(hit[:, :k].any(axis=1).mean()) for k in ks}


def category_precision_at_k(ranked_categories: np.ndarray, query_categories: np.ndarray, k: int = 10) -> float:
    """Mean share of the top k results whose category equals the query's."""
    rc, qc = np.asarray(ranked_categories), np.asarray(query_categories)
    if rc.shape[1] < k:
        raise ValueError(f"need at least {k} ranked results per query, got {rc.shape[1]}")
    return float((rc[:, :k] == qc[:, None]).mean())


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k row indices (Q, k), ties broken by lower index."""
    scores = queries @ gallery.T
    order = np.lexsort((np.broadcast_to(np.arange(gallery.shape[0]), scores.shape), -scores), axis=-1)
    return order[:, :k]


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fuse(image: np.ndarray, text: np.ndarray, image_weight: float = DEFAULT_FUSION_WEIGHT) -> np.ndarray:
    return normalize(image_weight * image + (1.0 - image_weight) * text)


def refine(
    q_img: np.ndarray,
    q_txt: np.ndarray,
    gallery: np.ndarray,
    k: int,
    top_n: int = REFINE_TOP_N,
    text_weight: float = DEFAULT_REFINE_WEIGHT,
) -> np.ndarray:
    """Image kNN for top_n candidates, re-ranked by cos(q, p) + b * cos(s, p); returns (Q, k) gallery rows."""
    cand = top_k(q_img, gallery, min(top_n, len(gallery)))  # (Q, N)
    g = gallery[cand]  # (Q, N, D)
    score = np.einsum("qd,qnd->qn", q_img, g) + text_weight * np.einsum("qd,qnd->qn", q_txt, g)
    order = np.lexsort((cand, -score), axis=-1)[:, :k]
    return np.take_along_axis(cand, order, axis=1)


# --- embedding with the in-process torch model ----------------------------------------------------------------
@torch.inference_mode()
def embed_images(ck: Checkpoint, images: Sequence[bytes], batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        px = np.stack([preprocess_image_bytes(b, ck.pre_cfg) for b in images[i : i + batch]])
        out.append(ck.model.encode_image(torch.from_numpy(px)).numpy())
    return np.concatenate(out) if out else np.zeros((0, ck.model_cfg.embed_dim), np.float32)


@torch.inference_mode()
def embed_texts(ck: Checkpoint, texts: Sequence[str], batch: int = 512) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch):
        ids, mask = ck.tokenizer.encode_batch(list(texts[i : i + batch]))
        out.append(ck.model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
    return np.concatenate(out) if out else np.zeros((0, ck.model_cfg.embed_dim), np.float32)


@dataclass
class Embedder:
    """Anything that turns image bytes and texts into embeddings: the in-process model or the served one."""

    images: Callable[[Sequence[bytes]], np.ndarray]
    texts: Callable[[Sequence[str]], np.ndarray]


def torch_embedder(ck: Checkpoint) -> Embedder:
    return Embedder(lambda b: embed_images(ck, b), lambda t: embed_texts(ck, t))


def evaluate(embedder: Embedder, catalog: Catalog, split: str = "test") -> dict[str, float]:
    products = catalog.products_in(split)
    queries = catalog.queries_in(split)
    refs = catalog.reformulations_in(split)
    pid = np.array([p.product_id for p in products])
    {p: i for i, p in enumerate(pid)}
    pcat = np.array([p.category for p in products])
    gallery = embedder.images([catalog.read_bytes(p.image) for p in products])
    qimg = embedder.images([catalog.read_bytes(q.image) for q in queries])
    kmax = min(max(KS), len(products))  # a gallery smaller than 10 caps every k at its size
    ranked = top_k(qimg, gallery, kmax)
    q_target = np.array([q.product_id for q in queries])
    metrics = {f"image {k}": v for k, v in recall_at_k(pid[ranked], q_target).items()}
    qcat = np.array([catalog.product(q.product_id).category for q in queries])
    metrics["image catP@10"] = category_precision_at_k(pcat[ranked], qcat, kmax)
    # Text-to-product retrieval with the titles' own words: a sanity check of the alignment.
    title_emb = embedder.texts([p.title for p in products])
    metrics.update({f"title {k}": v for k, v in recall_at_k(pid[top_k(title_emb, gallery, kmax)], pid).items()})
    if refs:
        qi = {q.query_id: i for i, q in enumerate(queries)}
        ref_img = np.stack([qimg[qi[r.query_id]] for r in refs])
        ref_txt = embedder.texts([r.text for r in refs])
        target = np.array([r.target_product_id for r in refs])
        fused = fuse(ref_img, ref_txt)
        metrics.update({f"mm-fusion {k}": v for k, v in recall_at_k(pid[top_k(fused, gallery, kmax)], target).items()})
        metrics.update(
            {f"mm-refine {k}": v for k, v in recall_at_k(pid[refine(ref_img, ref_txt, gallery, kmax)], target).items()}
        )
    metrics["n_gallery"], metrics["n_queries"], metrics["n_reformulations"] = len(products), len(queries), len(refs)
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
    head = "| model | " + " | ".join(columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    lines = [head, sep]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" if c in m else "-" for c in columns) + " |")
    return "\n".join(lines)


def write_results(out: str | Path, rows: dict[str, dict[str, float]], header: str) -> None:
    out = Path(out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=2, sort_keys=True))
    atomic_write_text(out.with_suffix(".md"), header.rstrip() + "\n\n" + markdown_table(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mim.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="checkpoint folder; repeat to compare (name=path also works)",
    )
    ap.add_argument("--catalog", default="artifacts/catalog")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--out", help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    catalog = load_catalog(args.catalog)
    rows = {}
    for spec in args.checkpoint:
        name, _, path = spec.rpartition("=")
        ck = load_checkpoint(path)
        rows[name or Path(path).name] = evaluate(torch_embedder(ck), catalog, args.split)
    table = markdown_table(rows)
    print(table)
    if args.out:
        write_results(
            args.out, rows, f"Split: {args.split}; command: python -m mim.evaluate {' '.join(argv or sys.argv[1:])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
