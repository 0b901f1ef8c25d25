"""A user's dataset as JSON Lines: the synthetic catalog round-trips through it to identical training batches,
bad rows are refused with the row and field named, and an imported CLIP fine-tunes on it (DML, 3-, 4-tower)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _client_helpers import small_catalog

from mim.data.dataset import DatasetError, load_dataset, write_dataset
from mim.model.checkpoint import load_checkpoint
from mim.model.config import get_size
from mim.model.tokenizer import TextTokenizer
from mim.model.towers import MIMModel
from mim.training.train import TrainConfig, batch_loss, load_split, train
from mimsearch.commands.dataset import main
from mimsearch.commands.evaluate import main as evaluate_main


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return small_catalog(tmp_path_factory.mktemp("dataset") / "catalog")


@pytest.fixture(scope="module")
def manifest(catalog):
    return write_dataset(catalog, catalog.root / "dataset.jsonl")


def test_catalog_roundtrips_to_identical_batches(catalog, manifest):
    ds = load_dataset(manifest)
    for split in ("train", "val", "test"):
        assert [(p.product_id, p.title, p.image, p.category) for p in ds.products_in(split)] == [
            (p.product_id, p.title, p.image, p.category) for p in catalog.products_in(split)
        ]
    pre = get_size("tiny").preprocess
    a, b = load_split(catalog, "train", pre, progress=False), load_split(ds, "train", pre, progress=False)
    assert a.product_ids == b.product_ids and a.titles == b.titles
    np.testing.assert_array_equal(a.product_pixels, b.product_pixels)
    for qa, qb in zip(a.queries_of, b.queries_of):  # each product's query photos, in the same order
        np.testing.assert_array_equal(a.query_pixels[qa], b.query_pixels[qb])
        assert [a.query_texts[i] for i in qa] == [b.query_texts[i] for i in qb]
    torch.manual_seed(0)
    tok = TextTokenizer.train(a.titles + a.query_texts, vocab_size=256, context_length=pre.context_length)
    model = MIMModel(get_size("tiny").model.with_vocab(tok.vocab_size)).eval()
    for step in range(3):  # the same seed draws the same batch: same photos, augmentations, titles, queries
        la, _ = batch_loss(model, tok, a, "4tower", np.random.default_rng([7, step]), 8)
        lb, _ = batch_loss(model, tok, b, "4tower", np.random.default_rng([7, step]), 8)
        assert float(la.detach()) == float(lb.detach())


def test_cli_exports(catalog, tmp_path, capsys):
    out = catalog.root / "cli.jsonl"
    assert main(["--catalog", str(catalog.root), "--out", str(out)]) == 0
    assert out.read_text() == (catalog.root / "dataset.jsonl").read_text()
    assert main(["--catalog", str(catalog.root), "--out", str(tmp_path / "elsewhere.jsonl")]) == 2
    assert "write the dataset into the catalog folder" in capsys.readouterr().err


def test_string_ids_and_hash_split(catalog, tmp_path):
    """Product ids may be strings, and without a split field products are split by a hash of their id."""
    root = tmp_path / "user"
    shutil.copytree(catalog.root / "shop", root / "shop")
    shutil.copytree(catalog.root / "street", root / "street")
    rows = []
    for q in catalog.queries:
        p = catalog.product(q.product_id)
        rows.append({"query_image": q.image, "product_id": f"sku-{p.product_id}", "product_image": p.image})
        rows[-1]["title"] = p.title
    rows.append({"product_id": "distractor", "product_image": catalog.products[0].image, "title": "x"})
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_dataset(root / "d.jsonl", test_fraction=0.5)
    ids = [p.product_id for p in ds.products]
    assert ids == list(range(len(ids))) and len(ids) == len({q.product_id for q in catalog.queries}) + 1
    assert 0 < len(ds.products_in("test")) < len(ds.products)
    assert ds.queries[0].short_text == ds.product(ds.queries[0].product_id).title  # no query_text: the title


# --- refusals ------------------------------------------------------------------------------------------------
def _bad(catalog, tmp_path, edit):
    """Copy the manifest's rows, apply `edit(rows)`, write it into the catalog folder and load it."""
    rows = [json.loads(line) for line in (catalog.root / "dataset.jsonl").read_text().splitlines()]
    edit(rows)
    path = catalog.root / "bad.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda r: r[2].update(query_image="street/nope.jpg"),
            r"bad.jsonl:3: query_image: image file .*nope.jpg does not exist",
        ),
        (lambda r: r[4].update(query_image="bad.jsonl"), r"bad.jsonl:5: query_image: cannot decode image .*bad.jsonl"),
        (
            lambda r: r[1].update(title="Another title"),
            r"bad.jsonl:2: product 0 has title 'Another title' here but '.*' at line 1",
        ),
        (lambda r: r[3].update(title="  "), r"bad.jsonl:4: field 'title' is missing or empty"),
        (lambda r: r[0].pop("product_image"), r"bad.jsonl:1: field 'product_image' is missing or empty"),
        (lambda r: r[6].update(colour="red"), r"bad.jsonl:7: unknown field\(s\) \['colour'\]"),
        (lambda r: r[6].pop("split"), r"bad.jsonl:7: field 'split' is given on some rows only"),
        (lambda r: r.insert(3, "{not json"), r"bad.jsonl:4: not valid JSON"),
        (
            lambda r: r[0].update(query_image="../escape.jpg"),
            r"bad.jsonl:1: query_image '../escape.jpg' must be a path",
        ),
        (
            lambda r: [x.update(split="train") for x in r if x["split"] == "test"],
            r"the split leaves no test products \(36 products",
        ),
    ],
    ids=[
        "missing-file",
        "undecodable",
        "two-titles",
        "empty-title",
        "no-field",
        "unknown",
        "split",
        "json",
        "escape",
        "no-test",
    ],
)
def test_bad_datasets_name_row_and_field(catalog, tmp_path, edit, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset(_bad(catalog, tmp_path, edit))


def test_train_product_without_query_photo_is_title_only(catalog, tmp_path):
    path = _bad(
        catalog,
        tmp_path,
        lambda r: r.append({**{k: v for k, v in r[0].items() if k != "query_image"}, "product_id": 999}),
    )
    ds = load_dataset(path)
    title_only = [p for p in ds.products_in("train") if p.product_id == 999]
    assert title_only and title_only[0] not in ds.paired("train")
    data = load_split(ds, "train", get_size("tiny").preprocess, progress=False)
    assert data.product_ids[int(data.unpaired[0])] == 999 and len(data.unpaired) == 1


# --- fine-tuning an imported CLIP on the dataset ---------------------------------------------------------------
@pytest.fixture(scope="module")
def imported_clip(tmp_path_factory):
    from _clip_helpers import random_clip, save_hf_folder

    from mim.model.import_clip import import_hf

    root = tmp_path_factory.mktemp("clip")
    return import_hf(save_hf_folder(random_clip(seed=5), root / "hf"), root / "ckpt")


@pytest.mark.parametrize("objective", ["dml", "3tower", "4tower"])
def test_finetune_imported_clip_on_dataset(imported_clip, manifest, tmp_path, objective, capsys):
    out = train(
        TrainConfig(objective=objective, steps=3, batch_size=8, warmup=1),
        catalog=str(manifest),
        out=str(tmp_path / objective),
        init_from=str(imported_clip),
        device="cpu",
        progress=False,
    )
    before, after = load_checkpoint(imported_clip), load_checkpoint(out)
    assert after.model_cfg == before.model_cfg and after.pre_cfg == before.pre_cfg  # CLIP switches and preprocessing
    assert after.tokenizer.to_str() == before.tokenizer.to_str()  # CLIP's tokenizer, unchanged
    assert after.meta["objective"] == objective and after.meta["step"] == 3
    moved = (after.model.image.proj.weight - before.model.image.proj.weight).detach().abs().max()
    assert float(moved) > 0
    assert evaluate_main(["--checkpoint", f"ft={out}", "--catalog", str(manifest)]) == 0
    assert "| ft |" in capsys.readouterr().out
