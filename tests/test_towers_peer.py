"""benchmarks.towers_peer at tiny size: both sides hold the same weights (parity against transformers in FP32 on
real photos and titles), every variant is timed side by side per batch, and the table and files are written."""

from __future__ import annotations

import json

import pytest

from benchmarks import towers_peer
from mim import contract

pytest.importorskip("transformers", reason="transformers (the `dev` extra) is the peer")
pytest.importorskip("skimage", reason="scikit-image (dev extra) ships the photos")


def test_tiny_run_times_ours_and_transformers_on_the_same_weights(tmp_path, capsys):
    out = tmp_path / "peer"
    assert towers_peer.main(["--size", "tiny", "--batches", "1,3", "--out", str(out)]) == 0
    result = json.loads((out / "towers_peer.json").read_text())
    for tower in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER):
        parity = result["parity"][tower]
        # Same weights, same inputs: FP32 on a CPU is transformers' function to float rounding.
        assert {"ours eager", "ours explicit", "hf eager"} <= set(parity)
        if result["precision"] == "fp32":
            assert min(parity.values()) >= 0.99999, parity
    variants = {(r["tower"], r["variant"]) for r in result["rows"]}
    assert {(contract.TEXT_ENCODER, "ours full context"), (contract.TEXT_ENCODER, "hf eager longest")} <= variants
    assert {(r["tower"], r["batch"]) for r in result["rows"]} == {
        (t, b) for t in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER) for b in (1, 3)
    }
    assert all(r["items_per_s"] > 0 for r in result["rows"])
    summary = towers_peer.summary_rows(result)
    assert len(summary) == 4 and all(s["ratio"] > 0 for s in summary)
    for name in ("towers_peer.md", "towers_peer.csv"):
        assert (out / name).is_file()
    printed = capsys.readouterr().out
    assert "| tower | batch | ours best |" in printed and "python -m benchmarks.towers_peer --size tiny" in printed


def test_unknown_size_and_compile_mode_are_refused(capsys):
    assert towers_peer.main(["--size", "base"]) == 2
    assert "size 'base'; expected 'tiny' or a CLIP shape" in capsys.readouterr().err
    assert towers_peer.main(["--size", "tiny", "--compile", "turbo"]) == 2
    assert "--compile 'turbo'; expected one of ['none', 'default'" in capsys.readouterr().err


def test_a_spent_budget_runs_nothing_and_says_so():
    """benchmarks.gpu hands its towers step's deadline over: past it, no tower starts."""
    import time

    result = towers_peer.for_gpu_script("tiny", (1,), 0.0, 1, deadline=time.monotonic() - 1)
    assert result["rows"] == [] and result["summary"] == []
    assert "time budget was spent" in result["skipped"]
    # A budget that runs out between the towers: the first runs, the second is skipped with a note.
    plan = towers_peer.PeerPlan(size="tiny", batches=(1,), min_time=0.0, min_reps=1, deadline=time.monotonic() + 3)
    result = towers_peer.run(plan, log=lambda _: time.sleep(1.5))
    assert {r["tower"] for r in result["rows"]} <= {contract.IMAGE_ENCODER}
    assert any("time budget spent" in n for n in result["notes"])
