"""Side by side in one run, on the same machine and inputs: our ensembles, the PyTriton baseline, and the
in-process ceiling.

  ours       the repository's ensembles on the bundled tritonserver (`cpu` config: python-backend
             preprocessing, ONNX Runtime towers), measured with perf_analyzer
  pytriton   what a Python user would serve instead: PyTriton binding the torch towers eagerly (Python
             preprocessing + torch forward, benchmarks.pytriton_baseline) on the same server binary, measured
             with the same perf_analyzer settings and input files
  in-process the same preprocessing and ONNX Runtime sessions called directly in this process, no serving at
             all: at batch 1 the latency floor, at batch = concurrency the throughput a server could reach if
             it batched every request in flight for free

For each model and concurrency the three are measured back to back (ours, pytriton, in-process), so all see
the same machine state; the table reports ratios, which survive a noisy shared machine far better than the
absolute figures. Before timing, the three must agree on the embeddings (cosine >= PARITY_MIN_COSINE), or the
comparison would be between different computations.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mim import contract
from mim.search.embedding import Embedder
from mim.search.ranking import parity
from mim.serving.onnx_embedder import OnnxEmbedder

from . import perf
from .common import markdown_table, ratio, write_json, write_rows_csv
from .knn_bench import time_side_by_side

PARITY_MIN_COSINE = 0.999  # torch eager vs ONNX Runtime, both FP32 (text-embeddings-inference's FP16 gate)


def in_process(repository: Path, threads: int | None = None) -> OnnxEmbedder:
    """Our serving code without Triton: the served repository's preprocessing files and FP32 ONNX towers in
    mim.serving.backends' runner, with the served thread count. One call is one forward pass (no batch split),
    so a call at batch = concurrency measures what a server batching every request in flight could reach."""
    return OnnxEmbedder.from_repository(repository, threads=threads, batch_size=None)


def embed_samples(embedder: Embedder, model: str, samples: Sequence[perf.Sample]) -> np.ndarray:
    """What ensemble `model` returns for `samples`, computed by any embedder (in-process or served)."""
    images, texts = [s.image for s in samples], [s.text for s in samples]
    if model == contract.EMBED_IMAGE:
        return embedder.embed_images(images)
    if model == contract.EMBED_TEXT:
        return embedder.embed_texts(texts)
    if model == contract.EMBED_MULTIMODAL:
        return embedder.embed_multimodal(images, texts)
    raise ValueError(f"no embedding call for {model!r}; expected one of {list(perf.ENSEMBLES)}")


def served_embeddings(url: str, model: str, samples: Sequence[perf.Sample]) -> np.ndarray:
    from client.triton_client import EmbeddingClient

    with EmbeddingClient(url, timeout_s=60.0) as client:
        return embed_samples(client, model, samples)


def parity_checks(
    ours_url: str,
    baseline_url: str | None,
    inproc: Embedder,
    models: Sequence[str],
    samples: Sequence[perf.Sample],
) -> dict[str, dict[str, float]]:
    """Per model: min cosine of ours vs in-process and ours vs the PyTriton baseline on the same samples."""
    out = {}
    for model in models:
        ours = served_embeddings(ours_url, model, samples)
        row = {"ours_vs_inprocess": parity(ours, embed_samples(inproc, model, samples)).min_cosine}
        if baseline_url:
            row["ours_vs_pytriton"] = parity(ours, served_embeddings(baseline_url, model, samples)).min_cosine
        out[model] = row
    return out


@dataclass
class Comparison:
    rows: list[dict]
    levels: list[dict]  # every perf_analyzer row behind the table (ours and pytriton)
    parity: dict[str, dict[str, float]]
    commands: dict[str, str]
    errors: dict[str, str]


def inprocess_timing(
    inproc: Embedder,
    model: str,
    samples: Sequence[perf.Sample],
    batches: Sequence[int],
    min_time: float,
    min_reps: int,
) -> dict[int, float]:
    """Median seconds per call at each batch size (knn_bench's alternating timer, one warm-up each)."""
    fns: dict[str, Callable[[], object]] = {}
    for b in dict.fromkeys(batches):
        batch = [samples[i % len(samples)] for i in range(b)]
        fns[str(b)] = lambda batch=batch: embed_samples(inproc, model, batch)
    secs = time_side_by_side(fns, min_time, min_reps)
    return {int(k): v for k, v in secs.items()}


def compare(
    pa: perf.PerfAnalyzer,
    ours_url: str,
    baseline_url: str | None,
    inproc: Embedder,
    models: Sequence[str],
    input_files: dict[str, Path],
    samples: Sequence[perf.Sample],
    settings: perf.PerfSettings,
    workdir: Path,
    *,
    rounds: int = 1,
    inproc_min_time: float = 0.5,
    log=print,
) -> Comparison:
    """`rounds` > 1 repeats each (model, concurrency) pair in ABBA order (ours, pytriton, pytriton, ours, ...)
    so a load drift on the machine hits both sides alike; the table gives the mean and each round's ratio."""
    result = Comparison([], [], {}, {}, {})
    result.parity = parity_checks(ours_url, baseline_url, inproc, models, samples[:8])
    for model, checks in result.parity.items():
        log(f"  parity {model}: " + ", ".join(f"{k} min cosine {v:.6f}" for k, v in checks.items()))
    for model in models:
        bad = {k: v for k, v in result.parity[model].items() if not v >= PARITY_MIN_COSINE}
        if bad:
            result.errors[model] = f"embeddings disagree ({bad}; need >= {PARITY_MIN_COSINE}); not timed"
            log(f"  {model}: {result.errors[model]}")
            continue
        try:
            _compare_model(
                pa,
                {"ours": ours_url, "pytriton": baseline_url},
                inproc,
                model,
                input_files[model],
                samples,
                settings,
                workdir,
                rounds,
                inproc_min_time,
                result,
                log,
            )
        except perf.PerfAnalyzerError as e:
            result.errors[model] = str(e)
            log(f"  {model}: {e}")
    return result


def _compare_model(
    pa,
    urls: dict[str, str | None],
    inproc,
    model,
    input_file,
    samples,
    settings,
    workdir,
    rounds,
    inproc_min_time,
    result: Comparison,
    log,
) -> None:
    sides = [side for side, url in urls.items() if url]
    for side in sides:
        perf.warm_up(pa, model, urls[side], input_file)
    for c in settings.concurrencies:
        measured: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                level = perf.measure(
                    pa,
                    model,
                    urls[side],
                    input_file,
                    c,
                    settings,
                    workdir,
                    label=f"{model}@{side}" + (f"#{r + 1}" if rounds > 1 else ""),
                )
                log(perf.format_row(level.row))
                result.levels.append(level.row)
                result.commands.setdefault(f"{model}@{side}", shlex.join(level.command))
                measured[side].append(level.row)
        b = c * settings.batch
        secs = inprocess_timing(inproc, model, samples, (1, b), inproc_min_time, 5)
        row = comparison_row(
            model, c, combine(measured["ours"]), combine(measured.get("pytriton", [])), secs[1], secs[b], b
        )
        per_round = [
            ratio(o.get("throughput"), p.get("throughput"))
            for o, p in zip(measured["ours"], measured.get("pytriton", []))
        ]
        row["rounds"] = rounds
        row["throughput_ratio_per_round"] = "/".join(f"{x:.2f}" for x in per_round if x is not None) or None
        log(
            f"  {model:<26} c={c:<3} in-process batch 1 {row['inproc_b1_ms']:.2f} ms, batch {b} "
            f"{row['inproc_batch_throughput']:.0f} infer/s"
        )
        result.rows.append(row)


def combine(rows: Sequence[dict]) -> dict:
    """The rounds of one side at one level: mean throughput and latencies; settled only if every round was."""
    out: dict = {}
    for key in ("throughput", "p50_ms", "p99_ms"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    if rows:
        out["stable"] = all(r.get("stable") for r in rows)
    return out


def comparison_row(
    model: str, concurrency: int, ours: dict, base: dict, inproc_b1_s: float, inproc_batch_s: float, batch: int
) -> dict:
    """One table row; every ratio is ours over the other (throughput: > 1 means ours serves more; latency:
    < 1 means ours answers faster)."""
    inproc_b1_ms = inproc_b1_s * 1000.0
    inproc_thr = batch / inproc_batch_s
    return {
        "model": model,
        "concurrency": concurrency,
        "ours_throughput": ours.get("throughput"),
        "pytriton_throughput": base.get("throughput"),
        "inproc_batch": batch,
        "inproc_batch_throughput": inproc_thr,
        "ours_p50_ms": ours.get("p50_ms"),
        "pytriton_p50_ms": base.get("p50_ms"),
        "inproc_b1_ms": inproc_b1_ms,
        "ours_p99_ms": ours.get("p99_ms"),
        "pytriton_p99_ms": base.get("p99_ms"),
        "throughput_ours_over_pytriton": ratio(ours.get("throughput"), base.get("throughput")),
        "p50_ours_over_pytriton": ratio(ours.get("p50_ms"), base.get("p50_ms")),
        "p50_ours_over_inprocess": ratio(ours.get("p50_ms"), inproc_b1_ms),
        "throughput_ours_over_inprocess_ceiling": ratio(ours.get("throughput"), inproc_thr),
        "ours_settled": ours.get("stable"),
        "pytriton_settled": base.get("stable"),
    }


TABLE_COLUMNS = [
    ("model", "model"),
    ("concurrency", "c"),
    ("ours_throughput", "ours infer/s"),
    ("pytriton_throughput", "PyTriton infer/s"),
    ("throughput_ours_over_pytriton", "thr ours/PyTriton"),
    ("throughput_ratio_per_round", "per round"),
    ("ours_p50_ms", "ours p50 ms"),
    ("pytriton_p50_ms", "PyTriton p50 ms"),
    ("p50_ours_over_pytriton", "p50 ours/PyTriton"),
    ("inproc_b1_ms", "in-proc b1 ms"),
    ("p50_ours_over_inprocess", "p50 ours/in-proc"),
    ("inproc_batch_throughput", "in-proc batch=c infer/s"),
    ("throughput_ours_over_inprocess_ceiling", "thr ours/in-proc ceiling"),
]


def table(rows: Sequence[dict]) -> str:
    return markdown_table(rows, TABLE_COLUMNS)


def plot(rows: Sequence[dict], path: Path) -> Path:
    """Per model: throughput vs concurrency for ours, PyTriton and the in-process ceiling (left axis), and
    p50 latency (right panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, max(1, len(models)), figsize=(4.5 * max(1, len(models)), 7), squeeze=False)
    series = [
        ("ours_throughput", "ours (ensemble, ORT)", "o-"),
        ("pytriton_throughput", "PyTriton (torch eager)", "s--"),
        ("inproc_batch_throughput", "in-process ORT, batch=c", "^:"),
    ]
    lat = [
        ("ours_p50_ms", "ours p50", "o-"),
        ("pytriton_p50_ms", "PyTriton p50", "s--"),
        ("inproc_b1_ms", "in-process batch 1", "^:"),
    ]
    for j, model in enumerate(models):
        sel = sorted((r for r in rows if r["model"] == model), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in sel]
        for ax, what, ylabel in ((axes[0][j], series, "inferences / s"), (axes[1][j], lat, "latency (ms)")):
            for key, label, style in what:
                ys = [r.get(key) for r in sel]
                if any(y is not None for y in ys):
                    ax.plot(cs, [math.nan if y is None else y for y in ys], style, label=label)
            ax.set_xscale("log", base=2)
            ax.set(xlabel="concurrency", ylabel=ylabel, title=model)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


FIELDS = [k for k, _ in TABLE_COLUMNS] + [
    "rounds",
    "inproc_batch",
    "ours_p99_ms",
    "pytriton_p99_ms",
    "ours_settled",
    "pytriton_settled",
]


def write_outputs(result: Comparison, out: Path, meta: dict) -> list[Path]:
    return [
        write_rows_csv(result.rows, out / "comparison.csv", FIELDS),
        write_json(
            {
                **meta,
                "parity": result.parity,
                "commands": result.commands,
                "errors": result.errors,
                "results": result.rows,
                "perf_rows": result.levels,
            },
            out / "comparison.json",
        ),
        plot(result.rows, out / "comparison.png"),
    ]
