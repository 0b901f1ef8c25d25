"""`mimsearch index` / `search` and SearchService on a Milvus Lite store: the same results as on the exact KnnIndex,
resume after a stop, the model identity, and several replica URLs on the command line."""

from __future__ import annotations

import json

import pytest
from _client_helpers import assert_same_ranking, small_catalog

from client import cli
from client.indexing import build_index, catalog_items
from client.search import SearchService
from client.triton_client import EmbeddingClient
from mim.layout import model_id_of_checkpoint
from mim.search.stores import open_store
from mim.serving.server import free_port

pytest.importorskip("pymilvus", reason="the Milvus store needs pymilvus + milvus-lite (extra 'milvus')")
from mim.search.stores.milvus import MilvusStore  # noqa: E402


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return small_catalog(tmp_path_factory.mktemp("store-cli") / "catalog")


@pytest.fixture(scope="module")
def model_id(tiny_checkpoint) -> str:
    return model_id_of_checkpoint(tiny_checkpoint)


@pytest.mark.server
def test_index_stop_resume_and_search_on_milvus_equal_the_exact_index(
    triton_server, catalog, model_id, tmp_path, capsys
):
    store = tmp_path / "gallery.db"
    # a dead replica first in the list: every request fails over to the live one
    urls = f"127.0.0.1:{free_port()},{triton_server.grpc_url}"
    argv = ["index", "--url", urls, "--catalog", str(catalog.root), "--split", "all", "--store", str(store)]
    argv += ["--batch-size", "8", "--save-every", "1", "--no-progress", "--milvus-index", "HNSW:ef=64"]
    assert cli.main(argv + ["--max-batches", "2"]) == 3
    assert "PARTIAL" in capsys.readouterr().out
    with MilvusStore.open(str(store)) as partial:
        assert len(partial) == 16 and partial.model_id == model_id and partial.index.index_type == "HNSW"
    assert cli.main(argv) == 0
    assert "36 items (16 resumed, 20 embedded now)" in capsys.readouterr().out

    with EmbeddingClient(triton_server.grpc_url, timeout_s=60) as client:
        exact = build_index(
            client.embed_images,
            catalog_items(catalog, "all"),
            tmp_path / "g.safetensors",
            model_id=model_id,
            progress=False,
        ).index
        milvus = open_store(store, expected_model_id=model_id)
        try:
            a, b = SearchService(client, milvus), SearchService(client, exact)
            want = [r.id for r in b.by_image(catalog.read_bytes(catalog.queries[0].image), 4)]
            for q in catalog.queries[:3]:
                photo = catalog.read_bytes(q.image)
                assert_same_ranking(a.by_image(photo, 8), b.by_image(photo, 8))
                assert_same_ranking(a.by_text(q.short_text, 5), b.by_text(q.short_text, 5))
                assert_same_ranking(a.by_image(photo, 5, categories="mug"), b.by_image(photo, 5, categories="mug"))
                kw = {"mode": "refine", "top_n": 12}
                assert_same_ranking(
                    a.by_image_text(photo, "in red", 5, **kw), b.by_image_text(photo, "in red", 5, **kw)
                )
        finally:
            milvus.close()

    photo = catalog.path(catalog.queries[0].image)
    base = ["search", "--url", urls, "--store", str(store), "--image", str(photo), "-k", "4", "--json"]
    assert cli.main(base) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["query"]["store"] == str(store) and [r["rank"] for r in doc["results"]] == [1, 2, 3, 4]
    assert [r["id"] for r in doc["results"]] == want
    assert cli.main(base + ["--model-id", "other-model"]) == 2
    assert "expected_model_id='other-model'" in capsys.readouterr().err


def test_indexing_into_milvus_resumes_after_a_crash(catalog, tiny_checkpoint, model_id, tmp_path):
    """A crash after the third batch (each batch saved): the rerun embeds only what is missing, and the gallery
    equals one built without a crash (same ids, same search results)."""
    from mim.model.checkpoint import load_checkpoint
    from mim.search.embedding import TorchEmbedder

    local = TorchEmbedder(load_checkpoint(tiny_checkpoint))
    items = catalog_items(catalog, "all")

    def crash(batches, index):
        if batches == 3:
            raise RuntimeError("simulated crash")

    location = str(tmp_path / "crash.db")
    kw = {"model_id": model_id, "batch_size": 8, "save_every": 1, "progress": False}
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(local.embed_images, items, location, on_batch=crash, **kw)
    report = build_index(local.embed_images, items, location, **kw)
    assert (report.resumed_from, report.added, report.complete, len(report.index)) == (24, 12, True, 36)
    exact = build_index(local.embed_images, items, tmp_path / "ref.safetensors", **kw).index
    q = local.embed_images([catalog.read_bytes(catalog.queries[0].image)])
    (gs, gi), (ws, wi) = report.index.search(q, 10), exact.search(q, 10)
    assert gi.tolist() == wi.tolist() and abs(gs - ws).max() < 1e-5
    report.index.close()
