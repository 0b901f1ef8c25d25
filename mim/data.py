"""A deterministic synthetic street-to-shop catalog.

Every product is one (category, pattern, colour) combination: a drawn silhouette (mug, shirt, shoe, ...) filled
with a surface pattern (stripes, zebra, polka dots, ...) in a colour. Each product has

- one catalog ("shop") image: the product centred on white, PNG;
- several query ("street") photos, JPEG: the product scaled, moved, rotated and partly hidden on a cluttered
  background that also holds 1-3 *distractor* objects of other categories carrying the SAME pattern (and often
  the same colour);
- a title ("modern red zebra-striped ceramic mug") and, per query photo, a short typed query ("zebra mug").

The distractors are the point: an image-only metric learner can match the query photo on its pattern alone and
retrieve a zebra-striped shirt for a zebra-striped mug. The title names the category, so image-text alignment
has a signal that pattern matching lacks (the paper's false-positive argument, see METHOD.md).

Multimodal search gets reformulation pairs: a query photo of product X plus a text naming a change ("in red",
"with polka dots") whose answer is X with that attribute changed.

Products are split train/val/test by product (stratified per category), so test products never appear in
training. Everything is derived from `seed` through numpy Generators keyed by (seed, stream, product or query id), never
global random state (only the split uses one catalog-wide stream): the same seed and parameters give
byte-identical files, and products could be rendered in parallel.

Layout under `root`:
    catalog.json        manifest (written last, atomically)
    shop/p00000.png     catalog image of product 0
    street/q000000.jpg  query photo 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from tqdm import tqdm

FORMAT_VERSION = 2  # 2: larger products in street photos, 8 street photos per training product
MANIFEST = "catalog.json"
SPLITS = ("train", "val", "test")

# Category -> the material word its titles use. Silhouettes are drawn by `_SHAPES` below.
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

# Colour -> primary RGB. No white: products must stand out on the white catalog background.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 40),
    "blue": (35, 75, 200),
    "green": (35, 150, 60),
    "yellow": (240, 205, 30),
    "orange": (245, 125, 20),
    "purple": (125, 50, 170),
    "pink": (240, 120, 175),
    "black": (35, 35, 38),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
# Pattern marks use a darker shade of bright colours and a lighter shade of dark ones, so the hue stays readable.
# Red gets a darker (not pinkish) shade so red and pink products cannot be mixed up by their marks.
_LIGHTER_SECONDARY = frozenset({"blue", "purple", "black"})

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
_STREAM_STYLE, _STREAM_QUERY, _STREAM_TEXT, _STREAM_REFORM, _STREAM_SPLIT = range(5)


# --------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Product:
    product_id: int
    category: str
    pattern: str
    colour: str
    title: str
    split: str
    image: str  # path relative to the catalog root


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


def _normalize_params(
    *,
    seed: int = 0,
    image_size: int = 128,
    n_train_queries: int = 8,
    n_eval_queries: int = 2,
    categories: Iterable[str] | None = None,
    patterns: Iterable[str] | None = None,
    colours: Iterable[str] | None = None,
    split: Sequence[float] = (0.7, 0.1, 0.2),
) -> dict[str, Any]:
    """The generation parameters as stored in the manifest; raises ValueError on bad values."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}; expected a non-negative int")
    if not isinstance(image_size, (int, np.integer)) or not 32 <= image_size <= 1024:
        raise ValueError(f"image_size={image_size!r}; expected an int in [32, 1024] (128 is the default)")
    for name, n in (("n_train_queries", n_train_queries), ("n_eval_queries", n_eval_queries)):
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= 64:
            raise ValueError(f"{name}={n!r}; expected an int in [1, 64]")
    cats = _pick("categories", categories, CATEGORIES)
    if len(cats) < 2:
        raise ValueError(f"categories={cats}; need at least 2 so query photos can hold distractors of another category")
    fractions = [float(f) for f in split]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split={tuple(split)}; expected three non-negative (train, val, test) fractions summing to 1")
    return {
        "seed": int(seed),
        "image_size": int(image_size),
        "n_train_queries": int(n_train_queries),
        "n_eval_queries": int(n_eval_queries),
        "categories": cats,
        "patterns": _pick("patterns", patterns, PATTERNS),
        "colours": _pick("colours", colours, COLOURS),
        "split": fractions,
    }


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


# --------------------------------------------------------------------------------------------------------------
# Plan: every record of the catalog, without drawing anything


def _assign_splits(params: dict[str, Any], combos: list[tuple[str, str, str]]) -> list[str]:
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


def _title(seed: int, pid: int, category: str, pattern: str, colour: str) -> str:
    rng = _rng(seed, _STREAM_TEXT, pid)
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
    seed = params["seed"]
    combos = [(c, p, k) for c in params["categories"] for p in params["patterns"] for k in params["colours"]]
    splits = _assign_splits(params, combos)
    products = [
        Product(pid, cat, pat, col, _title(seed, pid, cat, pat, col), splits[pid], f"shop/p{pid:05d}.png")
        for pid, (cat, pat, col) in enumerate(combos)
    ]
    queries: list[QueryPhoto] = []
    for p in products:
        n = params["n_train_queries"] if p.split == "train" else params["n_eval_queries"]
        for k in range(n):
            qid = len(queries)
            rng = _rng(seed, _STREAM_TEXT, p.product_id, k + 1)
            text = _short_text(rng, p.category, p.pattern, p.colour)
            queries.append(QueryPhoto(qid, p.product_id, f"street/q{qid:06d}.jpg", text, p.split))
    index = {(p.category, p.pattern, p.colour): p for p in products}
    reforms = [r for q in queries for r in _reformulations(seed, q, products[q.product_id], index)]
    return products, queries, reforms


def _reformulations(
    seed: int, q: QueryPhoto, src: Product, index: dict[tuple[str, str, str], Product]
) -> list[Reformulation]:
    """At most one colour change and one pattern change per query photo, to a target in the same split."""
    rng = _rng(seed, _STREAM_REFORM, q.query_id)
    out = []
    colour_targets = [t for (c, p, k), t in index.items() if c == src.category and p == src.pattern and k != src.colour]
    pattern_targets = [
        t for (c, p, k), t in index.items() if c == src.category and k == src.colour and p != src.pattern
    ]
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
# Drawing: silhouettes


class _Pen:
    """ImageDraw in unit coordinates: (0, 0) is the top-left of the sprite box, (1, 1) its bottom-right."""

    def __init__(self, image: Image.Image):
        self.n = image.size[0]
        self.d = ImageDraw.Draw(image)

    def _xy(self, pts: Sequence[float]) -> list[float]:
        return [v * self.n for v in pts]

    def _w(self, w: float) -> int:
        return max(1, int(round(w * self.n)))

    def poly(self, *pts: float, fill: int = 255) -> None:
        self.d.polygon(self._xy(pts), fill=fill)

    def rect(self, *box: float, r: float = 0.0, fill: int = 255) -> None:
        if r:
            self.d.rounded_rectangle(self._xy(box), radius=r * self.n, fill=fill)
        else:
            self.d.rectangle(self._xy(box), fill=fill)

    def ellipse(self, *box: float, fill: int = 255) -> None:
        self.d.ellipse(self._xy(box), fill=fill)

    def ring(self, *box: float, w: float) -> None:
        self.d.ellipse(self._xy(box), outline=255, width=self._w(w))

    def arc(self, *box: float, start: float, end: float, w: float) -> None:
        self.d.arc(self._xy(box), start, end, fill=255, width=self._w(w))

    def line(self, *pts: float, w: float) -> None:
        self.d.line(self._xy(pts), fill=255, width=self._w(w))

    def pie(self, *box: float, start: float, end: float) -> None:
        self.d.pieslice(self._xy(box), start, end, fill=255)


# Each shape draws the patterned part ("fabric") and the plain dark part ("hardware": handles, legs, soles).
def _mug(f: _Pen, h: _Pen) -> None:
    f.ring(0.56, 0.32, 0.90, 0.72, w=0.08)
    f.rect(0.14, 0.18, 0.70, 0.88, r=0.06)
    h.rect(0.14, 0.18, 0.70, 0.23)  # rim


def _shirt(f: _Pen, h: _Pen) -> None:
    f.poly(
        0.34,
        0.10,
        0.42,
        0.10,
        0.46,
        0.16,
        0.54,
        0.16,
        0.58,
        0.10,
        0.66,
        0.10,
        0.94,
        0.28,
        0.86,
        0.46,
        0.74,
        0.38,
        0.74,
        0.92,
        0.26,
        0.92,
        0.26,
        0.38,
        0.14,
        0.46,
        0.06,
        0.28,
    )
    h.poly(0.42, 0.10, 0.46, 0.16, 0.54, 0.16, 0.58, 0.10, 0.55, 0.10, 0.53, 0.13, 0.47, 0.13, 0.45, 0.10)


def _shoe(f: _Pen, h: _Pen) -> None:
    f.poly(0.06, 0.30, 0.30, 0.34, 0.36, 0.44, 0.52, 0.50, 0.74, 0.56, 0.90, 0.62, 0.96, 0.72, 0.06, 0.72)
    h.rect(0.04, 0.70, 0.97, 0.80, r=0.03)  # sole
    h.line(0.42, 0.47, 0.46, 0.42, w=0.02)  # laces
    h.line(0.52, 0.51, 0.56, 0.45, w=0.02)
    h.line(0.62, 0.54, 0.66, 0.48, w=0.02)


def _bag(f: _Pen, h: _Pen) -> None:
    h.arc(0.28, 0.10, 0.72, 0.70, start=180, end=360, w=0.06)  # handle
    f.poly(0.14, 0.38, 0.86, 0.38, 0.94, 0.90, 0.06, 0.90)
    h.rect(0.44, 0.44, 0.56, 0.52)  # clasp


def _lamp(f: _Pen, h: _Pen) -> None:
    f.poly(0.30, 0.06, 0.70, 0.06, 0.88, 0.48, 0.12, 0.48)  # shade
    h.rect(0.46, 0.48, 0.54, 0.84)  # stem
    f.ellipse(0.24, 0.80, 0.76, 0.95)  # base


def _bottle(f: _Pen, h: _Pen) -> None:
    h.rect(0.40, 0.03, 0.60, 0.14, r=0.02)  # cap
    f.rect(0.42, 0.13, 0.58, 0.32)  # neck
    f.poly(0.42, 0.30, 0.58, 0.30, 0.74, 0.44, 0.26, 0.44)  # shoulder
    f.rect(0.26, 0.42, 0.74, 0.96, r=0.07)


def _hat(f: _Pen, h: _Pen) -> None:
    f.ellipse(0.03, 0.58, 0.97, 0.82)  # brim
    f.rect(0.24, 0.18, 0.76, 0.70, r=0.16)  # crown
    h.rect(0.24, 0.54, 0.76, 0.62)  # band


def _chair(f: _Pen, h: _Pen) -> None:
    f.rect(0.22, 0.04, 0.78, 0.50, r=0.05)  # back
    f.poly(0.16, 0.50, 0.84, 0.50, 0.90, 0.64, 0.10, 0.64)  # seat
    for x0, x1, y1 in ((0.12, 0.19, 0.96), (0.81, 0.88, 0.96), (0.30, 0.35, 0.84), (0.65, 0.70, 0.84)):
        h.rect(x0, 0.64, x1, y1)


def _umbrella(f: _Pen, h: _Pen) -> None:
    f.pie(0.03, 0.10, 0.97, 0.90, start=180, end=360)
    for i in range(4):  # scalloped hem
        x = 0.03 + i * 0.235
        f.ellipse(x, 0.43, x + 0.235, 0.57, fill=0)
    h.rect(0.48, 0.04, 0.52, 0.12)  # tip
    h.rect(0.48, 0.48, 0.52, 0.86)  # shaft
    h.arc(0.34, 0.76, 0.52, 0.96, start=0, end=180, w=0.04)  # hook


def _clock(f: _Pen, h: _Pen) -> None:
    h.ellipse(0.10, 0.06, 0.34, 0.28)  # bells
    h.ellipse(0.66, 0.06, 0.90, 0.28)
    h.line(0.28, 0.80, 0.16, 0.96, w=0.05)  # feet
    h.line(0.72, 0.80, 0.84, 0.96, w=0.05)
    f.ellipse(0.12, 0.14, 0.88, 0.90)
    h.line(0.50, 0.52, 0.50, 0.28, w=0.045)  # hands
    h.line(0.50, 0.52, 0.68, 0.60, w=0.045)
    h.ellipse(0.46, 0.48, 0.54, 0.56)


_SHAPES: dict[str, Callable[[_Pen, _Pen], None]] = {
    "mug": _mug,
    "shirt": _shirt,
    "shoe": _shoe,
    "bag": _bag,
    "lamp": _lamp,
    "bottle": _bottle,
    "hat": _hat,
    "chair": _chair,
    "umbrella": _umbrella,
    "clock": _clock,
}


# --------------------------------------------------------------------------------------------------------------
# Drawing: patterns. Each maps unit coordinates (u, v) of the sprite box to "ink" in [0, 1]: 0 is the primary
# colour, 1 the secondary shade. Coordinates are per object, so the pattern rotates and scales with it.


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _rotated(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return u * c + v * s, -u * s + v * c


def _pat_solid(u, v, ph):
    return np.zeros((v.shape[0], u.shape[1]), np.float32)


def _pat_stripes(u, v, ph):
    a, b = _rotated(u, v, ph[2] * 0.25)
    return (_frac(b * 5.0 + ph[0]) < 0.45).astype(np.float32)


def _pat_zebra(u, v, ph):
    a, b = _rotated(u, v, 0.7 + ph[2] * 0.25)
    w = b * 4.5 + 0.28 * np.sin(2 * np.pi * (1.4 * a + ph[0])) + 0.14 * np.sin(2 * np.pi * (3.3 * a + ph[1]))
    width = 0.38 + 0.16 * np.sin(2 * np.pi * (2.1 * a + 1.7 * b + ph[1]))
    return (_frac(w) < width).astype(np.float32)


_Mark = Callable[[ImageDraw.ImageDraw, float, float, float], None]


def _lattice_marks(n: int, k: float, ph, mark: _Mark) -> np.ndarray:
    """Ink of repeated marks on a lattice with k cells per unit whose odd rows are shifted by half a cell.
    `mark(draw, cx, cy, cell)` draws one mark centred at pixel (cx, cy). Drawing shapes is much cheaper than
    evaluating a distance field at every pixel."""
    im = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(im)
    cell = n / k
    for r in range(-1, int(math.ceil(k)) + 2):
        cy = (r + 0.5 - ph[1]) * cell
        shift = ph[0] + 0.5 * (r % 2)
        for c in range(-1, int(math.ceil(k)) + 2):
            mark(d, (c + 0.5 - shift) * cell, cy, cell)
    return np.asarray(im, dtype=np.float32) / 255.0


def _pat_dots(u, v, ph):
    def dot(d, cx, cy, cell):
        r = 0.27 * cell
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)

    return _lattice_marks(u.shape[1], 4.5, ph, dot)


def _pat_plaid(u, v, ph):
    a, b = _rotated(u, v, ph[2] * 0.1)
    bands = 0.45 * (_frac(a * 3.0 + ph[0]) < 0.38) + 0.45 * (_frac(b * 3.0 + ph[1]) < 0.38)
    lines = (np.abs(_frac(a * 3.0 + ph[0] + 0.69) - 0.5) < 0.035) | (
        np.abs(_frac(b * 3.0 + ph[1] + 0.69) - 0.5) < 0.035
    )
    return np.where(lines, 1.0, bands).astype(np.float32)


def _pat_checkerboard(u, v, ph):
    a, b = _rotated(u, v, ph[2] * 0.1)
    return ((np.floor(a * 5.0 + ph[0]) + np.floor(b * 5.0 + ph[1])) % 2).astype(np.float32)


def _pat_zigzag(u, v, ph):
    a, b = _rotated(u, v, ph[2] * 0.1)
    tri = np.abs(2.0 * _frac(a * 4.0 + ph[0]) - 1.0)
    return (_frac(b * 4.0 + 0.8 * tri + ph[1]) < 0.45).astype(np.float32)


def _pat_stars(u, v, ph):
    tilt = (ph[2] - 0.5) * 0.6  # radians; one point roughly up
    # Unit star: 10 vertices alternating outer points (radius 1) and inner corners (radius 0.42).
    unit = [
        ((1.0 if i % 2 == 0 else 0.42) * math.cos(a), (1.0 if i % 2 == 0 else 0.42) * math.sin(a))
        for i, a in enumerate(-np.pi / 2 + tilt + np.arange(10) * np.pi / 5)
    ]

    def star(d, cx, cy, cell):
        r = 0.40 * cell
        d.polygon([(cx + r * x, cy + r * y) for x, y in unit], fill=255)

    return _lattice_marks(u.shape[1], 3.5, ph, star)


_PATTERN_FNS: dict[str, Callable[..., np.ndarray]] = {
    "solid": _pat_solid,
    "stripes": _pat_stripes,
    "zebra": _pat_zebra,
    "dots": _pat_dots,
    "plaid": _pat_plaid,
    "checkerboard": _pat_checkerboard,
    "zigzag": _pat_zigzag,
    "stars": _pat_stars,
}

_HARDWARE_RGB = (58, 56, 60)


def _shades(colour: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(primary, secondary, outline) RGB as float arrays."""
    primary = np.array(COLOUR_RGB[colour], np.float32)
    if colour in _LIGHTER_SECONDARY:
        secondary = primary + (255.0 - primary) * 0.55
    else:
        secondary = primary * 0.5
    return primary, secondary, primary * 0.35


_SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap anti-aliasing for silhouettes and patterns


def _grid(n: int) -> tuple[np.ndarray, np.ndarray, Image.Image]:
    """Unit coordinates of an n x n box as broadcastable rows: u (1, n) runs left->right, v (n, 1) top->bottom;
    and a left-lit shading image (RGB, 255 at the left edge down to 84% at the right)."""
    t = (np.arange(n, dtype=np.float32) + 0.5) / n
    row = np.repeat((255.0 * (1.0 - 0.16 * t)).astype(np.uint8)[None, :, None], 3, axis=2)  # (1, n, 3)
    light = Image.fromarray(row, "RGB").resize((n, n), Image.Resampling.NEAREST)
    return t[None, :], t[:, None], light


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary erosion by a (2r+1) square, separably: rows, then columns."""
    out = mask.copy()
    for s in range(1, r + 1):
        out[s:, :] &= mask[:-s, :]
        out[:-s, :] &= mask[s:, :]
    rows = out.copy()
    for s in range(1, r + 1):
        out[:, s:] &= rows[:, :-s]
        out[:, :-s] &= rows[:, s:]
    return out


def _sprite(category: str, pattern: str, colour: str, size: int, phase: np.ndarray, angle: float = 0.0) -> Image.Image:
    """The product drawn in a size x size box, rotated by angle degrees, as a premultiplied 'RGBa' image.

    `phase` (3 floats in [0, 1)) shifts and tilts the pattern; a product keeps its own phase in every image.
    With angle != 0 the image grows to hold the rotated box.
    """
    n = max(8, size * _SUPERSAMPLE)
    fabric, hardware = Image.new("L", (n, n), 0), Image.new("L", (n, n), 0)
    _SHAPES[category](_Pen(fabric), _Pen(hardware))
    body = (np.asarray(fabric) > 127) | (np.asarray(hardware) > 127)
    edge = body & ~_erode(body, _SUPERSAMPLE)

    u, v, light = _grid(n)
    ink = np.broadcast_to(_PATTERN_FNS[pattern](u, v, phase), (n, n))  # (n, n) in [0, 1]
    ink = Image.fromarray(np.ascontiguousarray(ink * 255.0).astype(np.uint8), "L")
    primary, secondary, outline = (tuple(int(c) for c in x) for x in _shades(colour))
    shaded = ImageChops.multiply(
        Image.composite(Image.new("RGB", (n, n), secondary), Image.new("RGB", (n, n), primary), ink), light
    )
    rgba = np.empty((n, n, 4), np.uint8)
    rgba[..., :3] = np.asarray(shaded)
    rgba[np.asarray(hardware) > 127, :3] = _HARDWARE_RGB
    rgba[edge, :3] = outline
    rgba[..., 3] = body * np.uint8(255)
    im = Image.fromarray(rgba, "RGBA").convert("RGBa").resize((max(1, n // _SUPERSAMPLE),) * 2, Image.Resampling.BOX)
    if angle:
        # Bilinear at the final resolution: bicubic costs 3x as much and the photo is degraded later anyway.
        im = im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    return im


def _paste(canvas: Image.Image, sprite: Image.Image, cx: float, cy: float) -> tuple[int, int, int, int]:
    """Alpha-paste an 'RGBa' sprite centred at (cx, cy); returns its box (x0, y0, x1, y1)."""
    rgba = sprite.convert("RGBA")
    x0, y0 = int(round(cx - rgba.width / 2)), int(round(cy - rgba.height / 2))
    canvas.paste(rgba, (x0, y0), rgba)
    return x0, y0, x0 + rgba.width, y0 + rgba.height


def _product_phase(seed: int, pid: int) -> np.ndarray:
    return _rng(seed, _STREAM_STYLE, pid).random(3)


def render_catalog_image(category: str, pattern: str, colour: str, image_size: int, phase: np.ndarray) -> Image.Image:
    """The shop image: the product at 82% of the frame, centred on white, RGB."""
    canvas = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    sprite = _sprite(category, pattern, colour, int(round(0.82 * image_size)), phase)
    _paste(canvas, sprite, image_size / 2, image_size / 2)
    return canvas


# --------------------------------------------------------------------------------------------------------------
# Drawing: street photos


def _muted(rng: np.random.Generator, lo: float = 40, hi: float = 230) -> tuple[int, int, int]:
    """A random colour pulled towards grey, so clutter rarely looks like a saturated product colour."""
    c = rng.uniform(lo, hi, 3)
    c = 0.55 * c + 0.45 * c.mean()
    return tuple(int(x) for x in c)


def _background(rng: np.random.Generator, s: int) -> Image.Image:
    """A gradient with random clutter shapes (rectangles, ellipses, lines, polygons)."""
    c0, c1 = np.array(_muted(rng, 80, 250), np.float32), np.array(_muted(rng, 40, 240), np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    x, y, _ = _grid(s)
    g = (x - 0.5) * math.cos(ang) + (y - 0.5) * math.sin(ang) + 0.5
    g = np.clip(np.broadcast_to(g, (s, s)), 0.0, 1.0)[..., None]
    im = Image.fromarray((c0 * (1 - g) + c1 * g).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(4, 11))):
        kind = int(rng.integers(4))
        cx, cy = rng.uniform(-0.1, 1.1, 2) * s
        w, h = rng.uniform(0.08, 0.5, 2) * s
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        colour = _muted(rng)
        if kind == 0:
            d.rectangle(box, fill=colour)
        elif kind == 1:
            d.ellipse(box, fill=colour)
        elif kind == 2:
            d.line(box, fill=colour, width=max(1, int(rng.uniform(0.01, 0.05) * s)))
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 6))))
            radii = rng.uniform(0.05, 0.25, 5) * s
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]
            d.polygon(pts, fill=colour)
    return im


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h


def _place_distractors(
    rng: np.random.Generator,
    canvas: Image.Image,
    product: Product,
    others: list[str],
    scale: float,
    product_box: tuple[float, float, float, float],
) -> None:
    """1-3 objects of other categories with the product's pattern (same colour 60% of the time), placed where they
    overlap the product least among a few random candidate spots."""
    s = canvas.width
    n = min(int(rng.integers(1, 4)), len(others))
    cats = [others[i] for i in rng.choice(len(others), size=n, replace=False)]
    taken = [product_box]
    for cat in cats:
        colour = product.colour if rng.random() < 0.6 else COLOURS[rng.integers(len(COLOURS))]
        # Usually smaller than the product, sometimes as big (the product is not always the biggest object).
        rel = rng.uniform(0.45, 0.9) if rng.random() < 0.85 else rng.uniform(0.9, 1.15)
        size = int(round(np.clip(scale * rel, 0.2, 0.8) * s))
        best, best_cost = None, None
        for _ in range(8):
            cx, cy = rng.uniform(0.1, 0.9, 2) * s
            box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
            cost = sum(_overlap(box, t) for t in taken)
            if best_cost is None or cost < best_cost:
                best, best_cost = (cx, cy, box), cost
        cx, cy, box = best
        taken.append(box)
        sprite = _sprite(cat, product.pattern, colour, size, rng.random(3), rng.uniform(-30, 30))
        _paste(canvas, sprite, cx, cy)


def _occlude(rng: np.random.Generator, canvas: Image.Image, box: tuple[int, int, int, int]) -> None:
    """Cover a strip of up to ~25% of the product's box from one side, like an object in front of it."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    frac = rng.uniform(0.08, 0.25)
    side = int(rng.integers(4))
    over = rng.uniform(0.05, 0.4)  # how far the occluder sticks out past the product
    if side == 0:
        r = (x0 - over * bw, y0 - 0.1 * bh, x0 + frac * bw, y1 + 0.1 * bh)
    elif side == 1:
        r = (x1 - frac * bw, y0 - 0.1 * bh, x1 + over * bw, y1 + 0.1 * bh)
    elif side == 2:
        r = (x0 - 0.1 * bw, y0 - over * bh, x1 + 0.1 * bw, y0 + frac * bh)
    else:
        r = (x0 - 0.1 * bw, y1 - frac * bh, x1 + 0.1 * bw, y1 + over * bh)
    d = ImageDraw.Draw(canvas)
    colour = _muted(rng, 20, 240)
    radius = rng.uniform(0, 0.3) * min(r[2] - r[0], r[3] - r[1])
    d.rounded_rectangle(r, radius=radius, fill=colour, outline=tuple(int(c * 0.6) for c in colour))


def _photo_jitter(rng: np.random.Generator, im: Image.Image) -> Image.Image:
    """Camera-ish degradations: white balance, brightness, contrast, saturation, sensor noise, slight blur."""
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    a = np.asarray(im, dtype=np.float32)
    a = a * (rng.uniform(0.93, 1.07, 3) * rng.uniform(0.78, 1.15)).astype(np.float32)
    mean = a.mean()
    a = (a - mean) * np.float32(rng.uniform(0.8, 1.15)) + mean
    grey = a.mean(axis=2, keepdims=True)
    a = grey + (a - grey) * np.float32(rng.uniform(0.75, 1.15))
    a = a + rng.standard_normal(a.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 7.0))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def render_query_photo(
    seed: int, query_index: int, product: Product, categories: Sequence[str], image_size: int
) -> tuple[Image.Image, int]:
    """The k-th street photo of a product and the JPEG quality to save it with. Deterministic in its arguments."""
    rng = _rng(seed, _STREAM_QUERY, product.product_id, query_index)
    s = image_size
    canvas = _background(rng, s)
    scale = rng.uniform(0.5, 0.85)  # product 24-41 px across at the tiny model's 48 px: its silhouette stays legible
    angle = rng.uniform(-25, 25)
    size = int(round(scale * s))
    half = size / 2 * 0.85  # keep most of the product inside the frame
    cx, cy = rng.uniform(half, s - half, 2)
    product_box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    others = [c for c in categories if c != product.category]
    _place_distractors(rng, canvas, product, others, scale, product_box)
    phase = _product_phase(seed, product.product_id)
    sprite = _sprite(product.category, product.pattern, product.colour, size, phase, angle)
    box = _paste(canvas, sprite, cx, cy)
    if rng.random() < 0.75:
        _occlude(rng, canvas, box)
    return _photo_jitter(rng, canvas), int(rng.integers(70, 96))


# --------------------------------------------------------------------------------------------------------------
# Generation, loading, reuse


def _to_manifest(params: dict[str, Any], products, queries, reforms) -> str:
    doc = {
        "format_version": FORMAT_VERSION,
        "params": params,
        "products": [dataclasses.asdict(p) for p in products],
        "queries": [dataclasses.asdict(q) for q in queries],
        "reformulations": [dataclasses.asdict(r) for r in reforms],
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


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


def generate_catalog(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    image_size: int = 128,
    n_train_queries: int = 8,
    n_eval_queries: int = 2,
    categories: Iterable[str] | None = None,
    patterns: Iterable[str] | None = None,
    colours: Iterable[str] | None = None,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    progress: bool = True,
) -> Catalog:
    """Draw the catalog under `root` (created if needed), overwriting any catalog there; returns it.

    The old manifest is removed first and the new one written last, so a crash mid-way leaves no manifest that
    points at missing or stale files.
    """
    params = _normalize_params(
        seed=seed,
        image_size=image_size,
        n_train_queries=n_train_queries,
        n_eval_queries=n_eval_queries,
        categories=categories,
        patterns=patterns,
        colours=colours,
        split=split,
    )
    root = Path(root)
    products, queries, reforms = _plan(params)
    for sub in _OWNED:
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)

    by_product: dict[int, list[QueryPhoto]] = {}
    for q in queries:
        by_product.setdefault(q.product_id, []).append(q)
    s = params["image_size"]
    for p in tqdm(products, desc="catalog", unit="product", disable=not progress):
        phase = _product_phase(params["seed"], p.product_id)
        render_catalog_image(p.category, p.pattern, p.colour, s, phase).save(root / p.image, format="PNG")
        for k, q in enumerate(by_product.get(p.product_id, [])):
            photo, quality = render_query_photo(params["seed"], k, p, params["categories"], s)
            photo.save(root / q.image, format="JPEG", quality=quality)

    _remove_stale(root, {p.image for p in products} | {q.image for q in queries})
    _write_atomic(root / MANIFEST, _to_manifest(params, products, queries, reforms))
    return Catalog(root, params["seed"], products, queries, reforms, params)


def _records(cls: type, rows: list[dict[str, Any]], where: Path) -> list[Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    try:
        return [cls(**{k: row[k] for k in names}) for row in rows]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: malformed {cls.__name__} record ({e}); regenerate with ensure_catalog") from None


def load_catalog(root: str | os.PathLike) -> Catalog:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no catalog manifest at {path}; create one with `python -m mim.data --out {root}` "
            "or mim.data.ensure_catalog(root)"
        )
    doc = json.loads(path.read_text(encoding="utf-8"))
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={version!r}, expected {FORMAT_VERSION}; regenerate it with ensure_catalog"
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


def ensure_catalog(root: str | os.PathLike, **kwargs: Any) -> Catalog:
    """Reuse the catalog at `root` if it was generated with these parameters and its images exist, else generate.

    kwargs are generate_catalog's (progress is not a generation parameter and is ignored in the comparison).
    """
    progress = kwargs.pop("progress", True)
    wanted = _normalize_params(**kwargs)
    try:
        cat = load_catalog(root)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
        cat = None
    if cat is not None and cat.params == wanted:
        images = [p.image for p in cat.products] + [q.image for q in cat.queries]
        if all(cat.path(rel).is_file() for rel in images):
            return cat
    return generate_catalog(root, progress=progress, **kwargs)


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


def summary(catalog: Catalog) -> str:
    lines = [f"catalog at {catalog.root}: seed={catalog.seed} image_size={catalog.image_size}"]
    for s in SPLITS:
        refs = catalog.reformulations_in(s)
        kinds = {k: sum(r.kind == k for r in refs) for k in ("colour", "pattern")}
        lines.append(
            f"  {s:5s}: {len(catalog.products_in(s)):4d} products, {len(catalog.queries_in(s)):5d} query photos, "
            f"{len(refs):5d} reformulations (colour {kinds['colour']}, pattern {kinds['pattern']})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mim.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="catalog root directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--n-train-queries", type=int, default=8, help="query photos per train product")
    ap.add_argument("--n-eval-queries", type=int, default=2, help="query photos per val/test product")
    ap.add_argument("--categories", default=None, help=f"comma-separated subset of {','.join(CATEGORIES)}")
    ap.add_argument("--patterns", default=None, help=f"comma-separated subset of {','.join(PATTERNS)}")
    ap.add_argument("--colours", default=None, help=f"comma-separated subset of {','.join(COLOURS)}")
    ap.add_argument("--force", action="store_true", help="regenerate even if a matching catalog exists")
    ap.add_argument("--sheet", default=None, help="also save a contact sheet PNG of test products here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    kwargs = {
        "seed": args.seed,
        "image_size": args.image_size,
        "n_train_queries": args.n_train_queries,
        "n_eval_queries": args.n_eval_queries,
        "categories": args.categories,
        "patterns": args.patterns,
        "colours": args.colours,
        "progress": not args.no_progress,
    }
    t0 = time.perf_counter()
    try:
        cat = generate_catalog(args.out, **kwargs) if args.force else ensure_catalog(args.out, **kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(cat))
    print(f"  ready in {time.perf_counter() - t0:.1f}s")
    if args.sheet:
        print(f"  contact sheet: {save_contact_sheet(cat, args.sheet)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
