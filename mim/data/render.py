"""Drawing the synthetic catalog's images: product silhouettes filled with surface patterns, shop images on white,
and street photos (cluttered background, distractor objects carrying the product's pattern, occlusion, camera
degradations).

Every function here is deterministic in its arguments: randomness comes in as a numpy Generator or a `Look`
(pattern phase and model details), which `mim.data.synth` derives from the catalog seed. Images are PIL RGB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from mim.data.catalog import Product

# Colour -> primary RGB. Its keys are the catalog's colour names (mim.data.synth.COLOURS, in this order).
# No white: products must stand out on the white catalog background.
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
_COLOURS = tuple(COLOUR_RGB)
# Pattern marks use a darker shade of bright colours and a lighter shade of dark ones, so the hue stays readable.
# Red gets a darker (not pinkish) shade so red and pink products cannot be mixed up by their marks.
_LIGHTER_SECONDARY = frozenset({"blue", "purple", "black"})


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

# Trim (handles, legs, soles, rims) colours a product model can have: neutrals, so none reads as a product colour.
TRIM_RGB: tuple[tuple[int, int, int], ...] = ((58, 56, 60), (112, 78, 48), (172, 172, 178), (226, 220, 204))
LOGOS = ("none", "disc", "square", "triangle")


@dataclass(frozen=True)
class Look:
    """How one product is drawn beyond its category, pattern and colour: the instance details of its model.

    phase:  3 floats in [0, 1) that shift and tilt the pattern (per product)
    aspect: (x, y) stretch of the silhouette, about 0.8-1.2 (per model)
    trim:   index into TRIM_RGB for the plain parts (per model)
    logo:   index into LOGOS, a small mark on the patterned part (per model)
    """

    phase: tuple[float, float, float]
    aspect: tuple[float, float] = (1.0, 1.0)
    trim: int = 0
    logo: int = 0


def _draw_logo(fabric: np.ndarray, rgba: np.ndarray, kind: str, colour: tuple[int, int, int]) -> None:
    """A mark of about 1/5 of the box at the centre of the patterned part's bounding box, in the trim colour."""
    if kind == "none" or not fabric.any():
        return
    n = fabric.shape[0]
    ys, xs = np.nonzero(fabric)
    cx, cy, r = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, 0.1 * n
    im = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(im)
    if kind == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    rgba[(np.asarray(im) > 127) & fabric, :3] = colour


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


def _sprite(category: str, pattern: str, colour: str, size: int, look: Look, angle: float = 0.0) -> Image.Image:
    """The product drawn in a size x size box, rotated by angle degrees, as a premultiplied 'RGBa' image.

    `look` carries the pattern phase and the model's details; a product keeps its look in every image. The
    aspect stretches the box to (size * ax, size * ay); with angle != 0 the image grows to hold the rotated box.
    """
    phase = np.asarray(look.phase)
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
    trim = TRIM_RGB[look.trim]
    rgba[np.asarray(hardware) > 127, :3] = trim
    _draw_logo((np.asarray(fabric) > 127) & ~(np.asarray(hardware) > 127), rgba, LOGOS[look.logo], trim)
    rgba[edge, :3] = outline
    rgba[..., 3] = body * np.uint8(255)
    out = (max(1, round(n * look.aspect[0] / _SUPERSAMPLE)), max(1, round(n * look.aspect[1] / _SUPERSAMPLE)))
    im = Image.fromarray(rgba, "RGBA").convert("RGBa").resize(out, Image.Resampling.BOX)
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


def render_catalog_image(category: str, pattern: str, colour: str, image_size: int, look: Look) -> Image.Image:
    """The shop image: the product at 82% of the frame (its longer side at most 90%), centred on white, RGB."""
    canvas = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    size = min(0.82, 0.9 / max(look.aspect)) * image_size
    sprite = _sprite(category, pattern, colour, int(round(size)), look)
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


@dataclass(frozen=True)
class StreetLayout:
    """How big the product and its distractors are in a street photo (fractions of the frame / of the product)."""

    product_scale: tuple[float, float]  # the product's box as a fraction of the frame side
    distractor_rel: tuple[float, float]  # a distractor's size relative to the product, 85% of the time
    distractor_rel_big: tuple[float, float]  # ... and the other 15%


# The catalog parameter `street_layout` names one of these.
STREET_LAYOUTS: dict[str, StreetLayout] = {
    # The product is the photo's subject, as in a shopper's photo of the thing they want: 60-90% of the frame,
    # distractors at most about half its size. Its shape can be read; the confound is in the gallery, where
    # other kinds of product carry the same pattern and colour.
    "subject": StreetLayout((0.6, 0.9), (0.3, 0.46), (0.46, 0.55)),
    # Catalog format 3's photos: distractors often 70-90% of the product's size and sometimes bigger, so the
    # photo alone often does not say which object is the product.
    "crowded": StreetLayout((0.5, 0.85), (0.45, 0.9), (0.9, 1.15)),
}
DEFAULT_STREET_LAYOUT = "subject"


def _place_distractors(
    rng: np.random.Generator,
    canvas: Image.Image,
    product: Product,
    others: list[str],
    scale: float,
    product_box: tuple[float, float, float, float],
    layout: StreetLayout,
) -> None:
    """1-3 objects of other categories with the product's pattern (same colour 60% of the time), placed where they
    overlap the product least among a few random candidate spots."""
    s = canvas.width
    n = min(int(rng.integers(1, 4)), len(others))
    cats = [others[i] for i in rng.choice(len(others), size=n, replace=False)]
    taken = [product_box]
    for cat in cats:
        colour = product.colour if rng.random() < 0.6 else _COLOURS[rng.integers(len(_COLOURS))]
        # Usually smaller than the product, sometimes bigger (in the crowded layout).
        rel = rng.uniform(*layout.distractor_rel) if rng.random() < 0.85 else rng.uniform(*layout.distractor_rel_big)
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
        look = Look(tuple(rng.random(3)), trim=int(rng.integers(len(TRIM_RGB))))
        sprite = _sprite(cat, product.pattern, colour, size, look, rng.uniform(-30, 30))
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


def render_street_photo(
    rng: np.random.Generator,
    product: Product,
    look: Look,
    categories: Sequence[str],
    image_size: int,
    layout: str = DEFAULT_STREET_LAYOUT,
) -> tuple[Image.Image, int]:
    """A street photo of `product` and the JPEG quality to save it with; `rng` is this photo's own stream,
    `look` the product's look (the same in all its images), `categories` those distractors come from, `layout`
    a key of STREET_LAYOUTS."""
    if layout not in STREET_LAYOUTS:
        raise ValueError(f"street layout {layout!r}; expected one of {list(STREET_LAYOUTS)}")
    shape = STREET_LAYOUTS[layout]
    s = image_size
    canvas = _background(rng, s)
    scale = rng.uniform(*shape.product_scale)  # subject: the product 29-43 px across at the tiny model's 48 px
    angle = rng.uniform(-25, 25)
    size = int(round(scale * s))
    half = size / 2 * 0.85  # keep most of the product inside the frame
    cx, cy = rng.uniform(half, s - half, 2)
    product_box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    others = [c for c in categories if c != product.category]
    _place_distractors(rng, canvas, product, others, scale, product_box, shape)
    sprite = _sprite(product.category, product.pattern, product.colour, size, look, angle)
    box = _paste(canvas, sprite, cx, cy)
    if rng.random() < 0.75:
        _occlude(rng, canvas, box)
    return _photo_jitter(rng, canvas), int(rng.integers(70, 96))
