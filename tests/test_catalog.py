"""Tests for the catalog records and manifest (mim.data.catalog) on a hand-written catalog: no drawing involved."""

from __future__ import annotations

import json

import pytest

from mim.data import catalog
from mim.data.catalog import Catalog, Product, QueryPhoto, Reformulation, load_catalog, write_manifest

PARAMS = {"seed": 7, "image_size": 32, "categories": ["mug", "hat"]}


@pytest.fixture
def cat(tmp_path) -> Catalog:
    products = [
        Product(0, "mug", "zebra", "red", "red zebra-striped ceramic mug", "train", "shop/p00000.png"),
        Product(1, "mug", "zebra", "blue", "blue zebra-striped ceramic mug", "train", "shop/p00001.png"),
        Product(2, "hat", "dots", "red", "red polka-dot wool hat", "test", "shop/p00002.png"),
    ]
    queries = [
        QueryPhoto(0, 0, "street/q000000.jpg", "zebra mug", "train"),
        QueryPhoto(1, 2, "street/q000001.jpg", "red hat", "test"),
    ]
    reforms = [Reformulation(0, "in blue", 0, 1, "colour", "train")]
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "p00000.png").write_bytes(b"png bytes")
    write_manifest(tmp_path, PARAMS, products, queries, reforms)
    return Catalog(tmp_path, 7, products, queries, reforms, PARAMS)


def test_write_load_round_trip(cat):
    loaded = load_catalog(cat.root)
    assert loaded == cat
    assert loaded.params == PARAMS and loaded.image_size == 32 and loaded.seed == 7


def test_manifest_is_sorted_json_with_version(cat):
    text = (cat.root / catalog.MANIFEST).read_text()
    doc = json.loads(text)
    assert doc["format_version"] == catalog.FORMAT_VERSION
    assert text == json.dumps(doc, indent=1, sort_keys=True) + "\n"  # same records, same bytes
    assert not [p.name for p in cat.root.iterdir() if p.name.startswith(".")], "no temp file left behind"


def test_splits_and_texts(cat):
    assert [p.product_id for p in cat.products_in("train")] == [0, 1]
    assert [q.query_id for q in cat.queries_in("test")] == [1]
    assert cat.reformulations_in("test") == []
    assert cat.all_texts()[-1] == "in blue" and len(cat.all_texts()) == 6
    assert "train:    2 products (   1 with photos),     1 query photos,     1 reformulations (colour 1" in (
        catalog.summary(cat)
    )
    assert [p.product_id for p in cat.paired("train")] == [0]  # product 1 has a title and no street photo


def test_read_bytes(cat):
    assert cat.read_bytes("shop/p00000.png") == b"png bytes"


def test_unknown_product_id(cat):
    with pytest.raises(KeyError, match=r"unknown product id 9999 .* valid ids are 0\.\.2"):
        cat.product(9999)


def test_unknown_split(cat):
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        cat.products_in("dev")


def test_path_must_stay_inside_root(cat):
    with pytest.raises(ValueError, match="stay inside"):
        cat.path("../etc/passwd")
    with pytest.raises(ValueError, match="stay inside"):
        cat.path("/etc/passwd")


def test_missing_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(catalog.CatalogError, match="mimsearch catalog"):
        load_catalog(tmp_path)


@pytest.mark.parametrize("version", [1, 2, 3, None])
def test_other_format_version_is_refused(cat, version):
    path = cat.root / catalog.MANIFEST
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "format_version": version}))
    with pytest.raises(
        ValueError, match=rf"format_version={version!r}, expected {catalog.FORMAT_VERSION}: .* would be misread"
    ):
        load_catalog(cat.root)


def test_a_version_2_catalog_is_refused_not_misread(cat):
    # Version 2 had one product per (category, pattern, colour) and no `variant` field: read as version 3, every
    # product would silently become model 0.
    path = cat.root / catalog.MANIFEST
    doc = json.loads(path.read_text())
    for p in doc["products"]:
        del p["variant"]
    doc["format_version"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(
        ValueError,
        match=rf"format_version=2, expected {catalog.FORMAT_VERSION}: .* regenerate it with `mimsearch catalog",
    ):
        load_catalog(cat.root)


def test_malformed_record_is_refused(cat):
    path = cat.root / catalog.MANIFEST
    doc = json.loads(path.read_text())
    del doc["products"][1]["colour"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="malformed Product record"):
        load_catalog(cat.root)
