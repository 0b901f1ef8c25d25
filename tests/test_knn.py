"""mim.search.knn against the reference top-k (ranking.exact_top_k: a float64 full sort, ties by ascending id).

Two kinds of data:
* "quantised": rows with four entries of +-0.5 and zeros elsewhere. They are exactly unit norm, every inner
  product is a multiple of 0.25 computed exactly in fp16/fp32/fp64, and most scores tie, so results must equal
  the reference bit for bit, including the tie order (ascending id).
* "gaussian": random unit rows. fp32 and fp64 scores differ by ~1e-7, so results are compared "up to ties":
  the same score sequence, and every returned id really has the score at its position.

The CuPy variants run the same checks with device="cuda" and skip with a reason where CUDA is not usable.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from mim.search import knn, prefilter, topk_kernel
from mim.search.knn import TOPK_METHODS, KnnIndex, cuda_unavailable_reason
from mim.search.ranking import exact_top_k

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _float32_unless_asked(monkeypatch):
    """These tests pin the float32 engine and its selectors, also on CPUs where prefilter='auto' would take their
    searches; the bfloat16 search runs where a test asks for it (`where`'s bf16 variant, tests/test_prefilter.py)."""
    monkeypatch.setattr(prefilter, "cpu_has_bf16_dot", lambda: False)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    if request.param == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            pytest.skip(f"CuPy path needs a usable CUDA device: {reason}")
    return request.param


def _skip_if_unusable(device: str, method: str) -> None:
    if method == "compiled" and device != "cpu":
        pytest.skip("topk='compiled' runs on host arrays only (numba); the GPU has torch.topk")
    if device == "cuda" and method == "torch":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("topk='torch' on the GPU needs a CUDA build of torch; this torch is CPU-only")


# ---- data and reference ----------------------------------------------------------------------------------


def quantised_unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = np.zeros((n, d), dtype=np.float32)
    cols = np.argsort(rng.random((n, d)), axis=1)[:, :4]  # 4 distinct columns per row
    np.put_along_axis(x, cols, rng.choice([-0.5, 0.5], size=(n, 4)).astype(np.float32), axis=1)
    return x


def gaussian_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_topk(gallery, ids, queries, k, allowed=None):
    """mim.search.ranking.exact_top_k (the project's one reference top-k) in float64 over the rows sorted by id, so
    equal scores come in ascending id; fewer than k allowed items -> pad with -1 / -inf, as KnnIndex does."""
    ids = np.asarray(ids)
    by_id = np.argsort(ids, kind="stable")
    if allowed is not None:
        by_id = by_id[np.asarray(allowed)[by_id]]
    g, gid = np.asarray(gallery, np.float64)[by_id], ids[by_id]
    scores = np.full((len(queries), k), -np.inf)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    if len(gid):
        s, rows = exact_top_k(np.asarray(queries, np.float64), g, k)  # (Q, min(k, M))
        scores[:, : rows.shape[1]] = s
        out_ids[:, : rows.shape[1]] = gid[rows]
    return scores, out_ids


def assert_same_up_to_ties(index, queries, k, got_scores, got_ids, atol=1e-5):
    """Scores agree with the float64 reference and every id carries the reference score at its position."""
    gallery, ids = index.embeddings(), index.ids
    ref_scores, _ = reference_topk(gallery, ids, queries, k)
    np.testing.assert_allclose(got_scores, ref_scores, atol=atol, rtol=0)
    rows = np.searchsorted(ids, got_ids)
    true = np.einsum("qd,qkd->qk", queries.astype(np.float64), gallery.astype(np.float64)[rows])
    np.testing.assert_allclose(true, ref_scores, atol=atol, rtol=0)
    assert all(len(set(r)) == k for r in got_ids.tolist()), "an id was returned twice in one row"


def make_index(rng, n=3000, d=16, device="cpu", data=quantised_unit, id_stride=7, **kw):
    x = data(rng, n, d)
    ids = rng.permutation(n).astype(np.int64) * id_stride + 3  # non-contiguous ids added out of order
    index = KnnIndex(d, device=device, **kw)
    index.add(ids, x)
    return index, ids, x


# ---- equality with the reference -------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(TOPK_METHODS))
def test_exact_with_ties_matches_reference(device, method):
    _skip_if_unusable(device, method)
    rng = np.random.default_rng(0)
    index, ids, x = make_index(rng, device=device, topk=method, chunk_size=700)
    q = quantised_unit(rng, 20)
    for k in (1, 10, 1024, len(index)):
        scores, got = index.search(q, k)
        ref_s, ref_i = reference_topk(x, ids, q, k)
        assert scores.dtype == np.float32 and got.dtype == np.int64 and got.shape == (20, k)
        np.testing.assert_array_equal(got, ref_i)
        np.testing.assert_array_equal(scores, ref_s.astype(np.float32))


def test_random_data_matches_reference_up_to_ties(device):
    rng = np.random.default_rng(1)
    index, _, _ = make_index(rng, n=5000, d=64, device=device, data=gaussian_unit, chunk_size=1500)
    q = gaussian_unit(rng, 16, 64)
    for k in (1, 100, 1024, len(index)):
        scores, got = index.search(q, k)
        assert_same_up_to_ties(index, q, k, scores, got)


@pytest.mark.parametrize("method", sorted(TOPK_METHODS))
def test_chunked_equals_unchunked(device, method):
    _skip_if_unusable(device, method)
    rng = np.random.default_rng(2)
    x, ids, q = quantised_unit(rng, 1000), np.arange(1000) * 2, quantised_unit(rng, 12)
    whole = KnnIndex(16, device=device, topk=method, chunk_size=1 << 20)
    tiny = KnnIndex(16, device=device, topk=method, chunk_size=7, query_batch_size=5)
    for index in (whole, tiny):
        index.add(ids, x)
    for k in (1, 50, 1000):
        s1, i1 = whole.search(q, k)
        s2, i2 = tiny.search(q, k)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)


def test_batch_equals_single_queries(device):
    rng = np.random.default_rng(3)
    index, _, _ = make_index(rng, n=800, device=device, chunk_size=300, query_batch_size=4)
    q = quantised_unit(rng, 9)
    s, i = index.search(q, 25)
    for row in range(len(q)):
        s1, i1 = index.search(q[row : row + 1], 25)
        np.testing.assert_array_equal(i1[0], i[row])
        np.testing.assert_array_equal(s1[0], s[row])


def test_ties_are_ordered_by_ascending_id(device):
    rng = np.random.default_rng(4)
    v = quantised_unit(rng, 1)
    ids = rng.permutation(500) * 3
    index = KnnIndex(16, device=device, chunk_size=64)
    for part in np.array_split(ids, 4):  # several adds, ids out of order
        index.add(part, np.repeat(v, len(part), axis=0))
    scores, got = index.search(v, 200)
    np.testing.assert_array_equal(got[0], np.sort(ids)[:200])
    assert (scores == 1.0).all()


# ---- category filter -------------------------------------------------------------------------------------


def _index_with_categories(rng, device, n=2000, model_id=None):
    x = quantised_unit(rng, n)
    ids = np.arange(n) * 5
    cats = rng.choice(["shoes", "bags", "hats", "rare"], p=[0.4, 0.4, 0.195, 0.005], size=n)
    meta = [{"title": f"item {i}", "category": c, "image_path": f"img/{i}.jpg"} for i, c in zip(ids, cats)]
    index = KnnIndex(16, device=device, chunk_size=300, model_id=model_id)
    index.add(ids, x, meta)
    return index, ids, x, cats


def test_category_filter_matches_reference(device):
    rng = np.random.default_rng(5)
    index, ids, x, cats = _index_with_categories(rng, device)
    q = quantised_unit(rng, 8)
    for filt, allowed in (("shoes", cats == "shoes"), ({"bags", "hats"}, np.isin(cats, ["bags", "hats"]))):
        scores, got = index.search(q, 100, categories=filt)
        ref_s, ref_i = reference_topk(x, ids, q, 100, allowed=allowed)
        np.testing.assert_array_equal(got, ref_i)
        np.testing.assert_array_equal(scores, ref_s.astype(np.float32))
        wanted = {filt} if isinstance(filt, str) else filt
        assert {index.get_metadata(i)["category"] for i in got.ravel().tolist()} <= wanted


def test_category_filter_pads_when_fewer_items_match(device):
    rng = np.random.default_rng(6)
    index, ids, x, cats = _index_with_categories(rng, device)
    n_rare = int((cats == "rare").sum())
    assert 0 < n_rare < 50
    q = quantised_unit(rng, 3)
    scores, got = index.search(q, 50, categories="rare")
    ref_s, ref_i = reference_topk(x, ids, q, 50, allowed=cats == "rare")
    np.testing.assert_array_equal(got, ref_i)
    assert (got[:, n_rare:] == -1).all() and np.isneginf(scores[:, n_rare:]).all()
    assert np.isfinite(scores[:, :n_rare]).all()
    scores, got = index.search(q, 5, categories={"no-such-category"})
    assert (got == -1).all() and np.isneginf(scores).all()


# ---- mutation --------------------------------------------------------------------------------------------


def test_remove_then_search_and_add_after_remove(device):
    rng = np.random.default_rng(7)
    index, ids, x = make_index(rng, n=1500, device=device, chunk_size=400)
    gone = rng.choice(ids, size=600, replace=False)
    index.remove(gone)
    keep = ~np.isin(ids, gone)
    assert len(index) == 900 and set(index.ids.tolist()) == set(ids[keep].tolist())
    q = quantised_unit(rng, 10)
    scores, got = index.search(q, 300)
    ref_s, ref_i = reference_topk(x[keep], ids[keep], q, 300)
    np.testing.assert_array_equal(got, ref_i)
    np.testing.assert_array_equal(scores, ref_s.astype(np.float32))
    with pytest.raises(KeyError, match=f"id {int(gone[0])} is not in the index"):
        index.get_metadata(gone[0])

    back = gone[:100]
    new_x = quantised_unit(rng, 100)
    index.add(back, new_x, [{"title": "re-added", "category": "c"}] * 100)
    all_ids = np.concatenate([ids[keep], back])
    all_x = np.concatenate([x[keep], new_x])
    scores, got = index.search(q, 1000)
    ref_s, ref_i = reference_topk(all_x, all_ids, q, 1000)
    np.testing.assert_array_equal(got, ref_i)
    np.testing.assert_array_equal(scores, ref_s.astype(np.float32))
    assert index.get_metadata(back[0]) == {"title": "re-added", "category": "c"}


def test_remove_unknown_id_names_it_and_removes_nothing():
    rng = np.random.default_rng(8)
    index, ids, _ = make_index(rng, n=50)
    with pytest.raises(KeyError, match="id 4 is not in the index; nothing was removed"):
        index.remove([ids[0], 4])
    assert len(index) == 50
    with pytest.raises(KeyError, match="id 1"):
        KnnIndex(16, device="cpu").remove([1])


# ---- validation ------------------------------------------------------------------------------------------


def _small(model_id=None):
    rng = np.random.default_rng(9)
    index = KnnIndex(16, device="cpu", model_id=model_id)
    index.add([1, 2, 3], quantised_unit(rng, 3))
    return index


def _unit(n, d=16):
    return quantised_unit(np.random.default_rng(10), n, d)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda ix: ix.add([10, 11], _unit(2, 8)), ValueError, r"have dim 8, expected 16"),
        (lambda ix: ix.add([10], _unit(1)[0]), ValueError, r"must be 2-D \(n, 16\); got shape \(16,\)"),
        (lambda ix: ix.add([10], _unit(1)[None]), ValueError, r"must be 2-D"),
        (
            lambda ix: ix.add([10, 11], np.where(np.eye(2, 16) > 0, np.nan, _unit(2))),
            ValueError,
            r"embeddings row 0 contains NaN or inf",
        ),
        (
            lambda ix: ix.add([10, 11], np.vstack([_unit(1), np.full((1, 16), np.inf)])),
            ValueError,
            r"row 1 contains NaN or inf",
        ),
        (lambda ix: ix.add([10, 10], _unit(2)), ValueError, r"duplicate id 10 in ids"),
        (lambda ix: ix.add([10, 2], _unit(2)), ValueError, r"id 2 is already in the index"),
        (lambda ix: ix.add([1.5, 2.5], _unit(2)), TypeError, r"ids must be integers .*got dtype float64"),
        (lambda ix: ix.add(["a"], _unit(1)), TypeError, r"ids must be integers"),
        (lambda ix: ix.add([-1], _unit(1)), ValueError, r"-1 marks padding"),
        (lambda ix: ix.add([10, 11], _unit(3)), ValueError, r"got 2 ids but 3 embedding rows"),
        (lambda ix: ix.add([10, 11], _unit(2), [{"title": "x"}]), ValueError, r"metadata has 1 entries but 2 ids"),
        (lambda ix: ix.add([10], _unit(1), [{"x": object()}]), ValueError, r"metadata\[0\] is not JSON"),
        (lambda ix: ix.add([10], _unit(1), [{"category": 3}]), TypeError, r"\['category'\] must be a str"),
        (lambda ix: ix.add([10], 2 * _unit(1)), ValueError, r"row 0 has L2 norm 2; expected unit norm"),
        (lambda ix: ix.add([10], np.zeros((1, 16)), normalize=True), ValueError, r"all zeros"),
        (lambda ix: ix.add([10], np.ones((1, 16), dtype=np.int64)), TypeError, r"must be a float array"),
        (lambda ix: ix.search(_unit(2, 8), 1), ValueError, r"queries have dim 8, expected 16"),
        (lambda ix: ix.search(_unit(1)[0], 1), ValueError, r"queries must be 2-D"),
        (lambda ix: ix.search(np.full((1, 16), np.nan), 1), ValueError, r"queries row 0 contains NaN"),
        (
            lambda ix: ix.search(_unit(1), 4),
            ValueError,
            r"k=4 is larger than the index \(3 items\); expected 1 <= k <= 3",
        ),
        (lambda ix: ix.search(_unit(1), 0), ValueError, r"k must be a positive int; got 0"),
        (lambda ix: ix.search(_unit(1), 1, categories={3}), TypeError, r"categories must be a str or a set"),
        (lambda ix: ix.get_metadata(99), KeyError, r"id 99 is not in the index"),
    ],
)
def test_validation_errors(call, exc, match):
    index = _small()
    with pytest.raises(exc, match=match):
        call(index)
    assert len(index) == 3  # a refused call changes nothing


def test_empty_index_search_is_refused():
    with pytest.raises(ValueError, match="the index is empty; add items before searching"):
        KnnIndex(16, device="cpu").search(_unit(1), 1)


def test_normalize_option_and_unit_tolerance():
    index = KnnIndex(16, device="cpu")
    index.add([1, 2], 3 * _unit(2), normalize=True)
    index.add([3], _unit(1) * (1 + 5e-4))  # within the default tolerance
    np.testing.assert_allclose(np.linalg.norm(index.embeddings(), axis=1), 1, atol=1e-3)


def test_constructor_errors():
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda'; got 'tpu'"):
        KnnIndex(4, device="tpu")
    with pytest.raises(ValueError, match="topk must be 'auto' or one of"):
        KnnIndex(4, device="cpu", topk="heap")
    with pytest.raises(ValueError, match="dim must be a positive int"):
        KnnIndex(0, device="cpu")
    if cuda_unavailable_reason() is not None:
        with pytest.raises(RuntimeError, match="device='cuda' was requested but .*use device='cpu'"):
            KnnIndex(4, device="cuda")
        assert KnnIndex(4, device="auto").device == "cpu"


# ---- persistence -----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, device):
    rng = np.random.default_rng(11)
    index, ids, _, _ = _index_with_categories(rng, device, n=700, model_id="clip-b16")
    index.remove(ids[:10])
    path = tmp_path / "gallery.safetensors"
    index.save(path)
    loaded = KnnIndex.load(path, expected_model_id="clip-b16", device=device)
    assert loaded.model_id == "clip-b16" and len(loaded) == len(index) == 690
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.embeddings(), index.embeddings())
    for i in index.ids.tolist():
        assert loaded.get_metadata(i) == index.get_metadata(i)
    q = quantised_unit(rng, 6)
    for kw in ({}, {"categories": "bags"}):
        s1, i1 = index.search(q, 40, **kw)
        s2, i2 = loaded.search(q, 40, **kw)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)


def test_save_load_empty_and_model_id_none(tmp_path):
    path = tmp_path / "empty.safetensors"
    KnnIndex(8, device="cpu").save(path)
    loaded = KnnIndex.load(path, device="cpu")
    assert len(loaded) == 0 and loaded.dim == 8 and loaded.model_id is None


def test_load_refuses_other_model(tmp_path):
    index = KnnIndex(16, device="cpu", model_id="mim-tiny-v1")
    index.add([1], _unit(1))
    index.save(tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match=r"model_id='mim-tiny-v1' but expected_model_id='mim-base-v2'"):
        KnnIndex.load(tmp_path / "g.safetensors", expected_model_id="mim-base-v2", device="cpu")


def test_file_is_safetensors_not_pickle(tmp_path):
    index = KnnIndex(16, device="cpu", model_id="m")
    index.add([5, 6], _unit(2), [{"title": "a", "category": "c", "image_path": "a.jpg"}, {}])
    path = tmp_path / "g.safetensors"
    index.save(path)
    raw = path.read_bytes()
    assert not raw.startswith(b"\x80"), "pickle protocol opcode at the start of the file"
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 little-endian header size, then JSON
    header = json.loads(raw[8 : 8 + n])
    meta = header["__metadata__"]
    assert meta["format"] == "mim-knn-index" and meta["format_version"] == "1"
    assert meta["dim"] == "16" and json.loads(meta["model_id"]) == "m" and meta["count"] == "2"
    assert header["ids"]["dtype"] == "I64" and header["embeddings"]["shape"] == [2, 16]
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]


def _good_file(tmp_path):
    index = _small(model_id="m")
    path = tmp_path / "g.safetensors"
    index.save(path)
    return index, path


def _assert_loads_like(path, index):
    loaded = KnnIndex.load(path, expected_model_id="m", device="cpu")
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.embeddings(), index.embeddings())


def test_crash_in_writer_keeps_last_good_file(tmp_path, monkeypatch):
    import safetensors.numpy

    index, path = _good_file(tmp_path)
    before = path.read_bytes()

    def half_write_then_die(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"trunc')
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write_then_die)
    bigger = _small()
    bigger.add([50], _unit(1))
    with pytest.raises(OSError, match="simulated"):
        bigger.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"], "temp file left behind"
    _assert_loads_like(path, index)


def test_crash_at_rename_keeps_last_good_file(tmp_path, monkeypatch):
    index, path = _good_file(tmp_path)
    before = path.read_bytes()

    def no_rename(src, dst):
        raise KeyboardInterrupt  # the process dies between fsync and rename

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        _small().save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"], "temp file left behind"
    _assert_loads_like(path, index)


def test_corrupted_and_foreign_files_are_refused(tmp_path):
    _, path = _good_file(tmp_path)
    raw = bytearray(path.read_bytes())

    flipped = tmp_path / "flipped.safetensors"
    raw_f = bytearray(raw)
    raw_f[-10] ^= 0xFF  # inside the tensor data
    flipped.write_bytes(bytes(raw_f))
    with pytest.raises(ValueError, match="is corrupted: the SHA-256"):
        KnnIndex.load(flipped, device="cpu")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ValueError, match="not a readable KnnIndex file"):
        KnnIndex.load(truncated, device="cpu")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04\x95 definitely a pickle")
    with pytest.raises(ValueError, match="not a readable KnnIndex file"):
        KnnIndex.load(garbage, device="cpu")

    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, foreign, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a KnnIndex file: header format='pt'"):
        KnnIndex.load(foreign, device="cpu")

    future = tmp_path / "future.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, future, metadata={"format": knn.FORMAT_NAME, "format_version": "9"})
    with pytest.raises(ValueError, match="format version '9'; this code reads version 1"):
        KnnIndex.load(future, device="cpu")

    with pytest.raises(FileNotFoundError, match="no index file"):
        KnnIndex.load(tmp_path / "missing.safetensors", device="cpu")


# ---- selectors and the GPU path --------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(TOPK_METHODS))
def test_each_selector_returns_a_valid_topk_set(method):
    rng = np.random.default_rng(12)
    scores = (rng.integers(-4, 5, size=(7, 3000)) / 4).astype(np.float32)  # heavy ties
    for k in (1, 13, 1024, 3000):
        cols = TOPK_METHODS[method](np, scores, k)
        assert cols.shape == (7, k)
        kth = -np.sort(-scores, axis=1)[:, k - 1 : k]
        picked = np.take_along_axis(scores, cols, axis=1)
        assert (picked >= kth).all() and all(len(set(r)) == k for r in cols.tolist())
        canon = knn._lowest_columns_on_ties(np, scores, cols)
        expect = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)
        np.testing.assert_array_equal(np.sort(canon, axis=1), expect)


@pytest.mark.gpu
def test_cupy_equals_numpy():
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"CuPy path needs a usable CUDA device: {reason}")
    rng = np.random.default_rng(13)
    x, ids, q = quantised_unit(rng, 4000), rng.permutation(4000) * 3, quantised_unit(rng, 64)
    meta = [{"category": "ab"[i % 2]} for i in range(4000)]
    cpu = KnnIndex(16, device="cpu")
    gpu = KnnIndex(16, device="cuda", chunk_size=999)
    for index in (cpu, gpu):
        index.add(ids, x, meta)
    assert gpu.dtype == np.float16 and cpu.dtype == np.float32
    for k, cats in ((1, None), (100, None), (1024, None), (4000, None), (100, "a")):
        s1, i1 = cpu.search(q, k, categories=cats)
        s2, i2 = gpu.search(q, k, categories=cats)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)


# ---- the tiled search core: tiles, the tie pass, filters, backends and inputs ------------------------------------
# Each runs on torch (CPU) and on the NumPy backend (the search without torch); the CUDA variants are marked gpu.
# ("cpu", "numpy", "bf16"): the NumPy engine with its bfloat16 candidate search taking every search.
BACKENDS = [
    ("cpu", "torch"),
    ("cpu", "numpy"),
    ("cpu", "numpy", "bf16"),
    pytest.param(("cuda", "torch"), marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKENDS, ids=lambda p: "-".join(p))
def where(request) -> dict:
    device, backend, *low = request.param
    if device == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            pytest.skip(f"the CUDA path needs a usable CUDA device: {reason}")
    if low:
        reason = prefilter.unavailable_reason()
        if reason is not None:
            pytest.skip(f"the bfloat16 candidate search cannot run here: {reason}")
        return {"device": device, "backend": backend, "prefilter": "bf16"}
    return {"device": device, "backend": backend}


def test_ties_across_tile_boundaries_keep_the_lowest_ids(where):
    """A group of identical rows spread over many 16-row tiles, more per tile than k+1: every tile must give
    up tied items, and the result must still be the lowest ids of the group, in ascending order."""
    rng = np.random.default_rng(20)
    n, d = 400, 16
    x = quantised_unit(rng, n, d)
    v = quantised_unit(rng, 1, d)
    tied = np.sort(rng.choice(n, size=120, replace=False))
    x[tied] = v  # 120 rows with the same best score for the query v
    ids = rng.permutation(n) * 3 + 1
    index = KnnIndex(d, chunk_size=16, query_batch_size=3, **where)
    index.add(ids, x)
    q = np.concatenate([v, quantised_unit(rng, 7, d), v])
    for k in (1, 10, 17, 119, 120, 121, 200, n):
        scores, got = index.search(q, k)
        ref_s, ref_i = reference_topk(x, ids, q, k)
        np.testing.assert_array_equal(got, ref_i)
        np.testing.assert_array_equal(scores, ref_s.astype(np.float32))


def test_tie_pass_runs_only_for_rows_that_tie(where, monkeypatch):
    rng = np.random.default_rng(21)
    x = gaussian_unit(rng, 3000, 32)
    x[2000] = x[10]  # one duplicated image
    index = KnnIndex(32, chunk_size=512, **where)
    index.add(np.arange(3000), x)
    exact_rows = []
    scan = KnnIndex._scan

    def counting(self, q, k, view, *, exact):
        if exact:
            exact_rows.append(int(q.shape[0]))
        return scan(self, q, k, view, exact=exact)

    monkeypatch.setattr(KnnIndex, "_scan", counting)
    q = gaussian_unit(rng, 9, 32)
    index.search(q, 10)
    assert exact_rows == [], "random scores have no ties: the exact pass must not run"
    q[4] = x[10]  # this row's two best items tie (rows 10 and 2000)
    scores, got = index.search(q, 10)
    # A tie inside the top k: both items are candidates, so only their order is fixed, without a second pass.
    assert exact_rows == []
    assert got[4, :2].tolist() == [10, 2000] and scores[4, 0] == scores[4, 1]
    assert_same_up_to_ties(index, q, 10, scores, got)
    # A tie at the boundary (k = 1: the best and the second tie): which item is in decides, so that row alone is
    # searched again with the exact rule.
    scores, got = index.search(q, 1)
    assert exact_rows == [1]
    assert got[4, 0] == 10


@pytest.mark.parametrize("share", ["selective", "broad"])
def test_filters_leaving_fewer_than_k_items(where, share):
    """Selective filters are searched on a compacted copy of their rows, broad ones as a mask: both pad."""
    rng = np.random.default_rng(22)
    n = 400
    x = quantised_unit(rng, n)
    ids = np.arange(n) * 2
    want = 20 if share == "selective" else 150  # at most 1/8 of the gallery is compacted
    cats = np.array(["a"] * want + ["b"] * (n - want))[rng.permutation(n)]
    index = KnnIndex(16, chunk_size=64, **where)
    index.add(ids, x, [{"category": c} for c in cats])
    q = quantised_unit(rng, 5)
    for k in (want - 1, want, want + 1, n):
        scores, got = index.search(q, k, categories="a")
        ref_s, ref_i = reference_topk(x, ids, q, k, allowed=cats == "a")
        np.testing.assert_array_equal(got, ref_i)
        np.testing.assert_array_equal(scores, ref_s.astype(np.float32))
        assert (got[:, want:] == -1).all() and np.isneginf(scores[:, want:]).all()


def test_k_equal_to_the_gallery_returns_every_item_in_order(where):
    rng = np.random.default_rng(23)
    x = quantised_unit(rng, 257)
    ids = rng.permutation(257) * 5
    for chunk in (None, 1, 32, 256, 257):
        index = KnnIndex(16, chunk_size=chunk, **where)
        index.add(ids, x)
        q = quantised_unit(rng, 4)
        scores, got = index.search(q, 257)
        ref_s, ref_i = reference_topk(x, ids, q, 257)
        np.testing.assert_array_equal(got, ref_i)
        np.testing.assert_array_equal(scores, ref_s.astype(np.float32))


def test_a_gallery_of_one_row(where):
    index = KnnIndex(16, **where)
    v = quantised_unit(np.random.default_rng(24), 2)
    index.add([42], v[:1], [{"category": "mug"}])
    scores, got = index.search(v, 1)
    assert got.tolist() == [[42], [42]] and scores.dtype == np.float32
    np.testing.assert_array_equal(scores[:, 0], (v @ v[0]).astype(np.float32))
    assert index.search(v, 1, categories="mug")[1].tolist() == [[42], [42]]
    s, i = index.search(v, 1, categories="shoe")
    assert i.tolist() == [[-1], [-1]] and np.isneginf(s).all()
    with pytest.raises(ValueError, match=r"k=2 is larger than the index \(1 items\)"):
        index.search(v, 2)


def test_filter_views_follow_adds_and_removes(where):
    """Filters are cached per category set: an add or a remove must drop the cache (no stale rows or ids)."""
    rng = np.random.default_rng(25)
    x = quantised_unit(rng, 200)
    index = KnnIndex(16, **where)
    index.add(np.arange(200), x, [{"category": "ab"[i % 2]} for i in range(200)])
    q = x[:3]
    for cats in ("a", {"a", "b"}, "b"):
        index.search(q, 5, categories=cats)  # fills the cache
    extra = quantised_unit(rng, 1)
    index.add([1000], extra, [{"category": "a"}])
    _, got = index.search(extra, 1, categories="a")
    assert got.tolist() == [[1000]]
    index.remove([1000, 0])
    _, got = index.search(x[:1], 199, categories={"a", "b"})
    assert 0 not in got and 1000 not in got and (got >= 0).all()
    np.testing.assert_array_equal(got, reference_topk(x[1:], np.arange(1, 200), x[:1], 199)[1])
    _, got = index.search(x[:1], 150, categories="a")  # the even ids 2..198 that are left, then padding
    assert sorted(got[0, :99].tolist()) == list(range(2, 200, 2)) and (got[0, 99:] == -1).all()


def test_query_inputs_numpy_torch_and_float_widths(where):
    import torch

    rng = np.random.default_rng(26)
    index, _, _ = make_index(rng, n=500, **where)
    q = quantised_unit(rng, 6)
    want = index.search(q, 20)
    for other in (q.astype(np.float64), q.astype(np.float16), torch.from_numpy(q), list(map(list, q))):
        got = index.search(other, 20)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    bad = torch.from_numpy(q.copy())
    bad[3, 2] = float("nan")
    if where["backend"] == "torch":
        with pytest.raises(ValueError, match="queries row 3 contains NaN or inf"):
            index.search(bad, 5)
    with pytest.raises(ValueError, match="queries row 3 contains NaN or inf"):
        index.search(bad.numpy(), 5)


def test_the_numpy_backend_refuses_the_gpu():
    with pytest.raises(RuntimeError, match="NumPy backend runs on the CPU only"):
        knn._ops("numpy", "cuda")
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'numpy'; got 'jax'"):
        KnnIndex(4, device="cpu", backend="jax")


@pytest.mark.gpu
def test_device_queries_cupy_and_torch_cuda_match_host_queries():
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CUDA path needs a usable CUDA device: {reason}")
    import torch

    rng = np.random.default_rng(27)
    index, _, _ = make_index(rng, n=5000, device="cuda")
    q = quantised_unit(rng, 33)
    want = index.search(q, 100)
    inputs = [torch.from_numpy(q).cuda(), torch.from_numpy(q).cuda().half()]
    try:
        import cupy
    except Exception:  # CuPy is optional on the GPU: torch tensors are the main device input
        cupy = None
    if cupy is not None:
        inputs.append(cupy.asarray(q))
    for other in inputs:
        got = index.search(other, 100)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    bad = torch.from_numpy(q).cuda()
    bad[5, 0] = float("inf")
    with pytest.raises(ValueError, match="queries row 5 contains NaN or inf"):
        index.search(bad, 10)
    with pytest.raises(ValueError, match=r"queries row 0 has values beyond the FP16 range"):
        index.search(torch.full((1, 16), 1e6, device="cuda"), 10)


def test_save_and_load_on_each_backend(where, tmp_path):
    rng = np.random.default_rng(28)
    index = KnnIndex(16, model_id="m", **where)
    cats = rng.choice(["shoes", "bags", "rare"], p=[0.5, 0.47, 0.03], size=300)
    index.add(np.arange(300) * 3, quantised_unit(rng, 300), [{"category": c} for c in cats])
    path = tmp_path / "g.safetensors"
    index.save(path)
    loaded = KnnIndex.load(path, expected_model_id="m", **where)
    np.testing.assert_array_equal(loaded.embeddings(), index.embeddings())
    q = quantised_unit(rng, 4)
    for kw in ({}, {"categories": "rare"}, {"categories": {"shoes", "bags"}}):
        np.testing.assert_array_equal(loaded.search(q, 30, **kw)[1], index.search(q, 30, **kw)[1])


def _gpu_branches_on_cpu(index: KnnIndex) -> KnnIndex:
    """Turn a torch-CPU index's operations to their CUDA branches on CPU tensors: FP16 storage and queries (the
    product upcasts each tile where torch has no FP16 product with an FP32 result, as on the CPU), query checks
    computed as flags that travel back with the results, and the packed one-copy read-back. What the GPU runs,
    minus the GPU; the index must still be empty."""
    import torch

    ops = index._ops
    ops.device, ops.tdtype, ops.storage_dtype = "cuda", torch.float16, np.dtype(np.float16)
    ops.host_view = lambda t: None  # every tensor query is treated as a device tensor
    index._dtype = ops.storage_dtype
    index._set_rows(index._ids, ops.empty_gallery(index.dim), index._cat_codes)
    return index


def test_the_gpu_branches_give_the_cpu_results():
    import torch

    rng = np.random.default_rng(29)
    x, ids, q = quantised_unit(rng, 3000), rng.permutation(3000) * 3, quantised_unit(rng, 40)
    x[1500:1700] = x[0]  # ties across the 512-row tiles
    q[:3] = x[0]
    meta = [{"category": "abcdefghijklmnop"[i % 16]} for i in range(3000)]
    cpu = KnnIndex(16, device="cpu")
    gpu = _gpu_branches_on_cpu(KnnIndex(16, device="cpu", chunk_size=512, query_batch_size=16, backend="torch"))
    for index in (cpu, gpu):
        index.add(ids, x, meta)
    assert gpu.dtype == np.float16 and gpu._emb.dtype == torch.float16
    for k, cats in ((1, None), (100, None), (250, None), (3000, None), (100, "a"), (300, {"a", "b", "c"})):
        for queries in (q, torch.from_numpy(q)):
            s1, i1 = cpu.search(q, k, categories=cats)
            s2, i2 = gpu.search(queries, k, categories=cats)
            np.testing.assert_array_equal(i1, i2)
            np.testing.assert_array_equal(s1, s2)
    bad = torch.from_numpy(q.copy())
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match="queries row 7 contains NaN or inf"):
        gpu.search(bad, 10)
    with pytest.raises(ValueError, match="queries row 2 has values beyond the FP16 range"):
        gpu.search(torch.from_numpy(np.where(np.arange(40)[:, None] == 2, 7e4, q).astype(np.float32)), 10)
    with pytest.raises(ValueError, match="queries row 0 has values beyond the FP16 range"):
        gpu.search(np.full((1, 16), 1e5, np.float32), 10)  # a host query is checked on the host


def test_filtered_searches_from_several_threads_share_the_cache():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(30)
    x = quantised_unit(rng, 2000)
    cats = "abcdefghij"
    index = KnnIndex(16, device="cpu")
    index.add(np.arange(2000), x, [{"category": cats[i % 10]} for i in range(2000)])
    q = quantised_unit(rng, 4)
    filters = [frozenset(rng.choice(list(cats), size=rng.integers(1, 4), replace=False)) for _ in range(60)]
    want = [index.search(q, 15, categories=set(f))[1] for f in filters]
    index.add([5000], quantised_unit(rng, 1), [{"category": "k"}])  # empties the cache; "k" is in no filter
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda f: index.search(q, 15, categories=set(f))[1], filters))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("c, k", [(5000, 11), (5003, 101), (640, 10), (200, 101), (65, 1)])
def test_group_selection_keeps_the_best_values_with_ties_and_a_ragged_tail(c, k):
    rng = np.random.default_rng(c + k)
    s = np.round(rng.standard_normal((9, c)), 1).astype(np.float32)  # many ties, groups share maxima
    s[3] = 0.5  # a row of one value
    s[4, -3:] = 9.0  # the best scores in the ragged tail past the last whole group
    cols = knn.select_groups(np, s, k)
    assert cols.shape == (9, k) and all(len(set(r)) == k for r in cols.tolist())
    np.testing.assert_array_equal(np.sort(np.take_along_axis(s, cols, 1), 1), np.sort(s, 1)[:, c - k :])


def _needs_numba():
    reason = topk_kernel.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the compiled selector is not available here: {reason}")


def _check_kernel_rows(s: np.ndarray, k: int) -> None:
    vals, cols = topk_kernel.topk(s, k, sort=True)
    want = -np.sort(-s, axis=1)[:, :k]
    np.testing.assert_array_equal(vals, want)  # the k best values, best first
    np.testing.assert_array_equal(np.take_along_axis(s, cols, 1), vals)  # columns that hold them
    assert all(len(set(r)) == k for r in cols.tolist()), "a column was returned twice"
    unsorted, cols2 = topk_kernel.topk(s, k, sort=False)
    np.testing.assert_array_equal(np.sort(unsorted, 1), np.sort(want, 1))
    np.testing.assert_array_equal(np.take_along_axis(s, cols2, 1), unsorted)


@pytest.mark.parametrize("c, k", [(5000, 11), (5003, 101), (640, 10), (200, 101), (65, 1), (7, 7), (1, 1)])
def test_compiled_selection_with_ties_infinities_and_ragged_tails(c, k):
    _needs_numba()
    rng = np.random.default_rng(c * 7 + k)
    s = np.round(rng.standard_normal((12, c)), 1).astype(np.float32)  # many ties, groups share maxima
    s[1] = rng.standard_normal(c)  # no ties
    s[2] = 0.5  # a row of one value: every group ties, the buffer fills and is cut again and again
    s[3, -3:] = 9.0  # the best scores in the ragged tail past the last whole group
    s[4] = -np.inf  # a row a filter excluded entirely
    s[5, : c // 2] = -np.inf  # half excluded: for small c fewer than k finite scores remain
    s[6] = np.where(rng.random(c) < 0.5, -0.0, 0.0)  # signed zeros compare equal
    s[7] = rng.choice(np.array([3e38, -3e38, 1e-45, -1e-45], dtype=np.float32), size=c)  # extremes, denormals
    s[8] = np.arange(c, dtype=np.float32)  # ascending: every new column beats the bar
    s[9] = -np.arange(c, dtype=np.float32)  # descending
    _check_kernel_rows(s, k)


def test_compiled_selection_in_row_ranges_equals_one_call():
    _needs_numba()
    rng = np.random.default_rng(5)
    s = rng.standard_normal((37, 3001)).astype(np.float32)
    want_v, want_c = topk_kernel.topk(s, 25, sort=True)
    vals, cols = np.zeros((37, 25), np.float32), np.zeros((37, 25), np.int64)
    for rows in [(0, 10), (10, 11), (11, 37)]:
        topk_kernel.select_rows(s, 25, rows, True, vals, cols)
    np.testing.assert_array_equal(vals, want_v)
    np.testing.assert_array_equal(cols, want_c)
    with pytest.raises(ValueError, match=r"k must be in \[1, 3001\]"):
        topk_kernel.topk(s, 3002)


def test_kernels_warm_up_and_load_from_the_disk_cache_in_a_new_process():
    _needs_numba()
    assert topk_kernel.warm_up() is True
    code = (
        "import time; from mim.search import topk_kernel as tk; t = time.perf_counter(); tk.warm_up(); "
        "print(time.perf_counter() - t)"
    )
    took = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert took < 3.0, f"a new process took {took:.1f} s to get the kernels: the disk cache is not used"


def test_without_numba_the_numpy_selectors_are_used(monkeypatch):
    monkeypatch.setattr(topk_kernel, "unavailable_reason", lambda: "numba is not installed (test)")
    assert topk_kernel.warm_up() is False
    assert knn.numpy_topk_method(256, 5000, 11) == "groups"
    assert knn.numpy_topk_method(1, 100, 11) == "argpartition"
    with pytest.raises(ValueError, match="topk='compiled' cannot be used: numba is not installed"):
        KnnIndex(4, device="cpu", topk="compiled")
    rng = np.random.default_rng(6)
    index, ids, x = make_index(rng, n=500)
    q = quantised_unit(rng, 5)
    got = index.search(q, 10)
    ref_s, ref_i = reference_topk(x, ids, q, 10)
    np.testing.assert_array_equal(got[1], ref_i)


@pytest.mark.parametrize("method", ["auto", "groups"])  # auto: the compiled kernel where numba is installed
def test_large_tiles_are_selected_in_row_blocks_with_the_same_results(monkeypatch, method):
    rng = np.random.default_rng(41)
    x, q = quantised_unit(rng, 4000), quantised_unit(rng, 37)
    x[2000:2100] = x[7]  # ties, so the exact pass runs too
    q[:2] = x[7]
    index = KnnIndex(16, device="cpu", backend="numpy", topk=method)
    index.add(np.arange(4000) * 2, x)
    want = index.search(q, 25)
    monkeypatch.setattr(knn, "PARALLEL_SELECT_SCORES", 1)  # every tile in row blocks
    monkeypatch.setattr(knn, "COMPILED_PARALLEL_SCORES", 1)
    calls = []
    real = knn._select_pool

    def counting_pool():
        calls.append(1)
        return real()

    monkeypatch.setattr(knn, "_select_pool", counting_pool)
    got = index.search(q, 25)
    np.testing.assert_array_equal(want[1], got[1])
    np.testing.assert_array_equal(want[0], got[0])
    assert calls or (os.cpu_count() or 1) == 1
    index.chunk_size = 333  # many tiles: the compiled selector's running top-k, folded in row blocks
    got = index.search(q, 25)
    np.testing.assert_array_equal(want[1], got[1])
    np.testing.assert_array_equal(want[0], got[0])
    index.chunk_size = None
    # Query blocks searched side by side in the same pool (whose threads then select on their own).
    monkeypatch.setattr(knn, "QUERY_BLOCK_MACS", 1)
    monkeypatch.setattr(knn, "QUERY_BLOCK_ROWS", 2)
    for k in (1, 25, 4000):
        a, b = index.search(q, k), index.search(q[:1], k)
        np.testing.assert_array_equal(a[1][:1], b[1])
        if k == 25:
            np.testing.assert_array_equal(a[1], want[1])
            np.testing.assert_array_equal(a[0], want[0])
    assert knn._NumpyOps().query_blocks(37, 10**9, "compiled") is None  # one search on every BLAS thread
    blocks = knn._NumpyOps().query_blocks(37, 10**9, "groups")
    cores = os.cpu_count() or 1
    assert blocks is None if cores == 1 else (len(blocks) == cores and blocks[0][0] == 0 and blocks[-1][1] == 37)


def test_compiled_selection_spreads_over_cores_only_when_its_work_pays_for_a_handoff(monkeypatch):
    _needs_numba()
    calls = []
    real = knn._select_pool
    monkeypatch.setattr(knn, "_select_pool", lambda: calls.append(1) or real())
    ops = knn._NumpyOps()
    s = np.random.default_rng(3).standard_normal((64, 3000), dtype=np.float32)
    want = np.sort(s, axis=1)[:, ::-1]
    monkeypatch.setattr(knn, "COMPILED_PARALLEL_SCORES", ops.compiled_cost(64, 3000, 50))
    vals, _ = ops.topk(s, 49, sort=True, method="compiled")  # just below the bar: the calling thread alone
    np.testing.assert_array_equal(vals, want[:, :49])
    assert not calls
    vals, cols = ops.topk(s, 50, sort=True, method="compiled")  # at the bar: the rows split over the cores
    np.testing.assert_array_equal(vals, want[:, :50])
    np.testing.assert_array_equal(np.take_along_axis(s, cols, axis=1), vals)
    assert calls or (os.cpu_count() or 1) == 1


def test_cpu_default_engine_is_numpy_and_agrees_with_torch():
    assert knn.default_backend("cpu") == "numpy" and knn.default_backend("cuda") == "torch"
    rng = np.random.default_rng(42)
    x, q = quantised_unit(rng, 3000), quantised_unit(rng, 20)
    a, b = KnnIndex(16, device="cpu"), KnnIndex(16, device="cpu", backend="torch")
    for index in (a, b):
        index.add(np.arange(3000), x)
    assert isinstance(a._emb, np.ndarray)
    for k in (1, 10, 3000):
        for r1, r2 in zip(a.search(q, k), b.search(q, k)):
            np.testing.assert_array_equal(r1, r2)
