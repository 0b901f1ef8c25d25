"""The vector-store interface: Milvus (Lite, in-process, and its server on loopback) against the exact KnnIndex on
the same galleries, the model identity, and bad input that must fail clearly and lose nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mim.search.knn import KnnIndex
from mim.search.stores import VectorStore, open_store, store_exists, upsert
from mim.search.stores.exact import ExactStore
from mim.serving.server import free_port

pytest.importorskip("pymilvus", reason="the Milvus store needs pymilvus + milvus-lite (pip install -e '.[milvus]')")
from mim.search.stores.milvus import MilvusIndexConfig, MilvusStore, MilvusStoreError, category_filter  # noqa: E402

DIM, N = 32, 600
CATS = ("mug", "shirt", "shoe", 'odd "cat" \\ name')


def gallery(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Unit rows with exact duplicates (ties) and non-contiguous ids."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((N, DIM)).astype(np.float32)
    emb[N // 2 : N // 2 + 20] = emb[:20]  # 20 pairs of identical rows: tied scores for every query
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(N, dtype=np.int64) * 7 + 3
    meta = [
        {"category": CATS[i % len(CATS)], "title": f"item {i}", "image": f"/img/{i}.png", "sku": i} for i in range(N)
    ]
    meta[5].pop("category")  # an item without a category is never returned by a filtered search
    return ids, emb, meta


def queries(seed: int = 1, q: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.standard_normal((q, DIM)).astype(np.float32)
    _, emb, _ = gallery()
    out[:4] = emb[:4]  # queries equal to a duplicated row: the top-2 is a tie
    return out


def assert_same_up_to_ties(got, want, q: np.ndarray, exact: KnnIndex) -> None:
    """Same scores; the same ids wherever the score is above the row's k-th score (a tie at the boundary may pick
    either item, and scores within float error may come in either order); each returned score is that item's
    true inner product; padding in the same places."""
    (gs, gi), (ws, wi) = got, want
    assert gs.shape == ws.shape and gi.dtype == np.int64 and gs.dtype == np.float32
    np.testing.assert_allclose(gs, ws, atol=1e-5)
    for g, w, sc in zip(gi, wi, ws):  # the same items above the k-th score; their order may differ within 1e-5
        above = sc > sc[-1] + 1e-5
        assert set(g[above].tolist()) == set(w[above].tolist())
    assert np.array_equal(gi == -1, wi == -1)
    real = gi >= 0
    true = np.einsum("qd,qkd->qk", q, exact.embeddings()[np.searchsorted(exact.ids, np.where(real, gi, gi.max()))])
    np.testing.assert_allclose(gs[real], true[real], atol=1e-5)
    for row in gi:
        assert len(set(row[row >= 0].tolist())) == int((row >= 0).sum()), "an id returned twice"


@pytest.fixture()
def pair(tmp_path):
    ids, emb, meta = gallery()
    exact = ExactStore(DIM, device="cpu", model_id="model-a")  # a KnnIndex with the store interface
    exact.add(ids, emb, meta)
    milvus = open_store(tmp_path / "g.db", dim=DIM, model_id="model-a")
    milvus.add(ids, emb, meta)
    milvus.save()
    yield exact, milvus, tmp_path / "g.db"
    milvus.close()


# --- parity with the exact index ---------------------------------------------------------------------------------
def test_both_implement_the_interface(pair):
    exact, milvus, _ = pair
    assert isinstance(exact, VectorStore) and isinstance(milvus, VectorStore)
    assert len(milvus) == len(exact) == N and milvus.dim == exact.dim == DIM
    assert milvus.model_id == exact.model_id == "model-a"
    assert np.array_equal(milvus.ids, exact.ids)
    for i in (3, 3 + 7 * 5, 3 + 7 * (N - 1)):
        assert milvus.get_metadata(i) == exact.get_metadata(i)
    np.testing.assert_allclose(milvus.vectors(exact.ids[[9, 0, 4]]), exact.embeddings()[[9, 0, 4]], atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 10, 57])
def test_flat_matches_exact(pair, k):
    exact, milvus, _ = pair
    q = queries()
    assert_same_up_to_ties(milvus.search(q, k), exact.search(q, k), q, exact)


@pytest.mark.parametrize("cats", ["mug", {"shirt", 'odd "cat" \\ name'}, ["mug", "shoe", "shirt"]])
def test_flat_matches_exact_with_category_filter(pair, cats):
    exact, milvus, _ = pair
    q = queries()
    got, want = milvus.search(q, 12, categories=cats), exact.search(q, 12, categories=cats)
    assert_same_up_to_ties(got, want, q, exact)
    allowed = {cats} if isinstance(cats, str) else set(cats)
    assert all(milvus.get_metadata(i).get("category") in allowed for i in got[1].ravel().tolist())


def test_flat_matches_exact_after_removals_and_reopen(pair):
    exact, milvus, path = pair
    gone = exact.ids[::3]
    exact.remove(gone)
    milvus.remove(gone)
    q = queries()
    assert len(milvus) == len(exact)
    assert_same_up_to_ties(milvus.search(q, 10), exact.search(q, 10), q, exact)
    milvus.save()
    milvus.close()
    reopened = open_store(path, expected_model_id="model-a")
    try:
        assert isinstance(reopened, MilvusStore) and len(reopened) == len(exact)
        assert_same_up_to_ties(reopened.search(q, 10), exact.search(q, 10), q, exact)
        assert_same_up_to_ties(
            reopened.search(q, 5, categories="shoe"), exact.search(q, 5, categories="shoe"), q, exact
        )
    finally:
        reopened.close()


def test_few_matches_are_padded_like_the_exact_index(pair):
    exact, milvus, _ = pair
    q = queries()[:3]
    for cats in ("no-such-category", {"mug", "no-such-category"}):
        assert_same_up_to_ties(milvus.search(q, 300, categories=cats), exact.search(q, 300, categories=cats), q, exact)
    s, i = milvus.search(q, 5, categories="no-such-category")
    assert (i == -1).all() and np.isneginf(s).all()


def test_upsert_replaces_rows_and_metadata(pair):
    exact, milvus, _ = pair
    ids = exact.ids[:3]
    new = np.eye(DIM, dtype=np.float32)[:3]
    meta = [{"category": "shoe", "title": f"new {i}"} for i in range(3)]
    for store in (exact, milvus):
        upsert(store, ids, new, meta)
        assert len(store) == N
        assert store.get_metadata(int(ids[1])) == {"category": "shoe", "title": "new 1"}
        s, i = store.search(new[:1], 1)
        assert i[0, 0] == ids[0] and s[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["HNSW", "IVF_FLAT"])
def test_approximate_indexes_return_sensible_neighbours(tmp_path, kind):
    ids, emb, meta = gallery()
    cfg = MilvusIndexConfig.parse(f"{kind}:ef=200" if kind == "HNSW" else f"{kind}:nlist=8,nprobe=8")
    with MilvusStore.open(str(tmp_path / "a.db"), dim=DIM, model_id="m", index=cfg) as store:
        store.add(ids, emb, meta)
        store.save()
        exact = KnnIndex(DIM, device="cpu")
        exact.add(ids, emb)
        q = queries()
        # ef >= N and nprobe = nlist search everything: these settings must be exact
        assert_same_up_to_ties(store.search(q, 10), exact.search(q, 10), q, exact)
    with MilvusStore.open(str(tmp_path / "a.db")) as again:
        assert again.index.index_type == kind  # the collection's own index decides the search parameters


# --- the model identity ------------------------------------------------------------------------------------------
def test_another_models_gallery_is_refused(pair):
    _, milvus, path = pair
    milvus.close()
    with pytest.raises(ValueError, match=r"built with model_id='model-a' but expected_model_id='model-b'"):
        open_store(path, expected_model_id="model-b")


# --- bad input: refused with a clear message, nothing lost, the store still answers ------------------------------
def test_bad_input_is_refused_and_loses_nothing(pair):
    exact, milvus, _ = pair
    ids, emb, meta = gallery(seed=5)
    fresh = ids + 10_000
    before = len(milvus)
    with pytest.raises(ValueError, match=r"embeddings have dim 31, expected 32"):
        milvus.add(fresh[:2], emb[:2, :31])
    with pytest.raises(ValueError, match=r"queries have dim 8, expected 32"):
        milvus.search(emb[:1, :8], 3)
    nan = emb[:3].copy()
    nan[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"embeddings row 1 contains NaN or inf"):
        milvus.add(fresh[:3], nan)
    with pytest.raises(ValueError, match=r"queries row 0 contains NaN or inf"):
        milvus.search(nan[1:2], 3)
    with pytest.raises(ValueError, match=r"duplicate id 10003 in ids"):
        milvus.add([10_003, 10_003], emb[:2])
    with pytest.raises(ValueError, match=r"id 3 is already in the gallery .*g.db#gallery; remove it first"):
        milvus.add([10_010, 3], emb[:2])  # the new id must not be written either
    with pytest.raises(ValueError, match=r"k=601 is larger than the gallery \(600 items\)"):
        milvus.search(emb[:1], N + 1)
    with pytest.raises(ValueError, match=r"has L2 norm"):
        milvus.add(fresh[:1], emb[:1] * 2)
    with pytest.raises(KeyError, match=r"id 99999 is not in the gallery"):
        milvus.remove([3, 99999])
    with pytest.raises(ValueError, match=r"metadata\['category'\] is empty"):
        milvus.add(fresh[:1], emb[:1], [{"category": ""}])
    assert len(milvus) == before and 10_010 not in set(milvus.ids.tolist()) and 3 in set(milvus.ids.tolist())
    q = queries()
    assert_same_up_to_ties(milvus.search(q, 10), exact.search(q, 10), q, exact)


def test_category_filter_is_a_quoted_literal():
    assert category_filter('x" or id > 0 or "') == r'category in ["x\" or id > 0 or \""]'
    with pytest.raises(TypeError, match=r"categories must be a str or a set of str"):
        category_filter({3})


def test_location_picks_the_implementation(tmp_path):
    assert isinstance(open_store(tmp_path / "g.safetensors", dim=4, options={"device": "cpu"}), KnnIndex)
    with pytest.raises(ValueError, match=r"is not a KnnIndex file \(\*\.safetensors\), a Milvus Lite folder"):
        open_store(tmp_path / "g.npz", dim=4)
    with pytest.raises(FileNotFoundError, match=r"no gallery collection 'gallery'"):
        open_store(tmp_path / "empty.db")
    assert not store_exists(tmp_path / "nothing.db") and not (tmp_path / "nothing.db").exists()
    with MilvusStore.open(str(tmp_path / "new" / "folder" / "g.db"), dim=4) as fresh:  # parents are created
        assert len(fresh) == 0 and store_exists(fresh.location)
    with pytest.raises(ValueError, match=r"expected key=value"):
        MilvusIndexConfig.parse("HNSW:ef")
    with pytest.raises(
        ValueError, match=r"HNSW takes no parameter foo; expected one of: \['M', 'ef', 'efConstruction'\]"
    ):
        MilvusIndexConfig.parse("HNSW:foo=1")
    with pytest.raises(ValueError, match=r"FLAT takes no parameter nlist; expected one of: none"):
        MilvusIndexConfig.parse("FLAT:nlist=4")
    assert MilvusIndexConfig.parse("GPU_CAGRA:search_width=4").search["search_width"] == 4


def test_another_index_type_on_an_existing_collection_is_refused(tmp_path):
    location = str(tmp_path / "g.db")
    with MilvusStore.open(location, dim=4):  # FLAT
        pass
    with pytest.raises(ValueError, match=r"has a FLAT index, not the HNSW asked for; .*--milvus-index FLAT"):
        MilvusStore.open(location, index=MilvusIndexConfig.named("HNSW"))
    with MilvusStore.open(location, index=MilvusIndexConfig.named("FLAT")) as same:
        assert same.index.index_type == "FLAT"


def test_a_uri_that_does_not_answer_fails_in_bounded_time():
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(MilvusStoreError, match=rf"Milvus at {uri} did not answer within 3s"):
        MilvusStore.open(f"{uri}#g", timeout_s=3)
    assert time.monotonic() - t0 < 30


def test_a_lite_folder_in_use_names_the_file_and_the_fix(pair):
    _, _, path = pair  # held open by this process
    code = textwrap.dedent(
        f"""
        from mim.search.stores.milvus import MilvusStore, MilvusStoreError
        try:
            MilvusStore.open({str(path)!r})
        except MilvusStoreError as e:
            print("REFUSED:", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert f"REFUSED: {path.resolve()} is in use by another process" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "python -m milvus_lite server --data-dir" in out.stdout
    assert "Traceback" not in out.stderr, out.stderr  # only our message: Milvus Lite is not even asked


def test_the_lite_server_shares_one_folder_between_processes(tmp_path):
    """`python -m milvus_lite server` on loopback: the http:// URI path of the store, as for a real server."""
    port = free_port()
    cmd = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "srv"), "--host", "127.0.0.1"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ids, emb, meta = gallery()
        deadline = time.monotonic() + 60
        while True:
            try:
                store = MilvusStore.open(f"http://127.0.0.1:{port}#shared", dim=DIM, model_id="m", timeout_s=2)
                break
            except MilvusStoreError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        with store:
            store.add(ids, emb, meta)
            store.save()
        code = f"""from mim.search.stores import open_store
s = open_store("http://127.0.0.1:{port}#shared", expected_model_id="m")
print(len(s), s.search(s.vectors([3]), 1)[1][0, 0])"""
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == [str(N), "3"], out.stderr[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_save_fails_loudly_when_milvus_lite_lacks_its_index_wait(tmp_path, monkeypatch):
    import milvus_lite

    with MilvusStore.open(str(tmp_path / "g.db"), dim=4) as store:
        store.add([1], np.eye(4, dtype=np.float32)[:1])
        store.save()  # the pinned milvus-lite: waits for its background indexing
        with monkeypatch.context() as patch, pytest.raises(MilvusStoreError, match=r"milvus-lite 3\.2\.2 lacks what"):
            patch.setattr(milvus_lite.server_manager_instance, "_servers", {})  # as if its internals had changed
            store.save()
