"""Tests for generating the synthetic street-to-shop catalog (mim.data.synth), on a 3 x 3 x 3 subset at 64 px with 2
models per combination."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mim.data import catalog, synth
from mim.data.synth import CATEGORIES, COLOURS, PATTERN_WORDS, PATTERNS
from mimsearch.commands import catalog as catalog_cmd

SMALL = {
    "image_size": 64,
    "categories": ["mug", "shirt", "hat"],
    "patterns": ["solid", "zebra", "dots"],
    "colours": ["red", "blue", "green"],
    "variants": 2,
    "street_fraction": 0.5,
    "progress": False,
}


@pytest.fixture(scope="module")
def cat(tmp_path_factory) -> catalog.Catalog:
    return synth.generate_catalog(tmp_path_factory.mktemp("cat_a"), seed=0, **SMALL)


@pytest.fixture(scope="module")
def cat_again(tmp_path_factory) -> catalog.Catalog:
    return synth.generate_catalog(tmp_path_factory.mktemp("cat_b"), seed=0, **SMALL)


@pytest.fixture(scope="module")
def cat_seed1(tmp_path_factory) -> catalog.Catalog:
    return synth.generate_catalog(tmp_path_factory.mktemp("cat_c"), seed=1, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical(cat, cat_again):
    a, b = _files(cat.root), _files(cat_again.root)
    assert a.keys() == b.keys()
    assert "catalog.json" in a
    different = [k for k in a if a[k] != b[k]]
    assert different == []


def test_different_seed_differs(cat, cat_seed1):
    a, b = _files(cat.root), _files(cat_seed1.root)
    assert a["catalog.json"] != b["catalog.json"]
    queries = [k for k in a if k.startswith("street/") and k in b]
    assert queries and sum(a[k] != b[k] for k in queries) == len(queries)


def test_several_models_per_combination_share_the_title(cat):
    combos: dict[tuple[str, str, str], list[catalog.Product]] = {}
    for p in cat.products:
        combos.setdefault((p.category, p.pattern, p.colour), []).append(p)
    assert len(combos) == 27 and len(cat.products) == 54
    assert [p.product_id for p in cat.products] == list(range(54))
    assert [q.query_id for q in cat.queries] == list(range(len(cat.queries)))
    for models in combos.values():
        assert [p.variant for p in models] == [0, 1]
        assert len({p.title for p in models}) == 1, "the title names the concept, not the model"
        a, b = (cat.read_bytes(p.image) for p in models)
        assert a != b, "models of one combination must look different"


def test_models_differ_in_details_the_title_does_not_name():
    looks = synth._model_looks(0, tuple(CATEGORIES), 4)
    for cat_name in CATEGORIES:
        models = [looks[cat_name, v] for v in range(4)]
        assert len({m[1] for m in models}) == 4 and len({m[2] for m in models}) == 4  # distinct trims and logos
        assert all(0.8 <= a <= 1.2 for m in models for a in m[0])
    product = catalog.Product(0, "mug", "zebra", "red", "red zebra-striped ceramic mug", "train", "shop/p.png")
    plain = synth.product_look(0, product, 1, CATEGORIES)
    assert (plain.aspect, plain.trim, plain.logo) == ((1.0, 1.0), 0, 0)  # one model per combination: no details


def test_street_photos_for_a_fraction_of_training_products(cat):
    per_product: dict[int, int] = {}
    for q in cat.queries:
        per_product[q.product_id] = per_product.get(q.product_id, 0) + 1
    for p in cat.products:
        if p.split != "train":
            assert per_product[p.product_id] == cat.params["n_eval_queries"]
        else:
            assert per_product.get(p.product_id, 0) in (0, cat.params["n_train_queries"])
    for c in SMALL["categories"]:
        train = [p for p in cat.products_in("train") if p.category == c]
        paired = [p for p in train if p.product_id in per_product]
        assert len(paired) == round(0.5 * len(train)), "street_fraction is applied per category"
    assert cat.paired("test") == cat.products_in("test")
    defaults = synth.CatalogParams().as_manifest()
    assert (defaults["n_train_queries"], defaults["n_eval_queries"]) == (synth.DEFAULT_TRAIN_QUERIES, 2)
    assert (defaults["variants"], defaults["street_fraction"]) == (3, 0.5)


def test_default_split_proportions():
    params = synth.CatalogParams().as_manifest()
    products, queries, reforms = synth._plan(params)
    assert len(products) == len(CATEGORIES) * len(PATTERNS) * len(COLOURS) * 3 == 1920
    counts = {s: sum(p.split == s for p in products) for s in catalog.SPLITS}
    assert counts == {"train": 1340, "val": 190, "test": 390}
    assert len({q.product_id for q in queries if q.split == "train"}) == 670
    test_reforms = [r for r in reforms if r.split == "test"]
    assert {r.kind for r in test_reforms} == {"colour", "pattern"}
    assert len(test_reforms) > 200


def test_reformulations_change_one_attribute_within_split(cat):
    assert cat.reformulations, "the small catalog should still produce reformulation pairs"
    queries = {q.query_id: q for q in cat.queries}
    for r in cat.reformulations:
        src, tgt = cat.product(r.source_product_id), cat.product(r.target_product_id)
        assert queries[r.query_id].product_id == src.product_id
        assert src.split == tgt.split == r.split
        assert src.category == tgt.category and src.variant == tgt.variant  # the same model, changed
        if r.kind == "colour":
            assert src.pattern == tgt.pattern and src.colour != tgt.colour
            assert tgt.colour in r.text.split()
        else:
            assert r.kind == "pattern"
            assert src.colour == tgt.colour and src.pattern != tgt.pattern
            assert r.text in synth.PATTERN_PHRASES[tgt.pattern]


def test_ensure_reuses_matching_catalog(cat):
    manifest = cat.root / catalog.MANIFEST
    before = manifest.stat().st_mtime_ns
    again = synth.ensure_catalog(cat.root, seed=0, **SMALL)
    assert again == cat
    assert manifest.stat().st_mtime_ns == before


def test_ensure_regenerates_on_changed_params(tmp_path):
    first = synth.generate_catalog(tmp_path, seed=0, **SMALL)
    second = synth.ensure_catalog(tmp_path, seed=0, **{**SMALL, "n_train_queries": 1, "n_eval_queries": 1})
    assert second.params["n_train_queries"] == 1
    assert len(second.queries) == len(second.paired("train") + second.paired("val") + second.paired("test"))
    assert len(second.queries) < len(first.queries)
    on_disk = {f"street/{p.name}" for p in (tmp_path / "street").iterdir()}
    assert on_disk == {q.image for q in second.queries}, "stale query photos of the old catalog must be removed"
    assert catalog.load_catalog(tmp_path) == second


def test_ensure_regenerates_when_an_image_is_missing(tmp_path):
    first = synth.generate_catalog(tmp_path, seed=0, **SMALL)
    first.path(first.queries[0].image).unlink()
    again = synth.ensure_catalog(tmp_path, seed=0, **SMALL)
    assert again.path(first.queries[0].image).is_file()


def test_ensure_regenerates_an_old_format_catalog(tmp_path):
    first = synth.generate_catalog(tmp_path, seed=0, **SMALL)
    manifest = tmp_path / catalog.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 2}))
    with pytest.raises(ValueError, match="format_version=2"):
        catalog.load_catalog(tmp_path)
    again = synth.ensure_catalog(tmp_path, seed=0, **SMALL)
    assert again == first and json.loads(manifest.read_text())["format_version"] == catalog.FORMAT_VERSION


def test_crash_leaves_no_manifest(tmp_path, monkeypatch):
    synth.generate_catalog(tmp_path, seed=0, **SMALL)
    calls = {"n": 0}
    real = synth.render_query_photo

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "render_query_photo", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synth.generate_catalog(tmp_path, seed=3, **SMALL)
    assert not (tmp_path / catalog.MANIFEST).exists()
    with pytest.raises(catalog.CatalogError, match="mimsearch catalog"):
        catalog.load_catalog(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"categories": ["mug", "spaceship"]}, r"unknown categories \['spaceship'\]; expected names from"),
        ({"categories": ["mug"]}, "need at least 2"),
        ({"patterns": ["zebra", "zebra"]}, "duplicate patterns"),
        ({"colours": ["white"]}, r"unknown colours \['white'\]"),
        ({"image_size": 16}, r"image_size=16; expected an int in \[32, 1024\]"),
        ({"n_train_queries": 0}, r"n_train_queries=0"),
        ({"seed": -1}, "non-negative"),
        ({"split": (0.5, 0.5, 0.5)}, "summing to 1"),
        ({"variants": 0}, r"variants=0; expected an int in \[1, 4\]"),
        ({"variants": 5}, r"variants=5; expected an int in \[1, 4\]"),
        ({"street_fraction": 0.0}, r"street_fraction=0.0; expected a number in \(0, 1\]"),
        ({"street_fraction": 1.5}, r"street_fraction=1.5; expected a number in \(0, 1\]"),
        ({"street_layout": "busy"}, r"street_layout='busy'; expected one of \['subject', 'crowded'\]"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        synth.generate_catalog(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir()), "validation must happen before anything is written"


def test_subset_order_does_not_change_ids():
    a = synth.CatalogParams(categories=["hat", "mug"]).as_manifest()
    b = synth.CatalogParams(categories=["mug", "hat"]).as_manifest()
    assert a == b


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    sheet = tmp_path / "sheet.png"
    argv = [
        "--out",
        str(out),
        "--image-size",
        "48",
        "--categories",
        "mug,bag",
        "--patterns",
        "stars,plaid",
        "--colours",
        "pink,black",
        "--variants",
        "2",
        "--street-fraction",
        "1",
        "--no-progress",
        "--sheet",
        str(sheet),
    ]
    assert catalog_cmd.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "test :" in printed
    cat = catalog.load_catalog(out)
    assert len(cat.products) == 16 and cat.image_size == 48
    assert cat.paired("train") == cat.products_in("train")
    with Image.open(sheet) as im:
        assert im.format == "PNG"
    assert catalog_cmd.main(["--out", str(out), "--categories", "rocket", "--no-progress"]) == 2
    assert "unknown categories" in capsys.readouterr().err


def test_split_by_product_is_disjoint_and_complete(cat):
    ids = {s: {p.product_id for p in cat.products_in(s)} for s in catalog.SPLITS}
    assert all(ids.values()), f"every split should be non-empty: {ids}"
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert set().union(*ids.values()) == {p.product_id for p in cat.products}
    for s in catalog.SPLITS:
        # Stratified per category: every split holds every category.
        assert {p.category for p in cat.products_in(s)} == set(SMALL["categories"])
        for q in cat.queries_in(s):
            assert q.product_id in ids[s]


def test_images_decode_with_expected_format(cat):
    for p in cat.products:
        with Image.open(io.BytesIO(cat.read_bytes(p.image))) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
            assert im.getpixel((0, 0)) == (255, 255, 255)  # white catalog background
            assert im.getpixel((32, 32)) != (255, 255, 255)  # the product sits in the middle
    for q in cat.queries:
        with Image.open(cat.path(q.image)) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))


def test_titles_and_short_texts(cat):
    for p in cat.products:
        words = p.title.split()
        assert p.colour in words and p.category == words[-1]
        assert PATTERN_WORDS[p.pattern][0] in words
    for q in cat.queries:
        words = q.short_text.split()
        assert 2 <= len(words) <= 3 and words[-1] == cat.product(q.product_id).category
    texts = cat.all_texts()
    assert len(texts) == len(cat.products) + len(cat.queries) + len(cat.reformulations)
    assert cat.products[0].title in texts and cat.reformulations[0].text in texts


def test_load_round_trip(cat):
    loaded = catalog.load_catalog(cat.root)
    assert loaded == cat
    assert loaded.params == cat.params and loaded.image_size == 64


def test_manifest_is_valid_json_with_version(cat):
    doc = json.loads((cat.root / catalog.MANIFEST).read_text())
    assert doc["format_version"] == catalog.FORMAT_VERSION
    assert doc["params"]["seed"] == 0 and doc["params"]["categories"] == ["mug", "shirt", "hat"]


def test_street_layouts_are_deterministic_and_differ():
    product = synth._plan(synth.CatalogParams(categories=["mug", "hat"]).as_manifest())[0][0]
    photos = {
        layout: [np.asarray(synth.render_query_photo(0, 1, product, ["mug", "hat"], 64, 3, layout)[0]) for _ in "ab"]
        for layout in synth.STREET_LAYOUTS
    }
    for a, b in photos.values():
        assert np.array_equal(a, b)
    assert not np.array_equal(photos["subject"][0], photos["crowded"][0])
    assert synth.CatalogParams().as_manifest()["street_layout"] == synth.DEFAULT_STREET_LAYOUT == "subject"
    with pytest.raises(ValueError, match="street layout 'busy'; expected one of"):
        synth.render_query_photo(0, 1, product, ["mug", "hat"], 64, 3, "busy")


def test_catalog_params_own_the_defaults_checks_and_manifest_form(cat):
    p = synth.CatalogParams(seed=0, **{k: v for k, v in SMALL.items() if k != "progress"})
    assert p.as_manifest() == cat.params  # what the manifest of a catalog generated with them records
    names = synth.CatalogParams(categories="shoe,mug").categories
    assert names == tuple(c for c in synth.CATEGORIES if c in ("mug", "shoe"))  # canonical order, not the given one
    with pytest.raises(ValueError, match=r"variants=0; expected an int in \[1, "):
        synth.CatalogParams(variants=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 3  # type: ignore[misc]
