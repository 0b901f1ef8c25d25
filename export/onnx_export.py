"""Export each tower of a checkpoint to ONNX, clean it up, check it, and write everything serving needs.

    python -m export.onnx_export --checkpoint artifacts/ckpt --out artifacts/export

writes into the output folder:

    image_encoder.onnx        FP32, after graph surgery (the CPU / ONNX Runtime path, and TensorRT's input)
    text_encoder.onnx
    image_encoder.fp16.onnx   FP16 weights and compute, FP32 I/O and FP32 normalisations (GPU without TensorRT)
    text_encoder.fp16.onnx
    image_encoder.safetensors the tower's torch weights (the `torch` / `gpu_torch` serving variants)
    text_encoder.safetensors
    preprocess.json           PreprocessConfig: read by the Triton preprocessing models at initialize
    model.json                ModelConfig: the concrete dims of the contract's symbolic ones
    tokenizer.json            the checkpoint's tokenizer, unchanged
    export.json               source model_id (mim.layout), opset, surgery report, parity figures (written last)

Graph inputs/outputs are named and typed from `mim.contract`, with a symbolic `batch` first dim; the exporter
refuses a graph whose I/O differs from the contract. With `check=True` every artifact is compared with the
FP32 torch tower on random inputs (ONNX Runtime, CPU) and the export fails if the cosine gate is missed.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export import ExportError
from mim import contract, layout
from mim.atomic import atomic_write_bytes
from mim.commandline import CommandParser
from mim.contract import random_inputs
from mim.model.checkpoint import load_checkpoint
from mim.model.config import ModelConfig, dumps
from mim.model.towers import explicit_attention
from mim.search.ranking import parity

from .fp16 import convert_to_fp16
from .install import onnx_filename, write_torch_artifacts
from .surgery import DEFAULT_PASSES, count_nodes, run_passes

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
BATCH_DIM = "batch"
# Cosine gates against the FP32 torch tower. FP32 ONNX must be the same function up to float reassociation;
# FP16 keeps ~3 significant decimal digits; 0.999 is text-embeddings-inference's gate for FP16 embeddings.
FP32_MIN_COSINE = 0.99999
FP16_MIN_COSINE = 0.999
# Batch 1 is the single-query path; 7 is an odd batch > 1 that no tracer example shape equals.
PARITY_BATCHES = (1, 7)
# The batch used to trace; different from every parity batch, so a batch size baked into the graph shows.
TRACE_BATCH = 2

_ONNX_DTYPES = {
    "FP32": onnx.TensorProto.FLOAT,
    "FP16": onnx.TensorProto.FLOAT16,
    "INT64": onnx.TensorProto.INT64,
    "INT32": onnx.TensorProto.INT32,
}


class ParityError(ExportError):
    pass


@dataclass(frozen=True)
class Tower:
    """One exportable tower: its contract I/O and the torch module implementing it."""

    io: contract.ModelIO
    module: nn.Module

    @property
    def name(self) -> str:
        return self.io.name


def towers_of(model: nn.Module) -> list[Tower]:
    """The towers of a `MIMModel`. Their forward() argument names equal the contract input names, which is
    what lets `check_parity` call them with keyword arguments."""
    return [
        Tower(contract.MODELS[contract.IMAGE_ENCODER], model.image),
        Tower(contract.MODELS[contract.TEXT_ENCODER], model.text),
    ]


# --- random inputs -----------------------------------------------------------------------------------------
# --- export ------------------------------------------------------------------------------------------------
def export_tower(tower: Tower, model_cfg: ModelConfig, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Trace one tower with the TorchScript exporter into an in-memory ONNX model named by the contract. The
    towers trace their explicit attention (MatMul / Softmax nodes that surgery and the FP16 build pin by type)."""
    example = random_inputs(tower.io, model_cfg, TRACE_BATCH, seed=1)
    args = tuple(torch.from_numpy(example[s.name]) for s in tower.io.inputs)
    names_in = [s.name for s in tower.io.inputs]
    names_out = [s.name for s in tower.io.outputs]
    buf = io.BytesIO()
    with torch.no_grad(), explicit_attention(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo=True, which needs onnxscript (not a
        # dependency here); it is the supported path for torch 2.13 and this warning is not actionable.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        torch.onnx.export(
            tower.module.eval(),
            args,
            buf,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes={n: {0: BATCH_DIM} for n in names_in + names_out},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return onnx.load_from_string(buf.getvalue())


def check_io(model: onnx.ModelProto, io: contract.ModelIO, model_cfg: ModelConfig) -> None:
    """Refuse a graph whose inputs/outputs differ from the contract (names, order, dtypes, dims, and a
    symbolic batch first dim), naming what differs."""
    for kind, values, specs in (("input", model.graph.input, io.inputs), ("output", model.graph.output, io.outputs)):
        got = [v.name for v in values]
        want = [s.name for s in specs]
        if got != want:
            raise ExportError(f"{io.name}: graph {kind}s are {got}; the contract expects {want}")
        for v, spec in zip(values, specs):
            t = v.type.tensor_type
            if t.elem_type != _ONNX_DTYPES[spec.dtype]:
                raise ExportError(
                    f"{io.name}.{spec.name}: dtype {onnx.TensorProto.DataType.Name(t.elem_type)}; "
                    f"contract says {spec.dtype}"
                )
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            want_dims = [BATCH_DIM, *spec.resolve_dims(model_cfg)]
            if dims != want_dims:
                raise ExportError(f"{io.name}.{spec.name}: dims {dims}; contract says {want_dims}")


def check_parity(
    onnx_path: str | Path,
    torch_module: nn.Module,
    inputs: Mapping[str, np.ndarray],
    *,
    min_cosine: float = FP32_MIN_COSINE,
) -> dict[str, Any]:
    """Run the ONNX model (ONNX Runtime, CPU) and the FP32 torch module on the same inputs; compare each output
    row by cosine similarity. Raises `ParityError` if any row is below `min_cosine`.

    Returns `{"batch", "min_cosine", "max_abs_diff", "min_cosine_gate"}` (`mim.search.ranking.parity`).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(inputs))[0]
    with torch.no_grad():
        ref = torch_module.float()(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).numpy()
    if got.shape != ref.shape:
        raise ParityError(f"{onnx_path}: output shape {got.shape}; torch gives {ref.shape}")
    if not np.all(np.isfinite(got)):
        raise ParityError(f"{onnx_path}: output has non-finite values (NaN/inf); FP16 overflow in a normalisation?")
    p = parity(got, ref)
    result = {
        "batch": p.rows,
        "min_cosine": p.min_cosine,
        "max_abs_diff": p.max_abs_diff,
        "min_cosine_gate": min_cosine,
    }
    if p.min_cosine < min_cosine:
        raise ParityError(
            f"{Path(onnx_path).name}: row {p.worst_row} of batch {p.rows} has cosine {p.min_cosine:.6f} to "
            f"the FP32 torch output; expected >= {min_cosine} (max abs diff {p.max_abs_diff:.3g}). The "
            "exported graph is not the torch function: check the surgery passes / FP16 exclusions"
        )
    return result


def _parity_all(path: Path, tower: Tower, model_cfg: ModelConfig, min_cosine: float) -> dict[str, Any]:
    rows = [
        check_parity(path, tower.module, random_inputs(tower.io, model_cfg, b, seed=10 + b), min_cosine=min_cosine)
        for b in PARITY_BATCHES
    ]
    return {
        "min_cosine": min(r["min_cosine"] for r in rows),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "min_cosine_gate": min_cosine,
        "batches": rows,
    }


def _write_onnx(path: Path, model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model)  # full check (with shape inference) before anything touches the disk
    atomic_write_bytes(path, model.SerializeToString())


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = True,
    check: bool = True,
) -> dict[str, Any]:
    """Export both towers of the checkpoint at `ckpt_dir` into `out_dir` (see the module docstring for the
    files). Returns the content of `export.json`."""
    t0 = time.perf_counter()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    ckpt = load_checkpoint(ckpt_dir)
    model_cfg = ckpt.model_cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "checkpoint": str(ckpt_dir),
        layout.MODEL_ID: layout.model_id_of_checkpoint(ckpt_dir),
        "model_name": model_cfg.name,
        "opset": opset,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "towers": {},
    }
    for tower in towers_of(ckpt.model):
        report["towers"][tower.name] = _export_one(tower, model_cfg, out_dir, opset=opset, fp16=fp16, check=check)

    write_torch_artifacts(ckpt, ckpt_dir, out_dir)  # the torch variants' files, the configs, the tokenizer
    report["seconds"] = round(time.perf_counter() - t0, 2)
    # Written last: a folder with export.json is complete.
    atomic_write_bytes(out_dir / layout.EXPORT_JSON, dumps(report).encode())
    return report


def _export_one(tower: Tower, model_cfg: ModelConfig, out_dir: Path, *, opset: int, fp16: bool, check: bool) -> dict:
    raw = export_tower(tower, model_cfg, opset=opset)
    model, surgery = run_passes(raw, DEFAULT_PASSES)
    check_io(model, tower.io, model_cfg)
    path = out_dir / onnx_filename(tower.name)
    _write_onnx(path, model)
    entry: dict[str, Any] = {
        "file": path.name,
        "nodes_exported": count_nodes(raw),
        "nodes": count_nodes(model),
        "surgery": surgery,
    }
    if check:
        entry["parity_fp32"] = _parity_all(path, tower, model_cfg, FP32_MIN_COSINE)
    if fp16:
        model16, fp16_report = convert_to_fp16(model)
        check_io(model16, tower.io, model_cfg)
        path16 = out_dir / onnx_filename(tower.name, fp16=True)
        _write_onnx(path16, model16)
        entry["fp16"] = {"file": path16.name, "nodes": count_nodes(model16), **fp16_report}
        if check:
            entry["parity_fp16"] = _parity_all(path16, tower, model_cfg, FP16_MIN_COSINE)
    else:
        # A variant left from an earlier export would otherwise be installed next to the new FP32 model.
        (out_dir / onnx_filename(tower.name, fp16=True)).unlink(missing_ok=True)
    log.debug(
        "%s: %d -> %d nodes%s",
        tower.name,
        entry["nodes_exported"],
        entry["nodes"],
        f", cosine {entry['parity_fp32']['min_cosine']:.7f}" if check else "",
    )
    return entry


# --- CLI ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="mimsearch export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (mimsearch train)")
    p.add_argument("--out", required=True, type=Path, help="output folder for the ONNX artifacts")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset of the exported graphs")
    p.add_argument("--no-fp16", action="store_true", help="skip the FP16 ONNX variant")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs torch parity checks")
    return p


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, t in report["towers"].items():
        line = f"{name}: {t['file']} ({t['nodes_exported']} -> {t['nodes']} nodes)"
        if "parity_fp32" in t:
            p = t["parity_fp32"]
            line += f", FP32 cosine {p['min_cosine']:.7f} max|diff| {p['max_abs_diff']:.2e}"
        if "parity_fp16" in t:
            p = t["parity_fp16"]
            line += f", FP16 cosine {p['min_cosine']:.5f} max|diff| {p['max_abs_diff']:.2e}"
        lines.append(line)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = export_checkpoint(
        args.checkpoint, args.out, opset=args.opset, fp16=not args.no_fp16, check=not args.no_check
    )
    for line in summary_lines(report):
        print(line)
    print(f"wrote {args.out} (model_id {report[layout.MODEL_ID]}, {report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
