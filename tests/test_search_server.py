"""Search in one request through the real server: the `knn` model and the search_* ensembles return what the
client-side path (embed_* ensembles + a local KnnIndex of the same gallery) returns, refuse bad input the way
the embed_* ensembles do, and take a new gallery without downtime."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from _client_helpers import assert_same_ranking, small_catalog
from test_serving import BAD_INPUTS, bytes_input, photo
from tritonclient.utils import InferenceServerException

from client import cli
from client.search import SearchService
from client.search_client import AsyncSearchClient, SearchClient
from client.triton_client import ClientError, EmbeddingClient
from mim import contract
from mim.layout import model_id_of_checkpoint
from mim.search.knn import KnnIndex
from mim.search.stores.exact import ExactStore
from mim.serving import gallery

pytestmark = pytest.mark.server
K = 8


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return small_catalog(tmp_path_factory.mktemp("search_server") / "catalog")


@pytest.fixture(scope="module")
def model_id(tiny_checkpoint) -> str:
    return model_id_of_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def gallery_path(triton_server, catalog, model_id, tmp_path_factory):
    """The catalog's gallery, embedded through the server and installed into its repository with
    `index --install` (which also has the server load it)."""
    out = tmp_path_factory.mktemp("gallery") / "catalog.safetensors"
    argv = ["index", "--url", triton_server.grpc_url, "--catalog", str(catalog.root), "--split", "all"]
    argv += ["--out", str(out), "--model-id", model_id, "--no-progress", "--install", str(triton_server.repository)]
    assert cli.main(argv) == 0
    assert gallery.latest_gallery(triton_server.repository).read_bytes() == out.read_bytes()
    return out


@pytest.fixture(scope="module")
def search(triton_server, gallery_path):
    with SearchClient(triton_server.grpc_url, timeout_s=60) as c:
        c.wait_ready(30)
        yield c


@pytest.fixture(scope="module")
def local(triton_server, gallery_path):
    """The client-side path: embeddings from the embed_* ensembles, kNN in this process."""
    with EmbeddingClient(triton_server.grpc_url, timeout_s=60) as c:
        yield SearchService(c, ExactStore.load(gallery_path, device="cpu"))


def assert_same_results(got, want) -> None:
    assert_same_ranking(got, want, tol=1e-5)
    assert [(r.title, r.category, r.image) for r in got] == [(r.title, r.category, r.image) for r in want]


# --- server-side == client-side ------------------------------------------------------------------------------
def test_server_side_top_k_equals_client_side_for_every_mode(search, local, catalog):
    photos = [catalog.read_bytes(q.image) for q in catalog.queries[:4]]
    texts = [q.short_text for q in catalog.queries[:4]]
    for p in photos:
        assert_same_results(search.by_image(p, K), local.by_image(p, K))
        assert_same_results(search.by_image(p, K, categories="mug"), local.by_image(p, K, categories="mug"))
    for t in texts:
        assert_same_results(search.by_text(t, K), local.by_text(t, K))
        assert_same_results(
            search.by_text(t, K, categories=["shoe", "bag"]), local.by_text(t, K, categories={"shoe", "bag"})
        )
    for r in catalog.reformulations[:3]:
        p = catalog.read_bytes(catalog.queries[r.query_id].image)
        for w in (None, 0.8):
            assert_same_results(
                search.by_image_text(p, r.text, K, image_weight=w), local.by_image_text(p, r.text, K, image_weight=w)
            )
    hit = search.by_image(photos[0], 1)[0]
    product = catalog.product(hit.id)
    assert (hit.title, hit.category, hit.image) == (
        product.title,
        product.category,
        str(catalog.path(product.image).resolve()),
    )


def test_a_filter_matching_fewer_than_k_items_is_padded_then_dropped(search, triton_client, catalog):
    n_mugs = sum(p.category == "mug" for p in catalog.products)
    got = search.by_text("striped mug", n_mugs + 5, categories="mug")
    assert len(got) == n_mugs and all(r.category == "mug" for r in got)
    raw = triton_client.infer(
        contract.SEARCH_TEXT,
        [bytes_input(contract.TEXT, [b"striped mug"])],
        parameters={contract.K_PARAM: n_mugs + 5, contract.CATEGORIES_PARAM: '["mug"]'},
    )
    ids, scores = raw.as_numpy(contract.IDS.name)[0], raw.as_numpy(contract.SCORES.name)[0]
    assert (ids[n_mugs:] == -1).all() and np.isneginf(scores[n_mugs:]).all()
    assert list(raw.as_numpy(contract.ITEM_METADATA.name)[0][n_mugs:]) == [b"{}"] * 5


def test_batches_and_the_async_client_equal_single_queries(search, triton_server, catalog):
    photos = [catalog.read_bytes(q.image) for q in catalog.queries[:5]]
    batch = search.search_images(photos, K)
    for p, got in zip(photos, batch):
        assert_same_results(got, search.by_image(p, K))

    async def run():
        async with AsyncSearchClient(triton_server.grpc_url, timeout_s=60, max_batch=2) as c:
            await c.wait_ready(30)
            return await c.search_images(photos, K), await c.by_text("zebra mug", K)

    got, text = asyncio.run(run())
    for a, b in zip(got, batch):
        assert_same_results(a, b)
    assert_same_results(text, search.by_text("zebra mug", K))
    with pytest.raises(ValueError, match="server-side search does fusion only"):
        search.by_image_text(photos[0], "in red", K, mode="refine")


def test_requests_with_different_k_and_filters_batched_together(search, triton_server):
    """A burst of search_text requests with mixed k and filters: Triton batches some into one knn execution,
    and each gets what it would get alone."""
    cases = [(k, cats) for k in (1, 3, 7) for cats in (None, ["mug"], ["shoe", "bag"])] * 2
    want = [search.by_text(f"red striped {i % 3}", k, categories=cats) for i, (k, cats) in enumerate(cases)]
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        for _attempt in range(3):
            before = _counts(client, contract.KNN)
            results: dict[int, tuple] = {}
            done = threading.Event()
            callback = _collector(results, len(cases), done)
            for i, (k, cats) in enumerate(cases):
                params = {contract.K_PARAM: k}
                if cats:
                    params[contract.CATEGORIES_PARAM] = json.dumps(cats)
                inputs = [bytes_input(contract.TEXT, [f"red striped {i % 3}".encode()])]
                client.async_infer(contract.SEARCH_TEXT, inputs, callback(i), parameters=params)
            assert done.wait(60)
            for i in range(len(cases)):
                result, error = results[i]
                assert error is None, error
                assert result.as_numpy(contract.IDS.name)[0].tolist() == [r.id for r in want[i]] + [-1] * (
                    cases[i][0] - len(want[i])
                )
            inferences, executions = np.subtract(_counts(client, contract.KNN), before)
            assert inferences == len(cases)
            if executions < inferences:
                break
        assert executions < inferences, "Triton never batched the burst: mixed k and filters were not exercised"
    finally:
        client.close()


def _collector(results: dict, n: int, done: threading.Event):
    """async_infer callbacks that store (result, error) under the request's number; `done` once n arrived."""

    def for_request(i: int):
        def cb(result, error):
            results[i] = (result, error)
            if len(results) == n:
                done.set()

        return cb

    return for_request


def _counts(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model).model_stats
    latest = max(stats, key=lambda s: int(s.version or 0))
    return latest.inference_count, latest.execution_count


def test_cli_search_server_side(triton_server, search, catalog, tmp_path, capsys):
    photo_path = catalog.path(catalog.queries[0].image)
    base = ["search", "--url", triton_server.grpc_url, "--server-side"]
    assert cli.main(base + ["--image", str(photo_path), "--text", "in red", "-k", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    want = search.by_image_text(photo_path.read_bytes(), "in red", 4)
    assert doc["query"]["server_side"] and doc["query"]["mode"] == "fusion"
    assert [r["id"] for r in doc["results"]] == [r.id for r in want]
    page = tmp_path / "p.html"
    assert cli.main(base + ["--text", "zebra mug", "-k", "3", "--category", "mug", "--html", str(page)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "id", "score", "category", "title"] and all("mug" in t for t in table[1:4])
    assert page.read_text().count('<li class="result') == 3
    assert cli.main(base + ["--text", "mug", "--index", str(tmp_path / "x.safetensors")]) == 2
    assert "--server-side searches the server's gallery; drop --store" in capsys.readouterr().err
    assert cli.main(base + ["--image", str(photo_path), "--text", "in red", "--mode", "refine"]) == 2
    assert "--server-side does fusion only" in capsys.readouterr().err
    assert cli.main(["search", "--url", triton_server.grpc_url, "--text", "mug"]) == 2
    err = capsys.readouterr().err
    assert "search: give --store (the gallery: a KnnIndex file" in err and "or --server-side" in err


# --- bad input -----------------------------------------------------------------------------------------------
SEARCH_OF = {
    contract.EMBED_IMAGE: contract.SEARCH_IMAGE,
    contract.EMBED_TEXT: contract.SEARCH_TEXT,
    contract.EMBED_MULTIMODAL: contract.SEARCH_MULTIMODAL,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_search_ensembles_refuse_what_the_embed_ensembles_refuse(triton_server, triton_client, search, case):
    model, make_inputs, params, message = BAD_INPUTS[case]
    target = SEARCH_OF[model]
    with pytest.raises(InferenceServerException, match=message.replace(model, target)) as info:
        triton_client.infer(target, make_inputs(), parameters=params)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert triton_server.is_running()
    assert len(search.by_image(photo(7), 3)) == 3


KNN_BAD_PARAMS = {
    "k-zero": ({contract.K_PARAM: 0}, r"'k' = 0 is outside \[1, 36\] \(the gallery holds 36 items\)"),
    "k-over-gallery": ({contract.K_PARAM: 37}, r"'k' = 37 is outside \[1, 36\]"),
    "k-not-a-number": ({contract.K_PARAM: "ten"}, r"'k' = 'ten' is not an integer"),
    "unknown-category": ({contract.CATEGORIES_PARAM: '["mug", "hat"]'}, r"unknown categories \['hat'\]; the gallery"),
    "categories-not-json": ({contract.CATEGORIES_PARAM: "mug"}, r"'categories' = 'mug' is not a JSON list"),
}


@pytest.mark.parametrize("case", list(KNN_BAD_PARAMS))
def test_bad_k_or_filter_is_invalid_argument(search, triton_client, case):
    params, message = KNN_BAD_PARAMS[case]
    for model, inputs in (
        (contract.SEARCH_TEXT, [bytes_input(contract.TEXT, [b"mug"])]),
        (contract.SEARCH_IMAGE, [bytes_input(contract.IMAGE, [photo(1)])]),
    ):
        with pytest.raises(InferenceServerException, match=message) as info:
            triton_client.infer(model, inputs, parameters=params)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert len(search.by_text("mug", 2)) == 2


def test_a_query_batch_over_the_max_batch_is_refused(search, triton_client):
    rows = [photo(3)] * (contract.MAX_BATCH_SIZE + 1)
    with pytest.raises(InferenceServerException, match=rf"batch-size must be <= {contract.MAX_BATCH_SIZE}") as info:
        triton_client.infer(contract.SEARCH_IMAGE, [bytes_input(contract.IMAGE, rows)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert len(search.search_images(rows, 2)) == len(rows)  # the client splits it at the max batch


def test_client_side_checks_of_k_and_categories(search):
    with pytest.raises(ClientError, match=r"search_text: k=0; expected a positive int"):
        search.by_text("mug", 0)
    with pytest.raises(ClientError, match=r"categories=\[\]; expected a str or a non-empty list"):
        search.by_text("mug", 3, categories=[])


# --- gallery updates -----------------------------------------------------------------------------------------
def _knn_versions(client) -> dict[str, str]:
    return {m.version: m.state for m in client.get_model_repository_index().models if m.name == contract.KNN}


def test_a_missing_or_foreign_gallery_is_refused_and_the_served_one_stays(
    search, triton_server, triton_client, gallery_path, tmp_path
):
    repo = triton_server.repository
    served = [v for v, state in _knn_versions(triton_client).items() if state == "READY"]
    # A version folder without its gallery (as if copied by hand).
    broken = repo / contract.KNN / str(gallery.versions(repo)[-1] + 1)
    broken.mkdir()
    shutil.copy(repo / contract.KNN / "1" / "model.py", broken / "model.py")
    try:
        with pytest.raises(ClientError, match=rf"{broken}/gallery.safetensors not found: the knn model has no gallery"):
            search.reload_gallery()
    finally:
        shutil.rmtree(broken)
    assert [v for v, state in _knn_versions(triton_client).items() if state == "READY"] == served
    assert len(search.by_text("mug", 3)) == 3  # still served
    # A gallery of another model is refused at install time, naming both ids.
    other = KnnIndex.load(gallery_path, device="cpu")
    foreign = KnnIndex(other.dim, device="cpu", model_id="another-model")
    foreign.add(other.ids, other.embeddings())
    foreign.save(tmp_path / "foreign.safetensors")
    with pytest.raises(gallery.GalleryError, match=r"built with model_id='another-model' but expected_model_id="):
        gallery.install_gallery(tmp_path / "foreign.safetensors", repo)


def test_a_new_gallery_swaps_in_atomically_while_requests_are_in_flight(search, triton_server, gallery_path, tmp_path):
    """Install a gallery whose ids are shifted by 1000 and reload while 4 threads keep searching: no request
    fails, each answer comes wholly from the old or wholly from the new gallery, and after the reload returns
    every answer is from the new one. The original gallery is reinstalled at the end."""
    old = KnnIndex.load(gallery_path, device="cpu")
    shifted = KnnIndex(old.dim, device="cpu", model_id=old.model_id)
    shifted.add(old.ids + 1000, old.embeddings(), [old.get_metadata(i) for i in old.ids.tolist()])
    shifted.save(tmp_path / "shifted.safetensors")
    stop, answers, errors = threading.Event(), [], []

    def hammer():
        with SearchClient(triton_server.grpc_url, timeout_s=60) as c:
            while not stop.is_set():
                try:
                    answers.append([r.id for r in c.by_text("blue striped mug", 5)])
                except Exception as e:  # collected: any failure fails the test
                    errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while len(answers) < 8 and not errors:
            threading.Event().wait(0.05)
        before = len(answers)
        gallery.install_gallery(tmp_path / "shifted.safetensors", triton_server.repository)
        search.reload_gallery()
        swapped = len(answers)
        while len(answers) < swapped + 8 and not errors:
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    assert all(all(i < 1000 for i in a) or all(i >= 1000 for i in a) for a in answers)
    assert all(i < 1000 for a in answers[:before] for i in a)
    assert all(i >= 1000 for i in search.by_text("blue striped mug", 5) for i in [i.id])
    assert any(all(i >= 1000 for i in a) for a in answers[swapped:])
    gallery.install_gallery(gallery_path, triton_server.repository)
    search.reload_gallery()
    assert all(r.id < 1000 for r in search.by_text("blue striped mug", 5))
    assert len(gallery.versions(triton_server.repository)) <= 3  # 1/ + the served one + the previous one
