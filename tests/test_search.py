"""Search through the real server equals in-process search; indexing is resumable; the CLI's JSON parses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _client_helpers import assert_same_ranking, small_catalog

from client import cli
from client.indexing import GalleryItem, build_index, catalog_items, manifest_items
from client.search import SearchService
from client.triton_client import EmbeddingClient
from mim.layout import model_id_of_checkpoint
from mim.model.checkpoint import load_checkpoint
from mim.search.embedding import TorchEmbedder
from mim.search.knn import KnnIndex


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return small_catalog(tmp_path_factory.mktemp("search") / "catalog")


@pytest.fixture(scope="module")
def model_id(tiny_checkpoint) -> str:
    return model_id_of_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(triton_server):
    with EmbeddingClient(triton_server.grpc_url, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def served_index(client, catalog, model_id, tmp_path_factory) -> KnnIndex:
    path = tmp_path_factory.mktemp("index") / "gallery.safetensors"
    return build_index(
        client.embed_images, catalog_items(catalog, "all"), path, model_id=model_id, progress=False
    ).index


@pytest.mark.server
def test_search_through_server_equals_in_process(client, served_index, catalog, tiny_checkpoint, model_id, tmp_path):
    local = TorchEmbedder(load_checkpoint(tiny_checkpoint))
    local_index = build_index(
        local.embed_images,
        catalog_items(catalog, "all"),
        tmp_path / "local.safetensors",
        model_id=model_id,
        progress=False,
    ).index
    np.testing.assert_array_equal(served_index.ids, local_index.ids)
    served, reference = SearchService(client, served_index), SearchService(local, local_index)
    k = 10
    for q in catalog.queries[:3]:
        photo = catalog.read_bytes(q.image)
        assert_same_ranking(served.by_image(photo, k), reference.by_image(photo, k))
        assert_same_ranking(served.by_text(q.short_text, k), reference.by_text(q.short_text, k))
    for r in catalog.reformulations[:2]:
        photo = catalog.read_bytes(catalog.queries[r.query_id].image)
        for kw in (
            {"mode": "fusion"},
            {"mode": "fusion", "image_weight": 0.8},
            {"mode": "refine", "top_n": 12},
            {"mode": "refine", "text_weight": 0.5},
        ):
            assert_same_ranking(
                served.by_image_text(photo, r.text, k, **kw), reference.by_image_text(photo, r.text, k, **kw)
            )
    hits = served.by_image(catalog.read_bytes(catalog.queries[0].image), 3)
    p = catalog.product(hits[0].id)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert (hits[0].title, hits[0].category, hits[0].image) == (
        p.title,
        p.category,
        str(catalog.path(p.image).resolve()),
    )


@pytest.mark.server
def test_refine_reranks_image_candidates_only(client, served_index, catalog):
    service = SearchService(client, served_index)
    photo = catalog.read_bytes(catalog.queries[0].image)
    image_top = {r.id for r in service.by_image(photo, 6)}
    refined = service.by_image_text(photo, "in blue", 4, mode="refine", top_n=6)
    assert {r.id for r in refined} <= image_top
    scores = [r.score for r in refined]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(ValueError, match="mode='blend'; expected one of"):
        service.by_image_text(photo, "in blue", 4, mode="blend")


@pytest.mark.server
def test_category_filter_and_k_larger_than_gallery(client, served_index):
    service = SearchService(client, served_index)
    hits = service.by_text("striped mug", 5, categories="shoe")
    assert hits and all(h.category == "shoe" for h in hits)
    assert len(service.by_text("mug", 10_000)) == len(served_index)


# --- resumable indexing -------------------------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


@pytest.mark.server
def test_index_build_resumes_after_a_crash(client, catalog, model_id, tmp_path):
    items = catalog_items(catalog, "all")  # 36 items -> 9 batches of 4
    full = build_index(
        client.embed_images, items, tmp_path / "full.safetensors", model_id=model_id, batch_size=4, progress=False
    )
    path = tmp_path / "resumed.safetensors"

    def crash_after_5(done, index):
        if done == 5:
            raise Crash("simulated crash after 5 batches")

    with pytest.raises(Crash):
        build_index(
            client.embed_images,
            items,
            path,
            model_id=model_id,
            batch_size=4,
            save_every=2,
            on_batch=crash_after_5,
            progress=False,
        )
    saved = KnnIndex.load(path, expected_model_id=model_id)
    assert len(saved) == 16  # batches 1-4 were saved (every 2 batches); batch 5 was lost with the crash

    embedded = []

    def counting(images):
        embedded.append(len(images))
        return client.embed_images(images)

    report = build_index(counting, items, path, model_id=model_id, batch_size=4, save_every=2, progress=False)
    assert report.complete and report.resumed_from == 16 and report.added == 20 and sum(embedded) == 20
    again = KnnIndex.load(path, expected_model_id=model_id)
    np.testing.assert_array_equal(again.ids, full.index.ids)
    np.testing.assert_allclose(again.embeddings(), full.index.embeddings(), atol=1e-6)
    assert [again.get_metadata(i) for i in again.ids] == [full.index.get_metadata(i) for i in full.index.ids]


@pytest.mark.server
def test_resume_refuses_another_model_or_gallery(client, catalog, model_id, tmp_path):
    items = catalog_items(catalog, "test")
    path = tmp_path / "g.safetensors"
    build_index(client.embed_images, items, path, model_id=model_id, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume from .*model_id=.* but expected_model_id='other'.*Delete it"):
        build_index(client.embed_images, items, path, model_id="other", progress=False)
    with pytest.raises(ValueError, match=r"holds ids not in this gallery"):
        build_index(client.embed_images, items[:2], path, model_id=model_id, progress=False)


@pytest.mark.server
def test_cli_index_max_batches_then_resume(triton_server, catalog, model_id, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    argv = [
        "index",
        "--url",
        triton_server.grpc_url,
        "--catalog",
        str(catalog.root),
        "--split",
        "all",
        "--out",
        str(out),
        "--model-id",
        model_id,
        "--batch-size",
        "8",
        "--save-every",
        "1",
        "--no-progress",
    ]
    assert cli.main(argv + ["--max-batches", "2"]) == 3
    assert "PARTIAL" in capsys.readouterr().out and len(KnnIndex.load(out)) == 16
    assert cli.main(argv) == 0
    assert "36 items (16 resumed, 20 embedded now)" in capsys.readouterr().out


# --- CLI search ---------------------------------------------------------------------------------------------------
@pytest.mark.server
def test_cli_search_json_and_html(triton_server, served_index, catalog, model_id, tmp_path, capsys):
    index_path = tmp_path / "idx.safetensors"
    served_index.save(index_path)
    photo = catalog.path(catalog.queries[0].image)
    html_out = tmp_path / "page.html"
    base = ["search", "--url", triton_server.grpc_url, "--index", str(index_path), "--model-id", model_id]
    assert (
        cli.main(
            base
            + [
                "--image",
                str(photo),
                "--text",
                "in red",
                "--mode",
                "refine",
                "-k",
                "4",
                "--json",
                "--html",
                str(html_out),
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["query"]["mode"] == "refine" and doc["query"]["model_id"] == model_id
    assert [r["rank"] for r in doc["results"]] == [1, 2, 3, 4]
    assert {"id", "score", "title", "category", "image"} <= doc["results"][0].keys()
    assert html_out.read_text().count('<li class="result') == 4

    assert cli.main(base + ["--text", "zebra mug", "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "id", "score", "category", "title"] and len(table) == 4

    assert cli.main(base[:-1] + ["other-model", "--text", "zebra mug"]) == 2
    assert "expected_model_id='other-model'" in capsys.readouterr().err


# --- manifests ----------------------------------------------------------------------------------------------------
def test_manifest_items_csv_and_jsonl(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text('id,image,title,category\n7,a.png,"red, striped mug",mug\n3,b.png,,\n')
    items = manifest_items(tmp_path / "imgs", csv_path)
    assert items == [
        GalleryItem(7, (tmp_path / "imgs/a.png").resolve(), "red, striped mug", "mug"),
        GalleryItem(3, (tmp_path / "imgs/b.png").resolve(), None, None),
    ]
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"id": 1, "image": "a.png", "title": "t"}\n\n{"id": 2, "image": "b.png"}\n')
    assert [i.id for i in manifest_items(tmp_path / "imgs", jl)] == [1, 2]
    bad = tmp_path / "bad.jsonl"
    for text, msg in (
        ('{"id": 1, "image": "../a.png"}\n', "must be a path relative"),
        ('{"id": 1, "image": "zz.png"}\n', "does not exist"),
        ('{"id": 1, "image": "a.png"}\n{"id": 1, "image": "b.png"}\n', "bad.jsonl:2: id 1 is a duplicate"),
        ('{"image": "a.png"}\n', r"missing field\(s\) \['id'\]"),
    ):
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            manifest_items(tmp_path / "imgs", bad)


@pytest.mark.server
def test_cli_index_folder_with_manifest(triton_server, catalog, model_id, tmp_path, capsys):
    lines = [json.dumps({"id": p.product_id, "image": p.image, "title": p.title}) for p in catalog.products[:5]]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "folder.safetensors"
    argv = [
        "index",
        "--url",
        triton_server.grpc_url,
        "--images",
        str(catalog.root),
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0  # the identity is the served model's (an unknown one: tests/test_layout.py)
    assert KnnIndex.load(out, expected_model_id=model_id).model_id == model_id
    override = tmp_path / "override.safetensors"
    argv[argv.index(str(out))] = str(override)
    assert cli.main(argv + ["--model-id", "folder-model"]) == 0
    index = KnnIndex.load(override, expected_model_id="folder-model")
    assert index.ids.tolist() == [0, 1, 2, 3, 4] and index.get_metadata(0)["title"] == catalog.products[0].title


@pytest.mark.server
def test_a_bad_gallery_image_is_named_by_file_and_line_or_skipped(triton_server, catalog, model_id, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    # Images relative to one folder: three catalog images linked beside the broken one, which is on line 2.
    rows = []
    for p in catalog.products[:3]:
        (tmp_path / Path(p.image).name).symlink_to(catalog.root / p.image)
        rows.append({"id": p.product_id, "image": Path(p.image).name})
    rows.insert(1, {"id": 99, "image": "broken.jpg"})
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "g.safetensors"
    argv = ["index", "--url", triton_server.grpc_url, "--images", str(tmp_path), "--manifest", str(manifest)]
    argv += ["--out", str(out), "--no-progress", "--batch-size", "4"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {tmp_path / 'broken.jpg'} ({manifest}:2): ") and "--skip-bad" in err[-1], err
    assert "could not decode" in err[-1] and not out.exists()
    assert cli.main(argv + ["--skip-bad"]) == 0
    text = capsys.readouterr().out
    assert f"skipped 1 bad image(s):\n  {tmp_path / 'broken.jpg'} ({manifest}:2): " in text, text
    assert sorted(KnnIndex.load(out, expected_model_id=model_id).ids.tolist()) == sorted(
        p.product_id for p in catalog.products[:3]
    )
