"""Train the DML baseline, the 3-tower and the 4-tower models on the same data and seeds, evaluate each on the
test split, and write one comparison: means with 95% bootstrap intervals over queries and seeds, paired
differences, and learning curves (markdown + JSON + PNG).

    mimsearch compare --catalog artifacts/catalog --steps 600 --jobs 2 --out benchmarks/results/quality
    mimsearch compare --seeds 0,1,2 --steps 1500 --eval-every 250 --jobs 2 --checkpoints artifacts/checkpoints/full
        --out benchmarks/results/quality_full                                       # make quality-full (one line)

`--jobs N` trains in N worker processes, each chain of runs (a run and those initialised from it) in one of them
with its share of the cores; the results are then evaluated in this process from the checkpoints.

4-tower is trained twice: from scratch, and initialised from the 3-tower weights of the same seed (the paper's
progressive recipe; it has then seen twice the steps). `--controls` adds the equal-budget controls: DML, 3-tower and
4-tower trained directly for those same total steps, and the progressive recipe with one continued learning-rate
schedule over both stages instead of a warm-up and decay per stage. Which schedule the bar judges is chosen on the
validation split (evaluated wherever the catalog has one), and every comparison is reported on the test split.
Checkpoints already trained with the same settings are reused, with the learning curve recorded while they were
trained.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mim.atomic import atomic_write_text
from mim.data.catalog import Catalog, load_catalog
from mim.model.checkpoint import Checkpoint, load_checkpoint
from mim.model.config import PreprocessConfig, get_size
from mim.model.preprocess import preprocess_image_bytes
from mim.model.tokenizer import TextTokenizer
from mim.model.towers import MIMModel
from mim.progress import progress_bar
from mim.search.embedding import LocalEmbedder, TorchEmbedder
from mim.search.ranking import top_k
from mim.tables import markdown_table
from mim.training.evaluate import COLUMNS, evaluate_per_query
from mim.training.stats import bootstrap_interval, paired_difference
from mim.training.train import DEFAULT_ALIGN_WEIGHT, TrainConfig, train


class Run(NamedTuple):
    """One run of a comparison, trained for each seed."""

    name: str
    objective: str
    init: str | None  # the run whose checkpoint (same seed) it starts from
    mult: int  # training steps as a multiple of the comparison's steps
    # (first step, length) of its learning-rate schedule as multiples of the comparison's steps; None: its own
    # warm-up and decay over its own steps
    schedule: tuple[int, int] | None = None


RUNS = (
    Run("dml", "dml", None, 1),
    Run("3tower", "3tower", None, 1),
    Run("4tower", "4tower", None, 1),
    Run("4tower-from-3tower", "4tower", "3tower", 1),
)
# Equal-budget controls: every one has seen 2x the steps, as the progressive 4tower-from-3tower has.
CONTROLS = (
    Run("dml-2x", "dml", None, 2),
    Run("3tower-2x", "3tower", None, 2),
    Run("4tower-2x", "4tower", None, 2),
    # The progressive recipe as one schedule: the 3-tower stage is the first half of a 2x warm-up and decay, the
    # 4-tower stage its second half (no second warm-up, the optimizer state carried over).
    Run("3tower-half-of-2x", "3tower", None, 1, (0, 2)),
    Run("4tower-from-3tower-continued", "4tower", "3tower-half-of-2x", 1, (1, 2)),
)
# The two schedules of the progressive recipe: restarted per stage, or continued across both.
PROGRESSIVE = ("4tower-from-3tower", "4tower-from-3tower-continued")
# Paired differences reported (a minus b), where both runs were trained: the paper's claims, then the controls.
DIFFERENCES = (
    ("3tower", "dml"),
    ("4tower", "3tower"),
    ("4tower-from-3tower", "3tower"),
    ("4tower", "dml"),
    ("3tower-2x", "dml-2x"),
    ("4tower-from-3tower", "dml-2x"),
    ("4tower-from-3tower-continued", "dml-2x"),
    ("4tower-from-3tower", "4tower-2x"),
    ("4tower-from-3tower-continued", "4tower-2x"),
    ("4tower-from-3tower-continued", "4tower-from-3tower"),
)
DIFF_METRICS = (
    "image R@1",
    "image R@10",
    "image catP@10",
    "image other-cat@1",
    "mm-fusion R@1",
    "mm-fusion R@10",
    "mm-refine R@10",
)
# How the progressive schedule is chosen on the validation split: the mean of these (image matching and the
# multimodal search the 4-tower is for), higher is better.
SCHEDULE_METRICS = ("image R@1", "mm-fusion R@1")
CURVE_METRICS = ("image R@1", "image catP@10")
CURVE_FILE = "curve.json"  # next to each checkpoint: the learning curve recorded while it was trained


class PixelCache:
    """Preprocessed pixels per image (keyed by its bytes): a learning curve evaluates the same images many times."""

    def __init__(self, pre: PreprocessConfig):
        self.pre = pre
        self._cache: dict[bytes, np.ndarray] = {}

    def __call__(self, images: Sequence[bytes]) -> np.ndarray:
        for b in images:
            if b not in self._cache:
                self._cache[b] = preprocess_image_bytes(b, self.pre)
        return np.stack([self._cache[b] for b in images])


class ModelEmbedder(LocalEmbedder):
    """A model being trained, in process, as an Embedder (what TorchEmbedder is for a loaded checkpoint), reading
    images through a PixelCache."""

    def __init__(self, model: MIMModel, tok: TextTokenizer, pixels: PixelCache, batch: int = 256):
        super().__init__(model.cfg.embed_dim, pixels.pre, tok, batch, 2 * batch)
        self.model, self.pixels = model, pixels

    def _images_batch(self, images: list[bytes]) -> np.ndarray:
        return self.encode_pixels(self.pixels(images))

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model.encode_image(torch.from_numpy(pixels)).numpy()

    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model.encode_text(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()


def rank_gallery(
    ck: Checkpoint, catalog: Catalog, images: Sequence[bytes], k: int, split: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Product ids (Q, k) and inner-product scores (Q, k) of the split's gallery for each query image, ranked by the
    in-process model: one model's side of a side-by-side view."""
    products = catalog.products_in(split)
    emb = TorchEmbedder(ck)
    gallery = emb.embed_images([catalog.read_bytes(p.image) for p in products])
    queries = emb.embed_images(list(images))
    rows = top_k(queries, gallery, min(k, len(products)))
    pid = np.array([p.product_id for p in products])
    return pid[rows], np.take_along_axis(queries @ gallery.T, rows, axis=1)


def _reusable(out: Path, want: TrainConfig, catalog: Catalog) -> bool:
    """True when `out` holds a finished run of this whole config on this catalog, and its curve; raises if it
    holds another run."""
    config = out / "config.json"
    if not config.is_file():
        return False
    meta = json.loads(config.read_text()).get("meta", {})
    differ = TrainConfig.from_meta(meta).differences(want)  # a setting the checkpoint predates: its default
    if meta.get("catalog", str(catalog.root)) != str(catalog.root):
        differ["catalog"] = (meta["catalog"], str(catalog.root))
    if differ:
        found = ", ".join(f"{k}: {a!r} != {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"{out} holds a run with other settings ({found}); remove it or pass another --checkpoints folder"
        )
    return meta.get("step") == want.steps and (out / CURVE_FILE).is_file()


def train_with_curve(
    catalog: Catalog,
    out: Path,
    config: TrainConfig,
    *,
    init_from: Path | None,
    eval_every: int,
    pixels: PixelCache,
    progress: bool,
) -> list[dict[str, float]]:
    """Train (or reuse) one run, evaluating the test split every `eval_every` steps; returns the curve."""
    if _reusable(out, config, catalog):
        print(f"{out}: reusing the checkpoint trained earlier with these settings", file=sys.stderr)
        return json.loads((out / CURVE_FILE).read_text())
    curve: list[dict[str, float]] = []

    def on_eval(step: int, model: MIMModel, tok: TextTokenizer) -> None:
        per = evaluate_per_query(ModelEmbedder(model, tok, pixels), catalog, "test")
        curve.append({"step": step, **{m: float(per[m].mean()) for m in CURVE_METRICS}})

    train(
        config,
        catalog=str(catalog.root),
        out=out,
        init_from=init_from,
        resume=True,
        progress=progress,
        eval_every=eval_every or config.steps,
        on_eval=on_eval,
    )
    atomic_write_text(out / CURVE_FILE, json.dumps(curve, indent=1))
    return curve


# Relative CPU cost of a training step per objective (tiny towers, batch 64 + 32 title-only rows, one thread:
# about 0.28, 0.43 and 0.46 s measured), so the longest chains can be handed out first.
_STEP_COST = {"dml": 1.0, "3tower": 1.5, "4tower": 1.65}


def _chains(runs: Sequence[Run]) -> list[list[Run]]:
    """The runs grouped so that a run initialised from another follows it in one chain; chains are independent.
    Most expensive chain first (steps x cost per step), so a pool of workers finishes them at about the same
    time."""
    chains: list[list[Run]] = []
    for run in runs:
        home = next((c for c in chains if any(r.name == run.init for r in c)), None) if run.init else None
        if home is None:
            chains.append([run])
        else:
            home.append(run)
    return sorted(chains, key=lambda c: -sum(r.mult * _STEP_COST.get(r.objective, 1.0) for r in c))


def _train_chain(
    catalog_root: str, checkpoints: str, seed: int, chain: list[Run], threads: int, base: TrainConfig, eval_every: int
) -> list[tuple[str, int, float, float]]:
    """Worker: train one chain of one seed (in its own process, with `threads` torch threads); returns
    (name, seed, wall seconds, CPU seconds) per run. Evaluation happens afterwards in the parent, from the files."""
    torch.set_num_threads(threads)
    catalog = load_catalog(catalog_root)
    pixels = PixelCache(get_size(base.size).preprocess)
    done = []
    for run in chain:
        t0, c0 = time.time(), time.process_time()
        _train_run(catalog, Path(checkpoints), seed, run, base, eval_every, pixels, progress=False)
        done.append((run.name, seed, time.time() - t0, time.process_time() - c0))
    return done


def _run_dir(checkpoints: Path, seed: int, name: str) -> Path:
    return checkpoints / f"seed{seed}" / name


def run_config(base: TrainConfig, seed: int, run: Run) -> TrainConfig:
    """The whole config of one run of one seed: the comparison's settings with the run's objective, steps and
    schedule."""
    start, length = run.schedule or (0, 0)
    return replace(
        base,
        objective=run.objective,
        steps=run.mult * base.steps,
        schedule_start=start * base.steps,
        schedule_steps=length * base.steps,
        seed=seed,
        # DML has no image-text term, so title-only rows and the text weight never reach it: its runs are shared
        # across their values.
        catalog_rows=0 if run.objective == "dml" else base.catalog_rows,
        align_weight=DEFAULT_ALIGN_WEIGHT if run.objective == "dml" else base.align_weight,
    )


def _train_run(
    catalog: Catalog,
    checkpoints: Path,
    seed: int,
    run: Run,
    base: TrainConfig,
    eval_every: int,
    pixels: PixelCache,
    progress: bool,
) -> list[dict[str, float]]:
    return train_with_curve(
        catalog,
        _run_dir(checkpoints, seed, run.name),
        run_config(base, seed, run),
        init_from=_run_dir(checkpoints, seed, run.init) if run.init else None,
        eval_every=eval_every,
        pixels=pixels,
        progress=progress,
    )


def run_comparison(
    catalog: Catalog,
    checkpoints: Path,
    base: TrainConfig,
    *,
    seeds: Sequence[int],
    runs: Sequence[Run] = RUNS,
    eval_every: int = 0,
    progress: bool = False,
    jobs: int = 1,
    val: bool = False,
) -> dict[str, Any]:
    """Train and evaluate every run for every seed; returns per-query values, curves and timings.

    `base` holds the settings every run shares; each run replaces its objective, steps and seed (`run_config`).
    With jobs > 1 the runs are first trained in that many worker processes (independent chains of runs, one torch
    thread share each), then evaluated here from their checkpoints. per_query[name][metric] is (S, n) with one row
    per seed on the test split (and val_per_query the same on the validation split, with `val`);
    curves[name][seed] the recorded learning curve, its steps counted from scratch (a run initialised from another
    starts where that one ended)."""
    names = [r.name for r in runs]
    for run in runs:
        if run.init is not None and run.init not in names[: names.index(run.name)]:
            raise ValueError(
                f"run {run.name!r} starts from {run.init!r}, which must be trained before it in the same call"
            )
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r}; expected a positive int (processes that train in parallel)")
    pixels = PixelCache(get_size(base.size).preprocess)  # what train() uses for a fresh run
    per_query: dict[str, dict[str, list[np.ndarray]]] = {n: {} for n in names}
    val_per_query: dict[str, dict[str, list[np.ndarray]]] = {n: {} for n in names}
    curves: dict[str, dict[str, list]] = {n: {} for n in names}
    seconds: dict[str, float] = dict.fromkeys(names, 0.0)
    cpu_seconds: dict[str, float] = dict.fromkeys(names, 0.0)  # all threads: extrapolates to an idle machine
    reused: list[str] = []  # runs trained by an earlier call: their training time is not in seconds / cpu_seconds
    worker_cpu = 0.0  # CPU seconds spent in worker processes (not in this process's clock)
    t_start = time.time()
    if jobs > 1:
        for name, _seed, wall, cpu in _train_in_workers(catalog, checkpoints, seeds, runs, jobs, base, eval_every):
            seconds[name] += wall
            cpu_seconds[name] += cpu
            worker_cpu += cpu
    for seed in seeds:
        for run in runs:
            name, init = run.name, run.init
            out = _run_dir(checkpoints, seed, name)
            t0, c0 = time.time(), time.process_time()
            curve = _train_run(catalog, checkpoints, seed, run, base, eval_every, pixels, progress)
            # A run started from another counts that run's steps too: its curve continues the other's.
            offset = next(r.mult * base.steps for r in runs if r.name == init) if init else 0
            curves[name][str(seed)] = [{**p, "step": p["step"] + offset} for p in curve]
            trained = (out / CURVE_FILE).stat().st_mtime >= t_start
            if not trained:
                reused.append(f"seed{seed}/{name}")
            ck = load_checkpoint(out)
            embedder = ModelEmbedder(ck.model, ck.tokenizer, pixels)
            for metric, values in evaluate_per_query(embedder, catalog).items():
                per_query[name].setdefault(metric, []).append(values)
            if val:
                for metric, values in evaluate_per_query(embedder, catalog, "val").items():
                    val_per_query[name].setdefault(metric, []).append(values)
            seconds[name] += time.time() - t0
            cpu_seconds[name] += time.process_time() - c0
            print(
                f"seed {seed} {name}: image R@1 {per_query[name]['image R@1'][-1].mean():.3f}, "
                f"catP@10 {per_query[name]['image catP@10'][-1].mean():.3f} ({time.time() - t0:.0f}s)",
                file=sys.stderr,
            )
    stacked = {n: {m: np.stack(v) for m, v in ms.items()} for n, ms in per_query.items()}
    return {
        "per_query": stacked,
        "val_per_query": {n: {m: np.stack(v) for m, v in ms.items()} for n, ms in val_per_query.items() if ms},
        "curves": curves,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "worker_cpu_seconds": worker_cpu,
        "reused": reused,
    }


def _train_in_workers(
    catalog: Catalog,
    checkpoints: Path,
    seeds: Sequence[int],
    runs: Sequence[Run],
    jobs: int,
    base: TrainConfig,
    eval_every: int,
) -> list[tuple[str, int, float, float]]:
    """Train every (seed, chain) in a pool of `jobs` processes; the cores are shared out as torch threads."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    chains = _chains(runs)
    tasks = [(seed, chain) for chain in chains for seed in seeds]
    # spawn, not fork: torch's thread pools do not survive a fork of a process that has used them.
    ctx = multiprocessing.get_context("spawn")
    done: list[tuple[str, int, float, float]] = []
    names = ", ".join(" + ".join(r.name for r in c) for c in chains)
    print(
        f"training {len(tasks)} chains of runs ({len(seeds)} seed(s) x [{names}]) in {jobs} processes with "
        f"{threads} torch thread(s) each",
        file=sys.stderr,
    )
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [
            pool.submit(_train_chain, str(catalog.root), str(checkpoints), seed, chain, threads, base, eval_every)
            for seed, chain in tasks
        ]
        bar = progress_bar(total=len(futures), desc=f"train in {jobs} processes", unit="chain")
        for f in as_completed(futures):
            done.extend(f.result())
            bar.update(1)
        bar.close()
    return done


def summarize(per_query: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Means, 95% bootstrap intervals and paired differences from run_comparison's per-query values."""
    intervals = {
        name: {m: bootstrap_interval(v).as_dict() for m, v in metrics.items()} for name, metrics in per_query.items()
    }
    diffs = {}
    for a, b in DIFFERENCES:
        if a in per_query and b in per_query:
            diffs[f"{a} - {b}"] = {
                m: paired_difference(per_query[a][m], per_query[b][m]).as_dict()
                for m in DIFF_METRICS
                if m in per_query[a] and m in per_query[b]
            }
    means = {name: {m: v["mean"] for m, v in metrics.items()} for name, metrics in intervals.items()}
    return {"means": means, "intervals": intervals, "differences": diffs}


def choose_schedule(val_per_query: dict[str, dict[str, np.ndarray]]) -> dict[str, Any] | None:
    """Which progressive schedule (PROGRESSIVE) scores higher on the validation split, by the mean of
    SCHEDULE_METRICS; None unless both were trained and evaluated there. Never looks at the test split."""
    if not all(name in val_per_query for name in PROGRESSIVE):
        return None
    by = [m for m in SCHEDULE_METRICS if all(m in val_per_query[n] for n in PROGRESSIVE)]  # a split may lack texts
    scores = {name: float(np.mean([val_per_query[name][m].mean() for m in by])) for name in PROGRESSIVE}
    return {"chosen": max(PROGRESSIVE, key=lambda n: scores[n]), "val_scores": scores, "by": by}


# The bar for calling the paper's effect reproduced, against DML trained for the same steps.
BAR_CATP_GAIN = 0.05  # category precision@10: at least +5 points, interval above 0
BAR_R1_FLOOR = -0.01  # image R@1: the interval's lower bound at least this
BAR_OTHER_CAT_CUT = 0.25  # top-1 results of another category: at least 25% fewer (relative)


def bar_checks(summary: dict[str, Any], progressive: str | None) -> list[dict[str, Any]]:
    """Each criterion of the bar, with the figures it was judged on: for each alignment model trained for the
    control budget (3tower-2x and the chosen progressive 4-tower) against dml-2x, then the progressive 4-tower
    against the 4-tower trained directly for the same steps. Rows whose runs are missing are left out."""
    diffs, means = summary["differences"], summary["means"]
    checks: list[dict[str, Any]] = []
    for model in ("3tower-2x", progressive):
        d = diffs.get(f"{model} - dml-2x") if model else None
        if d is None:
            continue
        catp, r1 = d["image catP@10"], d["image R@1"]
        other, base = means[model]["image other-cat@1"], means["dml-2x"]["image other-cat@1"]
        cut = (base - other) / base if base > 0 else 0.0
        checks += [
            {
                "model": model,
                "criterion": f"image catP@10 >= dml-2x + {BAR_CATP_GAIN:g}, interval above 0",
                "figure": _cell(catp),
                "met": bool(catp["mean"] >= BAR_CATP_GAIN and catp["lo"] > 0),
            },
            {
                "model": model,
                "criterion": f"image R@1 - dml-2x: lower bound >= {BAR_R1_FLOOR:g}"
                + (" (better: interval above 0)" if r1["lo"] > 0 else ""),
                "figure": _cell(r1),
                "met": bool(r1["lo"] >= BAR_R1_FLOOR),
            },
            {
                "model": model,
                "criterion": f"top-1 of another category at least {BAR_OTHER_CAT_CUT:.0%} rarer than dml-2x",
                "figure": f"{other:.3f} vs {base:.3f} ({abs(cut):.0%} {'fewer' if cut >= 0 else 'more'})",
                "met": bool(cut >= BAR_OTHER_CAT_CUT),
            },
        ]
    d = diffs.get(f"{progressive} - 4tower-2x", {}) if progressive else {}
    if "mm-fusion R@1" in d:  # a catalog with reformulations
        f = d["mm-fusion R@1"]
        checks.append(
            {
                "model": progressive,
                "criterion": "mm-fusion R@1 - 4tower-2x (trained directly, same steps): interval above 0",
                "figure": _cell(f),
                "met": bool(f["lo"] > 0),
            }
        )
    return checks


def _cell(iv: dict[str, float] | None) -> str:
    return "-" if iv is None else f"{iv['mean']:.3f} [{iv['lo']:.3f}, {iv['hi']:.3f}]"


# The table's columns: the evaluation's, with the two kinds of top-1 mistake after category precision.
TABLE_COLUMNS = (*COLUMNS[:4], "image other-cat@1", "image same-title@1", *COLUMNS[4:])


def markdown(summary: dict[str, Any], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    rows = ([name, *(_cell(m.get(c)) for c in columns)] for name, m in summary["intervals"].items())
    lines = [markdown_table(["model", *columns], rows, label_column=True)]
    if summary["differences"]:
        lines += ["", "Paired differences (same seeds and queries; 95% bootstrap interval of the mean difference):", ""]
        diffs = ([name, *(_cell(m.get(c)) for c in DIFF_METRICS)] for name, m in summary["differences"].items())
        lines.append(markdown_table(["difference", *DIFF_METRICS], diffs, label_column=True))
    schedule = summary.get("schedule")
    if schedule:
        scores = ", ".join(f"{n} {v:.3f}" for n, v in schedule["val_scores"].items())
        lines += [
            "",
            f"Progressive schedule, chosen on the validation split by the mean of {' and '.join(schedule['by'])}: "
            f"**{schedule['chosen']}** ({scores}). The bar below judges that row.",
        ]
    if summary.get("bar"):
        lines += ["", "The bar (each alignment model against DML trained for the same steps):", ""]
        rows = ([c["model"], c["criterion"], c["figure"], "met" if c["met"] else "**not met**"] for c in summary["bar"])
        lines.append(markdown_table(["model", "criterion", "figure", "verdict"], rows, label_column=True))
    return "\n".join(lines)


def plot_curves(curves: dict[str, dict[str, list]], out: Path, title: str) -> Path | None:
    """R@1 and category precision@10 vs training step, mean over seeds, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(5.5 * len(CURVE_METRICS), 4))
    drawn = False
    for name, by_seed in curves.items():
        points = [c for c in by_seed.values() if len(c) > 1]
        if not points:
            continue
        steps = [p["step"] for p in points[0]]
        for ax, metric in zip(axes, CURVE_METRICS):
            values = np.array([[p[metric] for p in c[: len(steps)]] for c in points if len(c) >= len(steps)])
            ax.plot(steps, values.mean(axis=0), marker="o", ms=3, label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, metric in zip(axes, CURVE_METRICS):
        ax.set_xlabel("training step")
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(out: Path, header: str, result: dict[str, Any], settings: dict[str, Any]) -> list[Path]:
    """OUT.md (header, table, differences, the schedule chosen on the validation split and the bar), OUT.json
    (everything but the per-query values), OUT.png (curves)."""
    summary = summarize(result["per_query"])
    val = result.get("val_per_query") or {}
    summary["schedule"] = choose_schedule(val)
    summary["val_means"] = {n: {m: float(v.mean()) for m, v in ms.items()} for n, ms in val.items()}
    progressive = summary["schedule"]["chosen"] if summary["schedule"] else None
    if progressive is None:  # one schedule trained: that one
        progressive = next((n for n in PROGRESSIVE if n in result["per_query"]), None)
    summary["bar"] = bar_checks(summary, progressive)
    png = plot_curves(
        result["curves"], out.with_suffix(".png"), f"test split, mean of {len(settings['seeds'])} seed(s)"
    )
    body = header.rstrip() + "\n\n" + markdown(summary) + "\n"
    if png is not None:
        body += f"\n![learning curves]({png.name})\n"
    doc = {**summary, **{k: result[k] for k in ("curves", "seconds", "cpu_seconds", "reused")}, "settings": settings}
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1, sort_keys=True))
    atomic_write_text(out.with_suffix(".md"), body)
    return [out.with_suffix(".md"), out.with_suffix(".json")] + ([png] if png else [])


def parse_seeds(text: str) -> list[int]:
    """ "0,1,2" -> [0, 1, 2]: distinct non-negative training seeds."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated ints such as 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: expected distinct non-negative ints such as 0,1,2")
    return seeds


def select_runs(names: str | None, controls: bool = False) -> tuple[Run, ...]:
    """The runs to train: all of RUNS (+ CONTROLS), or those named in "dml,3tower" (any of both tuples)."""
    if not names:
        return RUNS + (CONTROLS if controls else ())
    known = {r.name: r for r in RUNS + CONTROLS}
    wanted = names.split(",")
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"--runs: unknown {unknown}; expected names from {list(known)}")
    return tuple(known[w] for w in wanted)


def describe(
    catalog: Catalog,
    result: dict[str, Any],
    base: TrainConfig,
    *,
    command: str,
    seeds: Sequence[int],
    jobs: int,
    wall: float,
    cpu: float,
) -> tuple[str, dict[str, Any]]:
    """The report's header paragraph and the settings recorded in its JSON, for a `run_comparison` result."""
    steps, batch_size, catalog_rows = base.steps, base.batch_size, base.catalog_rows
    hard_negatives, align_weight, size = base.hard_negatives, base.align_weight, base.size
    p = catalog.params
    n_test = {
        "products": len(catalog.products_in("test")),
        "queries": len(catalog.queries_in("test")),
        "reformulations": len(catalog.reformulations_in("test")),
    }
    settings = {
        "command": command,
        "seeds": list(seeds),
        "steps": steps,
        "batch_size": batch_size,
        "catalog_rows": catalog_rows,
        "hard_negatives": hard_negatives,
        "align_weight": align_weight,
        "jobs": jobs,
        "size": size,
        "catalog": {
            k: p.get(k)
            for k in ("seed", "variants", "street_fraction", "street_layout", "n_train_queries", "image_size")
        },
        "test_split": n_test,
        "val_split": {
            "products": len(catalog.products_in("val")),
            "queries": len(catalog.queries_in("val")),
            "evaluated": bool(result.get("val_per_query")),
        },
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
        "date": date.today().isoformat(),
    }
    header = (
        f"# Retrieval quality: DML vs 3-tower vs 4-tower\n\n"
        f"Measured {settings['date']} on {settings['machine']} CPU ({settings['torch_threads']} torch threads), "
        f"`{size}` towers, {steps} steps, batches of {batch_size} street-to-shop pairs"
        f" + {catalog_rows} title-only catalog products (photo-title term only), hard negatives "
        f"{'on' if hard_negatives else 'off'}, image-text terms at weight {align_weight:g}; seeds "
        f"{list(seeds)}; wall time {wall / 60:.1f} min ({cpu / 60:.1f} CPU-min, {jobs} training process(es)). "
        f"Catalog: seed {p.get('seed')}, {p.get('variants')} models per (category, pattern, colour), street photos "
        f"for {p.get('street_fraction')} of the training products, street layout {p.get('street_layout')!r}. "
        f"Test split: {n_test['products']} gallery products, "
        f"{n_test['queries']} query photos, {n_test['reformulations']} reformulations.\n\n"
        f"Command: `{command}`\n\n"
        + (
            f"Reused checkpoints trained by earlier calls with the same settings (their training time is not in the "
            f"wall time above): {', '.join(result['reused'])}.\n\n"
            if result["reused"]
            else ""
        )
        + "Cells: mean over seeds and queries [95% bootstrap interval, resampling seeds and queries]. image R@k = the "
        "exact product (not another model of the same title) in the top k for a street photo; catP@10 = share of "
        "the top 10 in the query product's category (false positives lower it); title R@1 = the title retrieves a "
        "product carrying it; mm-fusion / mm-refine R@k = photo of X + reformulation text retrieves the changed "
        "product; other-cat@1 / same-title@1 = share of street photos whose top 1 is another category / another "
        "model with the same title (lower is better). 4tower-from-3tower continues from the 3-tower checkpoint, so it "
        "has seen twice the steps; the -2x runs are trained directly for those same steps, and "
        "4tower-from-3tower-continued runs one warm-up and decay over both stages (3tower-half-of-2x is its first)."
    )
    return header, settings
