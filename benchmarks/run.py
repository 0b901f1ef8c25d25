"""Every benchmark in one run, with one RESULTS.md: `make bench` (quick) and `make bench-full`.

    python -m benchmarks.run --quick      # < 3 min on 2 cores, into benchmarks/results/quick/ (gitignored)
    python -m benchmarks.run              # the full CPU set, ~10 min, into benchmarks/results/

Steps:
  1. checkpoint: --checkpoint (default artifacts/checkpoints/3tower); without one, a random-init `tiny`
     checkpoint is made (said so everywhere: its retrieval metrics mean nothing, its speed and parity do)
  2. export + install it into a copy of model_repository/ (export.engines) under --work
  3. catalog: --catalog if it holds one; else a small one (quick) or the default one (full) is generated
  4. start the bundled tritonserver (`cpu` config) and, for the comparison, the PyTriton baseline
  5. perf_analyzer sweeps of the towers and the ensembles (benchmarks.perf)
  6. ours vs PyTriton vs in-process, side by side (benchmarks.serving_compare)
  7. retrieval quality through the served path vs in-process (benchmarks.quality)
  8. kNN vs faiss (benchmarks.knn_bench, --quick in quick mode)
  9. gallery stores: exact KnnIndex vs Milvus Lite FLAT/HNSW/IVF (benchmarks.store_bench)
 10. the GPU ensemble (benchmarks.gpu), skipped with the reason where there is no GPU
Speed never fails a benchmark (a noisy level is measured once more and marked); a broken model, a failed
parity check or a tool that cannot start does: the run still writes what it has, then exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mim import contract, tables
from mim.commandline import CommandParser

from . import gpu, knn_bench, perf, quality, serving_compare, store_bench
from .common import hardware, markdown_table, now_utc, versions, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # the committed results (`make bench` / `make bench-full` write there)
DEFAULT_OUT = Path("artifacts/benchmarks")  # a run without --out never touches the committed results
DEFAULT_CHECKPOINT = Path("artifacts/checkpoints/3tower")
DEFAULT_CATALOG = Path("artifacts/catalog")
DEFAULT_WORK = Path("artifacts/bench")
# Quick catalog: 4 categories x 4 patterns x 4 colours = 64 products (12 test products, 24 test photos) drawn
# in ~4 s; the default catalog (640 products) takes ~40 s.
QUICK_CATALOG = {
    "categories": "mug,shirt,shoe,bag",
    "patterns": "solid,stripes,zebra,dots",
    "colours": "red,blue,green,black",
}


@dataclass(frozen=True)
class Mode:
    name: str
    perf: perf.PerfSettings
    compare_models: tuple[str, ...]
    samples: int  # distinct requests in each perf_analyzer input file
    inproc_min_time: float  # seconds of in-process calls per batch size per level
    knn_args: tuple[str, ...]
    compare_rounds: int  # ours/PyTriton measured this many times per level, in ABBA order


QUICK = Mode("quick", perf.QUICK, perf.ENSEMBLES, 8, 0.3, ("--quick",), 1)
# The full kNN grid (N up to 1e6) alone takes ~15 min on 2 cores: the full run stops at N = 1e5 to stay near
# 10 minutes; `python -m benchmarks.knn_bench` runs the whole grid on its own.
FULL_KNN = ("--sizes", "10000,100000", "--min-time", "0.4")
# 1.2 s windows, at most 5: 5 models x 4 levels in the sweep plus 3 x 4 x 2 rounds x 2 servers in the comparison.
FULL = Mode(
    "full", dataclasses.replace(perf.FULL, interval_ms=1200, max_trials=5), perf.ENSEMBLES, 16, 1.0, FULL_KNN, 2
)
# Milvus Lite inserts run at ~400 rows/s here: the full run stops at N = 1e4 (about 4 minutes);
# `python -m benchmarks.store_bench` alone goes to 2e4.
STORE_ARGS = {"quick": ("--quick",), "full": ("--sizes", "10000", "--min-time", "0.5")}


@dataclass
class Run:
    """What the run did and found; RESULTS.md and run.json are written from it."""

    mode: Mode
    argv: list[str]
    out: Path
    work: Path
    started: str = field(default_factory=now_utc)
    hardware_before: dict = field(default_factory=hardware)
    checkpoint: dict = field(default_factory=dict)
    catalog: dict = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    perf_analyzer: str = ""
    sweep: perf.SweepResult | None = None
    comparison: serving_compare.Comparison | None = None
    quality: dict | None = None
    knn_rc: int | None = None
    store_rc: int | None = None
    gpu_reason: str | None = None
    commands: dict[str, str] = field(default_factory=dict)

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one step, time it, and record (not raise) its failure so the other steps still run."""
        print(f"\n== {name}", flush=True)
        t0 = time.monotonic()
        try:
            return fn()
        except Exception as e:  # a failed step is reported in RESULTS.md and the exit code, not as a traceback
            self.errors[name] = f"{type(e).__name__}: {e}"
            print(f"!! {name} failed: {self.errors[name]}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            return None
        finally:
            self.stages[name] = round(time.monotonic() - t0, 1)


# --- steps -------------------------------------------------------------------------------------------------
def make_random_checkpoint(out: Path, seed: int = 0) -> Path:
    """A random-init `tiny` model with a tokenizer trained on a few titles (as tests/conftest.py makes it)."""
    import torch

    from mim.data.synth import TOY_TEXTS
    from mim.model.checkpoint import save_checkpoint
    from mim.model.config import get_size
    from mim.model.tokenizer import TextTokenizer
    from mim.model.towers import MIMModel

    torch.manual_seed(seed)
    spec = get_size("tiny")
    tok = TextTokenizer.train(list(TOY_TEXTS) * 4, vocab_size=200, context_length=spec.preprocess.context_length)
    model = MIMModel(spec.model.with_vocab(tok.vocab_size)).eval()
    meta = {"objective": "3tower", "step": 0, "random_init": True, "made_by": "benchmarks.run"}
    return save_checkpoint(out, model, spec.preprocess, tok, meta)


def resolve_checkpoint(run: Run, path: Path) -> Path:
    from mim.layout import model_id_of_checkpoint
    from mim.model.checkpoint import read_config

    if (path / "config.json").is_file():
        ckpt, note = path, "trained checkpoint"
    else:
        ckpt = run.work / "random-tiny-checkpoint"
        if not (ckpt / "config.json").is_file():
            make_random_checkpoint(ckpt)
        note = (
            f"no checkpoint at {path} (train one with `make train`): using a RANDOM-INIT tiny checkpoint; "
            "speed and served-vs-in-process parity are meaningful, retrieval metrics are not"
        )
    print(f"checkpoint: {ckpt} ({note})")
    meta = read_config(ckpt).get("meta", {})
    run.checkpoint = {"path": str(ckpt), "hash": model_id_of_checkpoint(ckpt), "note": note, "meta": meta}
    return ckpt


def install_repository(run: Run, ckpt: Path) -> Path:
    """A fresh copy of the committed model_repository/ with `ckpt` exported and installed (export.engines)."""
    from export.engines import build_and_install
    from mim.serving.repository import prepare_repository

    repo = prepare_repository(run.work / "model_repository", fresh=True)
    export_dir = run.work / "export"
    argv = ["--checkpoint", str(ckpt), "--repository", str(repo), "--export-dir", str(export_dir)]
    run.commands["export"] = "mimsearch engines " + shlex.join(argv)
    for line in build_and_install(ckpt, repo, export_dir=export_dir).lines():
        print(line)
    return repo


def resolve_catalog(run: Run, path: Path):
    from mim.data.catalog import load_catalog, summary
    from mim.data.synth import ensure_catalog

    try:
        catalog, how = load_catalog(path), "existing"
    except (FileNotFoundError, ValueError):
        if run.mode is QUICK:
            target = run.work / "catalog-quick"
            catalog, how = ensure_catalog(target, progress=False, **QUICK_CATALOG), f"small catalog ({QUICK_CATALOG})"
        else:
            catalog, how = ensure_catalog(path, progress=False), "default catalog generated (as `make catalog`)"
    print(summary(catalog))
    run.catalog = {
        "path": str(catalog.root),
        "how": how,
        "seed": catalog.seed,
        "test_products": len(catalog.products_in("test")),
        "test_queries": len(catalog.queries_in("test")),
    }
    return catalog


def start_servers(run: Run, stack: ExitStack, repo: Path, ckpt: Path, want_baseline: bool):
    from mim.serving.server import TritonServer

    from .pytriton_baseline import PyTritonProcess

    baseline = None
    if want_baseline:  # started first: its start-up overlaps ours
        baseline = PyTritonProcess(ckpt, run.work / "logs" / "pytriton.log").start_async()
        stack.callback(baseline.stop)
    server = TritonServer(repo, config="cpu", log_path=run.work / "logs" / "tritonserver.log")
    stack.enter_context(server)
    run.commands["tritonserver"] = shlex.join(server.command())
    print(f"tritonserver (cpu config) ready at {server.grpc_url}; log {server.log_path}")
    if baseline is not None:
        try:
            baseline.wait_ready()
            run.commands["PyTriton baseline"] = "python " + shlex.join(baseline.command()[1:])
            print(f"PyTriton baseline ready at {baseline.grpc_url}; log {baseline.log_path}")
        except RuntimeError as e:
            run.errors["pytriton baseline"] = str(e)
            print(f"!! PyTriton baseline did not start; comparing with in-process only:\n{e}", file=sys.stderr)
            baseline.stop()
            baseline = None
    return server, baseline


# --- report ------------------------------------------------------------------------------------------------
PERF_COLUMNS = [
    ("model", "model"),
    ("concurrency", "c"),
    ("throughput", "infer/s"),
    ("p50_ms", "p50 ms"),
    ("p90_ms", "p90 ms"),
    ("p99_ms", "p99 ms"),
    ("server_queue_ms", "server queue ms"),
    ("server_compute_ms", "server compute ms"),
    ("server_avg_batch", "avg batch"),
    ("stable", "settled"),
]
BREAKDOWN_COLUMNS = [
    ("component", "model / step"),
    ("inference_count", "requests"),
    ("execution_count", "executions"),
    ("avg_batch", "avg batch"),
    ("avg_latency_ms", "latency ms"),
    ("queue_ms", "queue ms"),
    ("compute_input_ms", "input ms"),
    ("compute_infer_ms", "infer ms"),
    ("compute_output_ms", "output ms"),
    ("compute_ms", "compute ms"),
]


def results_markdown(run: Run) -> str:
    hw, v = run.hardware_before, versions()
    lines = [
        f"# Benchmark results ({run.mode.name})",
        "",
        f"Run {run.started} on {hw['cpu_model']}, {hw['cpu_cores']} cores ({hw['cpu_affinity']} usable), "
        f"{hw['memory_gib']} GiB, {hw['platform']}; 1/5/15-min load average before {_load(hw)}, after "
        f"{_load(hardware())}.",
        "",
        "**Read the ratios, not the absolute numbers.** The machine has 2 shared, noisy cores: client "
        "(perf_analyzer), server and models all compete for them. Every ratio below comes from measurements "
        "taken back to back in this one run.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "## Commands",
        "",
        f"- this run: `{_command(run.argv)}`",
    ]
    lines += [f"- {k}: `{c}`" for k, c in run.commands.items()]
    if run.sweep is not None:
        lines += [f"- perf_analyzer, {m}: `{c}`" for m, c in run.sweep.commands.items()]
    if run.comparison is not None:
        lines += [f"- perf_analyzer, {m}: `{c}`" for m, c in run.comparison.commands.items() if m.endswith("@pytriton")]
    lines += [
        "",
        f"Checkpoint: `{run.checkpoint.get('path')}` ({run.checkpoint.get('hash')}): {run.checkpoint.get('note')}.",
        "",
        f"Catalog: `{run.catalog.get('path')}` ({run.catalog.get('how')}), test split "
        f"{run.catalog.get('test_products')} products / {run.catalog.get('test_queries')} query photos.",
        "",
    ]
    lines += _perf_section(run) + _comparison_section(run) + _quality_section(run) + _knn_section(run)
    lines += _store_section(run)
    lines += ["## GPU", ""]
    if "gpu" in run.skipped:
        lines += [f"Skipped: {run.skipped['gpu']}.", ""]
    elif run.gpu_reason:
        lines += [
            f"Skipped: {run.gpu_reason}. The code path (`benchmarks/gpu.py`: the `gpu_torch` config, towers in "
            "torch FP16 with CUDA graphs and GPU tensors through DLPack, then the same perf_analyzer sweep) runs "
            "on a CUDA machine; `python -m benchmarks.gpu` measures the towers and the kNN there as well.",
            "",
        ]
    else:
        lines += ["See `gpu/perf.csv` and `gpu/perf.png`.", ""]
    stages = ([k, f"{s:.1f}"] for k, s in run.stages.items())
    lines += ["## Run", "", tables.markdown_table(["step", "seconds"], stages, label_column=True)]
    if run.errors or run.skipped:
        lines += ["", "## Failed or skipped", ""]
        lines += [f"- **{k}** failed: {e.splitlines()[0]}" for k, e in run.errors.items()]
        lines += [f"- {k} skipped: {why}" for k, why in run.skipped.items()]
    return "\n".join(lines) + "\n"


def _load(hw: dict) -> str:
    return "/".join(f"{x:.2f}" for x in hw["loadavg"]) if hw.get("loadavg") else "unknown"


def _perf_section(run: Run) -> list[str]:
    if run.sweep is None:
        return []
    s = run.mode.perf
    window = (
        f"time windows of {s.interval_ms} ms"
        if s.mode == "time_windows"
        else f"count windows of >= {s.request_count} requests"
    )
    lines = [
        "## perf_analyzer: latency vs throughput",
        "",
        f"gRPC, batch {s.batch}, concurrency {', '.join(map(str, s.concurrencies))}, {window}, settled when "
        f"the last 3 agree within {s.stability_pct:g}% (at most {s.max_trials} windows; otherwise one "
        "fixed-count measurement, `settled = no`). Inputs: real catalog images (PNG and JPEG) and titles "
        "(`--input-data`, BYTES as base64); the towers get the same images and titles preprocessed as the "
        "server does. Files: `perf.csv`, `perf_breakdown.csv`, `perf.json`, `perf.png`.",
        "",
        markdown_table(run.sweep.rows, PERF_COLUMNS),
        "",
    ]
    sample = _breakdown_sample(run.sweep.breakdown)
    if sample:
        model, c = sample[0]["model"], sample[0]["concurrency"]
        lines += [
            f"Per-model breakdown (server side, per request) of `{model}` at concurrency {c}; "
            "`avg batch` = requests / executions shows the dynamic batcher at work:",
            "",
            markdown_table(sample, BREAKDOWN_COLUMNS),
            "",
        ]
    return lines


def _breakdown_sample(rows: list[dict]) -> list[dict]:
    multimodal = [r for r in rows if r["served_model"] == contract.EMBED_MULTIMODAL]
    if not multimodal:
        return []
    top = max(r["concurrency"] for r in multimodal)
    return [r for r in multimodal if r["concurrency"] == top]


def _comparison_section(run: Run) -> list[str]:
    cmp = run.comparison
    if cmp is None:
        return []
    lines = [
        "## Ours vs PyTriton vs in-process (side by side, one run)",
        "",
        "ours = our ensembles (python-backend preprocessing + ONNX Runtime towers, `cpu` config); PyTriton = "
        "the same checkpoint served as a PyTriton user would (Python preprocessing + torch eager forward, "
        "`@batch`, same bundled server binary, same perf_analyzer settings and input files); in-process = "
        "the same preprocessing + ONNX Runtime sessions called directly (batch 1: latency floor; batch = c: "
        "throughput ceiling). For each model and concurrency the three ran back to back. Ratios are ours "
        "over the other: throughput > 1 and latency < 1 favour ours.",
        "",
    ]
    if cmp.parity:
        lines += [
            "Same computation first (min cosine over 8 requests): "
            + "; ".join(
                f"{m}: " + ", ".join(f"{k.replace('_', ' ')} {v:.6f}" for k, v in checks.items())
                for m, checks in cmp.parity.items()
            )
            + ".",
            "",
        ]
    lines += [serving_compare.table(cmp.rows), "", "Files: `comparison.csv`, `comparison.json`, `comparison.png`.", ""]
    return lines


def _quality_section(run: Run) -> list[str]:
    lines = ["## Retrieval quality", ""]
    trained = quality.trained_table()
    if trained:
        lines += [
            f"DML vs 3-tower vs 4-tower, trained by `{quality.TRAINED_COMMAND}` (see `quality.md` for its "
            "setup; not retrained by this benchmark):",
            "",
            trained,
            "",
        ]
    else:
        lines += [
            f"The DML / 3-tower / 4-tower table is not there yet: `make quality` (`{quality.TRAINED_COMMAND}`)"
            " writes benchmarks/results/quality.{md,json}; this benchmark never retrains.",
            "",
        ]
    if run.quality is not None:
        lines += [
            "Served (Triton, ONNX Runtime, through client/triton_client.EmbeddingClient) vs in-process "
            "(torch), same catalog split (`quality_served.md`):",
            "",
            quality.served_markdown(run.quality),
            "",
        ]
    return lines


def _knn_section(run: Run) -> list[str]:
    if run.knn_rc is None:
        return []
    rows = []
    try:
        import csv

        with open(run.out / "knn.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        pass
    lines = [
        "## Exact kNN vs faiss",
        "",
        f"`python -m benchmarks.knn_bench {' '.join(run.mode.knn_args + ('--out', _rel(run.out)))}` "
        f"(exit {run.knn_rc}); `knn.csv`, `knn.json`, `knn.png`. Largest gallery, ratio = ours / faiss "
        "queries per second:",
        "",
    ]
    if rows:
        n = max(int(r["n"]) for r in rows)
        sel = [{k: _number(v) for k, v in r.items()} for r in rows if int(r["n"]) == n]
        lines += [
            markdown_table(
                sel,
                [
                    ("n", "N"),
                    ("d", "d"),
                    ("batch", "batch"),
                    ("k", "k"),
                    ("ours_qps", "ours q/s"),
                    ("faiss_qps", "faiss q/s"),
                    ("ratio_ours_over_faiss", "ours/faiss"),
                    ("ids_match", "same ids"),
                ],
            ),
            "",
        ]
    return lines


def _store_section(run: Run) -> list[str]:
    if run.store_rc is None:
        return []
    args = STORE_ARGS[run.mode.name] + ("--out", _rel(run.out))
    lines = [
        "## Gallery stores: exact vs Milvus",
        "",
        f"`python -m benchmarks.store_bench {' '.join(args)}` (exit {run.store_rc}); `store.csv`, `store.json`, "
        "`store.png`. Recall@10 against the exact index; Milvus Lite's queries/s are Lite's (pure Python around "
        "faiss), not a Milvus server's:",
        "",
    ]
    try:
        import csv

        with open(run.out / "store.csv", newline="") as f:
            rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
        lines += [store_bench.markdown(rows), ""]
    except OSError:
        pass
    return lines


def _command(argv: Sequence[str]) -> str:
    return " ".join(["python -m benchmarks.run", shlex.join(argv)]).rstrip()


def _rel(path: Path) -> str:
    """A path as the user would type it where they ran the benchmark (relative to the working directory)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _number(text: str) -> Any:
    """A CSV cell back as a float where it is one ('' stays missing)."""
    if text == "":
        return None
    try:
        return float(text) if any(ch in text for ch in ".eE") else int(text)
    except ValueError:
        return text


# --- driver ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="mimsearch bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="bounded (< 3 min) run")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="the checkpoint exported and served")
    p.add_argument(
        "--catalog", type=Path, default=DEFAULT_CATALOG, help="catalog of the requests (generated if missing)"
    )
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="exports, repository copy, logs, inputs")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: artifacts/benchmarks[/quick])")
    p.add_argument("--concurrency", type=perf._ints, help="override the sweep, e.g. 1,2,4,8")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: perf,compare,quality,knn,store,gpu")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.concurrency:
        mode = dataclasses.replace(mode, perf=dataclasses.replace(mode.perf, concurrencies=args.concurrency))
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {"perf", "compare", "quality", "knn", "store", "gpu"}
    if unknown:
        print(f"error: --skip {sorted(unknown)}; expected some of perf,compare,quality,knn,store,gpu", file=sys.stderr)
        return 2
    out = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    run = Run(mode, argv, out, args.work)
    out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    logging.getLogger("export").setLevel(logging.WARNING)
    t0 = time.monotonic()

    pa = run.stage("perf_analyzer", perf.locate)
    if pa is not None:
        run.perf_analyzer = f"{pa.binary} ({pa.version})"
        print(f"perf_analyzer: {run.perf_analyzer}")
    ckpt = run.stage("checkpoint", lambda: resolve_checkpoint(run, args.checkpoint))
    repo = run.stage("export", lambda: install_repository(run, ckpt)) if ckpt else None
    catalog = run.stage("catalog", lambda: resolve_catalog(run, args.catalog))
    if repo is not None and catalog is not None:
        _served_steps(run, pa, repo, ckpt, catalog, skip, args)
    if "knn" in skip:
        run.skipped["knn"] = "--skip knn"
    else:
        run.knn_rc = run.stage("knn", lambda: knn_bench.main([*mode.knn_args, "--out", _rel(out)]))
        if run.knn_rc:
            run.errors["knn"] = f"knn_bench exited with {run.knn_rc} (results did not match faiss)"
    if "store" in skip:
        run.skipped["store"] = "--skip store"
    else:
        store_args = [*STORE_ARGS[mode.name], "--out", _rel(out), "--work", str(args.work)]
        run.store_rc = run.stage("store", lambda: store_bench.main(store_args))
    _gpu_step(run, pa, repo, catalog, skip, args)
    run.stages["total"] = round(time.monotonic() - t0, 1)
    write_json(_run_json(run), out / "run.json")
    (out / "RESULTS.md").write_text(results_markdown(run))
    print(
        f"\nwrote {out}/RESULTS.md in {run.stages['total']:.0f} s"
        + (f"; FAILED steps: {sorted(run.errors)}" if run.errors else "")
    )
    return 1 if run.errors else 0


def _served_steps(run: Run, pa, repo: Path, ckpt: Path, catalog, skip: set[str], args) -> None:
    mode, out = run.mode, run.out
    samples = perf.catalog_samples(catalog, mode.samples)
    models = list(perf.ALL_MODELS)
    inputs = run.stage("inputs", lambda: perf.prepare_inputs(models, samples, repo, run.work / "inputs"))
    want_compare = "compare" not in skip and pa is not None
    with ExitStack() as stack:
        servers = run.stage("servers", lambda: start_servers(run, stack, repo, ckpt, want_compare))
        if servers is None:
            return
        server, baseline = servers
        meta = {
            "date": now_utc(),
            "mode": mode.name,
            "settings": dataclasses.asdict(mode.perf),
            "hardware": hardware(),
            "versions": versions(),
            "checkpoint": run.checkpoint,
            "catalog": run.catalog,
            "inputs": perf.describe_inputs(inputs or {}, samples),
        }
        if "perf" in skip or pa is None or inputs is None:
            run.skipped["perf"] = "--skip perf" if "perf" in skip else "perf_analyzer unavailable"
        else:
            run.sweep = run.stage(
                "perf",
                lambda: perf.run_sweeps(pa, server.grpc_url, models, inputs, mode.perf, run.work / "logs" / "perf"),
            )
            if run.sweep is not None:
                perf.write_outputs(run.sweep, out, meta)
                run.errors.update({f"perf {m}": e for m, e in run.sweep.errors.items()})
        if want_compare and inputs is not None:
            run.comparison = run.stage("compare", lambda: _compare(run, pa, server, baseline, repo, inputs, samples))
            if run.comparison is not None:
                serving_compare.write_outputs(run.comparison, out, meta)
                run.errors.update({f"compare {m}": e for m, e in run.comparison.errors.items()})
        else:
            run.skipped["compare"] = "--skip compare" if "compare" in skip else "perf_analyzer unavailable"
        if "quality" in skip:
            run.skipped["quality"] = "--skip quality"
        else:
            run.quality = run.stage("quality", lambda: quality.served_quality(server.grpc_url, ckpt, catalog))
            if run.quality is not None:
                run.quality["date"] = now_utc()
                cmd = (
                    f"python -m benchmarks.quality --url {server.grpc_url} --checkpoint {ckpt} --catalog {catalog.root}"
                )
                quality.write_outputs(run.quality, out, cmd)
                if not run.quality["serving_loses_nothing"]:
                    run.errors["quality"] = "served and in-process results differ (see quality_served.md)"


def _compare(run: Run, pa, server, baseline, repo: Path, inputs: dict, samples) -> serving_compare.Comparison:
    inproc = serving_compare.in_process(repo)
    models = list(run.mode.compare_models)
    return serving_compare.compare(
        pa,
        server.grpc_url,
        baseline.grpc_url if baseline else None,
        inproc,
        models,
        {m: inputs[m] for m in models},
        samples,
        run.mode.perf,
        run.work / "logs" / "compare",
        rounds=run.mode.compare_rounds,
        inproc_min_time=run.mode.inproc_min_time,
    )


def _gpu_step(run: Run, pa, repo: Path | None, catalog, skip: set[str], args) -> None:
    if "gpu" in skip:
        run.skipped["gpu"] = "--skip gpu"
        return
    run.gpu_reason = gpu.unavailable_reason(repo)
    if run.gpu_reason is None and (pa is None or repo is None or catalog is None):
        run.gpu_reason = "earlier steps failed (perf_analyzer, export or catalog)"
    if run.gpu_reason:
        print(f"\n== gpu\nGPU ensemble benchmark skipped: {run.gpu_reason}")
        return

    def go():
        samples = perf.catalog_samples(catalog, run.mode.samples)
        gpu_repo = run.work / "model_repository_gpu"
        if gpu_repo.exists():
            shutil.rmtree(gpu_repo)
        shutil.copytree(repo, gpu_repo)
        inputs = perf.prepare_inputs(list(perf.ALL_MODELS), samples, gpu_repo, run.work / "inputs")
        return gpu.run(pa, gpu_repo, inputs, run.mode.perf, run.out / "gpu")

    result = run.stage("gpu", go)
    if result is not None:
        run.errors.update({f"gpu {m}": e for m, e in result.errors.items()})


def _run_json(run: Run) -> dict:
    return {
        "mode": run.mode.name,
        "command": _command(run.argv),
        "started": run.started,
        "finished": now_utc(),
        "hardware_before": run.hardware_before,
        "hardware_after": hardware(),
        "versions": versions(),
        "perf_analyzer": run.perf_analyzer,
        "checkpoint": run.checkpoint,
        "catalog": run.catalog,
        "stages_s": run.stages,
        "errors": run.errors,
        "skipped": run.skipped,
        "gpu_skipped_reason": run.gpu_reason,
        "commands": run.commands,
    }


if __name__ == "__main__":
    raise SystemExit(main())
