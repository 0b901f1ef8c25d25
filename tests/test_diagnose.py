"""What an embedding matches on (mim.training.diagnose): outcomes and precisions on hand-made cases, then whole catalogs
ranked by embedders whose behaviour is known (an exact one and one that sees colour only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_small_catalog

from mim.data.catalog import Product
from mim.training import diagnose
from mimsearch.commands import diagnose as diagnose_cmd


def _p(pid: int, category: str, pattern: str, colour: str, title: str | None = None) -> Product:
    return Product(pid, category, pattern, colour, title or f"{colour} {pattern} {category}", "test", f"p{pid}.png")


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (_p(0, "mug", "zebra", "red"), "exact"),
        (_p(1, "mug", "zebra", "red"), "same title, other model"),
        (_p(2, "mug", "dots", "red"), "same category"),
        (_p(3, "hat", "zebra", "red"), "other category, same pattern and colour"),
        (_p(4, "hat", "dots", "red"), "other category, same colour"),
        (_p(5, "hat", "zebra", "blue"), "other category, same pattern"),
        (_p(6, "hat", "dots", "blue"), "other category, nothing shared"),
    ],
)
def test_outcome(first, expected):
    assert diagnose.outcome(first, _p(0, "mug", "zebra", "red")) == expected


def test_empty_attributes_are_never_shared_nor_reported():
    # A JSON Lines dataset names the category only.
    wanted, other = _p(0, "mug", "", "", "a mug"), _p(1, "hat", "", "", "a hat")
    assert diagnose.outcome(other, wanted) == "other category, nothing shared"
    assert diagnose.attribute_precision([[other, wanted]], [wanted]) == {"category": 0.5}


def test_attribute_precision_on_a_hand_made_ranking():
    q = [_p(0, "mug", "zebra", "red"), _p(1, "hat", "dots", "blue")]
    ranked = [[_p(2, "mug", "dots", "red"), _p(3, "hat", "zebra", "red")], [_p(4, "hat", "dots", "red")] * 2]
    got = diagnose.attribute_precision(ranked, q)
    assert got == pytest.approx({"category": (0.5 + 1) / 2, "pattern": (0.5 + 1) / 2, "colour": (1 + 0) / 2})
    with pytest.raises(ValueError, match="one ranking per query"):
        diagnose.attribute_precision(ranked[:1], q)


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    return make_small_catalog(tmp_path_factory.mktemp("cat"), image_size=32, split=(0.0, 0.0, 1.0))


class _ByProduct:
    """Embeds an image as a vector chosen by its product (street photos and the catalog image alike)."""

    def __init__(self, catalog, vector_of):
        self.product_of = {catalog.read_bytes(p.image): p for p in catalog.products}
        self.product_of.update({catalog.read_bytes(q.image): catalog.product(q.product_id) for q in catalog.queries})
        self.vector_of = vector_of

    def embed_images(self, images):
        return np.stack([self.vector_of(self.product_of[b]) for b in images]).astype(np.float32)


def test_an_exact_embedder_and_a_colour_only_one(small_catalog):
    products = small_catalog.products_in("test")
    exact = _ByProduct(small_catalog, lambda p: np.eye(len(products))[p.product_id])
    d = diagnose.diagnose(exact, small_catalog)
    assert d["top1"]["exact"] == 1.0 and sum(d["top1"].values()) == pytest.approx(1.0)

    colours = sorted({p.colour for p in products})
    colour_only = _ByProduct(small_catalog, lambda p: np.eye(len(colours))[colours.index(p.colour)])
    d = diagnose.diagnose(colour_only, small_catalog, k=5)
    # 24 products, 12 per colour: every top 5 is one colour, and the categories are mixed.
    assert d["street"]["colour"] == d["catalog"]["colour"] == 1.0
    assert d["street"]["category"] < 0.7
    assert d["top1"]["exact"] < 0.2
    with pytest.raises(ValueError, match="need more than k=30"):
        diagnose.diagnose(exact, small_catalog, k=30)


def test_cli_on_a_checkpoint(small_catalog, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "d" / "diag"
    argv = ["--checkpoint", f"random={tiny_checkpoint}", "--catalog", str(small_catalog.root), "--out", str(out)]
    assert diagnose_cmd.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| random |" in printed and "other category, same pattern and colour" in printed
    doc = json.loads(out.with_suffix(".json").read_text())
    assert set(doc["random"]) == {"street", "catalog", "top1"}
    assert diagnose_cmd.main(["--checkpoint", str(tiny_checkpoint), "--catalog", str(tmp_path / "none")]) == 2
    assert "no catalog manifest" in capsys.readouterr().err
