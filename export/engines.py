"""`make engines`: export a checkpoint's towers, build TensorRT FP16 engines where TensorRT and a GPU exist,
and install everything into the Triton model repository.

    python -m export.engines --checkpoint CKPT --repository model_repository [--export-dir artifacts/export]
                             [--no-tensorrt] [--min-batch 1 --opt-batch 16 --max-batch 64]

Repository layout written here (the serving code reads exactly these paths):

    <repo>/image_encoder/1/model.onnx          FP32 ONNX (CPU / ONNX Runtime path)
    <repo>/image_encoder/1/model.fp16.onnx     FP16 ONNX (GPU without TensorRT)
    <repo>/image_encoder/1/model.plan          TensorRT FP16 engine, only when one was really built
    <repo>/image_encoder/1/model.plan.json     what the engine was built for (TensorRT, GPU, profile, weights)
    <repo>/text_encoder/1/...                  the same
    <repo>/preprocess_image/1/preprocess.json
    <repo>/preprocess_text/1/preprocess.json
    <repo>/preprocess_text/1/tokenizer.json

On a machine without TensorRT or without a GPU this prints one line saying so and installs the ONNX
artifacts only; it never writes a plan it did not build (and removes a plan in the repository that belongs to
another checkpoint, so the repository never serves stale weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from mim import contract
from mim.atomic import atomic_write
from mim.catalog import load_catalog
from mim.checkpoint import TOKENIZER, weights_hash
from mim.config import ModelConfig, PreprocessConfig

from .fp16_gate import fp16_gate
from .onnx_export import (
    EXPORT_JSON,
    MODEL_JSON,
    PREPROCESS_JSON,
    export_checkpoint,
    onnx_filename,
    summary_lines,
)
from .tensorrt_build import (
    PLAN_META_SUFFIX,
    BatchRange,
    build_engine,
    engine_is_current,
    engine_parity,
    plan_filename,
    tensorrt_unavailable_reason,
    tower_profile,
)

log = logging.getLogger(__name__)

ENCODERS = (contract.IMAGE_ENCODER, contract.TEXT_ENCODER)
VERSION_DIR = "1"
REPO_ONNX, REPO_ONNX_FP16, REPO_PLAN = "model.onnx", "model.fp16.onnx", "model.plan"
REPO_PLAN_META = REPO_PLAN + PLAN_META_SUFFIX
TIMING_CACHE = "timing.cache"


class InstallError(RuntimeError):
    pass


# --- install -----------------------------------------------------------------------------------------------
def install(export_dir: str | Path, repo_dir: str | Path) -> list[Path]:
    """Copy the artifacts of `export_dir` (written by `export_checkpoint`, plus any engines) into the Triton
    repository `repo_dir` with the layout in the module docstring. Returns the files written.

    A plan is installed only when `<tower>.plan` and its `.plan.json` exist in the export folder and were
    built from the exported checkpoint; a repository plan from another checkpoint is removed.
    """
    export_dir, repo_dir = Path(export_dir), Path(repo_dir)
    meta_path = export_dir / EXPORT_JSON
    if not meta_path.is_file():
        raise InstallError(
            f"{meta_path} not found: {export_dir} is not a finished export; run "
            "`python -m export.onnx_export --checkpoint CKPT --out DIR` (or `make engines`) first"
        )
    export_meta = json.loads(meta_path.read_text())
    ckpt_hash = export_meta["checkpoint_hash"]
    written: list[Path] = []

    def put(src: Path, dst: Path) -> None:
        if not src.is_file():
            raise InstallError(f"{src} missing from the export folder; re-run the export")
        _copy(src, dst)
        written.append(dst)

    for tower in ENCODERS:
        vdir = repo_dir / tower / VERSION_DIR
        put(export_dir / onnx_filename(tower), vdir / REPO_ONNX)
        # The export record (source checkpoint hash, parity figures) travels with each tower, so whoever holds
        # the repository can tell which model it serves (the index/search CLI refuses a gallery of another).
        put(meta_path, vdir / EXPORT_JSON)
        fp16_src = export_dir / onnx_filename(tower, fp16=True)
        if fp16_src.is_file():
            put(fp16_src, vdir / REPO_ONNX_FP16)
        else:
            _remove(vdir / REPO_ONNX_FP16, "no FP16 ONNX in this export")
        plan, plan_meta = export_dir / plan_filename(tower), export_dir / (plan_filename(tower) + PLAN_META_SUFFIX)
        if _plan_hash(plan_meta) == ckpt_hash and plan.is_file():
            put(plan, vdir / REPO_PLAN)
            put(plan_meta, vdir / REPO_PLAN_META)
        elif _plan_hash(vdir / REPO_PLAN_META) != ckpt_hash:
            _remove(vdir / REPO_PLAN, f"it was not built from checkpoint {ckpt_hash}")
            _remove(vdir / REPO_PLAN_META, "its engine was removed")

    put(export_dir / PREPROCESS_JSON, repo_dir / contract.PREPROCESS_IMAGE / VERSION_DIR / PREPROCESS_JSON)
    put(export_dir / PREPROCESS_JSON, repo_dir / contract.PREPROCESS_TEXT / VERSION_DIR / PREPROCESS_JSON)
    put(export_dir / TOKENIZER, repo_dir / contract.PREPROCESS_TEXT / VERSION_DIR / TOKENIZER)

    model_cfg = ModelConfig.from_dict(json.loads((export_dir / MODEL_JSON).read_text()))
    pre_cfg = PreprocessConfig.from_dict(json.loads((export_dir / PREPROCESS_JSON).read_text()))
    _write_configs(repo_dir, model_cfg, pre_cfg)
    return written


def _write_configs(repo_dir: Path, model_cfg: ModelConfig, pre_cfg: PreprocessConfig) -> None:
    """Regenerate the config.pbtxt files with this model's concrete dims (mim.serving.repository)."""
    try:
        from mim.serving.repository import write_repository
    except ImportError as e:
        # TODO(serving): mim.serving.repository.write_repository is being written; once it lands this branch
        # is dead and should become an error, since a repository without regenerated configs is inconsistent.
        log.warning("config.pbtxt files not regenerated: mim.serving.repository.write_repository unavailable (%s)", e)
        return
    write_repository(repo_dir, model_cfg, pre_cfg)


def _plan_hash(meta_path: Path) -> str | None:
    try:
        return json.loads(meta_path.read_text()).get("checkpoint_hash")
    except (OSError, ValueError, AttributeError):
        return None


def _copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _remove(path: Path, why: str) -> None:
    if path.exists():
        path.unlink()
        log.info("removed %s: %s", path, why)


# --- engines -----------------------------------------------------------------------------------------------
def build_engines(export_dir: str | Path, batches: BatchRange, *, check: bool = True) -> list[Path]:
    """Build (or reuse, when still current) one TensorRT FP16 engine per tower from the FP32 ONNX in
    `export_dir`; check each against ONNX Runtime. Needs TensorRT and a GPU."""
    export_dir = Path(export_dir)
    meta = json.loads((export_dir / EXPORT_JSON).read_text())
    model_cfg = ModelConfig.from_dict(json.loads((export_dir / MODEL_JSON).read_text()))
    plans = []
    for tower in ENCODERS:
        onnx_path, plan = export_dir / onnx_filename(tower), export_dir / plan_filename(tower)
        profile = tower_profile(contract.MODELS[tower], model_cfg, batches)
        if engine_is_current(plan, meta["checkpoint_hash"], profile=profile):
            log.info("%s: engine %s is current, not rebuilding", tower, plan)
        else:
            build_engine(
                onnx_path,
                plan,
                fp16=True,
                profile=profile,
                timing_cache_path=export_dir / TIMING_CACHE,
                checkpoint_hash=meta["checkpoint_hash"],
            )
        if check:
            result = engine_parity(plan, onnx_path, model_cfg=model_cfg)
            log.info("%s: engine vs ONNX Runtime cosine %.5f", tower, result["min_cosine"])
        plans.append(plan)
    return plans


# --- CLI ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.engines", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (python -m mim.train)")
    p.add_argument("--repository", required=True, type=Path, help="Triton model repository to install into")
    p.add_argument("--export-dir", type=Path, default=Path("artifacts/export"), help="where ONNX/engines are built")
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
        log.warning(
            "--max-batch %d differs from the generated config.pbtxt's max_batch_size %d (mim.contract."
            "MAX_BATCH_SIZE): Triton refuses an engine whose profile is smaller",
            batches.max,
            contract.MAX_BATCH_SIZE,
        )
    report = export_checkpoint(args.checkpoint, args.export_dir, check=not args.no_check)
    for line in summary_lines(report):
        print(line)
    if args.catalog is not None and not args.no_check:
        gate = fp16_gate(args.checkpoint, args.export_dir, load_catalog(args.catalog))
        print(
            f"FP16 gate on {gate['split']} split: min cosine images {gate['min_cosine_images']:.6f}, titles "
            f"{gate['min_cosine_titles']:.6f}; Recall@10 FP16 {gate['recall10_fp16']:.4f} "
            f"vs FP32 {gate['recall10_fp32']:.4f}"
        )

    reason = None if args.no_tensorrt else tensorrt_unavailable_reason()
    if args.no_tensorrt:
        print(
            "TensorRT build skipped (--no-tensorrt): built ONNX artifacts for the CPU/ONNX path only; "
            "no engine was built"
        )
    elif reason is not None:
        print(
            f"TensorRT not available ({reason}): built ONNX artifacts for the CPU/ONNX path only; no engine was built"
        )
    else:
        build_engines(args.export_dir, batches, check=not args.no_check)
        print(f"built TensorRT FP16 engines (batch {batches.min}/{batches.opt}/{batches.max}) in {args.export_dir}")
    files = install(args.export_dir, args.repository)
    plans = sum(1 for f in files if f.name == REPO_PLAN)
    print(
        f"installed {len(files)} files into {args.repository} ({plans} engine plans), "
        f"checkpoint {weights_hash(args.checkpoint)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
