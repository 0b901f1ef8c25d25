"""benchmarks.gpu, the one GPU script, at tiny sizes on whatever machine runs the tests: every step it has runs,
writes its files and checks itself (FP16/FP32 parity, kNN ids against an FP32 reference), and the rows that
need CUDA say why they are missing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks import gpu
from mim import contract
from mim.model.config import get_size

pytest.importorskip("skimage", reason="scikit-image (dev extra) ships the photos the script uses")


def test_the_floors_use_the_towers_matmul_flops():
    base = get_size("base").model
    assert gpu.tower_flops(base, contract.IMAGE_ENCODER) / 1e9 == pytest.approx(35.1, abs=0.1)
    assert gpu.tower_flops(base, contract.TEXT_ENCODER) / 1e9 == pytest.approx(6.0, abs=0.2)
    assert gpu.PEAK_TFLOPS * 1e12 / gpu.tower_flops(base, contract.IMAGE_ENCODER) == pytest.approx(22.5e3, rel=0.01)


def test_tiny_run_measures_towers_and_knn_and_checks_them(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "gpu"
    argv = ["--tiny", "--steps", "towers,knn", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]
    assert gpu.main(argv) == 0
    result = json.loads((out / "gpu.json").read_text())
    towers = result["towers"]
    assert {(r["tower"], r["batch"]) for r in towers} == {
        (t, b) for t in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER) for b in gpu.TINY.tower_batches
    }
    assert all(r["min_cosine_vs_fp32"] >= 0.999 and r["eager_items_per_s"] > 0 for r in towers)
    # The towers step also compares a CLIP of the same size with transformers on the same weights.
    peer = result["towers_peer"]
    assert {(s["tower"], s["batch"]) for s in peer["summary"]} == {(r["tower"], r["batch"]) for r in towers}
    cuda = gpu.cuda_reason()
    if cuda is not None:
        assert all(r["graphs_items_per_s"] is None and cuda in r["graphs_note"] for r in towers)
        assert result["copy"] == []
    methods = {r["method"] for r in result["knn"]}
    assert methods == {"ours", "ours_host_queries", "ours_1m_row_tiles", "torch_mm_topk"}
    assert all(r["recall_vs_fp32"] >= 0.99 for r in result["knn"])
    cells = result["topk_choice"]  # one summary per (n, batch, k): ours against torch.topk(q @ g.T)
    assert len(cells) == len(gpu.TINY.knn_n) * len(gpu.TINY.knn_batches) * len(gpu.TINY.knn_k)
    assert all(c["status"] == "measured" and c["ours_over_torch"] > 0 for c in cells)
    for name in ("towers.csv", "knn.csv", "gpu.png"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].endswith(f"files in {out}")
    assert "| tower | prec | batch |" in printed


def test_unknown_steps_are_refused(tmp_path, capsys):
    assert gpu.main(["--tiny", "--steps", "towers,engines", "--out", str(tmp_path)]) == 2
    assert "--steps ['engines']; expected some of towers,knn,serving" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.server
def test_tiny_run_serves_the_torch_ensembles_under_perf_analyzer(tiny_checkpoint, tmp_path):
    out = tmp_path / "gpu"
    result = gpu.run_all(gpu.TINY, out, checkpoint=tiny_checkpoint, steps=("serving",))
    serving = result["serving"]
    assert "skipped" not in serving, serving
    assert serving["config"] == (gpu.GPU_CONFIG if gpu.cuda_reason() is None else gpu.CPU_CONFIG)
    assert {r["model"] for r in serving["rows"]} == set(contract.MODELS) & {
        "embed_image",
        "embed_text",
        "embed_multimodal",
    }
    assert (out / "perf.csv").is_file()


def test_a_failing_step_is_recorded_and_the_others_keep_their_figures(tiny_checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gpu, "bench_knn", broken)
    out = tmp_path / "gpu"
    argv = ["--tiny", "--steps", "knn,towers", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]
    assert gpu.main(argv) == 1
    result = json.loads((out / "gpu.json").read_text())
    assert result["errors"] == {"knn": "RuntimeError: out of memory"}
    assert len(result["towers"]) == 2 * len(gpu.TINY.tower_batches)


def test_a_step_past_its_budget_stops_starting_cells_and_says_so(tiny_checkpoint, tmp_path):
    plan = replace(gpu.TINY, budget_s=(("towers", 0.0), ("knn", 120.0)))
    result = gpu.run_all(plan, tmp_path / "gpu", checkpoint=tiny_checkpoint, steps=("towers",))
    assert result["towers"] == [] and "budget of 0 s spent" in result["cut_short"]["towers"]
    assert json.loads((tmp_path / "gpu" / "gpu.json").read_text())["cut_short"] == result["cut_short"]
