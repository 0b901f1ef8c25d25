"""What an image embedding matches on: attribute precision and a breakdown of top-1 mistakes.

Recall says how often the right product comes first; this says what the model ranked first when it was wrong,
which is how the false-positive argument of docs/METHOD.md ("Setting") is checked on the synthetic catalog:

- attribute precision@10, for street photos against the catalog gallery and for catalog images against the other
  catalog images: the share of the top 10 with the query product's category, pattern and colour. A model that
  matches on texture has high colour and pattern precision and low category precision.
- top-1 breakdown of street-photo queries: the exact product, another model of the same (category, pattern,
  colour), the same category with another pattern or colour, or another category sharing pattern and colour,
  colour only, pattern only, or nothing.

    mimsearch diagnose --checkpoint dml=artifacts/checkpoints/full/seed0/dml \\
        --checkpoint 3tower=artifacts/checkpoints/full/seed0/3tower --catalog artifacts/catalog
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mim.atomic import atomic_write_text
from mim.data.catalog import ATTRIBUTES, Catalog, Product
from mim.search.embedding import Embedder
from mim.search.ranking import top_k
from mim.tables import markdown_table

# Top-1 outcomes, in the order they are tested: the first that holds names the result.
OUTCOMES = (
    "exact",
    "same title, other model",
    "same category",
    "other category, same pattern and colour",
    "other category, same colour",
    "other category, same pattern",
    "other category, nothing shared",
)


def attribute_precision(ranked: Sequence[Sequence[Product]], queries: Sequence[Product]) -> dict[str, float]:
    """Per attribute, the mean share of each query's ranked products that share the query product's value.

    Attributes no query product has (a JSON Lines dataset names categories only) are left out."""
    if len(ranked) != len(queries) or not len(queries):
        raise ValueError(f"need one ranking per query and at least one query; got {len(ranked)} and {len(queries)}")
    present = [a for a in ATTRIBUTES if any(getattr(q, a) for q in queries)]
    return {
        a: float(np.mean([np.mean([getattr(r, a) == getattr(q, a) for r in row]) for row, q in zip(ranked, queries)]))
        for a in present
    }


def outcome(first: Product, wanted: Product) -> str:
    """Which of OUTCOMES the top-1 result `first` is for a query of product `wanted`."""
    if first.product_id == wanted.product_id:
        return OUTCOMES[0]
    if first.title == wanted.title:
        return OUTCOMES[1]
    # An empty value (an attribute a dataset does not name) is never shared.
    same = {a: bool(getattr(wanted, a)) and getattr(first, a) == getattr(wanted, a) for a in ATTRIBUTES}
    if same["category"]:
        return OUTCOMES[2]
    if same["pattern"] and same["colour"]:
        return OUTCOMES[3]
    if same["colour"]:
        return OUTCOMES[4]
    if same["pattern"]:
        return OUTCOMES[5]
    return OUTCOMES[6]


def diagnose(embedder: Embedder, catalog: Catalog, split: str = "test", k: int = 10) -> dict[str, dict[str, float]]:
    """{"street": attribute precision@k of street photos, "catalog": the same for catalog images against the
    other catalog images, "top1": share of street-photo queries per outcome} on one split."""
    products = catalog.products_in(split)
    queries = catalog.queries_in(split)
    if len(products) <= k:
        raise ValueError(f"the {split} gallery has {len(products)} products; need more than k={k}")
    gallery = embedder.embed_images([catalog.read_bytes(p.image) for p in products])
    street = embedder.embed_images([catalog.read_bytes(q.image) for q in queries])
    wanted = [catalog.product(q.product_id) for q in queries]
    ranked = top_k(street, gallery, k)
    # Catalog against catalog: rank k + 1 and drop the query itself (its own image scores 1).
    self_ranked = top_k(gallery, gallery, k + 1)
    clean = [[products[j] for j in row if j != i][:k] for i, row in enumerate(self_ranked)]
    counts = dict.fromkeys(OUTCOMES, 0)
    for row, w in zip(ranked, wanted):
        counts[outcome(products[row[0]], w)] += 1
    return {
        "street": attribute_precision([[products[j] for j in row] for row in ranked], wanted),
        "catalog": attribute_precision(clean, products),
        "top1": {o: n / len(queries) for o, n in counts.items()},
    }


def markdown(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Two tables: attribute precision@10 (street and catalog queries), then the top-1 breakdown."""
    attrs = [a for a in ATTRIBUTES if all(a in d["street"] for d in rows.values())]
    head = [f"street {a}" for a in attrs] + [f"catalog {a}" for a in attrs]
    precision = (
        [name, *(f"{v:.3f}" for v in [d["street"][a] for a in attrs] + [d["catalog"][a] for a in attrs])]
        for name, d in rows.items()
    )
    top1 = ([name, *(f"{d['top1'][o]:.3f}" for o in OUTCOMES)] for name, d in rows.items())
    return "\n".join(
        [
            markdown_table(["model", *head], precision, label_column=True),
            "",
            markdown_table(["model", *OUTCOMES], top1, label_column=True),
        ]
    )


def diagnose_checkpoints(checkpoints: Mapping[str, str | Path], catalog: Catalog, split: str = "test") -> dict:
    """Name -> `diagnose` of that checkpoint's in-process torch model, in the order given."""
    from mim.model.checkpoint import load_checkpoint  # torch: only checkpoints need it
    from mim.search.embedding import TorchEmbedder

    return {name: diagnose(TorchEmbedder(load_checkpoint(path)), catalog, split) for name, path in checkpoints.items()}


def write_diagnosis(out: str | Path, rows: dict, split: str) -> None:
    """OUT.json (the numbers) and OUT.md (the tables of `markdown`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1, sort_keys=True))
    atomic_write_text(out.with_suffix(".md"), f"Split: {split}.\n\n{markdown(rows)}\n")
