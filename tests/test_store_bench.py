"""The store benchmark on a tiny grid: it runs end to end, and its recall column means what it says."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import store_bench

pytest.importorskip("pymilvus", reason="the store benchmark needs pymilvus + milvus-lite (extra 'milvus')")


def test_recall_at_k_counts_exact_ids_found():
    exact = np.array([[1, 2, 3, -1], [4, 5, 6, 7]])
    assert store_bench.recall_at_k(exact, exact) == 1.0
    assert store_bench.recall_at_k(np.array([[1, 9, 9, 9], [4, 5, 9, 9]]), exact) == pytest.approx(3 / 7)


def test_queries_are_near_their_gallery_rows():
    g = store_bench.clustered(500, 64, seed=0)
    q = store_bench.near_queries(g, 20, seed=1)
    assert np.allclose(np.linalg.norm(g, axis=1), 1, atol=1e-5) and np.allclose(np.linalg.norm(q, axis=1), 1)
    cos = q @ g.T  # (20, 500)
    # a query sits near one gallery row (noise as large as the row: cosine ~0.7) and far from most
    assert cos.max(axis=1).min() > 0.5 and np.median(cos) < 0.3


def test_tiny_run_writes_the_files_and_flat_is_exact(tmp_path):
    rc = store_bench.main(["--sizes", "400", "--min-time", "0.01", "--out", str(tmp_path), "--work", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "store.json").read_text())["rows"]
    by = {(r["engine"], r["params"]): r for r in rows}
    assert by[("KnnIndex (exact)", "-")]["recall_at_10"] == 1.0
    assert by[("Milvus Lite FLAT", "-")]["recall_at_10"] == 1.0
    assert {r["engine"] for r in rows} == {
        "KnnIndex (exact)",
        "Milvus Lite FLAT",
        "Milvus Lite HNSW",
        "Milvus Lite IVF_FLAT",
    }
    assert all(r["qps_b1"] > 0 and r["qps_b64"] > 0 and 0 <= r["recall_at_10"] <= 1 for r in rows)
    assert (tmp_path / "store.png").stat().st_size > 0 and (tmp_path / "store.csv").read_text().startswith("n,d,")
