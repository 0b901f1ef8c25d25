"""A user's own street-to-shop dataset as JSON Lines, read into the same `Catalog` records that training and
evaluation use for the synthetic catalog (which can write itself in this format, `write_dataset`).

One row per query photo; paths are relative to the manifest's folder and must stay inside it:

    {"query_image": "street/0001.jpg", "product_id": "sku-42", "product_image": "shop/sku-42.jpg",
     "title": "Red leather tote bag", "query_text": "red tote", "category": "bag", "split": "train"}

- required: `query_image`, `product_id` (a string or a non-negative integer), `product_image`, `title`;
- optional: `query_text` (a short typed query, for the 4-tower objective; the title when absent), `category`
  (for category precision), `split` ("train", "val" or "test"; all rows or none);
- a row without `query_image` adds a product without query photos: in val/test a gallery-only distractor, in
  train a title-only product that only the photo-title term sees (docs/METHOD.md, "Objectives").

Without `split`, products are split by a hash of their id (`test_fraction` of them to test, the rest to train),
so a product's query photos never straddle two splits. Every row is checked before anything is returned: a
missing or undecodable image, an empty title, a product given two titles or two images, or a split without
test products is one error naming the row and the field. Nothing is written by reading.

    mimsearch dataset --catalog artifacts/catalog --out artifacts/catalog.jsonl   # export the synthetic one
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from mim.atomic import atomic_write_text
from mim.data.catalog import SPLITS, Catalog, Product, QueryPhoto, load_catalog
from mim.errors import DataError

REQUIRED = ("product_id", "product_image", "title")
OPTIONAL = ("query_image", "query_text", "category", "split")
DEFAULT_TEST_FRACTION = 0.2


class DatasetError(DataError):
    """A dataset that cannot be used; the message names the manifest row and field."""


def is_dataset(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".ndjson")


def open_catalog(path: str | Path, **kwargs: Any) -> Catalog:
    """A synthetic catalog folder (`mim.data.catalog.load_catalog`) or a JSON Lines manifest (`load_dataset`)."""
    return load_dataset(path, **kwargs) if is_dataset(path) else load_catalog(path)


def _split_of(product_key: str, test_fraction: float) -> str:
    # A stable hash (not Python's salted hash()): the same dataset splits the same way on every machine.
    h = int.from_bytes(hashlib.sha256(product_key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


def _check_image(path: Path, where: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{where}: image file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(path.read_bytes())) as im:
                im.load()
    except Exception as e:  # Pillow raises many types for corrupt data
        raise DatasetError(
            f"{where}: cannot decode image {path} ({type(e).__name__}: {e}); expected a JPEG, PNG or WebP file"
        ) from None


def load_dataset(
    manifest: str | Path, *, test_fraction: float = DEFAULT_TEST_FRACTION, check_images: bool = True
) -> Catalog:
    """Read and check a JSON Lines dataset (format in the module docstring) into a `Catalog`."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DatasetError(f"dataset manifest {manifest} not found")
    root = manifest.parent
    products: dict[str | int, Product] = {}
    first_row: dict[str | int, int] = {}
    queries: list[QueryPhoto] = []
    seen_images: set[str] = set()

    def image(row: dict[str, Any], field: str, where: str) -> str:
        rel = row[field]
        p = Path(rel)
        if not isinstance(rel, str) or not rel or p.is_absolute() or ".." in p.parts:
            raise DatasetError(f"{where}: {field} {rel!r} must be a path relative to {root} that stays inside it")
        if check_images and rel not in seen_images:
            _check_image(root / p, f"{where}: {field}")
            seen_images.add(rel)
        return p.as_posix()

    with open(manifest, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise DatasetError(f"{manifest}: no rows; expected one JSON object per line (see mim/data/dataset.py)")
    rows = [(f"{manifest}:{n}", n, _parse_row(line, f"{manifest}:{n}")) for n, line in lines]
    if len({"split" in row for _, _, row in rows}) > 1:
        where = next(w for w, _, row in rows if ("split" in row) != ("split" in rows[0][2]))
        raise DatasetError(f"{where}: field 'split' is given on some rows only; give it on every row or none")
    # Integer product ids are kept (the synthetic catalog's); otherwise products are numbered in order of first
    # appearance, and the ids in the file stay the products' keys.
    int_ids = all(isinstance(row["product_id"], int) for _, _, row in rows)
    for where, n, row in rows:
        pid, title = row["product_id"], row["title"]
        category = str(row.get("category") or "")
        if pid in products:
            p, first = products[pid], first_row[pid]
            for field, value, before in (
                ("title", title, p.title),
                ("product_image", Path(row["product_image"]).as_posix(), p.image),
                ("category", category, p.category),
                ("split", row.get("split", p.split), p.split),
            ):
                if value != before:
                    raise DatasetError(
                        f"{where}: product {pid!r} has {field} {value!r} here but {before!r} at line {first}; "
                        f"a product has one {field}"
                    )
        else:
            split = row.get("split") or _split_of(str(pid), test_fraction)
            number = pid if int_ids else len(products)
            products[pid] = Product(number, category, "", "", title, split, image(row, "product_image", where))
            first_row[pid] = n
        if row.get("query_image") not in (None, ""):
            p = products[pid]
            text = row.get("query_text") or title
            queries.append(QueryPhoto(len(queries), p.product_id, image(row, "query_image", where), text, p.split))
    catalog = Catalog(root, 0, list(products.values()), queries, [], {"dataset": str(manifest)})
    for split in ("train", "test"):
        if not catalog.products_in(split):
            raise DatasetError(
                f"{manifest}: the split leaves no {split} products ({len(products)} products, test_fraction="
                f'{test_fraction}); give some rows "split": "{split}", or add products'
            )
    return catalog


def _parse_row(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg}); expected one JSON object per line") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise DatasetError(f"{where}: unknown field(s) {unknown}; expected {list(REQUIRED + OPTIONAL)}")
    for field in REQUIRED:
        if row.get(field) is None or (isinstance(row[field], str) and not row[field].strip()):
            raise DatasetError(f"{where}: field {field!r} is missing or empty")
    pid = row["product_id"]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or (isinstance(pid, int) and pid < 0):
        raise DatasetError(f"{where}: product_id {pid!r} must be a string or a non-negative integer")
    for field in ("title", "query_text", "category"):
        if field in row and not isinstance(row[field], str):
            raise DatasetError(f"{where}: field {field!r} is {type(row[field]).__name__}; expected a string")
    if "query_text" in row and not row["query_text"].strip():
        raise DatasetError(f"{where}: field 'query_text' is empty; leave it out to use the title")
    if "split" in row and row["split"] not in SPLITS:
        raise DatasetError(f"{where}: split {row['split']!r}; expected one of {list(SPLITS)}")
    return row


def write_dataset(catalog: Catalog, out: str | Path) -> Path:
    """Write `catalog` as a JSON Lines dataset next to its images (atomically). Rows are grouped by product in
    catalog order, each product's query photos in catalog order, so `load_dataset` of the file gives the same
    products, the same query photos per product and the same splits, hence the same training batches."""
    out = Path(out)
    if out.parent.resolve() != catalog.root.resolve():
        raise DatasetError(f"{out}: write the dataset into the catalog folder {catalog.root}, so its paths resolve")
    by_product: dict[int, list[QueryPhoto]] = {p.product_id: [] for p in catalog.products}
    for q in catalog.queries:
        by_product[q.product_id].append(q)
    lines = []
    for p in catalog.products:
        base = {"product_id": p.product_id, "product_image": p.image, "title": p.title, "split": p.split}
        if p.category:
            base["category"] = p.category
        rows = [{**base, "query_image": q.image, "query_text": q.short_text} for q in by_product[p.product_id]]
        lines += [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rows or [base]]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
