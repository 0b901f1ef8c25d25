"""`make engines` (`mimsearch engines`): export a checkpoint's towers, build TensorRT FP16 engines where
TensorRT and a GPU exist, and install everything into the Triton model repository.

    mimsearch engines --checkpoint CKPT --repository model_repository [--export-dir artifacts/export]
                      [--no-tensorrt] [--min-batch 1 --opt-batch 16 --max-batch 64] [--catalog DIR]

The library call is `build_and_install(checkpoint, repository, ...) -> InstallReport`; `main` only parses flags
and prints the report. The files installed, and the model identity written into the configs, are
`mim.layout`'s. On a machine without TensorRT or without a GPU the report says so and only the ONNX artifacts
are installed; a plan is never written unless it was built, and a plan in the repository that belongs to
another checkpoint is removed, so the repository never serves stale weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mim import contract, layout
from mim.model.config import ModelConfig

from .install import install, read_json
from .onnx_export import export_checkpoint, onnx_filename, summary_lines
from .tensorrt_build import (
    BatchRange,
    build_engine,
    engine_is_current,
    engine_parity,
    plan_filename,
    tensorrt_unavailable_reason,
    tower_profile,
)

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"
DEFAULT_EXPORT_DIR = Path("artifacts/export")


@dataclass
class InstallReport:
    """What `build_and_install` did."""

    model_id: str
    repository: Path
    export_dir: Path
    export: dict[str, Any]  # the content of export.json
    reused_export: bool = False  # the export folder already held this checkpoint's export
    gate: dict[str, Any] | None = None  # export.fp16_gate's figures, when a catalog was given
    engines: list[Path] = field(default_factory=list)  # TensorRT plans built (or reused) in export_dir
    tensorrt_skipped: str | None = None  # why no engine was built; None when engines were built
    batches: BatchRange = field(default_factory=BatchRange)
    files: list[Path] = field(default_factory=list)  # written into the repository

    @property
    def plans_installed(self) -> int:
        return sum(1 for f in self.files if f.name == layout.TRT_PLAN)

    def lines(self) -> list[str]:
        """The report in words, as `mimsearch engines` prints it."""
        out = [] if self.reused_export else summary_lines(self.export)
        if self.reused_export:
            out.append(f"export of model {self.model_id} already in {self.export_dir}; not exported again")
        if self.gate is not None:
            g = self.gate
            out.append(
                f"FP16 gate on {g['split']} split: min cosine images {g['min_cosine_images']:.6f}, titles "
                f"{g['min_cosine_titles']:.6f}; Recall@10 FP16 {g['recall10_fp16']:.4f} "
                f"vs FP32 {g['recall10_fp32']:.4f}"
            )
        if self.tensorrt_skipped is not None:
            out.append(f"{self.tensorrt_skipped}: built ONNX artifacts for the CPU/ONNX path only; no engine was built")
        else:
            b = self.batches
            out.append(f"built TensorRT FP16 engines (batch {b.min}/{b.opt}/{b.max}) in {self.export_dir}")
        out.append(
            f"installed {len(self.files)} files into {self.repository} ({self.plans_installed} engine plans), "
            f"model_id {self.model_id}"
        )
        return out


# --- the pipeline --------------------------------------------------------------------------------------------
def build_and_install(
    checkpoint: str | Path,
    repository: str | Path,
    *,
    export_dir: str | Path = DEFAULT_EXPORT_DIR,
    tensorrt: bool = True,
    batches: BatchRange | None = None,
    check: bool = True,
    catalog: str | Path | None = None,
    reuse_export: bool = False,
) -> InstallReport:
    """Export `checkpoint` to ONNX (FP32 + FP16) in `export_dir`, gate FP16 on `catalog`'s test split when one is
    given, build TensorRT engines when `tensorrt` and TensorRT and a GPU are available, and install it all into
    `repository` (configs regenerated with the checkpoint's dims and model id). `check=False` skips the parity
    checks and the gate. With `reuse_export`, an export folder already holding this checkpoint's export is
    installed as it is."""
    checkpoint, repository, export_dir = Path(checkpoint), Path(repository), Path(export_dir)
    batches = batches or BatchRange()
    model_id = layout.model_id_of_checkpoint(checkpoint)
    previous = read_json(export_dir / layout.EXPORT_JSON)
    reused = reuse_export and previous is not None and previous.get(layout.MODEL_ID) == model_id
    report = export_checkpoint(checkpoint, export_dir, check=check) if not reused else previous
    result = InstallReport(model_id, repository, export_dir, report, reused_export=reused, batches=batches)
    if catalog is not None and check:
        from mim.data.dataset import open_catalog

        from .fp16_gate import fp16_gate

        result.gate = fp16_gate(checkpoint, export_dir, open_catalog(catalog))  # a catalog folder or a dataset
    reason = "TensorRT build skipped (not requested: --no-tensorrt)" if not tensorrt else None
    if reason is None:
        unavailable = tensorrt_unavailable_reason()
        reason = f"TensorRT not available ({unavailable})" if unavailable is not None else None
    if reason is None:
        result.engines = build_engines(export_dir, batches, check=check)
    result.tensorrt_skipped = reason
    result.files = install(export_dir, repository)
    return result


# --- engines -----------------------------------------------------------------------------------------------
def build_engines(export_dir: str | Path, batches: BatchRange, *, check: bool = True) -> list[Path]:
    """Build (or reuse, when still current) one TensorRT FP16 engine per tower from the FP32 ONNX in
    `export_dir`; check each against ONNX Runtime. Needs TensorRT and a GPU."""
    export_dir = Path(export_dir)
    meta = json.loads((export_dir / layout.EXPORT_JSON).read_text())
    model_cfg = ModelConfig.from_dict(json.loads((export_dir / layout.MODEL_JSON).read_text()))
    plans = []
    for tower in layout.ENCODERS:
        onnx_path, plan = export_dir / onnx_filename(tower), export_dir / plan_filename(tower)
        profile = tower_profile(contract.MODELS[tower], model_cfg, batches)
        if engine_is_current(plan, meta[layout.MODEL_ID], profile=profile):
            log.info("%s: engine %s is current, not rebuilding", tower, plan)
        else:
            build_engine(
                onnx_path,
                plan,
                fp16=True,
                profile=profile,
                timing_cache_path=export_dir / TIMING_CACHE,
                model_id=meta[layout.MODEL_ID],
            )
        if check:
            result = engine_parity(plan, onnx_path, model_cfg=model_cfg)
            log.info("%s: engine vs ONNX Runtime cosine %.5f", tower, result["min_cosine"])
        plans.append(plan)
    return plans


# --- CLI ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimsearch engines", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (mimsearch train)")
    p.add_argument("--repository", required=True, type=Path, help="Triton model repository to install into")
    p.add_argument("--export-dir", type=Path, default=DEFAULT_EXPORT_DIR, help="where ONNX/engines are built")
    p.add_argument("--no-tensorrt", action="store_true", help="install the ONNX artifacts only")
    p.add_argument("--min-batch", type=int, default=1, help="smallest batch the engine accepts")
    p.add_argument("--opt-batch", type=int, default=16, help="batch the engine's kernels are tuned for")
    p.add_argument("--max-batch", type=int, default=contract.MAX_BATCH_SIZE, help="largest batch the engine accepts")
    p.add_argument("--no-check", action="store_true", help="skip the parity checks (torch vs ONNX vs engine)")
    p.add_argument(
        "--catalog", type=Path, help="also gate the FP16 ONNX on this catalog's test split (export/fp16_gate.py)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        batches = BatchRange(args.min_batch, args.opt_batch, args.max_batch)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if batches.max != contract.MAX_BATCH_SIZE:
        # The generated configs keep max_batch_size = contract.MAX_BATCH_SIZE (clients batch up to it).
        log.warning(
            "--max-batch %d differs from the generated config.pbtxt's max_batch_size %d (mim.contract."
            "MAX_BATCH_SIZE): Triton refuses an engine whose profile is smaller",
            batches.max,
            contract.MAX_BATCH_SIZE,
        )
    report = build_and_install(
        args.checkpoint,
        args.repository,
        export_dir=args.export_dir,
        tensorrt=not args.no_tensorrt,
        batches=batches,
        check=not args.no_check,
        catalog=args.catalog,
    )
    for line in report.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
