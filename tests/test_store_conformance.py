"""One conformance suite for every vector store in `mim.search.stores.REGISTRY`, the way fsspec's abstract tests
run against each filesystem: the `location` fixture gives one location per implementation, and every test below
runs against each. A new store adds its location to `LOCATIONS` and passes the same tests.

The reference is a brute-force NumPy ranking of the same rows (random unit vectors: no ties)."""

from __future__ import annotations

import numpy as np
import pytest

from mim.search import stores
from mim.search.stores import VectorStore, delete_store, open_store, store_exists, upsert

DIM, N = 16, 60
CATS = ("mug", "shirt", "shoe")


def _milvus_lite(tmp_path):
    pytest.importorskip("pymilvus", reason="the Milvus store needs pymilvus + milvus-lite (pip install -e '.[milvus]')")
    return f"{tmp_path / 'gallery.db'}#conformance"


LOCATIONS = {  # registry name -> a fresh location in a test's folder
    "exact": lambda tmp_path: str(tmp_path / "sub" / "gallery.safetensors"),
    "milvus": _milvus_lite,
}


def test_every_registered_store_has_a_conformance_location():
    assert set(LOCATIONS) == set(stores.REGISTRY)


@pytest.fixture(params=sorted(LOCATIONS))
def location(request, tmp_path) -> str:
    loc = LOCATIONS[request.param](tmp_path)
    assert stores.implementation(loc) == request.param
    return loc


@pytest.fixture()
def store(location):
    s = open_store(location, dim=DIM, model_id="model-a")
    yield s
    s.close()


def gallery(seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((N, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(N, dtype=np.int64) * 3 + 1  # not contiguous
    meta = [{"category": CATS[i % 3], "title": f"item {i}", "image": f"/img/{i}.png"} for i in range(N)]
    return ids, emb, meta


def brute_force(emb, ids, q, k, mask=None):
    scores = q @ emb.T  # (Q, N)
    if mask is not None:
        scores = np.where(mask[None], scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.where(
        np.isfinite(np.take_along_axis(scores, order, 1)), ids[order], -1
    )


@pytest.fixture()
def filled(store):
    ids, emb, meta = gallery()
    store.add(ids, emb, meta)
    store.save()
    return store


def test_an_empty_store_has_the_interface(store, location):
    assert isinstance(store, VectorStore)
    assert (store.location, store.dim, store.model_id) == (location, DIM, "model-a")
    assert store.count == len(store) == 0 and store.ids.size == 0
    with pytest.raises(ValueError, match=r"is empty; add items before searching"):
        store.search(np.eye(DIM, dtype=np.float32)[:1], 1)


def test_search_equals_brute_force(filled):
    ids, emb, _ = gallery()
    q = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    scores, got = filled.search(q, 7)
    want_s, want_i = brute_force(emb, ids, q, 7)
    assert got.dtype == np.int64 and scores.dtype == np.float32 and got.shape == (5, 7)
    np.testing.assert_array_equal(got, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    assert filled.count == len(filled) == N
    np.testing.assert_array_equal(filled.ids, ids)


def test_a_category_filter_pads_with_minus_one(filled):
    ids, emb, meta = gallery()
    q = emb[:2]
    mugs = np.array([m["category"] == "mug" for m in meta])
    scores, got = filled.search(q, 25, categories={"mug"})  # 20 mugs: 5 pads per row
    want_s, want_i = brute_force(emb, ids, q, 25, mugs)
    np.testing.assert_array_equal(got, want_i)
    assert (got[:, 20:] == -1).all() and np.isneginf(scores[:, 20:]).all()


def test_k_above_the_gallery_is_refused(filled):
    with pytest.raises(ValueError, match=rf"k={N + 1} is larger than the"):
        filled.search(gallery()[1][:1], N + 1)


def test_vectors_and_metadata_by_id(filled):
    ids, emb, meta = gallery()
    np.testing.assert_allclose(filled.vectors(ids[[7, 2, 9]]), emb[[7, 2, 9]], atol=1e-6)
    assert filled.vectors(ids[[3]]).dtype == np.float32
    assert filled.get_metadata(int(ids[4])) == meta[4]
    with pytest.raises(KeyError, match=r"id 2 is not in the"):
        filled.vectors([2])
    with pytest.raises(KeyError, match=r"id 2 is not in the"):
        filled.get_metadata(2)


def test_add_refuses_a_held_id_and_remove_an_unknown_one(filled):
    ids, emb, _ = gallery()
    with pytest.raises(ValueError, match=rf"id {ids[0]} is already in the"):
        filled.add(ids[:1], emb[:1])
    with pytest.raises(KeyError, match=r"id 2 is not in the"):
        filled.remove([ids[1], 2])
    assert filled.count == len(filled) == N  # nothing was removed


def test_remove_and_upsert_keep_count_and_search(filled):
    ids, emb, _ = gallery()
    filled.remove(ids[:10])
    assert filled.count == len(filled) == N - 10
    assert filled.search(emb[:1], 1)[1][0, 0] != ids[0]
    upsert(filled, ids[10:12], emb[[0, 1]], [{"category": "shoe"}, {}])
    assert filled.count == len(filled) == N - 10
    np.testing.assert_allclose(filled.vectors(ids[10:12]), emb[[0, 1]], atol=1e-6)
    assert filled.get_metadata(int(ids[11])) == {}


def test_save_then_reopen_keeps_everything_and_the_model_identity(filled, location):
    ids, emb, _ = gallery()
    q = emb[:3]
    before = filled.search(q, 5)
    filled.save()
    filled.close()
    assert store_exists(location)
    with pytest.raises(ValueError, match=r"was built with model_id='model-a' but expected_model_id='model-b'"):
        open_store(location, expected_model_id="model-b").close()
    again = open_store(location, expected_model_id="model-a")
    try:
        assert again.count == N and again.model_id == "model-a"
        after = again.search(q, 5)
        np.testing.assert_array_equal(after[1], before[1])
        np.testing.assert_allclose(after[0], before[0], atol=1e-5)
    finally:
        again.close()


def test_delete_removes_the_gallery(filled, location):
    filled.close()
    delete_store(location)
    assert not store_exists(location)
    delete_store(location)  # nothing there: no error
    with pytest.raises(FileNotFoundError, match=r"no gallery"):
        open_store(location)


def test_an_option_the_store_does_not_take_is_refused(location):
    with pytest.raises(ValueError, match=r"store option\(s\) \['colour'\] are not understood by the \w+ store"):
        open_store(location, dim=DIM, options={"colour": "red"})


# --- the registry itself (no store opened) -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "name"),
    [
        ("g.safetensors", "exact"),
        ("dir/g.db", "milvus"),
        ("g.db#products", "milvus"),
        ("http://10.0.0.5:19530#products", "milvus"),
        ("https://milvus.example", "milvus"),
    ],
)
def test_the_location_picks_the_implementation(where, name):
    assert stores.implementation(where) == name


def test_an_unknown_location_lists_the_kinds_there_are():
    with pytest.raises(ValueError, match=r"'g\.npz' is not a KnnIndex file \(\*\.safetensors\), a Milvus Lite folder"):
        stores.implementation("g.npz")


def test_a_missing_implementation_module_says_what_to_install(monkeypatch):
    reg = stores.Registration("no_such_module_here:Store", "a test location", suffixes=(".nope",), install="pip x")
    monkeypatch.setitem(stores.REGISTRY, "nope", reg)
    with pytest.raises(ImportError, match=r"needs no_such_module_here; install it with pip x"):
        open_store("g.nope")
