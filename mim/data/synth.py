"""Generate the deterministic synthetic street-to-shop catalog (`mimsearch catalog --out DIR`).

Every product is one model of a category made in one (pattern, colour): a drawn silhouette (mug, shirt, shoe, ...)
filled with a surface pattern (stripes, zebra, polka dots, ...) in a colour. A category has `variants` models,
which differ in details no title names: proportions, trim colour and a small logo. So `variants` products share
each (category, pattern, colour) combination and its title, as products of one concept do in a real catalog.
Each product has

- one catalog ("shop") image: the product centred on white, PNG;
- a title ("modern red zebra-striped ceramic mug"), the same for every model of the combination;
- query ("street") photos, JPEG, for every val/test product and for a `street_fraction` of the training products
  (real street-to-shop pairs cover part of a catalog, titles all of it): the product scaled, moved, rotated and
  partly hidden on a cluttered background that also holds 1-3 *distractor* objects of other categories carrying
  the SAME pattern (and often the same colour); per photo a short typed query ("zebra mug"). In the default
  `street_layout` ("subject") the product fills most of the photo and distractors are at most about half its size;
  "crowded" (catalog format 3) makes them as big as the product.

The distractors are the point: an image-only metric learner can match the query photo on its pattern alone and
retrieve a zebra-striped shirt for a zebra-striped mug. The title names the category, so image-text alignment
has a signal that pattern matching lacks (the paper's false-positive argument, docs/METHOD.md "Setting").

Multimodal search gets reformulation pairs: a query photo of product X plus a text naming a change ("in red",
"with polka dots") whose answer is the same model as X with that attribute changed.

Products are split train/val/test by product (stratified per category), so test products never appear in
training. Everything is derived from `seed` through numpy Generators keyed by (seed, stream, product or query
id), never global random state (only the split uses one catalog-wide stream): the same seed and parameters give
byte-identical files, and products could be rendered in parallel.

This module plans the records (vocabulary, titles, queries, reformulations, splits) and writes the catalog;
`mim.data.render` draws the images and `mim.data.catalog` owns the records, the folder layout and the manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mim.data.catalog import (
    MANIFEST,
    Catalog,
    Product,
    QueryPhoto,
    Reformulation,
    load_catalog,
    write_manifest,
)
from mim.data.render import (
    COLOUR_RGB,
    DEFAULT_STREET_LAYOUT,
    LOGOS,
    STREET_LAYOUTS,
    TRIM_RGB,
    Look,
    render_catalog_image,
    render_street_photo,
)
from mim.progress import progress_bar

# Category -> the material word its titles use. mim.data.render draws a silhouette for each.
MATERIALS: dict[str, str] = {
    "mug": "ceramic",
    "shirt": "cotton",
    "shoe": "leather",
    "bag": "canvas",
    "lamp": "metal",
    "bottle": "glass",
    "hat": "wool",
    "chair": "wooden",
    "umbrella": "nylon",
    "clock": "plastic",
}
CATEGORIES: tuple[str, ...] = tuple(MATERIALS)

# Pattern -> (adjective used in titles, word used in short typed queries).
PATTERN_WORDS: dict[str, tuple[str, str]] = {
    "solid": ("solid", "plain"),
    "stripes": ("striped", "striped"),
    "zebra": ("zebra-striped", "zebra"),
    "dots": ("polka-dot", "dotted"),
    "plaid": ("plaid", "plaid"),
    "checkerboard": ("checkerboard", "checkered"),
    "zigzag": ("zigzag", "zigzag"),
    "stars": ("star-print", "starry"),
}
PATTERNS: tuple[str, ...] = tuple(PATTERN_WORDS)

# Colour names in id order; mim.data.render.COLOUR_RGB holds how each is drawn.
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

STYLE_WORDS = ("classic", "modern", "vintage", "everyday", "premium", "minimalist", "handmade", "essential")

# Reformulation phrasings. Colour phrasings take the target colour; pattern phrasings are per target pattern.
COLOUR_PHRASES = ("in {c}", "but {c}", "{c} one", "same in {c}")
PATTERN_PHRASES: dict[str, tuple[str, ...]] = {
    "solid": ("in solid", "plain one", "without pattern"),
    "stripes": ("with stripes", "in stripes", "striped one"),
    "zebra": ("with zebra stripes", "in zebra print", "zebra one"),
    "dots": ("with polka dots", "in polka dots", "dotted one"),
    "plaid": ("in plaid", "with plaid", "plaid one"),
    "checkerboard": ("with checks", "in checkerboard", "checkered one"),
    "zigzag": ("with zigzags", "in zigzag", "zigzag one"),
    "stars": ("with stars", "in star print", "starry one"),
}

# Stream tags keep the per-product random streams independent: (seed, tag, product_id[, k]).
_STREAM_STYLE, _STREAM_QUERY, _STREAM_TEXT, _STREAM_REFORM, _STREAM_SPLIT, _STREAM_MODEL, _STREAM_PAIRS = range(7)

# A few texts in the catalog's words (titles, a typed query, reformulations), for what needs text but no
# catalog: the tokenizer of the random tiny checkpoints the tests and the benchmarks build.
TOY_TEXTS = (
    "blue zebra-striped ceramic mug",
    "red polka-dot cotton shirt",
    "green plaid leather shoe",
    "yellow striped canvas bag",
    "zebra mug",
    "in red",
    "with polka dots",
)

# Defaults of the generation parameters (CatalogParams's).
DEFAULT_VARIANTS = 3
DEFAULT_STREET_FRACTION = 0.5
DEFAULT_TRAIN_QUERIES = 6


# --------------------------------------------------------------------------------------------------------------
# Parameters


def _pick(kind: str, given: Iterable[str] | None, known: tuple[str, ...]) -> list[str]:
    """Validate a subset of names and return it in canonical order (so product ids do not depend on order)."""
    if given is None:
        return list(known)
    if isinstance(given, str):
        given = [s for s in given.split(",") if s]
    given = list(given)
    unknown = [g for g in given if g not in known]
    if unknown:
        raise ValueError(f"unknown {kind} {unknown}; expected names from {list(known)}")
    if len(set(given)) != len(given):
        raise ValueError(f"duplicate {kind} in {given}; list each name once")
    if not given:
        raise ValueError(f"empty {kind} list; pass at least one name from {list(known)} or None for all")
    return [k for k in known if k in given]


@dataclass(frozen=True)
class CatalogParams:
    """Every parameter a synthetic catalog is generated from: the one owner of their names, defaults and checks.

    Checked and normalised when made (a bad value raises ValueError saying what is expected; name subsets are
    kept in canonical order, so product ids do not depend on the order given). The manifest records
    `as_manifest()`, and `ensure_catalog` reuses a catalog whose manifest records the same."""

    seed: int = 0
    image_size: int = 128  # px, square
    n_train_queries: int = DEFAULT_TRAIN_QUERIES  # street photos per paired training product
    n_eval_queries: int = 2  # street photos per val/test product
    categories: Sequence[str] | str | None = None  # a subset of CATEGORIES (names or "a,b"); None: all
    patterns: Sequence[str] | str | None = None  # a subset of PATTERNS; None: all
    colours: Sequence[str] | str | None = None  # a subset of COLOURS; None: all
    split: Sequence[float] = (0.7, 0.1, 0.2)  # train, val, test shares of each category's products
    variants: int = DEFAULT_VARIANTS  # models per (category, pattern, colour)
    street_fraction: float = DEFAULT_STREET_FRACTION  # share of training products with street photos
    street_layout: str = DEFAULT_STREET_LAYOUT  # subject | crowded

    def __post_init__(self) -> None:
        _check(self)
        normal = {
            "seed": int(self.seed),
            "image_size": int(self.image_size),
            "n_train_queries": int(self.n_train_queries),
            "n_eval_queries": int(self.n_eval_queries),
            "categories": tuple(_pick("categories", self.categories, CATEGORIES)),
            "patterns": tuple(_pick("patterns", self.patterns, PATTERNS)),
            "colours": tuple(_pick("colours", self.colours, COLOURS)),
            "split": tuple(float(f) for f in self.split),
            "variants": int(self.variants),
            "street_fraction": float(self.street_fraction),
        }
        if len(normal["categories"]) < 2:
            raise ValueError(
                f"categories={list(normal['categories'])}; need at least 2 so query photos can hold distractors of "
                "another category"
            )
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    def as_manifest(self) -> dict[str, Any]:
        """The parameters as the manifest stores them (JSON: lists for the name subsets and the split)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _check(p: CatalogParams) -> None:
    """Raise ValueError on a parameter out of range, naming it, its value and what is expected."""
    if not isinstance(p.seed, (int, np.integer)) or isinstance(p.seed, bool) or p.seed < 0:
        raise ValueError(f"seed={p.seed!r}; expected a non-negative int")
    if not isinstance(p.image_size, (int, np.integer)) or not 32 <= p.image_size <= 1024:
        raise ValueError(f"image_size={p.image_size!r}; expected an int in [32, 1024] (128 is the default)")
    for name, n in (("n_train_queries", p.n_train_queries), ("n_eval_queries", p.n_eval_queries)):
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= 64:
            raise ValueError(f"{name}={n!r}; expected an int in [1, 64]")
    v = p.variants
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v <= len(LOGOS):
        raise ValueError(f"variants={v!r}; expected an int in [1, {len(LOGOS)}] (models per category)")
    f = p.street_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise ValueError(f"street_fraction={f!r}; expected a number in (0, 1] (share of training products with photos)")
    if p.street_layout not in STREET_LAYOUTS:
        raise ValueError(
            f"street_layout={p.street_layout!r}; expected one of {list(STREET_LAYOUTS)} "
            f"({DEFAULT_STREET_LAYOUT!r} is the default)"
        )
    fractions = [float(x) for x in p.split]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split={tuple(p.split)}; expected three non-negative (train, val, test) fractions summing to 1"
        )


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


# --------------------------------------------------------------------------------------------------------------
# Plan: every record of the catalog, without drawing anything


def _assign_splits(params: dict[str, Any], combos: list[tuple[str, ...]]) -> list[str]:
    """Split by product, stratified per category so every split holds every kind of product."""
    rng = _rng(params["seed"], _STREAM_SPLIT)
    f_train, f_val, _ = params["split"]
    splits = [""] * len(combos)
    for cat in params["categories"]:
        ids = [i for i, c in enumerate(combos) if c[0] == cat]
        order = rng.permutation(len(ids))
        n_train = int(round(f_train * len(ids)))
        n_val = int(round(f_val * len(ids)))
        for rank, j in enumerate(order):
            splits[ids[j]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return splits


def _with_photos(params: dict[str, Any], products: list[Product]) -> set[int]:
    """Ids of the products that get street photos: all val/test products and a `street_fraction` of the training
    products, drawn per category (so every category keeps pairs)."""
    rng = _rng(params["seed"], _STREAM_PAIRS)
    chosen = {p.product_id for p in products if p.split != "train"}
    for cat in params["categories"]:
        ids = [p.product_id for p in products if p.split == "train" and p.category == cat]
        n = max(1, int(round(params["street_fraction"] * len(ids)))) if ids else 0
        chosen.update(ids[j] for j in rng.permutation(len(ids))[:n])
    return chosen


@functools.lru_cache(maxsize=8)
def _model_looks(seed: int, categories: tuple[str, ...], variants: int) -> dict[tuple[str, int], tuple[Any, ...]]:
    """(category, variant) -> (aspect, trim, logo): a category's models get distinct trims and logos."""
    looks = {}
    for ci, cat in enumerate(CATEGORIES):
        if cat not in categories:
            continue
        rng = _rng(seed, _STREAM_MODEL, ci)
        trims, logos = rng.permutation(len(TRIM_RGB)), rng.permutation(len(LOGOS))
        for v in range(variants):
            aspect = (1.0, 1.0) if variants == 1 else tuple(float(a) for a in rng.uniform(0.8, 1.2, 2))
            looks[cat, v] = (aspect, int(trims[v]), int(logos[v]))
    return looks


def product_look(seed: int, product: Product, variants: int, categories: Sequence[str]) -> Look:
    """A product's look: its own pattern phase plus its model's details (plain when variants == 1)."""
    phase = tuple(float(x) for x in _rng(seed, _STREAM_STYLE, product.product_id).random(3))
    if variants == 1:
        return Look(phase)
    aspect, trim, logo = _model_looks(seed, tuple(categories), variants)[product.category, product.variant]
    return Look(phase, aspect, trim, logo)


def _title(seed: int, combo: int, category: str, pattern: str, colour: str) -> str:
    """The combination's title: every model of it carries the same one (titles name concepts, not models)."""
    rng = _rng(seed, _STREAM_TEXT, combo)
    words = [colour, PATTERN_WORDS[pattern][0], MATERIALS[category], category]
    if rng.random() < 0.5:
        words.insert(0, STYLE_WORDS[rng.integers(len(STYLE_WORDS))])
    return " ".join(words)


def _short_text(rng: np.random.Generator, category: str, pattern: str, colour: str) -> str:
    """2-3 words, always ending with the category: 'zebra mug', 'blue mug', 'blue striped mug', 'ceramic mug'."""
    short = PATTERN_WORDS[pattern][1]
    options = ([short], [colour], [colour, short], [MATERIALS[category]])
    chosen = options[rng.choice(len(options), p=[0.3, 0.3, 0.3, 0.1])]
    return " ".join([*chosen, category])


def _plan(params: dict[str, Any]) -> tuple[list[Product], list[QueryPhoto], list[Reformulation]]:
    seed, nv = params["seed"], params["variants"]
    combos = [(c, p, k) for c in params["categories"] for p in params["patterns"] for k in params["colours"]]
    # Product id = combo * variants + variant: the models of one combination are neighbours.
    keys = [(*combo, v) for combo in combos for v in range(nv)]
    splits = _assign_splits(params, keys)
    products = [
        Product(
            pid, cat, pat, col, _title(seed, pid // nv, cat, pat, col), splits[pid], f"shop/p{pid:05d}.png", variant
        )
        for pid, (cat, pat, col, variant) in enumerate(keys)
    ]
    with_photos = _with_photos(params, products)
    queries: list[QueryPhoto] = []
    for p in products:
        if p.product_id not in with_photos:
            continue
        n = params["n_train_queries"] if p.split == "train" else params["n_eval_queries"]
        for k in range(n):
            qid = len(queries)
            rng = _rng(seed, _STREAM_TEXT, p.product_id, k + 1)
            text = _short_text(rng, p.category, p.pattern, p.colour)
            queries.append(QueryPhoto(qid, p.product_id, f"street/q{qid:06d}.jpg", text, p.split))
    index = {(p.category, p.pattern, p.colour, p.variant): p for p in products}
    reforms = [r for q in queries for r in _reformulations(seed, q, products[q.product_id], index)]
    return products, queries, reforms


def _reformulations(
    seed: int, q: QueryPhoto, src: Product, index: dict[tuple[str, str, str, int], Product]
) -> list[Reformulation]:
    """At most one colour change and one pattern change per query photo, to the same model in the same split."""
    rng = _rng(seed, _STREAM_REFORM, q.query_id)
    out = []
    same_model = [t for (c, _, _, v), t in index.items() if c == src.category and v == src.variant]
    colour_targets = [t for t in same_model if t.pattern == src.pattern and t.colour != src.colour]
    pattern_targets = [t for t in same_model if t.colour == src.colour and t.pattern != src.pattern]
    for kind, targets in (("colour", colour_targets), ("pattern", pattern_targets)):
        targets = [t for t in targets if t.split == src.split]
        if not targets:
            continue
        t = targets[rng.integers(len(targets))]
        if kind == "colour":
            text = COLOUR_PHRASES[rng.integers(len(COLOUR_PHRASES))].format(c=t.colour)
        else:
            phrases = PATTERN_PHRASES[t.pattern]
            text = phrases[rng.integers(len(phrases))]
        out.append(Reformulation(q.query_id, text, src.product_id, t.product_id, kind, src.split))
    return out


# --------------------------------------------------------------------------------------------------------------
# Generation and reuse


_OWNED = {"shop": re.compile(r"^p\d{5}\.png$"), "street": re.compile(r"^q\d{6}\.jpg$")}


def _remove_stale(root: Path, keep: set[str]) -> None:
    """Delete image files this module wrote for an earlier, larger catalog (only names matching our pattern)."""
    for sub, pattern in _OWNED.items():
        d = root / sub
        if not d.is_dir():
            continue
        for f in d.iterdir():
            if pattern.match(f.name) and f"{sub}/{f.name}" not in keep:
                f.unlink()


def render_query_photo(
    seed: int,
    query_index: int,
    product: Product,
    categories: Sequence[str],
    image_size: int,
    variants: int = 1,
    layout: str = DEFAULT_STREET_LAYOUT,
) -> tuple[Image.Image, int]:
    """The k-th street photo of a product and the JPEG quality to save it with. Deterministic in its arguments."""
    rng = _rng(seed, _STREAM_QUERY, product.product_id, query_index)
    look = product_look(seed, product, variants, categories)
    return render_street_photo(rng, product, look, categories, image_size, layout)


def generate_catalog(
    root: str | os.PathLike, params: CatalogParams | None = None, *, progress: bool = True, **settings: Any
) -> Catalog:
    """Draw the catalog of `params` (default CatalogParams(), with `settings` replacing any of its fields) under
    `root` (created if needed), overwriting any catalog there; returns it.

    The old manifest is removed first and the new one written last, so a crash mid-way leaves no manifest that
    points at missing or stale files.
    """
    params = dataclasses.replace(params or CatalogParams(), **settings).as_manifest()
    root = Path(root)
    products, queries, reforms = _plan(params)
    for sub in _OWNED:
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)

    by_product: dict[int, list[QueryPhoto]] = {}
    for q in queries:
        by_product.setdefault(q.product_id, []).append(q)
    s, nv, cats = params["image_size"], params["variants"], params["categories"]
    for p in progress_bar(products, desc="catalog", unit="product", enabled=progress):
        look = product_look(params["seed"], p, nv, cats)
        render_catalog_image(p.category, p.pattern, p.colour, s, look).save(root / p.image, format="PNG")
        for k, q in enumerate(by_product.get(p.product_id, [])):
            photo, quality = render_query_photo(params["seed"], k, p, cats, s, nv, params["street_layout"])
            photo.save(root / q.image, format="JPEG", quality=quality)

    _remove_stale(root, {p.image for p in products} | {q.image for q in queries})
    write_manifest(root, params, products, queries, reforms)
    return Catalog(root, params["seed"], products, queries, reforms, params)


def ensure_catalog(
    root: str | os.PathLike, params: CatalogParams | None = None, *, progress: bool = True, **settings: Any
) -> Catalog:
    """Reuse the catalog at `root` if it was generated with these parameters and its images exist, else generate
    it (arguments as `generate_catalog`)."""
    params = dataclasses.replace(params or CatalogParams(), **settings)
    try:
        cat = load_catalog(root)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
        cat = None
    if cat is not None and cat.params == params.as_manifest():
        images = [p.image for p in cat.products] + [q.image for q in cat.queries]
        if all(cat.path(rel).is_file() for rel in images):
            return cat
    return generate_catalog(root, params, progress=progress)


# --------------------------------------------------------------------------------------------------------------
# Inspection


def save_contact_sheet(
    catalog: Catalog, out: str | os.PathLike, *, split: str = "test", n_products: int = 6, cell: int = 128
) -> Path:
    """One row per product: its catalog image, then its query photos, with the title underneath. For eyeballing."""
    products = catalog.products_in(split)
    step = max(1, len(products) // max(1, n_products))
    chosen = products[::step][:n_products]
    rows = [[p.image] + [q.image for q in catalog.queries if q.product_id == p.product_id] for p in chosen]
    cols = max(len(r) for r in rows)
    label = 14
    sheet = Image.new("RGB", (cols * (cell + 4), len(rows) * (cell + label + 4)), (235, 235, 235))
    d = ImageDraw.Draw(sheet)
    for i, (p, row) in enumerate(zip(chosen, rows)):
        y = i * (cell + label + 4)
        for j, rel in enumerate(row):
            with Image.open(catalog.path(rel)) as im:
                sheet.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (j * (cell + 4), y))
        d.text((2, y + cell + 1), f"#{p.product_id} {p.title}", fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out
