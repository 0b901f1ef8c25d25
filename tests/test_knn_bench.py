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


def test_gpu_table_checks_ids_and_keeps_to_its_budget():
    """bench_gpu runs anywhere (FP32 on a CPU): every measured cell is checked against the FP32 reference and
    compared with torch.topk(q @ g.T); cells that would overrun the wall-time budget are listed as skipped."""
    rows, cells = knn_bench.bench_gpu((2000, 3000), (1, 8), (10,), 32, min_time=0.01, min_reps=2, log=lambda _: None)
    assert [(c["n"], c["batch"], c["status"]) for c in cells] == [
        (n, b, "measured") for n in (2000, 3000) for b in (1, 8)
    ]
    assert {r["method"] for r in rows} == {"ours", "ours_host_queries", "ours_1m_row_tiles", "torch_mm_topk"}
    ours = [r for r in rows if r["method"].startswith("ours")]
    assert all(r["recall_vs_fp32"] == 1.0 and r["same_ids_as_fp32"] == 1.0 for r in ours)
    rows, cells = knn_bench.bench_gpu((2000,), (1, 8), (10,), 32, min_time=0.01, budget_s=0.0, log=lambda _: None)
    assert rows == [] and all(c["status"].startswith("skipped: the 0 s budget") for c in cells) and len(cells) == 2
