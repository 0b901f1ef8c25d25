"""GPU timing of the towers in torch FP16 (optionally replayed as CUDA graphs) against the compute floor.

    python -m export.bench_towers [--size base] [--batches 1,2,4,...,256] [--no-cuda-graphs] [--json out.json]

For each batch size: ms per batch, items/s, achieved TFLOP/s and the fraction of the GPU's dense FP16 peak
(`--peak-tflops`, 790 for an H200). The FLOP count is analytic (matmuls only, 2 FLOP per MAC): about 35 GFLOP
per 224 px image for ViT-B/16, so an H200 tops out near 22k images/s. Before timing, FP16 outputs are
compared with FP32 ones on random inputs (cosine >= 0.999 per row, as the exported FP16 artifacts are).

The weights are random-init (timing and FP16 numerics do not depend on training). Without CUDA this prints
why and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mim import contract
from mim.atomic import atomic_write_text
from mim.commandline import CommandParser
from mim.model.config import ModelConfig, TextConfig, VisionConfig, get_size
from mim.model.towers import MIMModel
from mim.search.ranking import parity

from .onnx_export import FP16_MIN_COSINE, random_inputs

H200_FP16_TFLOPS = 790.0  # dense FP16/BF16 tensor-core peak of an H200 SXM
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


# --- FLOPs -------------------------------------------------------------------------------------------------
def _transformer_macs(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    """MACs of `layers` pre-norm blocks on `tokens` tokens: qkv + out projections (4 T W^2), scores and
    weighted sum (2 T^2 W), MLP (2 r T W^2). Norms, softmax and GELU are not matmul work and are left out."""
    per_block = 4 * tokens * width**2 + 2 * tokens**2 * width + 2 * int(mlp_ratio * width) * tokens * width
    return layers * per_block


def image_flops(v: VisionConfig, embed_dim: int) -> int:
    """FLOPs per image: patch embedding conv + transformer on patches + [CLS] + projection."""
    patch = v.num_patches * v.width * 3 * v.patch_size**2
    return 2 * (patch + _transformer_macs(v.num_patches + 1, v.width, v.layers, v.mlp_ratio) + v.width * embed_dim)


def text_flops(t: TextConfig, embed_dim: int) -> int:
    """FLOPs per text at full context length (the tower always runs the padded context)."""
    return 2 * (_transformer_macs(t.context_length, t.width, t.layers, t.mlp_ratio) + t.width * embed_dim)


# --- timing ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    tower: str
    batch: int
    ms_per_batch: float
    items_per_s: float
    tflops: float
    fraction_of_peak: float
    floor_items_per_s: float


def _callable(
    module: torch.nn.Module, inputs: dict[str, torch.Tensor], cuda_graphs: bool
) -> Callable[[], torch.Tensor]:
    """A zero-argument function running the module on fixed inputs: the eager call, or a CUDA graph replay
    (removes the per-kernel launch overhead that dominates small batches)."""
    if not cuda_graphs:
        return lambda: module(**inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream before capture, as the CUDA graphs docs ask
        for _ in range(3):
            module(**inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = module(**inputs)

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def time_call(fn: Callable[[], torch.Tensor], *, warmup: int, iters: int) -> float:
    """Seconds per call, measured with CUDA events after `warmup` calls and a device sync."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def cuda_inputs(io: contract.ModelIO, cfg: ModelConfig, batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, arr in random_inputs(io, cfg, batch, seed=batch).items():
        t = torch.from_numpy(arr).cuda()
        out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def fp16_parity(fp32: torch.nn.Module, fp16: torch.nn.Module, io: contract.ModelIO, cfg: ModelConfig) -> dict:
    """Per-row cosine of the FP16 tower's output to the FP32 tower's on random inputs (batch 7)."""
    x32 = cuda_inputs(io, cfg, 7, torch.float32)
    x16 = {k: (v.half() if v.is_floating_point() else v) for k, v in x32.items()}
    ref, got = fp32(**x32).float().cpu().numpy(), fp16(**x16).float().cpu().numpy()
    p = parity(got, ref)
    return {"min_cosine": p.min_cosine, "max_abs_diff": p.max_abs_diff, "finite": bool(np.isfinite(got).all())}


def bench(args: argparse.Namespace) -> tuple[list[Row], dict]:
    cfg = get_size(args.size).model
    torch.manual_seed(0)
    model32 = MIMModel(cfg).eval().cuda()
    model16 = copy.deepcopy(model32).half()
    towers = {
        contract.IMAGE_ENCODER: (model32.image, model16.image, image_flops(cfg.vision, cfg.embed_dim)),
        contract.TEXT_ENCODER: (model32.text, model16.text, text_flops(cfg.text, cfg.embed_dim)),
    }
    if args.tower != "both":
        towers = {args.tower: towers[args.tower]}
    peak = args.peak_tflops * 1e12
    rows, parity = [], {}
    with torch.no_grad():
        for name, (m32, m16, flops) in towers.items():
            io = contract.MODELS[name]
            parity[name] = fp16_parity(m32, m16, io, cfg)
            if not parity[name]["finite"] or parity[name]["min_cosine"] < FP16_MIN_COSINE:
                raise SystemExit(f"{name}: FP16 vs FP32 cosine {parity[name]['min_cosine']:.5f} < {FP16_MIN_COSINE}")
            for b in args.batches:
                fn = _callable(m16, cuda_inputs(io, cfg, b, torch.float16), args.cuda_graphs)
                sec = time_call(fn, warmup=args.warmup, iters=args.iters)
                rate = b / sec
                rows.append(Row(name, b, sec * 1e3, rate, rate * flops / 1e12, rate * flops / peak, peak / flops))
                del fn
                torch.cuda.empty_cache()
    return rows, parity


def table(rows: list[Row]) -> str:
    head = f"{'tower':<14} {'batch':>5} {'ms/batch':>9} {'items/s':>10} {'TFLOP/s':>8} {'of peak':>8} {'floor/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.tower:<14} {r.batch:>5} {r.ms_per_batch:>9.3f} {r.items_per_s:>10.0f} {r.tflops:>8.1f} "
            f"{r.fraction_of_peak:>8.1%} {r.floor_items_per_s:>9.0f}"
        )
    return "\n".join(lines)


# --- CLI ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m export.bench_towers", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base", help="model size from mim.model.config.SIZES")
    p.add_argument("--tower", choices=["both", contract.IMAGE_ENCODER, contract.TEXT_ENCODER], default="both")
    p.add_argument("--batches", type=lambda s: tuple(int(x) for x in s.split(",")), default=DEFAULT_BATCHES)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="time eager calls")
    p.add_argument("--peak-tflops", type=float, default=H200_FP16_TFLOPS, help="dense FP16 peak of the GPU")
    p.add_argument("--json", help="also write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA not available (torch.cuda.is_available() is False): no GPU timing run; nothing measured")
        return 0
    t0 = time.time()
    rows, parity = bench(args)
    gpu = torch.cuda.get_device_name(0)
    for name, p in parity.items():
        print(f"{name}: FP16 vs FP32 min cosine {p['min_cosine']:.6f}, max abs diff {p['max_abs_diff']:.2e}")
    print(
        f"{args.size} towers, torch {torch.__version__} FP16{' + CUDA graphs' if args.cuda_graphs else ''}, {gpu}, "
        f"peak {args.peak_tflops:.0f} TFLOP/s"
    )
    print(table(rows))
    if args.json:
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "python -m export.bench_towers " + " ".join(sys.argv[1:] if argv is None else argv),
            "gpu": gpu,
            "torch": torch.__version__,
            "size": args.size,
            "cuda_graphs": args.cuda_graphs,
            "peak_tflops": args.peak_tflops,
            "parity": parity,
            "rows": [asdict(r) for r in rows],
            "seconds": round(time.time() - t0, 1),
        }
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
