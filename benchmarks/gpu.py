"""One script that measures the GPU path against its floors, in one run:

    python -m benchmarks.gpu --out benchmarks/results/gpu            # a CUDA machine, `base` size (README: GPU)
    python -m benchmarks.gpu --tiny --out /tmp/gpu-tiny              # any machine, tiny sizes (the tests run this)

1. towers: the `base` towers (ViT-B/16 at 224 px, a 77-token text transformer) through
   `mim.serving.torch_backend.TorchEncoder` in FP16 (the whole tower; L2 norm in FP32), eager against CUDA
   graphs, timed side by side per batch; items/s and the fraction of the compute floor (the tower's matmul
   FLOPs / --peak-tflops). Parity: FP16 against FP32 by cosine on real photos and titles. Also the cost of the
   one host copy the serving path keeps (pixels from the preprocessing model to the GPU), pageable and pinned.
2. knn: `mim.search.knn.KnnIndex` over 1M and 10M x 512 FP16 galleries, batch 1/32/256, k 10/100, against
   `torch.mm` + `torch.topk` on the same device memory and against the memory floor (one read of the gallery
   at --hbm-tbps); ids checked against an FP32 reference; at most 90 s of wall time, the cells that would not
   fit are listed as skipped (`benchmarks.knn_bench.bench_gpu`).
3. serving (when tritonserver and perf_analyzer are found, e.g. unpacked from `make gpu-bundle`): a random-init
   checkpoint of the size exported and served with the `gpu_torch` config (`torch` on a CPU), the three
   ensembles under perf_analyzer at each concurrency.

Writes towers.csv, copy.csv, knn.csv, perf.* (step 3), gpu.json and gpu.png into --out, and prints a short
table last. Without CUDA every step runs on the CPU in FP32 (CUDA graphs and FP16 rows say why they are
missing), which is how the test suite keeps this script from rotting.
"""

from __future__ import annotations

import argparse
import copy
import functools
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mim import contract, layout
from mim.search import ranking
from mim.serving.runtimes import GPU_TORCH, TORCH

from . import perf, towers_peer
from .common import hardware, markdown_table, now_utc, tower_flops, versions, write_json, write_rows_csv
from .knn_bench import time_side_by_side

GPU_CONFIG, CPU_CONFIG = GPU_TORCH, TORCH  # rows of mim.serving.runtimes.VARIANTS
# An H200's dense FP16 tensor-core rate and copy bandwidth (matmul and device-to-device copy microbenchmarks);
# the floors are these divided into the work. Pass --peak-tflops / --hbm-tbps for another GPU.
PEAK_TFLOPS = 790.0
HBM_TBPS = 4.3
# Product-like titles for the text tower and the served requests (the catalog's vocabulary, no catalog needed).
TITLES = [
    "blue zebra-striped ceramic mug",
    "red polka-dot cotton shirt",
    "green plaid leather shoe",
    "yellow striped canvas bag",
    "black checked wool scarf",
    "white floral linen dress",
    "orange dotted plastic bottle",
    "purple solid silk tie",
]


@dataclass(frozen=True)
class Plan:
    size: str = "base"
    tower_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    min_time: float = 0.3  # seconds of timing per side of each comparison
    min_reps: int = 3
    knn_n: tuple[int, ...] = (1_000_000, 10_000_000)
    knn_batches: tuple[int, ...] = (1, 32, 256)
    knn_k: tuple[int, ...] = (10, 100)
    knn_dim: int = 512
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    perf_interval_ms: int = 1000
    photos: int = 8
    # Wall-clock budget of each step (a lent GPU is held for minutes): a step stops starting new cells once its
    # budget is spent, and gpu.json says so. The defaults keep the three steps under 6 minutes on an H200.
    budget_s: tuple[tuple[str, float], ...] = (("towers", 130.0), ("knn", 90.0), ("serving", 130.0))
    deadline: float | None = None  # time.monotonic() at which the running step's budget ends (set by run_all)


def out_of_time(plan: Plan) -> bool:
    """True once the running step has spent its budget: loops check it before each new cell."""
    return plan.deadline is not None and time.monotonic() > plan.deadline


TINY = Plan(
    size="tiny",
    tower_batches=(1, 4),
    min_time=0.01,
    min_reps=2,
    knn_n=(3000,),
    knn_batches=(1, 8),
    knn_k=(10,),
    knn_dim=64,
    concurrencies=(1,),
    perf_interval_ms=500,
    photos=2,
    budget_s=(("towers", 120.0), ("knn", 120.0), ("serving", 240.0)),
)


def cuda_reason() -> str | None:
    from mim.serving.torch_backend import cuda_unavailable_reason

    return cuda_unavailable_reason()


# --- inputs ------------------------------------------------------------------------------------------------
def photos(n: int, folder: Path | None = None) -> list[tuple[str, bytes]]:
    """Real photos as encoded files: `folder`/*.jpg (what `make gpu-bundle` carries), else scikit-image's."""
    if folder is not None:
        files = sorted(folder.glob("*.jpg"))[:n]
        if not files:
            raise FileNotFoundError(f"no *.jpg photos in {folder}")
        return [(f.name, f.read_bytes()) for f in files]
    from .preprocess import skimage_photos

    return [(p.name, p.data) for p in skimage_photos(megapixels=(1.0,))[:n]]


def random_checkpoint(size: str, out: Path, seed: int = 0) -> Path:
    """A random-init checkpoint of a named size with a tokenizer trained on TITLES (no base weights exist)."""
    import torch

    from mim.model.checkpoint import save_checkpoint
    from mim.model.config import get_size
    from mim.model.tokenizer import TextTokenizer
    from mim.model.towers import MIMModel

    spec = get_size(size)
    tok = TextTokenizer.train(TITLES * 4, vocab_size=512, context_length=spec.preprocess.context_length)
    torch.manual_seed(seed)
    model = MIMModel(spec.model.with_vocab(tok.vocab_size)).eval()
    return save_checkpoint(out, model, spec.preprocess, tok, {"objective": "3tower", "step": 0, "random_init": True})


def real_inputs(ckpt, images: Sequence[bytes], texts: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Preprocessed photos and tokenized titles, as the serving path makes them."""
    from mim.model.preprocess import preprocess_image_bytes

    ids, mask = ckpt.tokenizer.encode_batch(list(texts))
    return {
        contract.IMAGE_ENCODER: {
            contract.PIXEL_VALUES.name: np.stack([preprocess_image_bytes(b, ckpt.pre_cfg) for b in images])
        },
        contract.TEXT_ENCODER: {contract.INPUT_IDS.name: ids, contract.ATTENTION_MASK.name: mask},
    }


# --- 1. towers ---------------------------------------------------------------------------------------------
def _random_feeds(io: contract.ModelIO, model_cfg, batch: int, device) -> dict:
    import torch

    from mim.contract import random_inputs

    return {k: torch.from_numpy(v).to(device) for k, v in random_inputs(io, model_cfg, batch, seed=batch).items()}


def bench_towers(plan: Plan, ckpt, inputs: dict, peak_tflops: float, log: Callable[[str], None]) -> tuple[list, list]:
    """Rows per (tower, batch): eager and graph items/s side by side, fraction of the floor, FP16 parity."""

    from mim.serving.torch_backend import TorchEncoder

    reason = cuda_reason()
    device = "cuda" if reason is None else "cpu"
    precision = "fp16" if reason is None else "fp32"
    rows = []
    towers = {contract.IMAGE_ENCODER: ckpt.model.image, contract.TEXT_ENCODER: ckpt.model.text}
    for name, module in towers.items():
        io = contract.MODELS[name]
        fp32 = TorchEncoder(copy.deepcopy(module), ckpt.model_cfg, io, device=device)
        eager = TorchEncoder(copy.deepcopy(module), ckpt.model_cfg, io, device=device, precision=precision)
        graphs = None
        if reason is None:
            graphs = TorchEncoder(
                copy.deepcopy(module),
                ckpt.model_cfg,
                io,
                device=device,
                precision=precision,
                graph_batch_sizes=plan.tower_batches,
            )
        parity = ranking.parity((graphs or eager)(inputs[name]), fp32(inputs[name])).min_cosine
        flops = tower_flops(ckpt.model_cfg, name)
        floor_ips = peak_tflops * 1e12 / flops
        log(
            f"  {name}: {flops / 1e9:.2f} GFLOP/item, floor {floor_ips:,.0f} items/s; "
            f"{precision} vs fp32 cosine {parity:.6f}"
        )
        for batch in plan.tower_batches:
            if out_of_time(plan):
                break
            feeds = _random_feeds(io, ckpt.model_cfg, batch, device)
            encoders = {"eager": eager} | ({"graphs": graphs} if graphs is not None else {})
            fns = {mode: functools.partial(_forward, enc, feeds) for mode, enc in encoders.items()}
            secs = time_side_by_side(fns, plan.min_time, plan.min_reps)
            row = {
                "tower": name,
                "device": device,
                "precision": precision,
                "batch": batch,
                "eager_items_per_s": batch / secs["eager"],
                "graphs_items_per_s": batch / secs["graphs"] if "graphs" in secs else None,
                "graphs_note": "" if graphs is not None else f"no CUDA graphs: {reason}",
                "floor_items_per_s": floor_ips,
                "gflop_per_item": flops / 1e9,
                "min_cosine_vs_fp32": parity,
            }
            best = max(v for v in (row["eager_items_per_s"], row["graphs_items_per_s"]) if v is not None)
            row["fraction_of_floor"] = best / floor_ips
            rows.append(row)
        del fp32, eager, graphs
    return rows, bench_copy(plan, ckpt.model_cfg, reason, log)


def _forward(encoder, feeds: dict) -> Any:
    import torch

    out = encoder.forward(feeds)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


def bench_copy(plan: Plan, model_cfg, reason: str | None, log) -> list[dict]:
    """Host -> GPU copy of a pixel batch (what the encoder does with the preprocessing model's host tensor)."""
    if reason is not None:
        log(f"  host->GPU copy not measured: {reason}")
        return []
    import torch

    s = model_cfg.vision.image_size
    rows = []
    for batch in plan.tower_batches:
        host = torch.randn(batch, 3, s, s)
        pinned = host.pin_memory()
        dev = torch.empty_like(host, device="cuda")

        fns = {"pageable": functools.partial(_copy, dev, host), "pinned": functools.partial(_copy, dev, pinned)}
        secs = time_side_by_side(fns, plan.min_time, plan.min_reps)
        nbytes = host.numel() * 4
        rows.append(
            {
                "batch": batch,
                "bytes": nbytes,
                "pageable_us_per_image": secs["pageable"] / batch * 1e6,
                "pinned_us_per_image": secs["pinned"] / batch * 1e6,
                "pageable_gb_per_s": nbytes / secs["pageable"] / 1e9,
                "pinned_gb_per_s": nbytes / secs["pinned"] / 1e9,
            }
        )
    return rows


def _copy(dst, src) -> None:
    import torch

    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()


# --- 2. kNN ------------------------------------------------------------------------------------------------
def bench_knn(plan: Plan, hbm_tbps: float, log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """`benchmarks.knn_bench.bench_gpu` over the plan's grid within its wall-time budget: rows per cell and
    method, and one summary per cell (ours against torch.topk(q @ g.T), fraction of the floor, or why skipped)."""
    from .knn_bench import bench_gpu

    # The step's own deadline (run_all sets it from plan.budget_s): bench_gpu skips what would not fit in it.
    budget = plan.deadline - time.monotonic() if plan.deadline is not None else dict(plan.budget_s).get("knn", 90.0)
    return bench_gpu(
        plan.knn_n,
        plan.knn_batches,
        plan.knn_k,
        plan.knn_dim,
        min_time=plan.min_time,
        min_reps=plan.min_reps,
        hbm_tbps=hbm_tbps,
        budget_s=budget,
        log=log,
    )


# --- 3. the served ensembles -------------------------------------------------------------------------------
def serving_unavailable_reason() -> str | None:
    """None when tritonserver and perf_analyzer can run here, else why not."""
    from mim.serving.server import TritonServerError, triton_paths

    try:
        triton_paths()
        perf.locate()
    except (TritonServerError, perf.PerfAnalyzerError) as e:
        return str(e).splitlines()[0]
    return None


def unavailable_reason(repository: Path | None = None) -> str | None:
    """None when the `gpu_torch` ensembles can be served here (benchmarks.run asks before its GPU step)."""
    reason = cuda_reason()
    if reason is not None:
        return reason
    if repository is not None:
        for model in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER):
            if not (repository / model / "configs" / f"{GPU_CONFIG}.pbtxt").is_file():
                return f"{model}/configs/{GPU_CONFIG}.pbtxt missing (mimsearch repository --write)"
            weights = layout.version_dir(repository, model) / layout.TORCH_WEIGHTS
            if not weights.is_file():
                return f"{weights.relative_to(repository)} missing: install an export (make engines)"
    return serving_unavailable_reason()


def run(
    pa: perf.PerfAnalyzer,
    repository: Path,
    input_files: dict[str, Path],
    settings: perf.PerfSettings,
    out: Path,
    *,
    config: str = GPU_CONFIG,
    log=print,
) -> perf.SweepResult:
    """Serve `repository` with `config` and sweep every model of `input_files`; writes <out>/perf.*."""
    from mim.serving.server import TritonServer

    out.mkdir(parents=True, exist_ok=True)
    with TritonServer(repository, config=config, log_path=out / "tritonserver.log") as server:
        result = perf.run_sweeps(pa, server.grpc_url, list(input_files), input_files, settings, out / "logs", log=log)
    write_perf(result, out, config)
    return result


def write_perf(result: perf.SweepResult, out: Path, config: str) -> None:
    """perf.csv and perf.json (plus the plot where matplotlib exists: a GPU machine may lack it, and the figures
    matter, not the plot)."""
    if _has_matplotlib():
        perf.write_outputs(result, out, {"config": config})
    else:
        write_rows_csv(result.rows, out / "perf.csv", perf.PERF_FIELDS)
        write_json({"config": config, "results": result.rows, "errors": result.errors}, out / "perf.json")


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def bench_serving(plan: Plan, ckpt_dir: Path, images, work: Path, out: Path, log) -> dict[str, Any]:
    """Serve `ckpt_dir`'s towers in torch from a freshly generated repository (no ONNX needed) with a gallery of
    the photos installed; check every ensemble against the in-process model; sweep the embedding ensembles
    under perf_analyzer; then make sure no python-backend stub died on the way."""
    from export.install import export_torch, install
    from mim.model.checkpoint import load_checkpoint
    from mim.serving.repository import write_repository
    from mim.serving.server import TritonServer, TritonServerError

    reason = serving_unavailable_reason()
    if reason is not None:
        log(f"  serving skipped: {reason}")
        return {"skipped": reason}
    config = GPU_CONFIG if cuda_reason() is None else CPU_CONFIG
    repo = work / "model_repository"
    if repo.exists():
        shutil.rmtree(repo)
    ck = load_checkpoint(ckpt_dir)
    write_repository(repo, ck.model_cfg, ck.pre_cfg)  # configs only; the export brings the artifacts
    export_torch(ckpt_dir, work / "export")
    install(work / "export", repo, onnx=False)
    install_photo_gallery(ck, images, repo, work)
    samples = [perf.Sample(data, TITLES[i % len(TITLES)], name) for i, (name, data) in enumerate(images)]
    inputs = perf.prepare_inputs(list(perf.ENSEMBLES), samples, repo, work / "inputs")
    settings = perf.PerfSettings(
        concurrencies=plan.concurrencies, interval_ms=plan.perf_interval_ms, stability_pct=30.0, max_trials=4
    )
    found: dict[str, Any] = {"config": config}
    with TritonServer(repo, config=config, log_path=out / "tritonserver.log") as server:
        found["parity"] = served_parity(server.grpc_url, ck, images, log)
        pa = perf.locate()
        result = perf.run_sweeps(
            pa, server.grpc_url, list(inputs), inputs, settings, out / "logs", log=log, deadline=plan.deadline
        )
        try:
            server.check_health()
        except TritonServerError as e:
            found["health"] = str(e)
            log(f"  {e}")
        found["stub_environment"] = stub_environment(server.log_text())
    found.update(rows=result.rows, errors=result.errors, commands=result.commands, skipped_models=result.skipped)
    write_perf(result, out, config)
    return found


def stub_environment(log_text: str) -> list[str]:
    """The distinct "numpy ... from ...; Python ..." lines the python-backend models print at `initialize`
    (mim.serving.python_backend.environment_line): which numpy each stub really imported."""
    lines = {line.split("] ", 1)[1] for line in log_text.splitlines() if line.startswith("[") and "] numpy " in line}
    return sorted(line.split("; sys.path")[0] for line in lines)


def install_photo_gallery(ck, images, repo: Path, work: Path, seed: int = 0) -> None:
    """A gallery of the photos themselves (id = position, in-process embeddings), padded with random unit rows
    (ids from 1000) up to the search models' default k, as the served `knn` model's: the search ensembles load,
    and a photo's search must find the photo first."""
    from mim.search.embedding import TorchEmbedder
    from mim.search.knn import KnnIndex
    from mim.serving.gallery import encoders_model_id, install_gallery

    photos = TorchEmbedder(ck).embed_images([b for _, b in images])
    pad = max(0, contract.DEFAULT_K - len(images))
    noise = np.random.default_rng(seed).standard_normal((pad, photos.shape[1])).astype(np.float32)
    vectors = np.concatenate([photos, noise / np.linalg.norm(noise, axis=1, keepdims=True)])
    ids = np.concatenate([np.arange(len(images)), 1000 + np.arange(pad)]).astype(np.int64)
    names = [n for n, _ in images] + [f"random-{i}" for i in range(pad)]
    meta = [{"title": TITLES[i % len(TITLES)], "category": "photo", "image": n} for i, n in enumerate(names)]
    index = KnnIndex(ck.model_cfg.embed_dim, device="cpu", model_id=encoders_model_id(repo))
    index.add(ids, vectors, meta)
    index.save(work / "photos.safetensors")
    install_gallery(work / "photos.safetensors", repo)


def served_parity(url: str, ck, images, log) -> dict[str, Any]:
    """The served ensembles against the in-process torch model on the same photos and titles: the smallest
    cosine per embedding ensemble, and for `search_image` the share of photos whose top result is the photo."""
    from client.search_client import SearchClient
    from mim.search.embedding import TorchEmbedder

    data = [b for _, b in images]
    titles = [TITLES[i % len(TITLES)] for i in range(len(data))]
    local = TorchEmbedder(ck)
    with SearchClient(url) as client:
        client.wait_ready()
        served = {
            contract.EMBED_IMAGE: client.embed_images(data),
            contract.EMBED_TEXT: client.embed_texts(titles),
            contract.EMBED_MULTIMODAL: client.embed_multimodal(data, titles),
        }
        hits = client.search_images(data, k=1)
    expected = {
        contract.EMBED_IMAGE: local.embed_images(data),
        contract.EMBED_TEXT: local.embed_texts(titles),
        contract.EMBED_MULTIMODAL: local.embed_multimodal(data, titles),
    }
    found: dict[str, Any] = {m: float(ranking.parity(served[m], expected[m]).min_cosine) for m in served}
    found[contract.SEARCH_IMAGE] = float(np.mean([bool(h) and h[0].id == i for i, h in enumerate(hits)]))
    log("  served vs in-process: " + ", ".join(f"{m} {v:.6f}" for m, v in found.items()))
    return found


# --- the run -----------------------------------------------------------------------------------------------
def plot(tower_rows: list[dict], knn_rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in sorted({r["tower"] for r in tower_rows}):
        rs = [r for r in tower_rows if r["tower"] == name]
        a.plot([r["batch"] for r in rs], [r["eager_items_per_s"] for r in rs], "o--", label=f"{name} eager")
        if rs[0]["graphs_items_per_s"] is not None:
            a.plot([r["batch"] for r in rs], [r["graphs_items_per_s"] for r in rs], "o-", label=f"{name} CUDA graphs")
        a.axhline(rs[0]["floor_items_per_s"], ls=":", color="grey")
    a.set(xscale="log", yscale="log", xlabel="batch", ylabel="items/s", title="towers (dotted: compute floor)")
    if tower_rows:
        a.legend(fontsize=7)
    for method in sorted({r["method"] for r in knn_rows}):
        rs = [r for r in knn_rows if r["method"] == method]
        b.plot(range(len(rs)), [r["ms"] for r in rs], "o-", label=method)
    b.set(yscale="log", xlabel="cell (n, batch, k)", ylabel="ms per search", title="kNN")
    if knn_rows:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(result: dict[str, Any]) -> str:
    towers = markdown_table(
        result["towers"],
        [
            ("tower", "tower"),
            ("precision", "prec"),
            ("batch", "batch"),
            ("eager_items_per_s", "eager/s"),
            ("graphs_items_per_s", "graphs/s"),
            ("fraction_of_floor", "of floor"),
            ("min_cosine_vs_fp32", "cos vs fp32"),
        ],
        digits=3,
    )
    knn = markdown_table(
        result["knn"],
        [
            ("n", "N"),
            ("batch", "batch"),
            ("k", "k"),
            ("method", "method"),
            ("ms", "ms"),
            ("fraction_of_floor", "of floor"),
            ("recall_vs_fp32", "recall"),
        ],
        digits=3,
    )
    lines = [f"GPU run {result['date']} on {result['device']}", "", towers, "", knn]
    serving = result.get("serving", {})
    if serving.get("rows"):
        lines += [
            "",
            markdown_table(
                serving["rows"],
                [
                    ("model", "model"),
                    ("concurrency", "c"),
                    ("throughput", "infer/s"),
                    ("p50_ms", "p50 ms"),
                    ("p99_ms", "p99 ms"),
                ],
            ),
        ]
    elif "skipped" in serving:
        lines += ["", f"serving: skipped ({serving['skipped']})"]
    if serving.get("parity"):
        lines += ["", "served vs in-process: " + ", ".join(f"{m} {v:.6f}" for m, v in serving["parity"].items())]
    for what in ("errors", "health"):
        if serving.get(what):
            lines += [f"serving {what}: {serving[what]}"]
    for step, why in result.get("cut_short", {}).items():
        lines += [f"{step}: {why}"]
    return "\n".join(lines)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({cuda_reason()})"


def run_all(
    plan: Plan,
    out: Path,
    *,
    checkpoint: Path | None = None,
    photo_dir: Path | None = None,
    peak_tflops: float = PEAK_TFLOPS,
    hbm_tbps: float = HBM_TBPS,
    steps: Sequence[str] = ("towers", "knn", "serving"),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from mim.model.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    ckpt_dir = checkpoint or random_checkpoint(plan.size, work / f"random-{plan.size}")
    ckpt = load_checkpoint(ckpt_dir)
    images = photos(plan.photos, photo_dir)
    result: dict[str, Any] = {
        "date": now_utc(),
        "command": "python -m benchmarks.gpu " + " ".join(sys.argv[1:]),
        "device": device_name(),
        "plan": asdict(plan),
        "checkpoint": str(ckpt_dir),
        "peak_tflops": peak_tflops,
        "hbm_tbps": hbm_tbps,
        "hardware": hardware(),
        "versions": versions(),
        "towers": [],
        "copy": [],
        "knn": [],
        "topk_choice": [],
        "seconds": {},
    }
    result.update(errors={}, tracebacks={}, cut_short={})

    # Each step gets the plan with its own deadline (Plan.deadline), which its loops check before each cell.
    def towers(p: Plan) -> None:
        inputs = real_inputs(ckpt, [b for _, b in images], TITLES)
        result["towers"], result["copy"] = bench_towers(p, ckpt, inputs, peak_tflops, log)
        # benchmarks.towers_peer: a CLIP with the plan's image tower against transformers on the same weights.
        result["towers_peer"] = towers_peer.for_gpu_script(
            p.size, p.tower_batches, p.min_time, p.min_reps, peak_tflops, log, p.deadline, [b for _, b in images]
        )

    def knn(p: Plan) -> None:
        result["knn"], result["topk_choice"] = bench_knn(p, hbm_tbps, log)

    def serving(p: Plan) -> None:
        result["serving"] = bench_serving(p, ckpt_dir, images, work, out, log)

    # One step failing (a GPU machine is lent for minutes) must not lose the others' figures: each step's
    # error and traceback are recorded and the files are rewritten after every step.
    budgets = dict(plan.budget_s)
    for name, step in (("towers", towers), ("knn", knn), ("serving", serving)):
        if name not in steps:
            continue
        log(f"== {name} (budget {budgets.get(name, 0):.0f} s)")
        t = time.perf_counter()
        step_plan = replace(plan, deadline=time.monotonic() + budgets[name]) if name in budgets else plan
        try:
            step(step_plan)
        except Exception as e:  # recorded in gpu.json and printed; the next step still runs
            log(f"  {name} failed: {type(e).__name__}: {e}")
            result["errors"][name] = f"{type(e).__name__}: {e}"
            result["tracebacks"][name] = traceback.format_exc()
        if out_of_time(step_plan):
            result["cut_short"][name] = f"budget of {budgets[name]:.0f} s spent; cells after it were not run"
            log(f"  {name}: {result['cut_short'][name]}")
        result["seconds"][name] = time.perf_counter() - t
        result["seconds"]["total"] = time.perf_counter() - t0
        _write(result, out)
    if _has_matplotlib():
        plot(result["towers"], result["knn"], out / "gpu.png")
    return result


def _write(result: dict[str, Any], out: Path) -> None:
    write_rows_csv(result["towers"], out / "towers.csv")
    write_rows_csv(result["copy"], out / "copy.csv")
    write_rows_csv(result["knn"], out / "knn.csv")
    write_json(result, out / "gpu.json")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"), help="output folder")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: seconds on a CPU (what the tests run)")
    p.add_argument("--checkpoint", type=Path, help="use this checkpoint's towers instead of a random-init one")
    p.add_argument("--photos", type=Path, help="folder of *.jpg photos (default: scikit-image's)")
    p.add_argument("--steps", default="towers,knn,serving", help="comma-separated subset of towers,knn,serving")
    p.add_argument("--tower-batches", type=_ints, help="override the tower batch sizes")
    p.add_argument("--knn-n", type=_ints, help="override the gallery sizes")
    p.add_argument("--concurrency", type=_ints, help="override the perf_analyzer concurrencies")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense FP16 matmul rate of the GPU")
    p.add_argument("--hbm-tbps", type=float, default=HBM_TBPS, help="memory bandwidth of the GPU")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = TINY if args.tiny else Plan()
    if args.tower_batches:
        plan = replace(plan, tower_batches=args.tower_batches)
    if args.knn_n:
        plan = replace(plan, knn_n=args.knn_n)
    if args.concurrency:
        plan = replace(plan, concurrencies=args.concurrency)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - {"towers", "knn", "serving"}
    if unknown:
        print(f"error: --steps {sorted(unknown)}; expected some of towers,knn,serving", file=sys.stderr)
        return 2
    result = run_all(
        plan,
        args.out,
        checkpoint=args.checkpoint,
        photo_dir=args.photos,
        peak_tflops=args.peak_tflops,
        hbm_tbps=args.hbm_tbps,
        steps=steps,
    )
    print(summary(result))
    for step, error in result["errors"].items():
        print(f"{step} FAILED: {error}")
    print(f"\n{result['seconds'].get('total', 0):.0f} s; files in {args.out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
