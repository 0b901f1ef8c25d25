"""Search in one request (search_* ensembles) against the two-step path (embed_* request + kNN in the client),
on one server in one run.

    python -m benchmarks.search_bench --repository artifacts/model_repository --catalog artifacts/catalog \\
        --gallery-size 100000 --concurrency 1,2,4,8,16,32 --out benchmarks/results/search

The repository (with an installed export, e.g. the one `make demo` leaves under artifacts/) is copied into a
work folder, so the caller's is not touched. A server is started on the copy; the gallery is the catalog's
test split embedded through `embed_image`, filled up to --gallery-size with random unit vectors (the exact
scan costs the same whatever the vectors are), installed into the copy's `knn` model and loaded.

Two measurements at every concurrency, back to back on the same server:

1. perf_analyzer on search_image, search_multimodal, embed_image and embed_multimodal (benchmarks.perf): the
   server-side cost of running the kNN inside the pipeline, with the server's per-model breakdown.
2. End to end from Python, closed loop with one client per thread: `SearchClient.by_image` (one request) vs
   `EmbeddingClient.embed_images` + `KnnIndex.search` in the client (two steps), and the same for photo + text
   (fusion). This is what perf_analyzer cannot time: the client-side kNN. The client's kNN runs with the
   same thread bound as the served one (`threads` of the knn config), so both searches get the same means.

Writes <out>/perf.csv, perf_breakdown.csv, perf.json, perf.png (perf_analyzer), <out>/end_to_end.csv,
end_to_end.json and end_to_end.png. Bounded: each perf_analyzer level is capped by PerfSettings.time_bound_s,
each Python level lasts --seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mim import contract
from mim.commandline import CommandParser

from . import perf
from .common import hardware, now_utc, versions, write_json, write_rows_csv

PERF_MODELS = (contract.SEARCH_IMAGE, contract.SEARCH_MULTIMODAL, contract.EMBED_IMAGE, contract.EMBED_MULTIMODAL)
SETTINGS = perf.PerfSettings(concurrencies=(1, 2, 4, 8, 16, 32), interval_ms=1000, stability_pct=25.0, max_trials=4)
K = 10
FILLER_ID_START = 10_000_000  # filler ids stay clear of catalog product ids
E2E_FIELDS = ["path", "query", "concurrency", "requests", "errors", "throughput", "p50_ms", "p90_ms", "p99_ms"]
E2E_FIELDS += ["seconds"]


# --- the gallery -----------------------------------------------------------------------------------------------
def bench_gallery(embed_images: Callable, catalog, size: int, model_id: str, path: Path, seed: int = 0):
    """The catalog's test products embedded by the server, then random unit vectors up to `size` items."""
    from client.indexing import catalog_items
    from mim.search.knn import KnnIndex

    items = catalog_items(catalog, "test")
    emb = embed_images([i.image.read_bytes() for i in items])  # the client splits at the max batch
    index = KnnIndex(emb.shape[1], device="cpu", model_id=model_id)
    index.add([i.id for i in items], emb, [i.metadata() for i in items])
    fill = size - len(items)
    if fill > 0:
        rng = np.random.default_rng(seed)
        vectors = rng.normal(size=(fill, emb.shape[1])).astype(np.float32)
        metas = [{"title": f"filler {j}", "category": "filler"} for j in range(fill)]
        index.add(np.arange(fill) + FILLER_ID_START, vectors, metas, normalize=True)
    index.save(path)
    return index


# --- end-to-end closed loop ------------------------------------------------------------------------------------
def closed_loop(make_worker: Callable[[], Callable[[int], None]], concurrency: int, seconds: float) -> dict:
    """`concurrency` threads, each calling its own worker back to back for `seconds` (after 0.5 s of warm-up
    that is not counted); latencies of the counted calls."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = threading.Barrier(concurrency + 1)
    t0 = [0.0]

    def run(slot: int) -> None:
        work = make_worker()
        start.wait()
        n = 0
        while True:
            now = time.perf_counter()
            if now - t0[0] > seconds:
                return
            failed = False
            try:
                work(n)
            except Exception:
                failed = True
            done = time.perf_counter()
            if now >= t0[0]:  # started inside the window: warm-up calls count neither as requests nor as errors
                latencies[slot].append(done - now)
                errors[slot] += failed
            n += 1

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter() + 0.5
    start.wait()
    for t in threads:
        t.join(seconds + 120)
    lat = np.array([x for part in latencies for x in part]) * 1000
    return {
        "requests": int(lat.size),
        "errors": int(sum(errors)),
        "throughput": lat.size / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p90_ms": float(np.percentile(lat, 90)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "seconds": seconds,
    }


def end_to_end(url: str, index, samples: Sequence, concurrencies: Sequence[int], seconds: float, log=print) -> list:
    from client.search_client import SearchClient
    from client.triton_client import EmbeddingClient

    images = [s.image for s in samples]
    texts = [s.text for s in samples]

    def one_request(query: str):
        def make():
            client = SearchClient(url, timeout_s=60)
            if query == "image":
                return lambda n: client.by_image(images[n % len(images)], K)
            return lambda n: client.by_image_text(images[n % len(images)], texts[n % len(texts)], K)

        return make

    def two_steps(query: str):
        def make():
            client = EmbeddingClient(url, timeout_s=60)
            if query == "image":
                return lambda n: index.search(client.embed_images([images[n % len(images)]]), K)
            return lambda n: index.search(
                client.embed_multimodal([images[n % len(images)]], [texts[n % len(texts)]]), K
            )

        return make

    rows = []
    for query in ("image", "image+text"):
        for c in concurrencies:
            for path, make in (("search_* (one request)", one_request), ("embed_* + client kNN", two_steps)):
                row = {"path": path, "query": query, "concurrency": c, **closed_loop(make(query), c, seconds)}
                rows.append(row)
                log(
                    f"  {query:<10} {path:<24} c={c:<3} {row['throughput']:8.1f} searches/s  "
                    f"p50 {row['p50_ms'] or 0:7.2f} ms  p99 {row['p99_ms'] or 0:7.2f} ms  errors {row['errors']}"
                )
    return rows


def plot_end_to_end(rows: Sequence[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, query in zip(axes, ("image", "image+text")):
        for color, p in zip(("tab:blue", "tab:orange"), ("search_* (one request)", "embed_* + client kNN")):
            sel = sorted((r for r in rows if r["query"] == query and r["path"] == p), key=lambda r: r["concurrency"])
            thr = [r["throughput"] for r in sel]
            ax.plot(thr, [r["p50_ms"] for r in sel], "o-", color=color, label=f"{p} p50")
            ax.plot(thr, [r["p99_ms"] for r in sel], ":", color=color, alpha=0.7)
            for r in sel:
                ax.annotate(f"c{r['concurrency']}", (r["throughput"], r["p50_ms"]), fontsize=7, color=color)
        ax.set(title=f"{query} search, end to end", xlabel="searches / s", ylabel="latency ms (p50 solid, p99 dotted)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- CLI -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="mimsearch search-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, required=True, help="repository with an installed export (copied)")
    p.add_argument("--catalog", type=Path, required=True, help="catalog: test-split gallery and query samples")
    p.add_argument("--gallery-size", type=int, default=100_000, help="items in the served gallery")
    p.add_argument(
        "--concurrency", type=perf._ints, default=SETTINGS.concurrencies, help="client concurrencies, e.g. 1,4"
    )
    p.add_argument("--interval-ms", type=int, default=SETTINGS.interval_ms, help="perf_analyzer window")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each end-to-end level")
    p.add_argument("--samples", type=int, default=16, help="distinct queries")
    p.add_argument("--work", type=Path, default=Path("artifacts/search_bench"), help="scratch folder")
    p.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/search"), help="results folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from client.search_client import SearchClient
    from mim.data.catalog import load_catalog
    from mim.serving.backends import limit_threads
    from mim.serving.gallery import encoders_model_id, install_gallery
    from mim.serving.repository import KNN_THREADS
    from mim.serving.server import TritonServer

    settings = dataclasses.replace(SETTINGS, concurrencies=args.concurrency, interval_ms=args.interval_ms)
    catalog = load_catalog(args.catalog)
    samples = perf.catalog_samples(catalog, args.samples)
    pa = perf.locate()
    repo = args.work / "model_repository"
    shutil.rmtree(repo, ignore_errors=True)
    # The knn model's installed versions stay behind: this run installs its own gallery.
    shutil.copytree(args.repository, repo, ignore=lambda d, names: [n for n in names if _is_knn_version(d, n)])
    model_id = encoders_model_id(repo)
    inputs = perf.prepare_inputs(PERF_MODELS, samples, None, args.work / "inputs")
    with TritonServer(repo, config="cpu", log_path=args.work / "tritonserver.log") as server:
        with SearchClient(server.grpc_url, timeout_s=120) as client:
            client.wait_ready(60, models=perf.ENSEMBLES)
            t = time.perf_counter()
            gallery_file = args.work / "gallery.safetensors"
            index = bench_gallery(client.embed_images, catalog, args.gallery_size, model_id, gallery_file)
            install_gallery(gallery_file, repo)
            client.reload_gallery()
            print(f"gallery: {len(index)} items installed and loaded in {time.perf_counter() - t:.1f} s")
        print("perf_analyzer:")
        sweep = perf.run_sweeps(pa, server.grpc_url, PERF_MODELS, inputs, settings, args.work / "logs")
        print("end to end (Python clients, one per thread):")
        index.search(index.embeddings()[:1].astype(np.float32), 1)  # loads the top-k libraries, then bound them
        limit_threads(KNN_THREADS)
        rows = end_to_end(server.grpc_url, index, samples, settings.concurrencies, args.seconds)
        server_command = shlex.join(server.command())
    meta = {
        "date": now_utc(),
        "command": "python -m benchmarks.search_bench " + shlex.join(argv),
        "server": server_command,
        "hardware": hardware(),
        "versions": versions(),
        "settings": dataclasses.asdict(settings),
        "gallery": {"items": len(index), "dim": index.dim, "k": K, "model_id": model_id},
        "inputs": perf.describe_inputs(inputs, samples),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    perf.write_outputs(sweep, args.out, meta)
    write_rows_csv(rows, args.out / "end_to_end.csv", E2E_FIELDS)
    write_json({**meta, "results": rows}, args.out / "end_to_end.json")
    plot_end_to_end(rows, args.out / "end_to_end.png")
    print(f"wrote {args.out}/perf.csv, perf.png, end_to_end.csv, end_to_end.png")
    return 1 if sweep.errors or any(r["errors"] for r in rows) else 0


def _is_knn_version(folder: str, name: str) -> bool:
    return Path(folder).name == contract.KNN and name.isdigit() and name != "1"


if __name__ == "__main__":
    raise SystemExit(main())
