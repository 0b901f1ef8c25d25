"""mim.search.prefilter: the bfloat16 candidate search of the NumPy engine, against its float32 search.

The bound it rests on is checked pair by pair against float64 scores, on data chosen to strain it (wide dynamic
range, unnormalised queries); the search itself against the float32 engine (`prefilter="off"`) on gaussian
rows, duplicates, filters, dense clusters that force its fallback, and queries it must not take. The search
contract's tests (ties across tiles, filters, k = N, one row) also run on it: tests/test_knn.py's `where`.
"""

from __future__ import annotations

import numpy as np
import pytest

from mim.search import knn, prefilter
from mim.search.knn import KnnIndex

pytestmark = pytest.mark.skipif(
    prefilter.unavailable_reason() is not None, reason=f"bfloat16 search unavailable: {prefilter.unavailable_reason()}"
)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pair(x, ids=None, **kw):
    """The same gallery in a bfloat16-candidate index and a float32-only one."""
    ids = np.arange(len(x)) if ids is None else ids
    low = KnnIndex(x.shape[1], device="cpu", prefilter="bf16", **kw)
    high = KnnIndex(x.shape[1], device="cpu", prefilter="off", **kw)
    cats = ["c" if i % 20 == 0 else "ab"[i % 3 == 0] for i in range(len(x))]  # c: a compacted filter
    for index in (low, high):
        index.add(ids, x, [{"category": c} for c in cats])
    return low, high


def _assert_same(low, high, q, k, **kw):
    """Same ids up to float32 rounding: where they differ, the float64 scores at that rank agree to 1e-6 times
    the query's norm."""
    s1, i1 = low.search(q, k, **kw)
    s2, i2 = high.search(q, k, **kw)
    scale = float(np.linalg.norm(q, axis=1).max())
    np.testing.assert_allclose(s1, s2, atol=2e-6 * scale, rtol=0)
    if not np.array_equal(i1, i2):
        g = high.embeddings().astype(np.float64)
        pos = {int(v): j for j, v in enumerate(high.ids)}
        for r, c in zip(*np.nonzero(i1 != i2)):
            a, b = g[pos[int(i1[r, c])]] @ q[r], g[pos[int(i2[r, c])]] @ q[r]
            assert abs(a - b) < 1e-6 * scale, f"row {r} rank {c}: ids {i1[r, c]} and {i2[r, c]} score {a} and {b}"
    return s1, i1


def test_the_bound_holds_for_every_pair():
    """|exact - approximate| <= eps + c'|approximate| for every (query, row), on rows and queries of mixed
    scales: some near zero, some with a large component, unnormalised queries."""
    rng = np.random.default_rng(0)
    g = _unit(rng, 3000, 96)
    g[:50] *= np.float32(1e-3)  # rows of other norms are allowed by the bound (not by `add`)
    g[50:100, 0] = 3.0
    q = np.concatenate([_unit(rng, 20, 96) * 1000, _unit(rng, 20, 96) * 1e-4, rng.standard_normal((20, 96))])
    q = q.astype(np.float32)
    q[0, :5] = 1e6
    shadow = prefilter.Shadow.of(g)
    q_low, eps = prefilter.query_bounds(q, shadow)
    approx = prefilter.product(q_low, shadow.emb, 0, len(g)).astype(np.float64)
    exact = q.astype(np.float64) @ g.astype(np.float64).T
    c = prefilter.OUTPUT_ROUNDING / (1 - prefilter.OUTPUT_ROUNDING)
    slack = eps[:, None] + c * np.abs(approx) - np.abs(exact - approx)
    assert (slack >= 0).all(), f"bound broken by {-slack.min():.3g}"
    # ... and it is not vacuous: a few thousandths of the scores' scale for unit vectors
    assert eps[20:40].max() / np.linalg.norm(q[20:40], axis=1).max() < 0.01


def test_lower_bounds_are_below_the_bar_and_keep_minus_infinity():
    t = np.array([0.5, -0.25, 0.0, -np.inf, 3.0], dtype=np.float32)
    eps = np.array([1e-3, 1e-3, 0.0, 1e-3, 0.0])
    low = prefilter.lower_bounds(t, eps)
    assert low.dtype == np.float32 and np.isneginf(low[3])
    assert (low[:3] < t[:3]).all() and low[4] < 3.0
    assert low[2] < 0.0  # even with eps = 0 the output rounding's share is kept
    c = prefilter.OUTPUT_ROUNDING / (1 - prefilter.OUTPUT_ROUNDING)
    assert low[0] <= (0.5 - c * 0.5 - 2e-3) / (1 + c)


@pytest.mark.parametrize(
    "n, b, k, chunk", [(6000, 16, 10, None), (6000, 9, 100, 1000), (900, 4, 899, 128), (1, 3, 1, None)]
)
def test_gaussian_searches_equal_the_float32_search(n, b, k, chunk):
    rng = np.random.default_rng(1)
    x = _unit(rng, n, 64)
    low, high = _pair(x, ids=rng.permutation(n) * 3 + 1, chunk_size=chunk)
    q = _unit(rng, b, 64)
    _assert_same(low, high, q, k)
    _assert_same(low, high, q * np.float32(250), min(k, n))  # the ranking of unnormalised queries
    _assert_same(low, high, q, min(k, n), categories="a")  # a broad filter: a mask
    _assert_same(low, high, q, min(k, n), categories="b")  # a third of the rows: a mask too
    _assert_same(low, high, q, min(k, n), categories="c")  # one row in 20: a compacted copy, padded past it


def test_duplicates_keep_the_tie_rule():
    """Equal rows get equal float32 scores from the rescoring, so the index's tie rule orders them by id."""
    rng = np.random.default_rng(2)
    x = _unit(rng, 5000, 32)
    x[[4000, 17, 2500, 3999]] = x[100]  # five copies of one row across tiles
    low, high = _pair(x, chunk_size=700)
    q = np.concatenate([x[100:101], _unit(rng, 5, 32)])
    for k in (1, 3, 5, 6, 40):
        s1, i1 = low.search(q, k)
        s2, i2 = high.search(q, k)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, atol=1e-6, rtol=0)  # float32 sums in another order than BLAS's
    assert low.search(x[100:101], 5)[1].tolist() == [[17, 100, 2500, 3999, 4000]]


def test_dense_clusters_fall_back_to_the_float32_search(monkeypatch):
    """Rows closer together than the bound: the kept items cannot settle the top k, and those queries are
    searched again in float32 alone, with the same results."""
    rng = np.random.default_rng(3)
    base = _unit(rng, 1, 64)
    x = base + rng.standard_normal((3000, 64)).astype(np.float32) * 1e-4
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    x[1000:] = _unit(rng, 2000, 64)
    low, high = _pair(x)
    again = []
    scan = KnnIndex._scan
    monkeypatch.setattr(KnnIndex, "_scan", lambda self, q, *a, **kw: again.append(len(q)) or scan(self, q, *a, **kw))
    q = np.concatenate([base, _unit(rng, 3, 64)])
    _, i1 = _assert_same(low, high, q, 10)
    assert set(i1[0]) <= set(range(1000))
    assert again[0] == 1  # the cluster's query alone, searched by the float32 engine (its own call comes next)


def test_queries_too_large_for_bfloat16_are_searched_in_float32(monkeypatch):
    rng = np.random.default_rng(4)
    low, high = _pair(_unit(rng, 500, 16))
    q = _unit(rng, 3, 16) * np.float32(1e32)
    calls = []
    monkeypatch.setattr(prefilter, "scan", lambda *a: calls.append(1))
    np.testing.assert_array_equal(low.search(q, 5)[1], high.search(q, 5)[1])
    assert not calls


def test_the_copy_follows_adds_and_removes():
    rng = np.random.default_rng(5)
    x = _unit(rng, 600, 16)
    low, _ = _pair(x)
    low.search(x[:2], 3)  # makes the copy
    new = _unit(rng, 1, 16)
    low.add([5000], new)
    assert low.search(new, 1)[1].tolist() == [[5000]]
    low.remove([5000, 0])
    assert low.search(np.concatenate([new, x[:1]]), 1)[1][1].tolist() != [0]


def test_modes_and_the_auto_rule(monkeypatch):
    with pytest.raises(ValueError, match="prefilter must be one of"):
        KnnIndex(8, device="cpu", prefilter="fp8")
    with pytest.raises(ValueError, match="NumPy engine, not torch"):
        KnnIndex(8, device="cpu", backend="torch", prefilter="bf16")
    assert KnnIndex(8, device="cpu", backend="torch").prefilter == "off"
    monkeypatch.setattr(prefilter, "cpu_has_bf16_dot", lambda: True)
    rows = knn.PREFILTER_ROWS_PER_ITEM
    assert knn.prefilter_gains(2, rows * 11, 10) and not knn.prefilter_gains(1, 10**7, 10)
    assert not knn.prefilter_gains(256, rows * 11 - 1, 10)
    assert knn.prefilter_gains(256, rows * 101, 100) and not knn.prefilter_gains(256, 5000, 100)
    monkeypatch.setattr(prefilter, "cpu_has_bf16_dot", lambda: False)
    assert not knn.prefilter_gains(256, 10**6, 10)


def test_load_passes_the_mode_on(tmp_path):
    rng = np.random.default_rng(6)
    low, _ = _pair(_unit(rng, 50, 8))
    low.save(tmp_path / "g.safetensors")
    assert KnnIndex.load(tmp_path / "g.safetensors", device="cpu", prefilter="off").prefilter == "off"
    assert KnnIndex.load(tmp_path / "g.safetensors", device="cpu", prefilter="bf16").prefilter == "bf16"


def test_auto_takes_large_searches_where_the_cpu_has_bfloat16_dot(monkeypatch):
    rng = np.random.default_rng(7)
    n = knn.PREFILTER_ROWS_PER_ITEM * 11
    x = _unit(rng, n, 32)
    auto, off = KnnIndex(32, device="cpu"), KnnIndex(32, device="cpu", prefilter="off")
    for index in (auto, off):
        index.add(np.arange(n), x)
    calls = []
    scan = prefilter.scan
    monkeypatch.setattr(prefilter, "scan", lambda *a: calls.append(len(a[1])) or scan(*a))
    monkeypatch.setattr(prefilter, "cpu_has_bf16_dot", lambda: True)
    q = _unit(rng, 3, 32)
    _assert_same(auto, off, q, 10)
    auto.search(q[:1], 10)  # one query: float32
    auto.search(q, 11)  # fewer rows than PREFILTER_ROWS_PER_ITEM per item: float32
    assert calls == [3]
    off.warm_up()
    assert not off._all_rows.shadow  # never used: never made
    fresh = KnnIndex(32, device="cpu")
    fresh.add(np.arange(n), x)
    fresh.warm_up()  # a server's load: the copy is made before the first request
    assert "bf16" in fresh._all_rows.shadow


def test_auto_leaves_a_gallery_of_dense_clusters_to_float32_for_a_while(monkeypatch):
    """Most queries unsettled: each is searched twice. 'auto' then searches that view in float32 for
    PREFILTER_RETRY_AFTER searches, and tries bfloat16 again after them; a forced 'bf16' index keeps trying."""
    rng = np.random.default_rng(8)
    base = _unit(rng, 4, 64)
    n = knn.PREFILTER_ROWS_PER_ITEM * 11
    x = base[rng.integers(0, 4, n)] + rng.standard_normal((n, 64)).astype(np.float32) * 1e-4
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    monkeypatch.setattr(prefilter, "cpu_has_bf16_dot", lambda: True)
    monkeypatch.setattr(knn, "PREFILTER_RETRY_AFTER", 3)
    auto, forced = KnnIndex(64, device="cpu"), KnnIndex(64, device="cpu", prefilter="bf16")
    off = KnnIndex(64, device="cpu", prefilter="off")
    for index in (auto, forced, off):
        index.add(np.arange(n), x)
    calls = []
    scan = prefilter.scan
    monkeypatch.setattr(prefilter, "scan", lambda *a: calls.append(a[2]) or scan(*a))
    q = base + np.float32(1e-4)
    want = off.search(q, 10)
    for _ in range(5):
        got = auto.search(q, 10)
        np.testing.assert_array_equal(got[1], want[1])
    assert len(calls) == 2  # the first search, then 3 in float32, then the retry
    calls.clear()
    for _ in range(3):
        forced.search(q, 10)
    assert len(calls) == 3
