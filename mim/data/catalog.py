"""The synthetic street-to-shop catalog as its readers see it: records, the manifest, splits, image bytes.

A catalog is a folder:
    catalog.json        manifest (written last, atomically)
    shop/p00000.png     catalog ("shop") image of product 0
    street/q000000.jpg  query ("street") photo 0

Every product is one model variant of a (category, pattern, colour) combination with a title; products of the
same combination share their title and differ in details the title does not name. Every val/test product and a
fraction of the training products have query photos with a short typed query; some query photos have
reformulations (a text naming a change of colour or pattern whose answer is another product). Products are split
train/val/test by product, so test products never appear in training.

This module only reads and writes records. `mim.data.synth` plans and draws a catalog (`mimsearch catalog`),
`mim.data.render` holds the drawing code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mim.atomic import atomic_write_text
from mim.errors import DataError

# 2: larger products in street photos, 8 street photos per training product
# 3: several products (model variants) per attribute triple; street photos for only a fraction of training products
# 4: the product is the subject of its street photos (`street_layout`, default "subject"); format 3's photos are
#    the "crowded" layout
FORMAT_VERSION = 4
MANIFEST = "catalog.json"


class CatalogError(DataError):
    """A catalog folder that cannot be read: none there, or written by another version of the generator."""


SPLITS = ("train", "val", "test")
# The attributes a product's title names (Product fields); a JSON Lines dataset may leave all but the category empty.
ATTRIBUTES = ("category", "pattern", "colour")


@dataclass(frozen=True)
class Product:
    product_id: int
    category: str
    pattern: str
    colour: str
    title: str
    split: str
    image: str  # path relative to the catalog root
    # Which model of its category the product is (0..variants-1): a model has its own proportions, trim colour and
    # logo, shared by all its patterns and colours. The title does not name it.
    variant: int = 0


@dataclass(frozen=True)
class QueryPhoto:
    query_id: int
    product_id: int
    image: str  # path relative to the catalog root
    short_text: str
    split: str


@dataclass(frozen=True)
class Reformulation:
    query_id: int  # the query photo of the source product
    text: str  # the change, e.g. "in red"
    source_product_id: int
    target_product_id: int
    kind: str  # "colour" | "pattern"
    split: str


@dataclass
class Catalog:
    root: Path
    seed: int
    products: list[Product]
    queries: list[QueryPhoto]
    reformulations: list[Reformulation]
    params: dict[str, Any] = field(default_factory=dict)
    _by_id: dict[int, Product] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._by_id = {p.product_id: p for p in self.products}

    @property
    def image_size(self) -> int:
        return int(self.params["image_size"])

    def products_in(self, split: str) -> list[Product]:
        _check_split(split)
        return [p for p in self.products if p.split == split]

    def queries_in(self, split: str) -> list[QueryPhoto]:
        _check_split(split)
        return [q for q in self.queries if q.split == split]

    def reformulations_in(self, split: str) -> list[Reformulation]:
        _check_split(split)
        return [r for r in self.reformulations if r.split == split]

    def product(self, product_id: int) -> Product:
        try:
            return self._by_id[product_id]
        except KeyError:
            ids = f"0..{len(self.products) - 1}" if self.products else "none (empty catalog)"
            raise KeyError(
                f"unknown product id {product_id!r} in the catalog at {self.root}; valid ids are {ids}"
            ) from None

    def path(self, rel: str) -> Path:
        """Absolute path of an image given its manifest path; refuses paths that leave the catalog root."""
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"image path {rel!r} must be relative to the catalog root and stay inside it")
        return self.root / p

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def paired(self, split: str) -> list[Product]:
        """The split's products that have query photos (street-to-shop pairs); the others only have a title."""
        with_photos = {q.product_id for q in self.queries_in(split)}
        return [p for p in self.products_in(split) if p.product_id in with_photos]

    def all_texts(self) -> list[str]:
        """Titles, short queries and reformulation texts of every split, in manifest order (for a tokenizer).

        Including val/test texts leaks no product: the vocabulary is closed (every word occurs in every split).
        """
        return (
            [p.title for p in self.products]
            + [q.short_text for q in self.queries]
            + [r.text for r in self.reformulations]
        )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


# --------------------------------------------------------------------------------------------------------------
# Manifest


def write_manifest(
    root: str | os.PathLike,
    params: dict[str, Any],
    products: list[Product],
    queries: list[QueryPhoto],
    reforms: list[Reformulation],
) -> Path:
    """Write `root/catalog.json` atomically (sorted keys, so the same records give the same bytes)."""
    doc = {
        "format_version": FORMAT_VERSION,
        "params": params,
        "products": [dataclasses.asdict(p) for p in products],
        "queries": [dataclasses.asdict(q) for q in queries],
        "reformulations": [dataclasses.asdict(r) for r in reforms],
    }
    path = Path(root) / MANIFEST
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def _records(cls: type, rows: list[dict[str, Any]], where: Path) -> list[Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    try:
        return [cls(**{k: row[k] for k in names}) for row in rows]
    except (KeyError, TypeError) as e:
        raise CatalogError(f"{where}: malformed {cls.__name__} record ({e}); regenerate with ensure_catalog") from None


def load_catalog(root: str | os.PathLike) -> Catalog:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        what = "a file" if root.is_file() else ("a folder without one" if root.is_dir() else "nothing there")
        raise CatalogError(
            f"no catalog manifest at {path} ({what}); expected a catalog folder or a "
            f"JSON Lines dataset: create one with `mimsearch catalog --out {root}`"
        )
    doc = json.loads(path.read_text(encoding="utf-8"))
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise CatalogError(
            f"{path} has format_version={version!r}, expected {FORMAT_VERSION}: it was written by another version of "
            f"the generator and would be misread; regenerate it with `mimsearch catalog --out {root} --force` "
            "(or mim.data.synth.ensure_catalog)"
        )
    params = doc["params"]
    return Catalog(
        root,
        int(params["seed"]),
        _records(Product, doc["products"], path),
        _records(QueryPhoto, doc["queries"], path),
        _records(Reformulation, doc["reformulations"], path),
        params,
    )


def summary(catalog: Catalog) -> str:
    lines = [
        f"catalog at {catalog.root}: seed={catalog.seed} image_size={catalog.image_size} "
        f"variants={catalog.params.get('variants', 1)} street_fraction={catalog.params.get('street_fraction', 1.0)}"
        + (f" street_layout={catalog.params['street_layout']}" if "street_layout" in catalog.params else "")
    ]
    for s in SPLITS:
        refs = catalog.reformulations_in(s)
        kinds = {k: sum(r.kind == k for r in refs) for k in ("colour", "pattern")}
        lines.append(
            f"  {s:5s}: {len(catalog.products_in(s)):4d} products ({len(catalog.paired(s)):4d} with photos), "
            f"{len(catalog.queries_in(s)):5d} query photos, "
            f"{len(refs):5d} reformulations (colour {kinds['colour']}, pattern {kinds['pattern']})"
        )
    return "\n".join(lines)
