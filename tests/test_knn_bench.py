"""Smoke test for benchmarks/knn_bench.py: a tiny --quick run writes parseable outputs and matches faiss."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("faiss", reason="the kNN benchmark compares against faiss-cpu (extra 'bench')")

from benchmarks import knn_bench  # noqa: E402


def test_quick_bench_writes_results_that_match_faiss(tmp_path):
    argv = [
        "--quick",
        "--out",
        str(tmp_path),
        "--sizes",
        "3000",
        "--batches",
        "1,16",
        "--ks",
        "10",
        "--min-time",
        "0.01",
    ]
    assert knn_bench.main(argv) == 0

    with open(tmp_path / "knn.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["n"]), int(r["batch"]), int(r["k"])) for r in rows] == [(3000, 1, 10), (3000, 16, 10)]
    for r in rows:
        assert r["ids_match"] == "True"
        assert float(r["ours_qps"]) > 0 and float(r["faiss_qps"]) > 0
        assert float(r["ratio_ours_over_faiss"]) == pytest.approx(
            float(r["ours_qps"]) / float(r["faiss_qps"]), rel=1e-6
        )

    report = json.loads((tmp_path / "knn.json").read_text())
    assert report["command"].endswith(" ".join(argv))
    assert report["cpu_model"] and report["cpu_cores"] >= 1
    assert report["threads"]["faiss_omp"] == report["threads"]["requested"]
    assert {"numpy", "faiss"} <= report["versions"].keys()
    assert len(report["results"]) == 2
    assert (tmp_path / "knn.png").read_bytes().startswith(b"\x89PNG")
