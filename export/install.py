"""Installing an export into a Triton model repository, and the torch variants' artifacts on their own.

Nothing here imports `onnx` or TensorRT: a machine that serves the towers in torch (`torch` / `gpu_torch`
config variants) needs neither, so `export_torch` + `install(..., onnx=False)` run with torch alone. The ONNX
exporter (`export.onnx_export`) writes the same torch artifacts through `write_torch_artifacts`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from mim import contract, layout
from mim.atomic import atomic_write, atomic_write_bytes
from mim.model.config import ModelConfig, PreprocessConfig, dumps
from mim.serving.repository import write_repository

log = logging.getLogger(__name__)


class InstallError(RuntimeError):
    pass


def onnx_filename(tower_name: str, fp16: bool = False) -> str:
    return f"{tower_name}.fp16.onnx" if fp16 else f"{tower_name}.onnx"


def plan_filename(tower_name: str) -> str:
    return f"{tower_name}.plan"


def weights_filename(tower_name: str) -> str:
    """The tower's torch weights (safetensors), for the `torch` / `gpu_torch` serving variants."""
    return f"{tower_name}.safetensors"


def write_torch_artifacts(ckpt: Any, ckpt_dir: Path, out_dir: Path) -> None:
    """Each tower's weights, model.json, preprocess.json and the tokenizer file of the loaded checkpoint `ckpt`
    (from `ckpt_dir`) into `out_dir`: what the torch serving variants and the preprocessing models read."""
    from safetensors.torch import save as save_safetensors

    from mim.model.checkpoint import TOKENIZER
    from mim.serving.torch_backend import tower_state_dict

    for tower in layout.ENCODERS:
        state = tower_state_dict(ckpt.model, tower)
        atomic_write_bytes(out_dir / weights_filename(tower), save_safetensors(state))
    atomic_write_bytes(out_dir / layout.PREPROCESS_JSON, dumps(ckpt.pre_cfg.to_dict()).encode())
    atomic_write_bytes(out_dir / layout.MODEL_JSON, dumps(ckpt.model_cfg.to_dict()).encode())
    atomic_write_bytes(out_dir / TOKENIZER, (ckpt_dir / TOKENIZER).read_bytes())


def export_torch(ckpt_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """An export folder for the torch variants only (no ONNX, so no `onnx` package needed); install it with
    `install(out_dir, repo, onnx=False)`. Returns the content of its export.json."""
    import torch

    from mim.model.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    ckpt = load_checkpoint(ckpt_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_torch_artifacts(ckpt, ckpt_dir, out_dir)
    report = {
        "checkpoint": str(ckpt_dir),
        layout.MODEL_ID: layout.model_id_of_checkpoint(ckpt_dir),
        "model_name": ckpt.model_cfg.name,
        "torch": torch.__version__,
        "onnx": None,  # torch artifacts only
        "towers": {},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_bytes(out_dir / layout.EXPORT_JSON, dumps(report).encode())  # last: marks the folder complete
    return report


def install(export_dir: str | Path, repo_dir: str | Path, *, onnx: bool = True) -> list[Path]:
    """Copy the artifacts of `export_dir` (written by `export_checkpoint`, plus any engines) into the Triton
    repository `repo_dir` (files: `mim.layout.installed_files`), and regenerate its configs with the
    checkpoint's dims and model id. Returns the files written. `onnx=False` installs an `export_torch` folder:
    the torch variants' files only (the ONNX variants of that repository then have nothing to load).

    A plan is installed only when `<tower>.plan` and its `.plan.json` exist in the export folder and were
    built from the exported checkpoint; a repository plan from another checkpoint is removed.
    """
    export_dir, repo_dir = Path(export_dir), Path(repo_dir)
    meta_path = export_dir / layout.EXPORT_JSON
    if not meta_path.is_file():
        raise InstallError(
            f"{meta_path} not found: {export_dir} is not a finished export; run "
            "`python -m export.onnx_export --checkpoint CKPT --out DIR` (or `make engines`) first"
        )
    model_id = json.loads(meta_path.read_text())[layout.MODEL_ID]
    written: list[Path] = []

    def put(src: Path, dst: Path) -> None:
        if not src.is_file():
            raise InstallError(f"{src} missing from the export folder; re-run the export")
        _copy(src, dst)
        written.append(dst)

    for tower in layout.ENCODERS:
        vdir = layout.version_dir(repo_dir, tower)
        if onnx:
            put(export_dir / onnx_filename(tower), vdir / layout.ONNX_FP32)
        # The encoder reads its vocabulary size and dims from model.json; the export record travels with it.
        put(export_dir / layout.MODEL_JSON, vdir / layout.MODEL_JSON)
        put(meta_path, vdir / layout.EXPORT_JSON)
        # The torch variants (mim.serving.torch_backend) build the tower from these weights and model.json.
        put(export_dir / weights_filename(tower), vdir / layout.TORCH_WEIGHTS)
        fp16_src = export_dir / onnx_filename(tower, fp16=True)
        if fp16_src.is_file():
            put(fp16_src, vdir / layout.ONNX_FP16)
        else:
            _remove(vdir / layout.ONNX_FP16, "no FP16 ONNX in this export")
        plan, plan_meta = (
            export_dir / plan_filename(tower),
            export_dir / (plan_filename(tower) + layout.PLAN_META_SUFFIX),
        )
        if _plan_model_id(plan_meta) == model_id and plan.is_file():
            put(plan, vdir / layout.TRT_PLAN)
            put(plan_meta, vdir / layout.PLAN_META)
        elif _plan_model_id(vdir / layout.PLAN_META) != model_id:
            _remove(vdir / layout.TRT_PLAN, f"it was not built from model {model_id}")
            _remove(vdir / layout.PLAN_META, "its engine was removed")

    for model in (contract.PREPROCESS_IMAGE, contract.PREPROCESS_TEXT):
        put(export_dir / layout.PREPROCESS_JSON, layout.version_dir(repo_dir, model) / layout.PREPROCESS_JSON)
    text_dir = layout.version_dir(repo_dir, contract.PREPROCESS_TEXT)
    put(export_dir / layout.TOKENIZER_JSON, text_dir / layout.TOKENIZER_JSON)

    # Regenerated with this model's concrete dims, and its identity as the encoders' `model_id` parameter.
    model_cfg = ModelConfig.from_dict(json.loads((export_dir / layout.MODEL_JSON).read_text()))
    pre_cfg = PreprocessConfig.from_dict(json.loads((export_dir / layout.PREPROCESS_JSON).read_text()))
    write_repository(repo_dir, model_cfg, pre_cfg, model_id=model_id)
    return written


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _plan_model_id(meta_path: Path) -> str | None:
    return (read_json(meta_path) or {}).get(layout.MODEL_ID)


def _copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _remove(path: Path, why: str) -> None:
    if path.exists():
        path.unlink()
        log.info("removed %s: %s", path, why)
