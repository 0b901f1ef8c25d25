"""The Triton model repository, generated from the tensor contract (`mim.contract`).

    mimsearch repository --write                 # (re)write model_repository/ for the tiny size
    mimsearch repository --check                 # list differences, exit 1 if any
    mimsearch repository --write --checkpoint artifacts/ckpt --repository /srv/repo

Every `config.pbtxt` is built as Triton's own protobuf (`tritonclient.grpc.model_config_pb2.ModelConfig`),
checked against the contract, written with `google.protobuf.text_format` and parsed back, so a config that
Triton's schema would refuse never reaches disk. Tensor names and dtypes come from the contract; the concrete
dims come from a (ModelConfig, PreprocessConfig) pair.

One repository tree serves every machine:

    <model>/config.pbtxt            the production default (TensorRT engines for the two encoders)
    <model>/configs/cpu.pbtxt       encoders as python-backend models running model.onnx on ONNX Runtime (CPU)
    <model>/configs/gpu_onnx.pbtxt  encoders on a GPU without TensorRT: model.fp16.onnx, CUDA provider
    <model>/configs/torch.pbtxt     encoders as python-backend models running the towers in torch (CPU, FP32)
    <model>/configs/gpu_torch.pbtxt the towers in torch on a GPU: FP16, CUDA graphs, GPU tensors via DLPack

and `tritonserver --model-config-name=cpu` picks `configs/cpu.pbtxt` where a model has one and falls back to
`config.pbtxt` elsewhere (checked on tritonserver 2.51). Models without variants (preprocessing, fusion,
ensembles) have a single config.

Fusion weight: tritonserver 2.51 forwards the parameters of a request sent to an ensemble to every composing
model (checked: a python model inside an ensemble sees the ensemble request's parameters), so the `fuse` model
reads the image weight from the request parameter `contract.FUSION_WEIGHT_PARAM`, with the model config
parameter `default_image_weight` as the default. No extra input tensor is needed.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from mim import contract
from mim.atomic import atomic_write_text

# File and folder names of the repository are mim.layout's. Ensembles have no files of their own, but Triton
# refuses one without a version folder ("at least one version must be available"): git keeps it by KEEP_FILE.
from mim.layout import (
    ARTIFACT_GLOBS,
    DEFAULT_CONFIG,
    KEEP_FILE,
    MODEL_ID,
    MODEL_PY,
    PREPROCESS_JSON,
    VERSION,
)
from mim.model.config import ModelConfig, PreprocessConfig, get_size
from mim.serving.runtimes import DEFAULT as DEFAULT_VARIANT
from mim.serving.runtimes import GPU_TORCH, PLATFORMS, VARIANTS, Variant

DEFAULT_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
DEFAULT_SIZE = "tiny"
WRITE_COMMAND = "mimsearch repository --write"

# The encoders' config variants, their runtimes and knobs are mim.serving.runtimes's VARIANTS table.


# --- serving knobs, each with its reason ------------------------------------------------------------------
# Image decoding + resizing is CPU-bound Python: one instance per core on the 2-core CI machine. On a GPU
# server, raise it until preprocessing keeps the engine busy (perf_analyzer shows the queue time per model).
PREPROCESS_IMAGE_INSTANCES = 2
# The fast tokenizer takes microseconds per title; one instance keeps up with any encoder.
PREPROCESS_TEXT_INSTANCES = 1
# Fusion is a few vector ops per row.
FUSE_INSTANCES = 1
# kNN: one instance holds the gallery once; the dynamic batcher hands it every query waiting, which turns an
# exact scan from one pass over the gallery per query into one matrix product per batch.
KNN_INSTANCES = 1
KNN_DEVICE = "auto"  # KnnIndex: a CUDA device where torch can use one, the CPU otherwise
# The gpu_torch variant: the gallery in FP16 on the instance's GPU, and the query embeddings taken where the
# encoders left them (FORCE_CPU_ONLY_INPUT_TENSORS=no: GPU tensors through DLPack, no host copy).
GPU_KNN_PARAMS = {"device": "cuda", "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
# BLAS / OpenMP threads of the CPU search. One: the encoders' ONNX Runtime threads already use the cores, and
# threads that wait by spinning slow everyone down on a shared machine; measured on 2 loaded cores (100k x 128
# gallery, k=10), 1 thread searched a batch of 16 in 41 ms against 108 ms with 2 threads.
KNN_THREADS = 1
# Python models: no queue delay. Under load, requests queue while an instance is busy and are batched anyway;
# a delay would only add latency to an idle server.
PYTHON_QUEUE_DELAY_US = 0


@dataclass(frozen=True)
class GeneratedConfig:
    """One config file of one model: where it goes, the protobuf, and the reasons shown in its header."""

    model: str
    relpath: str  # inside the model folder: config.pbtxt or configs/<variant>.pbtxt
    config: pb.ModelConfig
    notes: tuple[str, ...] = field(default=())

    @property
    def path(self) -> str:
        return f"{self.model}/{self.relpath}"


class RepositoryError(ValueError):
    pass


# --- building blocks ---------------------------------------------------------------------------------------
def _dims(spec: contract.TensorSpec, model_cfg: ModelConfig, pre_cfg: PreprocessConfig) -> list[int]:
    return list(spec.resolve_dims(model_cfg, pre_cfg))


def _data_type(spec: contract.TensorSpec) -> int:
    return pb.DataType.Value(spec.triton_type)


def _base(name: str, model_cfg: ModelConfig, pre_cfg: PreprocessConfig) -> pb.ModelConfig:
    io = contract.MODELS[name]
    cfg = pb.ModelConfig(name=name, max_batch_size=contract.MAX_BATCH_SIZE)
    for spec in io.inputs:
        cfg.input.add(name=spec.name, data_type=_data_type(spec), dims=_dims(spec, model_cfg, pre_cfg))
    for spec in io.outputs:
        cfg.output.add(name=spec.name, data_type=_data_type(spec), dims=_dims(spec, model_cfg, pre_cfg))
    return cfg


def _python_model(
    name: str,
    model_cfg: ModelConfig,
    pre_cfg: PreprocessConfig,
    *,
    instances: int,
    kind: int = pb.ModelInstanceGroup.KIND_CPU,
    queue_delay_us: int = PYTHON_QUEUE_DELAY_US,
    params: dict[str, str] | None = None,
) -> pb.ModelConfig:
    cfg = _base(name, model_cfg, pre_cfg)
    cfg.backend = "python"
    cfg.instance_group.add(kind=kind, count=instances)
    cfg.dynamic_batching.SetInParent()  # present even when every field keeps its default
    cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    for key, value in (params or {}).items():
        cfg.parameters[key].string_value = value
    return cfg


def _with_header(cfg: GeneratedConfig, model_cfg: ModelConfig, pre_cfg: PreprocessConfig) -> str:
    lines = [
        f"# Generated by `{WRITE_COMMAND}` (mim/serving/repository.py) from the tensor contract in",
        "# mim/contract.py; do not edit by hand: change the generator and run the command again.",
        f"# Size {model_cfg.name!r}: image_size={pre_cfg.image_size} context_length={pre_cfg.context_length} "
        f"embed_dim={model_cfg.embed_dim}.",
    ]
    lines += [f"# {note}" for note in cfg.notes]
    return "\n".join(lines) + "\n" + text_format.MessageToString(cfg.config)


# --- the models --------------------------------------------------------------------------------------------
def preprocess_image_configs(model_cfg: ModelConfig, pre_cfg: PreprocessConfig) -> list[GeneratedConfig]:
    name = contract.PREPROCESS_IMAGE
    cfg = _python_model(name, model_cfg, pre_cfg, instances=PREPROCESS_IMAGE_INSTANCES)
    notes = (
        f"Encoded image bytes -> normalised pixels; reads {VERSION}/{PREPROCESS_JSON} (written by the exporter).",
        f"{PREPROCESS_IMAGE_INSTANCES} CPU instances: decoding is CPU-bound; one per core on the 2-core CI machine.",
    )
    return [GeneratedConfig(name, DEFAULT_CONFIG, cfg, notes)]


def preprocess_text_configs(model_cfg: ModelConfig, pre_cfg: PreprocessConfig) -> list[GeneratedConfig]:
    name = contract.PREPROCESS_TEXT
    cfg = _python_model(name, model_cfg, pre_cfg, instances=PREPROCESS_TEXT_INSTANCES)
    notes = (f"UTF-8 text -> token ids + mask; reads {VERSION}/{PREPROCESS_JSON} and the tokenizer file it names.",)
    return [GeneratedConfig(name, DEFAULT_CONFIG, cfg, notes)]


def encoder_configs(
    name: str, model_cfg: ModelConfig, pre_cfg: PreprocessConfig, model_id: str | None = None
) -> list[GeneratedConfig]:
    """One config per row of `runtimes.VARIANTS` for one encoder (the TensorRT default and the python-backend
    variants). With `model_id` (an installed checkpoint), every variant carries it as the parameter
    `mim.layout.MODEL_ID`, which clients read through the model-config API to learn which model the server runs."""
    identity = {MODEL_ID: model_id} if model_id else {}
    return [
        GeneratedConfig(name, v.relpath, _variant_config(name, v, model_cfg, pre_cfg, identity), _variant_notes(v))
        for v in VARIANTS
    ]


def _variant_config(
    name: str, v: Variant, model_cfg: ModelConfig, pre_cfg: PreprocessConfig, identity: dict[str, str]
) -> pb.ModelConfig:
    kind = pb.ModelInstanceGroup.KIND_GPU if v.gpu else pb.ModelInstanceGroup.KIND_CPU
    params = {**v.config_params, **identity}
    if v.runtime in PLATFORMS:  # a Triton backend of its own: the engine file, no python model
        cfg = _base(name, model_cfg, pre_cfg)
        cfg.platform, cfg.default_model_filename = PLATFORMS[v.runtime]
        cfg.instance_group.add(kind=kind, count=v.instances)
        cfg.dynamic_batching.max_queue_delay_microseconds = v.queue_delay_us
        for key, value in params.items():
            cfg.parameters[key].string_value = value
    else:
        cfg = _python_model(
            name, model_cfg, pre_cfg, instances=v.instances, kind=kind, queue_delay_us=v.queue_delay_us, params=params
        )
    cfg.dynamic_batching.preferred_batch_size.extend(v.preferred_batch_sizes)
    return cfg


# The variant list in the default config's header wraps where the other header lines end (within 100 columns).
_NOTE_WIDTH = 96


def _variant_notes(v: Variant) -> tuple[str, ...]:
    if v.name != DEFAULT_VARIANT:
        return v.notes
    others = [f"{o.name} ({o.label})" for o in VARIANTS if o.name != DEFAULT_VARIANT]
    listing = f"Other machines: --model-config-name={', '.join(others[:-1])} or {others[-1]}."
    return (*v.notes, *textwrap.wrap(listing, _NOTE_WIDTH, break_on_hyphens=False))


def fuse_configs(model_cfg: ModelConfig, pre_cfg: PreprocessConfig) -> list[GeneratedConfig]:
    name = contract.FUSE
    cfg = _python_model(
        name,
        model_cfg,
        pre_cfg,
        instances=FUSE_INSTANCES,
        params={"default_image_weight": repr(float(contract.DEFAULT_IMAGE_WEIGHT))},
    )
    notes = (
        f"embedding = normalize(w * image_embeds + (1 - w) * text_embeds); w from the request parameter "
        f"{contract.FUSION_WEIGHT_PARAM!r}",
        "(Triton forwards an ensemble request's parameters to its steps), else default_image_weight.",
    )
    return [GeneratedConfig(name, DEFAULT_CONFIG, cfg, notes)]


@dataclass(frozen=True)
class Step:
    model: str
    input_map: dict[str, str]  # model input name -> ensemble tensor name
    output_map: dict[str, str]  # model output name -> ensemble tensor name


def _ensemble(name: str, steps: Sequence[Step], model_cfg: ModelConfig, pre_cfg: PreprocessConfig) -> pb.ModelConfig:
    cfg = _base(name, model_cfg, pre_cfg)
    cfg.platform = "ensemble"
    for step in steps:
        s = cfg.ensemble_scheduling.step.add(model_name=step.model, model_version=-1)
        s.input_map.update(step.input_map)
        s.output_map.update(step.output_map)
    return cfg


def _identity(*specs: contract.TensorSpec) -> dict[str, str]:
    return {s.name: s.name for s in specs}


def ensemble_steps() -> dict[str, list[Step]]:
    """The three ensembles. Internal tensors keep the contract names of the tensors they carry."""
    c = contract
    image_chain = [
        Step(c.PREPROCESS_IMAGE, _identity(c.IMAGE), _identity(c.PIXEL_VALUES)),
        Step(c.IMAGE_ENCODER, _identity(c.PIXEL_VALUES), _identity(c.IMAGE_EMBEDS)),
    ]
    text_chain = [
        Step(c.PREPROCESS_TEXT, _identity(c.TEXT), _identity(c.INPUT_IDS, c.ATTENTION_MASK)),
        Step(c.TEXT_ENCODER, _identity(c.INPUT_IDS, c.ATTENTION_MASK), _identity(c.TEXT_EMBEDS)),
    ]

    def ending_in_embedding(chain: list[Step], out: contract.TensorSpec) -> list[Step]:
        last = chain[-1]
        return chain[:-1] + [Step(last.model, last.input_map, {out.name: c.EMBEDDING.name})]

    fuse = Step(c.FUSE, _identity(c.IMAGE_EMBEDS, c.TEXT_EMBEDS), _identity(c.EMBEDDING))
    embed = {
        c.EMBED_IMAGE: ending_in_embedding(image_chain, c.IMAGE_EMBEDS),
        c.EMBED_TEXT: ending_in_embedding(text_chain, c.TEXT_EMBEDS),
        # Triton runs each step as soon as its inputs exist, so the two chains run concurrently.
        c.EMBED_MULTIMODAL: image_chain + text_chain + [fuse],
    }
    # Search in one request: the embedding ensemble's steps, then the kNN over the served gallery.
    knn = Step(c.KNN, _identity(c.EMBEDDING), _identity(c.IDS, c.SCORES, c.ITEM_METADATA))
    search = {
        c.SEARCH_IMAGE: embed[c.EMBED_IMAGE] + [knn],
        c.SEARCH_TEXT: embed[c.EMBED_TEXT] + [knn],
        c.SEARCH_MULTIMODAL: embed[c.EMBED_MULTIMODAL] + [knn],
    }
    return {**embed, **search}


def knn_configs(model_cfg: ModelConfig, pre_cfg: PreprocessConfig) -> list[GeneratedConfig]:
    name = contract.KNN
    params = {"default_k": str(contract.DEFAULT_K), "device": KNN_DEVICE, "threads": str(KNN_THREADS)}
    cfg = _python_model(name, model_cfg, pre_cfg, instances=KNN_INSTANCES, params=params)
    gpu = _python_model(
        name,
        model_cfg,
        pre_cfg,
        instances=KNN_INSTANCES,
        kind=pb.ModelInstanceGroup.KIND_GPU,
        params={**params, **GPU_KNN_PARAMS},
    )
    notes = (
        "Exact top-k (mim.search.knn.KnnIndex) over the gallery of the latest version folder, installed by "
        "`python -m client.cli index ... --install REPO`.",
        f"Request parameters {contract.K_PARAM!r} (default {contract.DEFAULT_K}) and {contract.CATEGORIES_PARAM!r} "
        "(JSON list); one instance, batched queries are one matrix product.",
    )
    gpu_notes = (
        f"Selected by --model-config-name={GPU_TORCH}: the same KnnIndex with the gallery in FP16 on the "
        "instance's GPU (one tensor-core product per tile),",
        "query embeddings taken as GPU tensors where the encoders left them (DLPack, no host copy).",
    )
    return [
        GeneratedConfig(name, DEFAULT_CONFIG, cfg, notes),
        GeneratedConfig(name, f"configs/{GPU_TORCH}.pbtxt", gpu, gpu_notes),
    ]


def ensemble_configs(model_cfg: ModelConfig, pre_cfg: PreprocessConfig) -> list[GeneratedConfig]:
    out = []
    for name, steps in ensemble_steps().items():
        chain = " + ".join(s.model for s in steps)
        cfg = _ensemble(name, steps, model_cfg, pre_cfg)
        out.append(GeneratedConfig(name, DEFAULT_CONFIG, cfg, (f"Ensemble: {chain}.",)))
    return out


def build_configs(
    model_cfg: ModelConfig | None = None, pre_cfg: PreprocessConfig | None = None, model_id: str | None = None
) -> list[GeneratedConfig]:
    """Every config file of the repository, validated against the contract. `model_id`: see encoder_configs."""
    model_cfg, pre_cfg = resolve_configs(model_cfg, pre_cfg)
    configs = (
        preprocess_image_configs(model_cfg, pre_cfg)
        + preprocess_text_configs(model_cfg, pre_cfg)
        + encoder_configs(contract.IMAGE_ENCODER, model_cfg, pre_cfg, model_id)
        + encoder_configs(contract.TEXT_ENCODER, model_cfg, pre_cfg, model_id)
        + fuse_configs(model_cfg, pre_cfg)
        + knn_configs(model_cfg, pre_cfg)
        + ensemble_configs(model_cfg, pre_cfg)
    )
    missing = set(contract.MODELS) - {c.model for c in configs}
    if missing:
        raise RepositoryError(f"no config generated for contract models {sorted(missing)}")
    by_name = {c.model: c.config for c in configs if c.relpath == DEFAULT_CONFIG}
    problems = [p for c in configs for p in validate_config(c.config, model_cfg, pre_cfg, by_name)]
    if problems:
        raise RepositoryError("generated configs disagree with the contract:\n  " + "\n  ".join(problems))
    return configs


def resolve_configs(
    model_cfg: ModelConfig | None, pre_cfg: PreprocessConfig | None
) -> tuple[ModelConfig, PreprocessConfig]:
    spec = get_size(DEFAULT_SIZE)
    model_cfg = model_cfg or spec.model
    pre_cfg = pre_cfg or spec.preprocess
    if pre_cfg.image_size != model_cfg.vision.image_size or pre_cfg.context_length != model_cfg.text.context_length:
        raise RepositoryError(
            f"preprocess config (image_size={pre_cfg.image_size}, context_length={pre_cfg.context_length}) "
            f"disagrees with model {model_cfg.name!r} (image_size={model_cfg.vision.image_size}, "
            f"context_length={model_cfg.text.context_length}); pass the pair saved with one checkpoint"
        )
    return model_cfg, pre_cfg


# --- validation --------------------------------------------------------------------------------------------
def _tensor_problems(
    where: str, got: Sequence, specs: Sequence[contract.TensorSpec], model_cfg: ModelConfig, pre_cfg: PreprocessConfig
) -> list[str]:
    want = [(s.name, s.triton_type, _dims(s, model_cfg, pre_cfg)) for s in specs]
    have = [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in got]
    if have != want:
        return [f"{where}: got {have}, the contract expects {want}"]
    return []


def validate_config(
    cfg: pb.ModelConfig,
    model_cfg: ModelConfig,
    pre_cfg: PreprocessConfig,
    models: dict[str, pb.ModelConfig] | None = None,
) -> list[str]:
    """Differences between one model config and the contract (empty list: it agrees). With `models` (name ->
    default config), ensemble steps are also checked to wire existing models and tensors."""
    if cfg.name not in contract.MODELS:
        return [f"model {cfg.name!r} is not in the contract; expected one of {sorted(contract.MODELS)}"]
    io = contract.MODELS[cfg.name]
    problems = _tensor_problems(f"{cfg.name} inputs", cfg.input, io.inputs, model_cfg, pre_cfg)
    problems += _tensor_problems(f"{cfg.name} outputs", cfg.output, io.outputs, model_cfg, pre_cfg)
    if cfg.max_batch_size != contract.MAX_BATCH_SIZE:
        problems.append(f"{cfg.name}: max_batch_size={cfg.max_batch_size}, expected {contract.MAX_BATCH_SIZE}")
    if cfg.platform == "ensemble" and models is not None:
        problems += _ensemble_problems(cfg, models)
    return problems


def _ensemble_problems(cfg: pb.ModelConfig, models: dict[str, pb.ModelConfig]) -> list[str]:
    """Every step names an existing model and its real tensors; every tensor a step reads is an ensemble input
    or written by an earlier step; every ensemble output is written by some step."""
    problems = []
    available = {t.name for t in cfg.input}
    for i, step in enumerate(cfg.ensemble_scheduling.step):
        where = f"{cfg.name} step {i} ({step.model_name})"
        target = models.get(step.model_name)
        if target is None:
            problems.append(f"{where}: no model named {step.model_name!r} in the repository")
            continue
        inputs, outputs = {t.name for t in target.input}, {t.name for t in target.output}
        if set(step.input_map) != inputs:
            problems.append(f"{where}: maps inputs {sorted(step.input_map)}, the model has {sorted(inputs)}")
        if not set(step.output_map) <= outputs:
            problems.append(f"{where}: maps outputs {sorted(step.output_map)}, the model has {sorted(outputs)}")
        unread = sorted(set(step.input_map.values()) - available)
        if unread:
            problems.append(f"{where}: reads {unread} before any step writes them")
        available |= set(step.output_map.values())
    unwritten = sorted({t.name for t in cfg.output} - available)
    if unwritten:
        problems.append(f"{cfg.name}: outputs {unwritten} are written by no step")
    return problems


def parse_config(text: str, path: str = "<text>") -> pb.ModelConfig:
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"{path}: not a valid Triton ModelConfig: {e}") from None


# --- files -------------------------------------------------------------------------------------------------
MODEL_PY_TEMPLATE = '''\
# Generated by `{command}` (mim/serving/repository.py); do not edit by hand.
"""Triton python-backend entry point of `{name}`.

Thin on purpose: the set-up and the request logic live in mim.serving.backends (unit-tested without Triton),
the Triton tensor plumbing in mim.serving.python_backend. Files come from this version folder.
"""

import triton_python_backend_utils as pb_utils

from mim.serving import python_backend


class TritonPythonModel:
    def initialize(self, args):
        self.handler = python_backend.make_handler("{name}", args)

    def execute(self, requests):
        return python_backend.execute(pb_utils, self.handler, requests)

    def finalize(self):
        self.handler = None
'''


def python_models() -> list[str]:
    """Models with a python-backend variant, i.e. those that need `1/model.py`."""
    names = [contract.PREPROCESS_IMAGE, contract.PREPROCESS_TEXT, contract.IMAGE_ENCODER, contract.TEXT_ENCODER]
    return names + [contract.FUSE, contract.KNN]


def render_repository(
    model_cfg: ModelConfig | None = None, pre_cfg: PreprocessConfig | None = None, model_id: str | None = None
) -> dict[str, str]:
    """Relative path -> file content of every generated file."""
    model_cfg, pre_cfg = resolve_configs(model_cfg, pre_cfg)
    files: dict[str, str] = {}
    for cfg in build_configs(model_cfg, pre_cfg, model_id):
        text = _with_header(cfg, model_cfg, pre_cfg)
        if parse_config(text, cfg.path) != cfg.config:  # round trip through Triton's schema
            raise RepositoryError(f"{cfg.path}: text form does not parse back into the same ModelConfig")
        files[cfg.path] = text
    for name in python_models():
        files[f"{name}/{VERSION}/{MODEL_PY}"] = MODEL_PY_TEMPLATE.format(command=WRITE_COMMAND, name=name)
    for name in ensemble_steps():
        files[f"{name}/{VERSION}/{KEEP_FILE}"] = ""
    return dict(sorted(files.items()))


def write_repository(
    repo_dir: str | Path,
    model_cfg: ModelConfig | None = None,
    pre_cfg: PreprocessConfig | None = None,
    *,
    model_id: str | None = None,
) -> list[Path]:
    """Write every config.pbtxt, configs/*.pbtxt and 1/model.py into `repo_dir` (artifacts already there are
    kept). Defaults to the `tiny` size and no model id (the committed repository). Returns the written paths."""
    repo = Path(repo_dir)
    stray = _stray_entries(repo)
    if stray:
        raise RepositoryError(
            f"{repo} holds {stray} at its top level; Triton treats every top-level entry as a model folder, "
            "so remove them (a model repository holds model folders only)"
        )
    written = []
    for rel, text in render_repository(model_cfg, pre_cfg, model_id).items():
        path = repo / rel
        if not (path.is_file() and path.read_text() == text):  # unchanged content: keep the file (and its mtime)
            atomic_write_text(path, text)
        written.append(path)
    return written


def prepare_repository(dst: str | Path, *, fresh: bool = False, source: str | Path = DEFAULT_REPOSITORY) -> Path:
    """Copy the committed repository tree (configs, model.py files) to `dst`, leaving out any export artifacts
    it holds (`mim.layout.ARTIFACT_GLOBS`), so `export.engines.install` can install a checkpoint into the copy.
    `fresh` removes `dst` first; otherwise artifacts already in `dst` stay (install replaces what it installs)."""
    dst = Path(dst)
    if fresh and dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(source, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*ARTIFACT_GLOBS))
    return dst


def _stray_entries(repo: Path) -> list[str]:
    if not repo.is_dir():
        return []
    return sorted(p.name for p in repo.iterdir() if p.name not in contract.MODELS)


def check_repository(
    repo_dir: str | Path,
    model_cfg: ModelConfig | None = None,
    pre_cfg: PreprocessConfig | None = None,
    *,
    model_id: str | None = None,
) -> list[str]:
    """Differences between `repo_dir` and what `write_repository` would write (empty list: up to date):
    missing or edited files, configs that do not parse or disagree with the contract, and top-level entries
    that are not models."""
    repo = Path(repo_dir)
    if not repo.is_dir():
        return [f"{repo} is not a directory; run `{WRITE_COMMAND} --repository {repo}`"]
    model_cfg, pre_cfg = resolve_configs(model_cfg, pre_cfg)
    problems = [f"{name}: not a model of the contract (Triton would load it as one)" for name in _stray_entries(repo)]
    parsed: dict[str, pb.ModelConfig] = {}
    rendered = render_repository(model_cfg, pre_cfg, model_id)
    for rel, want in rendered.items():
        path = repo / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        got = path.read_text()
        if rel.endswith(".pbtxt"):
            try:
                parsed[rel] = parse_config(got, rel)
            except RepositoryError as e:
                problems.append(str(e))
                continue
        if got != want:
            problems.append(f"{rel}: differs from the generator's output")
    for path in sorted(repo.glob("*/config.pbtxt")) + sorted(repo.glob("*/configs/*.pbtxt")):
        rel = path.relative_to(repo).as_posix()
        if rel not in rendered:
            problems.append(f"{rel}: not written by the generator (a stale variant?); delete it or generate it")
    defaults = {rel.split("/")[0]: c for rel, c in parsed.items() if rel.endswith("/" + DEFAULT_CONFIG)}
    for rel, cfg in parsed.items():
        problems += [f"{rel}: {p}" for p in validate_config(cfg, model_cfg, pre_cfg, defaults)]
    return problems


def configs_for(size: str = DEFAULT_SIZE, checkpoint: str | Path | None = None) -> tuple[ModelConfig, PreprocessConfig]:
    """The (model, preprocessing) configs whose dims a repository is written with: a checkpoint's, else a size's."""
    if checkpoint is not None:
        from mim.model.checkpoint import read_config

        raw = read_config(checkpoint)
        return ModelConfig.from_dict(raw["model"]), PreprocessConfig.from_dict(raw["preprocess"])
    spec = get_size(size)
    return spec.model, spec.preprocess
