"""Gallery stores side by side on the same data: the exact KnnIndex against Milvus (Lite) FLAT, HNSW and IVF_FLAT.

For every gallery size N (d = 512) one clustered gallery and one query set are drawn (embeddings of real models
are clustered; uniform random vectors are the worst case of every graph and cell index). Each Milvus index type
gets its own collection in one Milvus Lite folder. Per engine and search setting:

* recall@10: the fraction of the exact top-10 (KnnIndex) that the engine also returns, over every query;
* queries/s at batch 1 (one query per call, the online case) and at batch 64, from timed calls after one
  warm-up call, for at least --min-time seconds each;
* build seconds: insert + flush + index build (Milvus), add (KnnIndex).

Milvus Lite is pure Python over faiss-cpu; each of its searches walks every row in Python (its delete mask) before
faiss runs, so its queries/s are those of Lite, not of a Milvus server, whose searches run in C++ (and on GPUs).
Recall depends on the index and its parameters only, so it carries over to a server.

Writes <out>/store.csv, <out>/store.json (rows, machine, versions, command) and <out>/store.png.

    python -m benchmarks.store_bench --quick       # N = 2,000, well under a minute
    python -m benchmarks.store_bench               # N = 10,000 and 20,000 (minutes; inserts run ~400 rows/s)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mim.commandline import CommandParser
from mim.search.knn import KnnIndex

from .common import hardware, markdown_table, now_utc, versions, write_json, write_rows_csv

RESULTS_DIR = Path(__file__).resolve().parent / "results"
K = 10
BATCH = 64


@dataclass(frozen=True)
class Grid:
    sizes: tuple[int, ...]
    dim: int
    queries: int
    min_time: float  # seconds of timed calls per engine, setting and batch size


QUICK = Grid(sizes=(2_000,), dim=512, queries=64, min_time=0.3)
FULL = Grid(sizes=(10_000, 20_000), dim=512, queries=256, min_time=1.0)

# (index type, build overrides, search settings to sweep); IVF's nlist is set from N below.
SETTINGS: tuple[tuple[str, dict, tuple[dict, ...]], ...] = (
    ("FLAT", {}, ({},)),
    ("HNSW", {"M": 16, "efConstruction": 200}, ({"ef": 16}, {"ef": 64}, {"ef": 256})),
    ("IVF_FLAT", {}, ({"nprobe": 4}, {"nprobe": 16}, {"nprobe": 64})),
)

FIELDS = ["n", "d", "engine", "params", "build_s", "qps_b1", "qps_b64", "recall_at_10"]


def clustered(n: int, dim: int, seed: int, clusters: int = 1024, spread: float = 1.0) -> np.ndarray:
    """(n, dim) unit rows around `clusters` random centres, noise as large as a centre (spread 1). Tighter
    clusters make every index look exact: at N = 1e4 with 256 clusters of spread 0.6, IVF with nprobe = 4 of
    400 cells already finds every true neighbour."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near_queries(gallery: np.ndarray, count: int, seed: int, noise: float = 1.0) -> np.ndarray:
    """Gallery rows moved by noise of norm ~`noise` and renormalised: a query near, not on, its product."""
    rng = np.random.default_rng(seed)
    d = gallery.shape[1]
    q = gallery[rng.choice(len(gallery), count, replace=False)]
    q = q + (noise / np.sqrt(d)) * rng.standard_normal(q.shape).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact top-k ids (padding -1 excluded) that `found` also holds."""
    hit = total = 0
    for f, e in zip(found, exact):
        want = set(e[e >= 0].tolist())
        total += len(want)
        hit += len(want & set(f.tolist()))
    return hit / total if total else math.nan


def queries_per_s(search: Callable[[np.ndarray], object], q: np.ndarray, batch: int, min_time: float) -> float:
    """Calls of `batch` queries, cycling through q, after one warm-up call; queries / second over >= min_time."""
    search(q[:batch])
    done, calls, t0 = 0, 0, time.perf_counter()
    while True:
        s = (calls * batch) % max(1, len(q) - batch + 1)
        search(q[s : s + batch])
        done, calls = done + batch, calls + 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time and calls >= 2:
            return done / elapsed


def bench_size(n: int, grid: Grid, folder: Path, log: Callable[[str], None]) -> list[dict]:
    from mim.search.stores.milvus import MilvusIndexConfig, MilvusStore

    gallery = clustered(n, grid.dim, seed=n)
    q = near_queries(gallery, grid.queries, seed=n + 1)
    ids = np.arange(n, dtype=np.int64)

    t0 = time.perf_counter()
    exact = KnnIndex(grid.dim, device="cpu")
    exact.add(ids, gallery)
    build = time.perf_counter() - t0
    truth = exact.search(q, K)[1]
    rows = [_row(n, grid, "KnnIndex (exact)", {}, build, lambda x: exact.search(x, K), q, truth)]
    log(_line(rows[-1]))

    for kind, build_params, sweeps in SETTINGS:
        if kind == "IVF_FLAT":
            build_params = {"nlist": max(16, int(4 * math.sqrt(n)))}  # the usual 4 * sqrt(N) cells
        cfg = MilvusIndexConfig.named(kind, **build_params)
        t0 = time.perf_counter()
        store = MilvusStore.open(f"{folder / 'bench.db'}#{kind.lower()}_{n}", dim=grid.dim, index=cfg)
        try:
            store.add(ids, gallery)
            store.save()
            build = time.perf_counter() - t0
            for search in sweeps:
                store.index = replace(cfg, search={**cfg.search, **search})
                label = f"Milvus Lite {kind}"
                params = {**build_params, **search}
                rows.append(_row(n, grid, label, params, build, lambda x, s=store: s.search(x, K), q, truth))
                log(_line(rows[-1]))
            store.drop()
        finally:
            store.close()
    return rows


def _row(n, grid, engine, params, build, search, q, truth) -> dict:
    recall = recall_at_k(search(q)[1], truth)
    return {
        "n": n,
        "d": grid.dim,
        "engine": engine,
        "params": ",".join(f"{k}={v}" for k, v in params.items()) or "-",
        "build_s": round(build, 2),
        "qps_b1": round(queries_per_s(search, q, 1, grid.min_time), 1),
        "qps_b64": round(queries_per_s(search, q, BATCH, grid.min_time), 1),
        "recall_at_10": round(recall, 4),
    }


def _line(r: dict) -> str:
    return (
        f"N={r['n']:>7} {r['engine']:<22} {r['params']:<22} build {r['build_s']:>7.1f} s  "
        f"b1 {r['qps_b1']:>8.1f} q/s  b64 {r['qps_b64']:>8.1f} q/s  recall@10 {r['recall_at_10']:.3f}"
    )


def plot(rows: Sequence[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for engine in dict.fromkeys(r["engine"] for r in rows):
            sel = [r for r in rows if r["n"] == n and r["engine"] == engine]
            if not sel:
                continue
            ax.plot([r["recall_at_10"] for r in sel], [r["qps_b1"] for r in sel], "o-", label=engine)
            for r in sel:
                if r["params"] != "-":
                    ax.annotate(r["params"].split(",")[-1], (r["recall_at_10"], r["qps_b1"]), fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 against the exact index")
        ax.set_ylabel("queries/s, one query per call")
        ax.set_title(f"N = {n:,} x {rows[0]['d']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(rows: Sequence[dict]) -> str:
    shown = [
        {**r, **{k: f"{float(r[k]):.1f}" for k in ("build_s", "qps_b1", "qps_b64")}, "recall_at_10": r["recall_at_10"]}
        for r in rows
    ]
    return markdown_table(
        shown,
        [
            ("n", "N"),
            ("engine", "engine"),
            ("params", "parameters"),
            ("build_s", "build s"),
            ("qps_b1", "q/s batch 1"),
            ("qps_b64", f"q/s batch {BATCH}"),
            ("recall_at_10", "recall@10"),
        ],
        digits=3,
    )


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m benchmarks.store_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 2,000 only (CI smoke)")
    p.add_argument("--sizes", help="comma-separated gallery sizes (default: 10000,20000; --quick: 2000)")
    p.add_argument("--min-time", type=float, help="seconds of timed calls per engine, setting and batch size")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default %(default)s)")
    p.add_argument("--work", type=Path, help="folder for the Milvus Lite data (default: a temporary folder)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    grid = QUICK if args.quick else FULL
    if args.sizes:
        grid = replace(grid, sizes=tuple(int(s) for s in args.sizes.split(",")))
    if args.min_time:
        grid = replace(grid, min_time=args.min_time)
    args.out.mkdir(parents=True, exist_ok=True)
    started, before = now_utc(), hardware()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for n in grid.sizes:  # the files are rewritten after each size, so a run cut short keeps what it measured
            rows += bench_size(n, grid, Path(tmp), lambda line: print(line, flush=True))
            write_rows_csv(rows, args.out / "store.csv", FIELDS)
            write_json(
                {
                    "command": "python -m benchmarks.store_bench " + " ".join(argv),
                    "started": started,
                    "finished": now_utc(),
                    "hardware_before": before,
                    "hardware_after": hardware(),
                    "versions": {**versions(), **_milvus_versions()},
                    "grid": grid.__dict__,
                    "rows": rows,
                },
                args.out / "store.json",
            )
            plot(rows, args.out / "store.png")
    print(markdown(rows))
    print(f"wrote {args.out}/store.csv, store.json, store.png")
    return 0


def _milvus_versions() -> dict[str, str]:
    from importlib import metadata

    return {d: metadata.version(d) for d in ("pymilvus", "milvus-lite")}


if __name__ == "__main__":
    sys.exit(main())
