"""The model comparison (mim.training.compare, `make quality` / `make quality-full`) end to end on a tiny catalog."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_small_catalog

from mim.training import compare
from mim.training.train import TrainConfig
from mimsearch.commands import compare as compare_cmd


@pytest.fixture(scope="module")
def tiny_catalog(tmp_path_factory):
    return make_small_catalog(tmp_path_factory.mktemp("cat"), image_size=48)


def test_two_seeds_with_intervals_differences_and_curves(tiny_catalog, tmp_path, capsys):
    args = ["--catalog", str(tiny_catalog.root), "--checkpoints", str(tmp_path / "ck"), "--runs", "dml,3tower"]
    args += ["--seeds", "0,1", "--steps", "2", "--eval-every", "1", "--batch-size", "4", "--catalog-rows", "2"]
    args += ["--hard-negatives", "--out", str(tmp_path / "res" / "q"), "--no-progress"]
    assert compare_cmd.main(args) == 0
    md = (tmp_path / "res" / "q.md").read_text()
    assert "| 3tower - dml |" in md and "seeds [0, 1]" in md and "hard negatives on" in md
    doc = json.loads((tmp_path / "res" / "q.json").read_text())
    for name in ("dml", "3tower"):
        iv = doc["intervals"][name]["image R@1"]
        assert iv["lo"] <= iv["mean"] <= iv["hi"]
        assert [p["step"] for p in doc["curves"][name]["0"]] == [1, 2]
        assert set(doc["curves"][name]) == {"0", "1"}
    d = doc["differences"]["3tower - dml"]["image R@1"]
    assert d["mean"] == pytest.approx(doc["means"]["3tower"]["image R@1"] - doc["means"]["dml"]["image R@1"])
    assert doc["settings"]["catalog"]["variants"] == 2 and doc["settings"]["seeds"] == [0, 1]
    assert (tmp_path / "res" / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun reuses the trained checkpoints and their curves.
    weights = tmp_path / "ck" / "seed1" / "3tower" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert compare_cmd.main(args) == 0
    assert weights.stat().st_mtime_ns == before
    assert json.loads((tmp_path / "res" / "q.json").read_text())["means"] == doc["means"]
    assert "Reused checkpoints trained by earlier calls" in (tmp_path / "res" / "q.md").read_text()
    assert "Reused" not in md and doc["reused"] == []

    # Other settings on the same checkpoints are refused, not mixed in.
    capsys.readouterr()
    assert compare_cmd.main([*args[:-4], "--no-hard-negatives", *args[-3:]]) == 2
    assert "holds a run with other settings (hard_negatives: True != False)" in capsys.readouterr().err


def test_bad_arguments(tiny_catalog, tmp_path):
    with pytest.raises(SystemExit):
        compare_cmd.main(["--catalog", str(tiny_catalog.root), "--seeds", "0,x"])
    with pytest.raises(SystemExit):
        compare_cmd.main(["--catalog", str(tiny_catalog.root), "--runs", "dml,5tower"])
    with pytest.raises(ValueError, match="starts from '3tower', which must be trained before it"):
        compare.run_comparison(tiny_catalog, tmp_path, TrainConfig(steps=1), seeds=[0], runs=[compare.RUNS[3]])


def test_chains_keep_a_run_after_the_one_it_starts_from():
    chains = compare._chains(compare.RUNS + compare.CONTROLS)
    names = [[r[0] for r in c] for c in chains]
    assert ["3tower", "4tower-from-3tower"] in names
    assert sorted(n for c in names for n in c) == sorted(r[0] for r in compare.RUNS + compare.CONTROLS)
    # Most expensive first (steps x cost per step), so parallel workers end together: 4-tower before DML.
    costs = [sum(r[3] * compare._STEP_COST[r[1]] for r in c) for c in chains]
    assert costs == sorted(costs, reverse=True)
    assert names.index(["4tower"]) < names.index(["dml"])


def test_parallel_jobs_give_the_same_models_as_one_process(tiny_catalog, tmp_path):
    base = TrainConfig(steps=2, batch_size=4, catalog_rows=2, align_weight=0.5)
    common = {"seeds": [0, 1], "eval_every": 1}
    runs = (compare.RUNS[0], compare.RUNS[1], compare.RUNS[3])  # dml alone; 3tower then 4tower-from-3tower
    one = compare.run_comparison(tiny_catalog, tmp_path / "one", base, runs=runs, jobs=1, **common)
    two = compare.run_comparison(tiny_catalog, tmp_path / "two", base, runs=runs, jobs=2, **common)
    assert one["reused"] == two["reused"] == []
    for name in one["per_query"]:
        for metric, values in one["per_query"][name].items():
            assert values == pytest.approx(two["per_query"][name][metric], abs=1e-6), (name, metric)
        for seed, curve in one["curves"][name].items():
            assert [p["step"] for p in curve] == [p["step"] for p in two["curves"][name][seed]]
            for a, b in zip(curve, two["curves"][name][seed]):
                assert a == pytest.approx(b, abs=1e-6)
        assert two["seconds"][name] > 0
    assert one["worker_cpu_seconds"] == 0 < two["worker_cpu_seconds"]
    meta = json.loads((tmp_path / "two" / "seed1" / "3tower" / "config.json").read_text())["meta"]
    assert meta["align_weight"] == 0.5
    with pytest.raises(ValueError, match="jobs=0; expected a positive int"):
        compare.run_comparison(tiny_catalog, tmp_path / "x", base, runs=runs, jobs=0, **common)


def _per_query(**means):
    """Per-query values (1 seed x 4 queries) whose mean is each given value."""
    return {m: np.full((1, 4), v) for m, v in means.items()}


def test_the_schedule_is_chosen_on_the_validation_split_only():
    a, b = compare.PROGRESSIVE
    val = {
        a: _per_query(**{"image R@1": 0.5, "mm-fusion R@1": 0.2}),
        b: _per_query(**{"image R@1": 0.4, "mm-fusion R@1": 0.4}),
    }
    choice = compare.choose_schedule(val)
    assert choice["chosen"] == b and choice["val_scores"][a] == pytest.approx(0.35)
    assert choice["by"] == ["image R@1", "mm-fusion R@1"]
    assert compare.choose_schedule({a: val[a]}) is None  # one schedule: nothing to choose


def test_the_bar_judges_each_alignment_model_against_dml_of_the_same_steps():
    q = {
        "dml-2x": {"image R@1": 0.40, "image catP@10": 0.30, "image other-cat@1": 0.40, "mm-fusion R@1": 0.05},
        "3tower-2x": {"image R@1": 0.41, "image catP@10": 0.33, "image other-cat@1": 0.35, "mm-fusion R@1": 0.10},
        "4tower-2x": {"image R@1": 0.38, "image catP@10": 0.36, "image other-cat@1": 0.30, "mm-fusion R@1": 0.15},
        "4tower-from-3tower": {
            "image R@1": 0.45,
            "image catP@10": 0.40,
            "image other-cat@1": 0.20,
            "mm-fusion R@1": 0.25,
        },
    }
    summary = compare.summarize({n: _per_query(**m) for n, m in q.items()})
    checks = compare.bar_checks(summary, "4tower-from-3tower")
    verdict = {(c["model"], c["criterion"].split(" ")[1]): c["met"] for c in checks}
    # 3tower-2x: +3 points of catP (short of 5), R@1 not worse, 12.5% fewer other-category top-1s (short of 25%).
    assert verdict[("3tower-2x", "catP@10")] is False and verdict[("3tower-2x", "R@1")] is True
    assert [c["met"] for c in checks if c["model"] == "3tower-2x"] == [False, True, False]
    # The progressive 4-tower meets every criterion, including beating 4tower-2x on fusion R@1.
    assert all(c["met"] for c in checks if c["model"] == "4tower-from-3tower") and len(checks) == 7
    assert "0.200 vs 0.400 (50% fewer)" in [c["figure"] for c in checks]
    md = compare.markdown({**summary, "bar": checks, "schedule": None})
    assert "| 3tower-2x | image catP@10 >= dml-2x + 0.05, interval above 0 | 0.030 [0.030, 0.030] | **not met** |" in md
