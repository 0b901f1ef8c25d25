"""Exact top-k: mim.search.knn.KnnIndex (CPU, float32 results) against faiss-cpu IndexFlatIP on the same data.

For every (N, d, batch, k) our CPU engines (NumPy, the default, with its bfloat16 candidate search where it
applies; the same in float32 alone, `prefilter="off"`; and torch) and faiss search the same query batch in
alternating rounds, each round one untimed and three timed calls per engine, until each has run for --min-time
seconds (and at least min_reps calls); queries/s = batch / median call time. The float32 product
alone (`product_only`), timed in the same rounds, is the floor of our float32 engine; the bfloat16 candidate
search (`mim.search.prefilter`) runs the same product in bfloat16 at about twice the rate and can go below it.
Results are checked against each other "up to ties": at every rank the two returned ids must carry the same
exact (float64) score, so the only swaps allowed are among equal scores. With a usable GPU the same grid also
times the CUDA path, a torch.mm + torch.topk baseline, and the memory floor (fp16 gallery bytes / 4.3 TB/s,
the H200's HBM bandwidth).

Writes <out>/knn.csv, <out>/knn.json (rows + hardware, versions, threads, date, command) and <out>/knn.png.

    python -m benchmarks.knn_bench --quick      # CI smoke: small N, < 60 s on 2 cores
    python -m benchmarks.knn_bench              # full grid: N up to 1e6, d 256/512 (~GBs of RAM, minutes)

`bench_gpu` is the GPU table (1M and 10M x 512 FP16 against torch.topk(q @ g.T) on the same memory, an FP32
reference and the memory floor, within a wall-time budget); `python -m benchmarks.gpu --steps knn` runs it.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mim.commandline import CommandParser
from mim.search.knn import TOPK_METHODS, KnnIndex, cuda_unavailable_reason, numpy_topk_method, prefilter_gains

HBM_BYTES_PER_S = 4.3e12  # H200 HBM3e peak; an exact scan can't beat reading the fp16 gallery once per batch
SCORE_ATOL = 1e-5  # fp32 vs fp64 inner products of unit vectors differ by ~1e-7
GPU_SCORE_ATOL = 2e-3  # fp16 storage rounds each embedding entry by up to 2^-11 relative


@dataclass(frozen=True)
class Grid:
    sizes: tuple[int, ...]
    dims: tuple[int, ...]
    batches: tuple[int, ...]
    ks: tuple[int, ...]
    min_time: float  # seconds of timed calls per engine per combination
    min_reps: int


QUICK = Grid(sizes=(5_000, 20_000), dims=(256,), batches=(1, 32, 256), ks=(10, 100), min_time=0.15, min_reps=3)
FULL = Grid(
    sizes=(10_000, 100_000, 1_000_000),
    dims=(256, 512),
    batches=(1, 32, 256),
    ks=(10, 100),
    min_time=1.0,
    min_reps=2,
)

CSV_FIELDS = [
    "n",
    "d",
    "batch",
    "k",
    "ours_qps",
    "faiss_qps",
    "ratio_ours_over_faiss",
    "torch_engine_qps",
    "fp32_engine_qps",
    "ours_prefilter",
    "product_qps",
    "ids_match",
    "exact_id_frac",
    "ours_topk",
    "gpu_qps",
    "torch_gpu_qps",
    "floor_qps",
    "gpu_ids_match",
]


# ---- environment -----------------------------------------------------------------------------------------


def set_threads(n: int) -> dict:
    """Give faiss (OpenMP), NumPy's OpenBLAS and torch (our default top-k) the same thread count."""
    import faiss
    import torch

    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    info = {"requested": n, "faiss_omp": faiss.omp_get_max_threads(), "torch": torch.get_num_threads()}
    info["numpy_openblas"] = _set_numpy_blas_threads(n)
    return info


def _set_numpy_blas_threads(n: int) -> int | str:
    """NumPy wheels bundle OpenBLAS under numpy.libs; set its pool size through its C API (no threadpoolctl)."""
    libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib in sorted(libdir.glob("libopenblas*.so*")):
        handle = ctypes.CDLL(str(lib))  # already loaded by numpy: dlopen returns the same instance
        for suffix in ("64_", "_64_", ""):
            setter = getattr(handle, f"openblas_set_num_threads{suffix}", None)
            getter = getattr(handle, f"openblas_get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                setter(ctypes.c_int(n))
                return int(getter())
    return "unknown (no bundled OpenBLAS found; set OMP_NUM_THREADS/OPENBLAS_NUM_THREADS before starting)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(argv: list[str], threads: dict, gpu_reason: str | None) -> dict:
    import faiss
    import torch

    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.knn_bench", *argv]),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "faiss": faiss.__version__,
            "torch": torch.__version__,
        },
        "platform": platform.platform(),
        "gpu": {"usable": gpu_reason is None, "reason": gpu_reason},
        # Timings are only as good as the machine is idle: record its load (1, 5, 15 min averages).
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if gpu_reason is None:
        env["gpu"]["name"] = torch.cuda.get_device_name()
    return env


# ---- measurement -----------------------------------------------------------------------------------------


def random_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# Timed calls per engine and round on the CPU grid, after one untimed call (`time_side_by_side`).
CPU_ROUND_CALLS = 3


def time_side_by_side(
    fns: dict[str, Callable[[], object]], min_time: float, min_reps: int, round_calls: int = 0
) -> dict[str, float]:
    """Median seconds per call for each fn, timed in alternating rounds so that every engine sees the same
    machine state (cache, thermal, background load). The median resists the outliers a shared machine produces
    (a descheduled thread stalls a whole parallel region).

    round_calls 0: one warm-up call each, then one timed call per fn and round. round_calls n: each round makes
    one untimed call of a fn, then n timed ones. The first call after another library's pays for that library's
    threads, which spin on the cores for a while after its call: faiss's OpenMP pool cost our next 5k-row search
    0.2 ms, as much as the search itself, so the CPU kNN grid times each engine after its own call."""
    if not round_calls:
        for fn in fns.values():
            fn()
    calls: dict[str, list[float]] = {name: [] for name in fns}
    while min(len(c) for c in calls.values()) < min_reps or min(sum(c) for c in calls.values()) < min_time:
        for name, fn in fns.items():
            if round_calls:
                fn()
            for _ in range(max(1, round_calls)):
                t0 = time.perf_counter()
                fn()
                calls[name].append(time.perf_counter() - t0)
    return {name: float(np.median(c)) for name, c in calls.items()}


def compare_up_to_ties(gallery: np.ndarray, q: np.ndarray, ids_a, ids_b, atol: float) -> tuple[bool, float]:
    """(same up to ties, fraction of identical ids). Rows of ids_a/ids_b are gallery row numbers, best first."""
    q64 = q.astype(np.float64)
    true_a = np.einsum("qd,qkd->qk", q64, gallery[ids_a].astype(np.float64))
    true_b = np.einsum("qd,qkd->qk", q64, gallery[ids_b].astype(np.float64))
    unique = all(len(set(r)) == len(r) for r in np.asarray(ids_a).tolist())
    match = unique and bool(np.allclose(true_a, true_b, atol=atol, rtol=0))
    return match, float(np.mean(np.asarray(ids_a) == np.asarray(ids_b)))


class GpuSide:
    """KnnIndex on CUDA vs torch.mm + torch.topk vs the HBM floor, for one gallery. Only built when CUDA is
    usable; the gallery is copied to the device once per (N, d)."""

    def __init__(self, gallery: np.ndarray, ids: np.ndarray, topk: str) -> None:
        self.gallery = gallery
        self.index = KnnIndex(gallery.shape[1], device="cuda", topk=topk)
        self.index.add(ids, gallery)
        self.tg = self.index._emb  # (N, d) fp16: the baseline runs on the index's own device memory

    def time(self, q: np.ndarray, k: int, grid: Grid, cpu_ids: np.ndarray) -> dict:
        import torch

        fns: dict[str, Callable] = {"gpu": lambda: self.index.search(q, k)}  # returns host arrays: synchronous
        if self.tg is not None:
            tq = torch.as_tensor(q, device="cuda").half()

            def torch_search():
                out = torch.topk(tq @ self.tg.T, k, dim=1)  # (B, N) fp16 scores
                torch.cuda.synchronize()
                return out

            fns["torch_gpu"] = torch_search
        secs = time_side_by_side(fns, grid.min_time, grid.min_reps)
        floor_s = self.gallery.shape[0] * self.gallery.shape[1] * 2 / HBM_BYTES_PER_S  # one fp16 gallery read
        _, got = self.index.search(q, k)
        return {
            "gpu_qps": len(q) / secs["gpu"],
            "torch_gpu_qps": len(q) / secs["torch_gpu"] if "torch_gpu" in secs else None,
            "floor_qps": len(q) / floor_s,
            # fp16 storage may swap near-ties that the fp32 CPU path orders the other way: looser tolerance
            "gpu_ids_match": compare_up_to_ties(self.gallery, q, got, cpu_ids, GPU_SCORE_ATOL)[0],
        }


def product_only(index: KnnIndex, gallery: np.ndarray, q: np.ndarray) -> Callable[[], None]:
    """The float32 product q @ gallery.T alone, over the index's own tiles into one kept buffer, on all BLAS
    threads: what every exact engine here computes, so its rate is the CPU's floor for an exact search."""
    step = min(gallery.shape[0], index._tile_rows(q.shape[0]))
    buf = np.empty((q.shape[0], step), dtype=np.float32)

    def run() -> None:
        for start in range(0, gallery.shape[0], step):
            tile = gallery[start : start + step]
            np.matmul(q, tile.T, out=buf[:, : tile.shape[0]])

    return run


def run_grid(grid: Grid, topk: str, seed: int, gpu_reason: str | None) -> list[dict]:
    import faiss

    rng = np.random.default_rng(seed)
    rows = []
    for n in grid.sizes:
        for d in grid.dims:
            gallery = random_unit(rng, n, d)  # (N, d) fp32
            ids = np.arange(n, dtype=np.int64)  # = faiss's sequential labels, so results compare directly
            ours = KnnIndex(d, device="cpu", topk=topk)  # the default CPU engine (NumPy)
            ours.add(ids, gallery)
            # The torch engine on the same gallery, timed beside it: the measurement behind the default.
            ours_torch = KnnIndex(d, device="cpu", topk=topk, backend="torch")
            ours_torch.add(ids, gallery)
            ours_fp32 = KnnIndex(d, device="cpu", topk=topk, prefilter="off")  # no bfloat16 candidates
            ours_fp32.add(ids, gallery)
            flat = faiss.IndexFlatIP(d)
            flat.add(gallery)
            gpu = GpuSide(gallery, ids, topk) if gpu_reason is None else None
            for batch in grid.batches:
                q = random_unit(rng, batch, d)
                for k in grid.ks:
                    secs = time_side_by_side(
                        {
                            "ours": lambda ours=ours, q=q, k=k: ours.search(q, k),
                            "faiss": lambda flat=flat, q=q, k=k: flat.search(q, k),
                            "ours_torch": lambda ours_torch=ours_torch, q=q, k=k: ours_torch.search(q, k),
                            "ours_fp32": lambda ours_fp32=ours_fp32, q=q, k=k: ours_fp32.search(q, k),
                            "product": product_only(ours, gallery, q),
                        },
                        grid.min_time,
                        grid.min_reps,
                        round_calls=CPU_ROUND_CALLS,
                    )
                    _, our_ids = ours.search(q, k)
                    _, faiss_ids = flat.search(q, k)
                    match, exact = compare_up_to_ties(gallery, q, our_ids, faiss_ids, SCORE_ATOL)
                    row = {
                        "n": n,
                        "d": d,
                        "batch": batch,
                        "k": k,
                        "ours_qps": batch / secs["ours"],
                        "faiss_qps": batch / secs["faiss"],
                        "ratio_ours_over_faiss": secs["faiss"] / secs["ours"],
                        "torch_engine_qps": batch / secs["ours_torch"],
                        "fp32_engine_qps": batch / secs["ours_fp32"],
                        "ours_prefilter": ours.prefilter == "bf16"
                        or (ours.prefilter == "auto" and prefilter_gains(batch, n, k)),
                        "product_qps": batch / secs["product"],
                        "ids_match": match,
                        "exact_id_frac": exact,
                        # the selector of the widest score tile of this search (NumPy engine)
                        "ours_topk": topk
                        if topk != "auto"
                        else numpy_topk_method(batch, min(n, ours._tile_rows(batch)), k + 1),
                        "gpu_qps": None,
                        "torch_gpu_qps": None,
                        "floor_qps": None,
                        "gpu_ids_match": None,
                    }
                    if gpu is not None:
                        row.update(gpu.time(q, k, grid, our_ids))
                    rows.append(row)
                    print(_format_row(row), flush=True)
            del ours, ours_torch, ours_fp32, flat, gpu, gallery
    return rows


# ---- the GPU table ---------------------------------------------------------------------------------------

GPU_BUDGET_S = 90.0  # wall time of the whole GPU kNN table: it has to fit a GPU lent for minutes
# A second tiling timed beside the default (whole gallery per product up to 1 GiB of scores): 1M-row tiles, so
# that the GPU table itself says whether a single selection over 10M scores or ten over 1M is faster.
GPU_TILE_ROWS_VARIANT = 1 << 20


def device_gallery(n: int, dim: int, device: str, dtype, seed: int = 0, chunk: int = 1 << 20):
    """(n, dim) random unit rows made on `device` chunk by chunk (no host copy of 10M rows), in `dtype`."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty((n, dim), dtype=dtype, device=device)
    for a in range(0, n, chunk):
        x = torch.randn((min(chunk, n - a), dim), generator=gen, device=device)
        out[a : a + len(x)] = (x / x.norm(dim=1, keepdim=True)).to(dtype)
    return out


def fp32_reference_topk(gallery, queries, k: int, chunk: int = 1 << 20):
    """Rows (B, k) of the FP32 top-k over the stored gallery (upcast chunk by chunk), queries in FP32."""
    import torch

    best_s = best_i = None
    for a in range(0, gallery.shape[0], chunk):
        s = queries.float() @ gallery[a : a + chunk].float().T
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        i = i + a
        if best_s is not None:
            v, j = torch.topk(torch.cat([best_s, v], 1), k, dim=1)
            i = torch.gather(torch.cat([best_i, i], 1), 1, j)
        best_s, best_i = v, i
    return best_i.cpu().numpy()


def bench_gpu(
    sizes: tuple[int, ...] = (1_000_000, 10_000_000),
    batches: tuple[int, ...] = (1, 32, 256),
    ks: tuple[int, ...] = (10, 100),
    dim: int = 512,
    *,
    min_time: float = 0.2,
    min_reps: int = 3,
    hbm_tbps: float = 4.3,
    budget_s: float = GPU_BUDGET_S,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], list[dict]]:
    """KnnIndex on the GPU (FP16 gallery) per cell (N, batch, k), side by side with torch.topk(q @ g.T) on
    the SAME device memory, ids against an FP32 reference, and the fraction of the memory floor (one read of
    the gallery at `hbm_tbps`). Two ways in for our queries: already on the device (what the served model
    gets from the encoders) and from host NumPy, and with `GPU_TILE_ROWS_VARIANT`-row tiles. Without CUDA it
    runs the same on the CPU in FP32 (no floor).

    The whole table stays within `budget_s` of wall time: a gallery or a cell that would not fit is skipped
    and recorded as such. Returns (rows: one per cell and method, cells: one summary per cell)."""
    import torch

    from mim.search.knn import KnnIndex, cuda_unavailable_reason

    t0 = time.perf_counter()
    reason = cuda_unavailable_reason()
    device = "cuda" if reason is None else "cpu"
    if reason is not None:
        log(f"  kNN on the CPU (FP32): {reason}")
    dtype = torch.float16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows: list[dict] = []
    cells: list[dict] = []
    last_build_per_row = last_cell = 0.0
    for n in sizes:
        grid = [(b, k) for b in batches for k in ks]
        left = budget_s - (time.perf_counter() - t0)
        if last_build_per_row * n + len(grid) * last_cell > left:
            cells += [_skipped(n, b, k, f"the {budget_s:.0f} s budget would run out") for b, k in grid]
            log(f"  n={n:,}: skipped, {left:.0f} s of the budget left")
            continue
        t_build = time.perf_counter()
        index = KnnIndex(dim, device=device, backend="torch")  # its gallery is the torch baseline's memory
        index.add(np.arange(n, dtype=np.int64), device_gallery(n, dim, device, dtype))
        gallery = index._emb  # (n, dim) in the index's storage: the baseline reads the same memory
        sync()
        last_build_per_row = (time.perf_counter() - t_build) / n
        floor_ms = n * dim * 2 / (hbm_tbps * 1e12) * 1e3 if device == "cuda" else None
        for b, k in grid:
            if (time.perf_counter() - t0) + 1.5 * last_cell > budget_s:
                cells.append(_skipped(n, b, k, f"the {budget_s:.0f} s budget ran out"))
                continue
            t_cell = time.perf_counter()
            q = random_unit(np.random.default_rng(b), b, dim)  # (b, dim) float32 on the host
            tq = torch.from_numpy(q).to(device)
            tq_store = tq.to(dtype)
            ref = fp32_reference_topk(gallery, tq, k)

            def torch_topk(tq_store=tq_store, k=k, gallery=gallery):
                return torch.topk(tq_store @ gallery.T, k, dim=1)[1].cpu()  # scores in the storage dtype

            def ours_tiles(tq=tq, k=k, index=index):
                index.chunk_size = GPU_TILE_ROWS_VARIANT
                try:
                    return index.search(tq, k)
                finally:
                    index.chunk_size = None

            fns = {
                "ours": lambda tq=tq, k=k, index=index: index.search(tq, k),
                "ours_host_queries": lambda q=q, k=k, index=index: index.search(q, k),
                "ours_1m_row_tiles": ours_tiles,
                "torch_mm_topk": torch_topk,
            }
            secs = time_side_by_side(fns, min_time, min_reps)
            got = {"ours": index.search(tq, k)[1], "ours_host_queries": index.search(q, k)[1]}
            got["ours_1m_row_tiles"] = ours_tiles()[1]
            got["torch_mm_topk"] = torch_topk().numpy()
            for method, sec in secs.items():
                ids = got[method]
                rows.append(
                    {
                        "n": n,
                        "batch": b,
                        "k": k,
                        "method": method,
                        "device": device,
                        "ms": sec * 1e3,
                        "queries_per_s": b / sec,
                        "floor_ms": floor_ms,
                        "fraction_of_floor": floor_ms / (sec * 1e3) if floor_ms else None,
                        "recall_vs_fp32": float(np.mean([len(set(a) & set(r)) / k for a, r in zip(ids, ref)])),
                        "same_ids_as_fp32": float(np.mean(ids == ref)),
                        "speedup_vs_torch": secs["torch_mm_topk"] / sec,
                    }
                )
            last_cell = time.perf_counter() - t_cell
            cells.append(
                {
                    "n": n,
                    "batch": b,
                    "k": k,
                    "status": "measured",
                    "ours_ms": secs["ours"] * 1e3,
                    "torch_ms": secs["torch_mm_topk"] * 1e3,
                    "ours_over_torch": secs["torch_mm_topk"] / secs["ours"],
                    "fraction_of_floor": floor_ms / (secs["ours"] * 1e3) if floor_ms else None,
                }
            )
            log(
                f"  n={n:,} batch={b} k={k}: "
                + ", ".join(f"{m} {s * 1e3:.3f} ms" for m, s in secs.items())
                + (f"; floor {floor_ms:.3f} ms" if floor_ms else "")
            )
        del index, gallery
        if device == "cuda":
            torch.cuda.empty_cache()
    log(f"  kNN table: {time.perf_counter() - t0:.1f} s of {budget_s:.0f} s")
    return rows, cells


def _skipped(n: int, batch: int, k: int, why: str) -> dict:
    return {"n": n, "batch": batch, "k": k, "status": f"skipped: {why}"}


# ---- output ----------------------------------------------------------------------------------------------


def _format_row(r: dict) -> str:
    line = (
        f"N={r['n']:>8} d={r['d']:>4} batch={r['batch']:>4} k={r['k']:>4}  ours {r['ours_qps']:>10.1f} q/s  "
        f"faiss {r['faiss_qps']:>10.1f} q/s  ratio {r['ratio_ours_over_faiss']:5.2f}  "
        f"torch engine {r['torch_engine_qps']:>10.1f} q/s  float32 alone {r['fp32_engine_qps']:>10.1f} q/s  "
        f"(bf16 {'on' if r['ours_prefilter'] else 'off'})  product alone {r['product_qps']:>10.1f} q/s  "
        f"match={'yes' if r['ids_match'] else 'NO'} exact={r['exact_id_frac']:.3f}"
    )
    if r.get("gpu_qps") is not None:
        line += f"  gpu {r['gpu_qps']:.0f} q/s floor {r['floor_qps']:.0f} q/s"
        if r.get("torch_gpu_qps") is not None:
            line += f" torch {r['torch_gpu_qps']:.0f} q/s"
    return line


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_FIELDS})


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["d"], r["k"]) for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (d, k) in zip(axes[0], panels):
        for color, b in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], batches):
            sel = sorted((r for r in rows if (r["d"], r["k"], r["batch"]) == (d, k, b)), key=lambda r: r["n"])
            ns = [r["n"] for r in sel]
            ax.plot(ns, [r["ours_qps"] for r in sel], "o-", color=color, label=f"ours b={b}")
            ax.plot(ns, [r["faiss_qps"] for r in sel], "s--", color=color, label=f"faiss b={b}")
            if any(r.get("gpu_qps") for r in sel):
                ax.plot(ns, [r["gpu_qps"] for r in sel], "^:", color=color, label=f"ours GPU b={b}")
        ax.set(xscale="log", yscale="log", xlabel="gallery size N", ylabel="queries / s", title=f"d={d}, k={k}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- entry point -----------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(v)) for v in text.split(","))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = CommandParser(prog="mimsearch knn-bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid for CI (< 60 s on 2 cores)")
    p.add_argument("--out", type=Path, default=Path("artifacts/benchmarks"), help="output directory")
    p.add_argument("--sizes", type=_ints, help="override gallery sizes, e.g. 1e4,1e5")
    p.add_argument("--dims", type=_ints, help="override embedding dims, e.g. 256,512")
    p.add_argument("--batches", type=_ints, help="override query batch sizes, e.g. 1,32,256")
    p.add_argument("--ks", type=_ints, help="override k values, e.g. 10,100")
    p.add_argument("--min-time", type=float, help="timed seconds per engine per combination")
    p.add_argument("--threads", type=int, default=None, help="threads for faiss, OpenBLAS and torch (default: all)")
    p.add_argument("--topk", default="auto", help=f"KnnIndex top-k selector (auto|{'|'.join(sorted(TOPK_METHODS))})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random galleries and queries")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    grid = Grid(
        sizes=args.sizes or base.sizes,
        dims=args.dims or base.dims,
        batches=args.batches or base.batches,
        ks=args.ks or base.ks,
        min_time=base.min_time if args.min_time is None else args.min_time,
        min_reps=base.min_reps,
    )
    n_threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    threads = set_threads(n_threads)
    gpu_reason = cuda_unavailable_reason()
    if gpu_reason is not None:
        print(f"GPU timings (CUDA path, torch.mm+topk, HBM floor) skipped: {gpu_reason}")
    print(f"threads: {threads}")

    rows = run_grid(grid, args.topk, args.seed, gpu_reason)

    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "knn.csv")
    report = {**environment(argv, threads, gpu_reason), "grid": grid.__dict__, "results": rows}
    (args.out / "knn.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out / "knn.png")
    ok = all(r["ids_match"] for r in rows) and all(r["gpu_ids_match"] in (None, True) for r in rows)
    print(f"wrote {args.out / 'knn.csv'}, knn.json, knn.png; results {'match' if ok else 'DO NOT match'} faiss")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
