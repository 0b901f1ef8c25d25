"""THE layout of an installed Triton model repository, and the identity of the model it serves.

As `mim.contract` owns the tensors, this module owns the files: every module that writes, copies or reads an
installed repository takes the names from here. Torch-free, so a client or a benchmark can import it cheaply.

An installed repository (generated configs from `mim.serving.repository`, artifacts from `export.engines`):

    <model>/config.pbtxt, <model>/configs/*.pbtxt   generated configs (committed)
    <model>/1/model.py                              python-backend entry point (generated, committed)
    <ensemble>/1/.gitkeep                           Triton needs a version folder even for an ensemble
    image_encoder/1/model.onnx                      FP32 ONNX (CPU / ONNX Runtime)
    image_encoder/1/model.fp16.onnx                 FP16 ONNX (GPU without TensorRT)
    image_encoder/1/model.plan, model.plan.json     TensorRT FP16 engine and what it was built for
    image_encoder/1/model.json                      ModelConfig of the checkpoint (concrete dims, vocabulary)
    image_encoder/1/model.safetensors               the tower's torch weights (`torch` / `gpu_torch` variants)
    image_encoder/1/export.json                     the export record: source model id, opset, parity figures
    text_encoder/1/...                              the same
    preprocess_image/1/preprocess.json              PreprocessConfig of the checkpoint
    preprocess_text/1/preprocess.json, tokenizer.json
    knn/<version>/gallery.safetensors               the served gallery (a KnnIndex file), one per version folder:
                                                    each new gallery is installed as the next version

The identity of a served model is `model_id`: the first 16 hex digits of the SHA-256 of the checkpoint's
weights file, so it is the same for every copy of the weights and changes with any retraining. It is written
(1) into `export.json` and `model.plan.json` under the key `MODEL_ID` when the checkpoint is exported, and
(2) as the config parameter `MODEL_ID` of both encoders when the checkpoint is installed. A client reads (2)
through Triton's model-config API (`served_model_id`), and a gallery (`mim.search.knn.KnnIndex`) stores the id it was
embedded with and refuses to load against another one. The committed repository holds no checkpoint, so its
configs carry no `MODEL_ID` parameter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mim import contract
from mim.errors import ModelError

# --- folders and files ---------------------------------------------------------------------------------------
VERSION = "1"  # the one version folder of every model; Triton serves the highest version found
DEFAULT_CONFIG = "config.pbtxt"
MODEL_PY = "model.py"
KEEP_FILE = ".gitkeep"

ONNX_FP32, ONNX_FP16 = "model.onnx", "model.fp16.onnx"
TRT_PLAN = "model.plan"
# What an engine was built for sits next to it: model.plan -> model.plan.json (<tower>.plan.json in an export).
PLAN_META_SUFFIX = ".json"
PLAN_META = TRT_PLAN + PLAN_META_SUFFIX
PREPROCESS_JSON = "preprocess.json"
MODEL_JSON = "model.json"
EXPORT_JSON = "export.json"
TOKENIZER_JSON = "tokenizer.json"  # the checkpoint's tokenizer file, copied unchanged
TORCH_WEIGHTS = "model.safetensors"  # an encoder's own tower weights, for the torch variants

GALLERY_FILE = "gallery.safetensors"  # in each version folder of the knn model (mim.serving.gallery)

ENCODERS = (contract.IMAGE_ENCODER, contract.TEXT_ENCODER)

# What an export puts into the repository (gitignored; skipped when the committed tree is copied).
ARTIFACT_GLOBS = (
    "*.onnx",
    "*.plan",
    "*.plan.json",
    PREPROCESS_JSON,
    MODEL_JSON,
    EXPORT_JSON,
    TOKENIZER_JSON,
    "*.safetensors",
    "__pycache__",
)


def version_dir(repository: str | Path, model: str) -> Path:
    return Path(repository) / model / VERSION


def installed_files(repository: str | Path, *, fp16: bool = True, plan: bool = False) -> list[Path]:
    """Every artifact file `export.engines.install` puts into `repository` (FP16 ONNX and engines optional)."""
    repo = Path(repository)
    files = [
        version_dir(repo, contract.PREPROCESS_IMAGE) / PREPROCESS_JSON,
        version_dir(repo, contract.PREPROCESS_TEXT) / PREPROCESS_JSON,
        version_dir(repo, contract.PREPROCESS_TEXT) / TOKENIZER_JSON,
    ]
    for tower in ENCODERS:
        vdir = version_dir(repo, tower)
        files += [vdir / ONNX_FP32, vdir / MODEL_JSON, vdir / EXPORT_JSON, vdir / TORCH_WEIGHTS]
        files += [vdir / ONNX_FP16] if fp16 else []
        files += [vdir / TRT_PLAN, vdir / PLAN_META] if plan else []
    return files


# --- model identity -------------------------------------------------------------------------------------------
MODEL_ID = "model_id"  # key in export.json / model.plan.json, and the encoders' config parameter
CHECKPOINT_WEIGHTS = "model.safetensors"  # the weights file of a checkpoint folder (mim.model.checkpoint)
MODEL_ID_DIGITS = 16


def model_id_of_checkpoint(ckpt_dir: str | Path) -> str:
    """The identity of the model in the checkpoint folder `ckpt_dir`: a hash of its weights file."""
    weights = Path(ckpt_dir) / CHECKPOINT_WEIGHTS
    if not weights.is_file():
        what = "not a folder" if not Path(ckpt_dir).is_dir() else "the folder has no weights"
        raise ModelError(
            f"{weights} not found ({what}); expected a checkpoint folder written by `mimsearch train` or "
            "`mimsearch import-clip`: give that folder as --checkpoint"
        )
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:MODEL_ID_DIGITS]


def model_id_in_config(parameters: Mapping[str, Any]) -> str | None:
    """The model id in a model config's `parameters` (protobuf map of ModelParameter, or the JSON form
    {name: {"string_value": ...}}); None when the repository carries none (the committed, uninstalled one)."""
    if MODEL_ID not in parameters:
        return None
    value = parameters[MODEL_ID]
    value = value.get("string_value") if isinstance(value, Mapping) else value.string_value
    return value or None


def served_model_id(model_config: Any) -> str | None:
    """The model id of a served encoder, from its config as Triton's model-config API returns it
    (`tritonclient.grpc` ModelConfig protobuf)."""
    return model_id_in_config(model_config.parameters)


def installed_model_id(repository: str | Path) -> str:
    """The model id of the checkpoint installed in `repository`, from both encoders' export records (which
    must agree): what a gallery served from the same repository must have been embedded with. ValueError,
    saying what to do, when a record is missing or the encoders disagree."""
    ids = {}
    for tower in ENCODERS:
        path = version_dir(repository, tower) / EXPORT_JSON
        try:
            value = json.loads(path.read_text()).get(MODEL_ID)
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{path} is missing or unreadable ({e}); install the exported model first "
                "(`mimsearch engines --checkpoint CKPT --repository REPO`)"
            ) from None
        if not value:
            raise ValueError(f"{path} has no {MODEL_ID!r}; reinstall the checkpoint (`mimsearch engines`)")
        ids[tower] = str(value)
    if len(set(ids.values())) != 1:
        raise ValueError(f"the encoders come from different checkpoints {ids}; install one checkpoint for both")
    return next(iter(ids.values()))


UNKNOWN_MODEL_ID_HELP = (
    "the served model's identity is unknown: its encoders' configs carry no `model_id` parameter, which "
    "`mimsearch engines --checkpoint CKPT --repository REPO` writes when it installs a checkpoint; reinstall "
    "the checkpoint the server runs (and restart the server), or pass --model-id ID"
)
