"""Our towers against transformers' CLIPModel on the same weights and the same inputs, side by side in one run.

    python -m benchmarks.towers_peer --size clip-vit-b-16 --batches 1,8,32 --out benchmarks/results/towers_peer/cpu
    python -m benchmarks.towers_peer --size tiny --out /tmp/peer            # seconds; the test suite runs this

A random CLIP of the named size is built with `transformers.CLIPModel`, saved as a Hugging Face folder and
imported with `mim.model.import_clip`, so both sides hold the same weights. Real photos (scikit-image's) go through our
preprocessing and real titles through our CLIP tokenizer once; both sides then get the same tensors.

Variants, each timed per batch in one alternating loop (`time_side_by_side`), so they share the machine state:

    ours eager           TorchEncoder: fused attention, text run at the batch's longest row
    ours full context    (text) the same at the full 77-token context: the same work as `hf eager`
    ours explicit        ours eager with the explicit attention the ONNX exporter traces: what fusing buys
    ours compiled        (--compile) torch.compile, under the CUDA graphs on a GPU; its setup time is reported
    ours graphs          (CUDA) one CUDA graph per (batch, text length bucket)
    hf eager             get_image_features / get_text_features, transformers' default (SDPA) attention
    hf eager longest     (text) the ids cut to the batch's longest row, as tokenizing with padding=True gives
    hf graphs            (CUDA) hf eager captured in a CUDA graph

On a GPU both sides run in FP16 (ours: the whole tower, see mim.serving.torch_backend; theirs: `.half()`); on a
CPU in FP32. Reported per (tower, batch, variant): items/s, the ratio to the best transformers variant at that
batch, and the fraction of the compute floor (matmul FLOPs per item / --peak-tflops; the text floor counts the
full 77-token context; omitted on a CPU unless --peak-tflops is given); per variant, the parity against
transformers in FP32 (lowest cosine over the real photos or titles).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mim import contract
from mim.search import ranking

from .common import hardware, markdown_table, now_utc, versions, write_json, write_rows_csv
from .knn_bench import time_side_by_side

PEAK_TFLOPS_GPU = 790.0  # an H200's dense FP16 tensor-core rate (benchmarks.gpu.PEAK_TFLOPS)
# Product titles and text queries as users type them: 5-25 CLIP tokens.
TITLES = (
    "blue zebra-striped ceramic mug",
    "red polka-dot cotton shirt, long sleeves",
    "men's waterproof hiking boots size 44",
    "vintage leather messenger bag, brown",
    "stainless steel water bottle 750ml with bamboo lid",
    "like this, but in red",
    "kids' unicorn backpack with reflective straps and a padded laptop sleeve",
    "white floral linen summer dress",
)
# A CLIP in every respect but size, for the test suite: 32 px in 16 px patches, 2 + 2 layers, CLIP's real
# vocabulary and 77-token context.
TINY_CLIP = {
    "vision": {"image_size": 32, "patch_size": 16, "hidden_size": 48, "num_hidden_layers": 2},
    "vision_heads": 3,
    "text": {"hidden_size": 32, "num_hidden_layers": 2},
    "text_heads": 2,
    "embed": 24,
}


@dataclass(frozen=True)
class PeerPlan:
    size: str = "clip-vit-b-16"
    batches: tuple[int, ...] = (1, 8, 32)
    min_time: float = 1.0  # seconds of timing per variant and batch
    min_reps: int = 3
    explicit: bool = True  # time the explicit-attention variant too
    compile_mode: str = "none"  # a TorchEncoder COMPILE_MODES entry: adds the `ours compiled` variant
    peak_tflops: float | None = None  # None: PEAK_TFLOPS_GPU on CUDA, no floor on a CPU
    seed: int = 0
    deadline: float | None = None  # time.monotonic() after which no new batch starts (benchmarks.gpu's budget)


# --- the two models ----------------------------------------------------------------------------------------
def hf_config(size: str):
    """transformers.CLIPConfig of a named size: `tiny`, or a CLIP shape of mim.model.config.SIZES (clip-vit-*)."""
    import transformers

    from mim.model.config import get_size

    if size == "tiny":
        t, v = TINY_CLIP["text"], TINY_CLIP["vision"]
        text = {**t, "intermediate_size": 2 * t["hidden_size"], "num_attention_heads": TINY_CLIP["text_heads"]}
        vision = {**v, "intermediate_size": 2 * v["hidden_size"], "num_attention_heads": TINY_CLIP["vision_heads"]}
        embed = TINY_CLIP["embed"]
    else:
        if not size.startswith("clip-"):
            raise ValueError(f"size {size!r}; expected 'tiny' or a CLIP shape (clip-vit-b-32, clip-vit-b-16, ...)")
        m = get_size(size).model
        text = {
            "hidden_size": m.text.width,
            "intermediate_size": int(m.text.width * m.text.mlp_ratio),
            "num_hidden_layers": m.text.layers,
            "num_attention_heads": m.text.heads,
        }
        vision = {
            "image_size": m.vision.image_size,
            "patch_size": m.vision.patch_size,
            "hidden_size": m.vision.width,
            "intermediate_size": int(m.vision.width * m.vision.mlp_ratio),
            "num_hidden_layers": m.vision.layers,
            "num_attention_heads": m.vision.heads,
        }
        embed = m.embed_dim
    text |= {"vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
    vision |= {"hidden_act": "quick_gelu"}
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed)


def build_pair(size: str, work: Path, seed: int = 0):
    """(transformers CLIPModel in FP32 eval mode, our checkpoint imported from it)."""
    import torch
    import transformers

    from mim.model.checkpoint import load_checkpoint
    from mim.model.import_clip import import_hf
    from mim.model.tokenizer import clip_vocab_from_bpe_file

    torch.manual_seed(seed)
    model = transformers.CLIPModel(hf_config(size)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped weight would show in the parity
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.02 * torch.randn_like(p))
    folder = work / "hf"
    model.save_pretrained(folder)
    vocab, merges = clip_vocab_from_bpe_file()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return model, load_checkpoint(import_hf(folder, work / "ours"))


def real_feeds(ckpt, photos: Sequence[bytes] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """`photos` (encoded files; default scikit-image's) through our preprocessing, TITLES through our
    tokenizer: per tower, the rows."""
    from mim.model.preprocess import preprocess_image_bytes

    if photos is None:
        from .preprocess import skimage_photos

        photos = [p.data for p in skimage_photos(megapixels=())]
    pixels = np.stack([preprocess_image_bytes(data, ckpt.pre_cfg) for data in photos])
    ids, mask = ckpt.tokenizer.encode_batch(list(TITLES))
    return {
        contract.IMAGE_ENCODER: {contract.PIXEL_VALUES.name: pixels},
        contract.TEXT_ENCODER: {contract.INPUT_IDS.name: ids, contract.ATTENTION_MASK.name: mask},
    }


def _rows(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """`batch` rows, cycling through the real ones."""
    n = len(next(iter(feeds.values())))
    idx = np.arange(batch) % n
    return {k: v[idx] for k, v in feeds.items()}


# --- callables ---------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_call(model, name: str, feeds: dict):
    """transformers' own entry points; returns (batch, embed) features (not normalised)."""
    if name == contract.IMAGE_ENCODER:
        return model.get_image_features(pixel_values=feeds[contract.PIXEL_VALUES.name]).pooler_output
    return model.get_text_features(
        input_ids=feeds[contract.INPUT_IDS.name], attention_mask=feeds[contract.ATTENTION_MASK.name]
    ).pooler_output


def _hf_feeds(feeds: dict[str, np.ndarray], device, dtype, longest: bool = False) -> dict:
    import torch

    from mim.serving.torch_backend import text_length

    out = {}
    for k, v in feeds.items():
        t = torch.from_numpy(np.ascontiguousarray(v)).to(device)
        out[k] = t.to(dtype) if t.is_floating_point() else t
    if longest and contract.ATTENTION_MASK.name in out:
        n = text_length(out[contract.ATTENTION_MASK.name])
        out = {k: v[:, :n].contiguous() for k, v in out.items()}
    return out


def _graph(fn: Callable[[], Any], device) -> Callable[[], Any]:
    """`fn` (fixed inputs) captured in a CUDA graph: warm-up on a side stream, capture, replay."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def _timed(fn: Callable[[], Any], device) -> Callable[[], Any]:
    def call():
        out = fn()
        _sync(device)
        return out

    return call


# --- the run -----------------------------------------------------------------------------------------------
def run(
    plan: PeerPlan,
    *,
    work: Path | None = None,
    photos: Sequence[bytes] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the pair, check parity, time every variant per tower and batch. Returns the result (rows,
    parity, setup seconds, settings); `write` puts it on disk."""
    import torch

    from mim.model.towers import explicit_attention
    from mim.serving.torch_backend import cuda_unavailable_reason

    from .common import tower_flops

    t0 = time.perf_counter()
    reason = cuda_unavailable_reason()
    device = torch.device("cuda" if reason is None else "cpu")
    precision = "fp16" if reason is None else "fp32"
    dtype = torch.float16 if reason is None else torch.float32
    peak = plan.peak_tflops if plan.peak_tflops is not None else (PEAK_TFLOPS_GPU if reason is None else None)
    if work is None:
        with tempfile.TemporaryDirectory(prefix="towers-peer-") as tmp:
            return run(plan, work=Path(tmp), photos=photos, log=log)
    hf32, ckpt = build_pair(plan.size, work, plan.seed)
    hf = copy.deepcopy(hf32).to(device=device, dtype=dtype)
    cfg = ckpt.model_cfg
    real = real_feeds(ckpt, photos)
    result: dict[str, Any] = {
        "date": now_utc(),
        "plan": asdict(plan),
        "device": torch.cuda.get_device_name(device) if reason is None else f"CPU ({reason})",
        "precision": precision,
        "threads": torch.get_num_threads(),
        "hf_attention": hf.config._attn_implementation,
        "peak_tflops": peak,
        "hardware": hardware(),
        "versions": {**versions(), "transformers": _version("transformers")},
        "parity": {},
        "setup_seconds": {},
        "rows": [],
        "notes": [] if reason is None else [f"no CUDA graph variants: {reason}"],
    }
    towers = {contract.IMAGE_ENCODER: ckpt.model.image, contract.TEXT_ENCODER: ckpt.model.text}
    for name, module in towers.items():
        if _late(plan):
            result["notes"].append(f"{name}: time budget spent before it started; not run")
            continue
        io = contract.MODELS[name]
        is_text = name == contract.TEXT_ENCODER
        ours = _our_variants(module, cfg, io, str(device), precision, plan, cuda=reason is None)
        for label, enc in ours.items():
            result["setup_seconds"][f"{name} {label}"] = enc.setup_seconds
        # Parity on the real rows, against transformers in FP32 on the CPU (the reference).
        with torch.no_grad():
            ref = _hf_call(hf32, name, _hf_feeds(real[name], torch.device("cpu"), torch.float32)).numpy()
        ref = ranking.l2_normalize(ref.astype(np.float32))
        tensors = {k: torch.from_numpy(v) for k, v in real[name].items()}
        parity = {label: _cos(enc.forward(tensors).cpu().numpy(), ref) for label, enc in ours.items()}
        if plan.explicit:
            with explicit_attention():
                parity["ours explicit"] = _cos(ours["ours eager"].forward(tensors).cpu().numpy(), ref)
        with torch.no_grad():
            parity["hf eager"] = _cos(
                _hf_call(hf, name, _hf_feeds(real[name], device, dtype)).float().cpu().numpy(), ref
            )
        result["parity"][name] = parity
        log(
            f"  {name}: parity vs transformers FP32 (min cosine) "
            + ", ".join(f"{k} {v:.6f}" for k, v in parity.items())
        )
        flops = tower_flops(cfg, name)
        for batch in plan.batches:
            if _late(plan):
                result["notes"].append(f"{name}: time budget spent before batch {batch}; later batches not run")
                break
            feeds = _rows(real[name], batch)
            dev_feeds = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
            fns: dict[str, Callable[[], Any]] = {}
            for label, enc in ours.items():
                fns[label] = _timed(functools.partial(enc.forward, dev_feeds), device)
            if plan.explicit:
                fns["ours explicit"] = _timed(functools.partial(_explicit, ours["ours eager"], dev_feeds), device)
            hf_in = _hf_feeds(feeds, device, dtype)
            hf_eager = functools.partial(_no_grad, _hf_call, hf, name, hf_in)
            fns["hf eager"] = _timed(hf_eager, device)
            if is_text:
                fns["hf eager longest"] = _timed(
                    functools.partial(_no_grad, _hf_call, hf, name, _hf_feeds(feeds, device, dtype, longest=True)),
                    device,
                )
            if reason is None:
                try:
                    with torch.no_grad():
                        fns["hf graphs"] = _timed(_graph(hf_eager, device), device)
                except Exception as e:  # transformers code that syncs the host cannot be captured: say so
                    result["notes"].append(f"{name} batch {batch}: hf graphs not captured ({type(e).__name__}: {e})")
            secs = time_side_by_side(fns, plan.min_time, plan.min_reps)
            best_hf = max(batch / s for label, s in secs.items() if label.startswith("hf"))
            for label, sec in secs.items():
                rate = batch / sec
                result["rows"].append(
                    {
                        "tower": name,
                        "batch": batch,
                        "variant": label,
                        "items_per_s": rate,
                        "ms_per_batch": sec * 1e3,
                        "ratio_to_best_hf": rate / best_hf,
                        "fraction_of_floor": rate * flops / (peak * 1e12) if peak else None,
                        "min_cosine_vs_hf_fp32": parity.get(
                            label, parity["hf eager"] if label.startswith("hf") else None
                        ),
                    }
                )
            log(f"  {name} batch {batch}: " + ", ".join(f"{k} {batch / s:,.1f}/s" for k, s in secs.items()))
            del fns, dev_feeds, hf_in
            if reason is None:
                torch.cuda.empty_cache()
        del ours
    result["seconds"] = time.perf_counter() - t0
    return result


def _late(plan: PeerPlan) -> bool:
    return plan.deadline is not None and time.monotonic() > plan.deadline


def _our_variants(module, cfg, io: contract.ModelIO, device: str, precision: str, plan: PeerPlan, cuda: bool) -> dict:
    """Our TorchEncoder variants of one tower, by label (see the module docstring)."""
    from mim.serving.torch_backend import TorchEncoder

    def encoder(**kw):
        return TorchEncoder(copy.deepcopy(module), cfg, io, device=device, precision=precision, **kw)

    ours = {"ours eager": encoder()}
    if io.name == contract.TEXT_ENCODER:
        ours["ours full context"] = encoder(trim_text=False)
    if plan.compile_mode != "none":
        graphs = {"graph_batch_sizes": plan.batches} if cuda else {}
        ours["ours compiled"] = encoder(compile_mode=plan.compile_mode, **graphs)
    if cuda:
        ours["ours graphs"] = encoder(graph_batch_sizes=plan.batches)
    return ours


def _no_grad(fn, *args):
    import torch

    with torch.inference_mode():
        return fn(*args)


def _explicit(encoder, feeds):
    from mim.model.towers import explicit_attention

    with explicit_attention():
        return encoder.forward(feeds)


def _cos(got: np.ndarray, ref: np.ndarray) -> float:
    return ranking.parity(got.astype(np.float32), ref).min_cosine


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (tower, batch): our best and transformers' best variant, and the ratio of the two; on equal
    work too (ours eager at full context against hf eager), which is the CPU target."""
    out = []
    keys = sorted({(r["tower"], r["batch"]) for r in result["rows"]}, key=lambda k: (k[0], k[1]))
    for tower, batch in keys:
        rows = {r["variant"]: r for r in result["rows"] if r["tower"] == tower and r["batch"] == batch}
        ours = max((r for v, r in rows.items() if v.startswith("ours")), key=lambda r: r["items_per_s"])
        hf = max((r for v, r in rows.items() if v.startswith("hf")), key=lambda r: r["items_per_s"])
        same_work = rows.get("ours full context", rows["ours eager"])
        out.append(
            {
                "tower": tower,
                "batch": batch,
                "ours_best": ours["variant"],
                "ours_items_per_s": ours["items_per_s"],
                "hf_best": hf["variant"],
                "hf_items_per_s": hf["items_per_s"],
                "ratio": ours["items_per_s"] / hf["items_per_s"],
                "ratio_same_work_eager": same_work["items_per_s"] / rows["hf eager"]["items_per_s"],
                "fraction_of_floor": ours["fraction_of_floor"],
            }
        )
    return out


def report(result: dict[str, Any]) -> str:
    """Markdown: the settings, the summary per batch, every variant, the parity."""
    lines = [
        f"# Towers against transformers on the same weights ({result['plan']['size']})",
        "",
        f"- date: {result['date']}",
        f"- command: `{result.get('command', 'python -m benchmarks.towers_peer')}`",
        f"- device: {result['device']}, {result['precision'].upper()}, {result['threads']} torch threads; "
        f"transformers {result['versions']['transformers']} ({result['hf_attention']} attention), "
        f"torch {result['versions']['torch']}",
        _machine(result["hardware"]),
        f"- compute floor: {result['peak_tflops']} TFLOP/s" if result["peak_tflops"] else "- compute floor: not set",
        *[f"- note: {n}" for n in result["notes"]],
        "",
        "## Best of ours against best of transformers",
        "",
        markdown_table(
            summary_rows(result),
            [
                ("tower", "tower"),
                ("batch", "batch"),
                ("ours_best", "ours best"),
                ("ours_items_per_s", "items/s"),
                ("hf_best", "transformers best"),
                ("hf_items_per_s", "items/s"),
                ("ratio", "ratio"),
                ("ratio_same_work_eager", "eager, same work"),
                ("fraction_of_floor", "of floor"),
            ],
        ),
        "",
        "## Every variant",
        "",
        markdown_table(
            result["rows"],
            [
                ("tower", "tower"),
                ("batch", "batch"),
                ("variant", "variant"),
                ("items_per_s", "items/s"),
                ("ms_per_batch", "ms/batch"),
                ("ratio_to_best_hf", "vs best hf"),
                ("fraction_of_floor", "of floor"),
                ("min_cosine_vs_hf_fp32", "cos vs hf fp32"),
            ],
            digits=3,
        ),
        "",
        "Setup seconds (weights to the device, torch.compile, graph captures): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["setup_seconds"].items()),
        "",
    ]
    return "\n".join(lines)


def _machine(hw: dict[str, Any]) -> str:
    load = hw.get("loadavg")
    load_text = f"; 1/5/15-min load average at the start {'/'.join(f'{v:.1f}' for v in load)}" if load else ""
    return f"- machine: {hw.get('cpu_model')}, {hw.get('cpu_cores')} cores ({hw.get('cpu_affinity')} usable){load_text}"


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "towers_peer.json")
    write_rows_csv(result["rows"], out / "towers_peer.csv")
    (out / "towers_peer.md").write_text(report(result))


def for_gpu_script(
    size: str,
    batches: Sequence[int],
    min_time: float,
    min_reps: int,
    peak_tflops: float | None = None,
    log: Callable[[str], None] = print,
    deadline: float | None = None,
    photos: Sequence[bytes] | None = None,
) -> dict[str, Any]:
    """The peer comparison as part of benchmarks.gpu's towers step: its `base` size maps to the CLIP with the
    same image tower (ViT-B/16 at 224 px), `tiny` to TINY_CLIP; `photos` are the script's. The result carries
    its summary rows; a machine without transformers gets the reason instead of figures."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return {"skipped": "transformers is not installed (the `dev` extra)", "rows": [], "summary": []}
    if deadline is not None and time.monotonic() > deadline:
        return {"skipped": "the step's time budget was spent before the comparison started", "rows": [], "summary": []}
    from mim.serving.torch_backend import cuda_unavailable_reason

    peer = {"base": "clip-vit-b-16"}.get(size, size if size.startswith("clip-") else "tiny")
    peak = peak_tflops if cuda_unavailable_reason() is None else None  # a GPU's peak means nothing on a CPU
    plan = PeerPlan(
        size=peer, batches=tuple(batches), min_time=min_time, min_reps=min_reps, peak_tflops=peak, deadline=deadline
    )
    result = run(plan, photos=photos, log=log)
    result["summary"] = summary_rows(result)
    return result


# --- CLI ---------------------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.towers_peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="clip-vit-b-16", help="tiny, or a CLIP shape: clip-vit-b-32, clip-vit-b-16, ...")
    p.add_argument("--batches", type=_ints, help="batch sizes (default 1,8,32; tiny: 1,4)")
    p.add_argument("--min-time", type=float, help="seconds of timing per variant and batch (default 1; tiny: 0.01)")
    p.add_argument("--min-reps", type=int, default=None, help="timed calls per variant and batch at least")
    p.add_argument("--no-explicit", action="store_true", help="skip the explicit-attention variant")
    p.add_argument("--compile", default="none", help="torch.compile mode for an `ours compiled` variant")
    p.add_argument("--peak-tflops", type=float, help="dense matmul peak for the floor (default 790 on CUDA)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads for both sides (the served CPU config uses 1: on shared cores a descheduled "
        "OpenMP thread stalls every parallel region)",
    )
    p.add_argument("--out", type=Path, help="write towers_peer.{json,csv,md} here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mim.serving.torch_backend import COMPILE_MODES

    if args.compile not in COMPILE_MODES:
        print(f"error: --compile {args.compile!r}; expected one of {list(COMPILE_MODES)}", file=sys.stderr)
        return 2
    tiny = args.size == "tiny"
    plan = PeerPlan(size=args.size, batches=(1, 4), min_time=0.01, min_reps=2) if tiny else PeerPlan(size=args.size)
    plan = replace(
        plan,
        batches=args.batches or plan.batches,
        min_time=plan.min_time if args.min_time is None else args.min_time,
        min_reps=plan.min_reps if args.min_reps is None else args.min_reps,
        explicit=not args.no_explicit,
        compile_mode=args.compile,
        peak_tflops=args.peak_tflops,
    )
    try:
        hf_config(plan.size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run(plan)
    result["command"] = "python -m benchmarks.towers_peer " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.out:
        write(result, args.out)
    print(report(result))
    if args.out:
        print(f"wrote {args.out}/towers_peer.{{md,json,csv}} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
