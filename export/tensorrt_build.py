"""TensorRT 10 FP16 engines from the exported ONNX towers, in small named steps (Polygraphy's style):

    network_from_onnx   parse the ONNX; every parser error is reported with its node
    profile_for         one contract tensor's (min, opt, max) shapes; `tower_profile` does all of a tower's inputs
    pin_fp32_layers     LayerNorm / softmax / reductions / the final L2 norm stay FP32 under the FP16 flag
    config_for          builder config: FP16 + OBEY_PRECISION_CONSTRAINTS, profile, timing cache
    build_engine        the above, serialise, log the engine's I/O signature, write plan + plan.json
    engine_is_current   refuse a plan built for another GPU / TensorRT version / checkpoint / profile
    engine_parity       run the engine on random inputs against ONNX Runtime (cosine gate)

`tensorrt` is imported inside the functions that need it, so this module (and `make engines`, which then
installs the ONNX path only) loads on machines without TensorRT. The pure logic (profiles, staleness, the
"not available" reason) is tested everywhere; builds and parity are tested where TensorRT and a GPU exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mim import contract, layout
from mim.layout import PLAN_META_SUFFIX
from mim.model.config import ModelConfig, dumps
from mim.search.ranking import parity

from .install import plan_filename

log = logging.getLogger(__name__)

ENGINE_MIN_COSINE = 0.999  # FP16 engine vs FP32 ONNX Runtime, same gate as the FP16 ONNX variant
WORKSPACE_BYTES = 4 << 30  # scratch memory tactics may use; 4 GiB leaves most of the GPU for the other engines

Shape = tuple[int, ...]
# Per input name: (min, opt, max) shapes of one optimization profile.
Profile = dict[str, tuple[Shape, Shape, Shape]]


class TensorRTError(RuntimeError):
    pass


# --- availability ------------------------------------------------------------------------------------------
def tensorrt_unavailable_reason() -> str | None:
    """None when engines can be built here; otherwise why not, in words fit for a one-line message."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:  # the usual case off NVIDIA's index: "No module named 'tensorrt'"
        return str(e)
    except Exception as e:  # the pip stub raises other errors when its real wheel is missing
        return f"import tensorrt failed: {type(e).__name__}: {e}"
    try:
        import torch
    except ImportError:
        return "torch is needed for CUDA memory when running engines, and it does not import"
    if not torch.cuda.is_available():
        return "tensorrt imports, but no CUDA GPU is visible"
    return None


def _trt():
    import tensorrt as trt

    return trt


@lru_cache(maxsize=1)
def _logger():
    """One TensorRT logger per process (TensorRT expects the same logger for builder and runtime)."""
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


# --- profiles ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchRange:
    """Batch sizes of one optimization profile.

    min: the smallest request the engine must accept: a single interactive query (one photo, one text).
    opt: the batch TensorRT tunes its kernels for: what Triton's dynamic batcher typically forms under steady
         traffic; batches near it run at the best throughput.
    max: the largest batch accepted: Triton's max_batch_size (catalog indexing, bursts). Activation memory is
         reserved for it, so it must not exceed what the serving config will send.
    """

    min: int = 1
    opt: int = 16
    max: int = contract.MAX_BATCH_SIZE

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(
                f"batch range min={self.min} opt={self.opt} max={self.max}; expected 1 <= min <= opt <= max"
            )
        if self.max > contract.MAX_BATCH_SIZE:
            raise ValueError(
                f"max batch {self.max} exceeds the contract's MAX_BATCH_SIZE={contract.MAX_BATCH_SIZE} "
                "(Triton's max_batch_size); raise it in mim/contract.py to serve larger batches"
            )


def profile_for(
    spec: contract.TensorSpec, model_cfg: ModelConfig, batches: BatchRange = BatchRange()
) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) shapes of one contract tensor: only the batch dim varies; the per-item dims are this
    model's (the contract's symbolic dims resolved from its config)."""
    dims = spec.resolve_dims(model_cfg)
    return (batches.min, *dims), (batches.opt, *dims), (batches.max, *dims)


def tower_profile(io: contract.ModelIO, model_cfg: ModelConfig, batches: BatchRange = BatchRange()) -> Profile:
    """The profile of every input of a tower (all inputs of one request share the batch)."""
    return {spec.name: profile_for(spec, model_cfg, batches) for spec in io.inputs}


# --- environment and staleness -----------------------------------------------------------------------------
def current_environment() -> dict[str, Any]:
    """What an engine is bound to: TensorRT version and the GPU (name, compute capability). Engines are not
    portable across either."""
    import torch

    trt = _trt()
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
    }


def engine_staleness(
    plan_path: str | Path,
    model_id: str,
    *,
    environment: Mapping[str, Any] | None = None,
    profile: Profile | None = None,
) -> str | None:
    """None if the plan at `plan_path` can be loaded here for the model `model_id` (mim.layout); otherwise the
    reason to rebuild.

    `environment` defaults to `current_environment()` (needs TensorRT and a GPU); tests pass their own.
    """
    plan_path = Path(plan_path)
    meta_path = plan_path.with_name(plan_path.name + PLAN_META_SUFFIX)
    if not plan_path.is_file():
        return f"no engine at {plan_path}"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return f"{meta_path} missing: cannot tell what the engine was built for"
    except ValueError as e:
        return f"{meta_path} is not valid JSON ({e})"
    if meta.get(layout.MODEL_ID) != model_id:
        return f"engine built from model {meta.get(layout.MODEL_ID)!r}, exporting {model_id!r}"
    env = dict(current_environment() if environment is None else environment)
    for key in ("tensorrt_version", "gpu_name", "compute_capability"):
        if str(meta.get(key)) != str(env.get(key)):
            return f"engine built for {key}={meta.get(key)!r}, this machine has {env.get(key)!r}"
    if profile is not None and _jsonable_profile(profile) != meta.get("profile"):
        return f"engine profile {meta.get('profile')} differs from the requested {_jsonable_profile(profile)}"
    if meta.get("plan_sha256") != _sha256(plan_path):
        return f"{plan_path} was replaced after it was built (sha256 differs from {meta_path.name})"
    return None


def engine_is_current(
    plan_path: str | Path,
    model_id: str,
    *,
    environment: Mapping[str, Any] | None = None,
    profile: Profile | None = None,
) -> bool:
    """Whether the plan may be reused. A stale one (other GPU, TensorRT version, checkpoint, profile) is
    reported and must be rebuilt rather than loaded: TensorRT refuses or misbehaves on foreign plans."""
    reason = engine_staleness(plan_path, model_id, environment=environment, profile=profile)
    if reason is not None:
        log.info("rebuilding %s: %s", plan_path, reason)
    return reason is None


# --- build steps -------------------------------------------------------------------------------------------
def network_from_onnx(onnx_path: str | Path):
    """(builder, network, parser) from an ONNX file. Raises `TensorRTError` listing every parser error."""
    trt = _trt()
    builder = trt.Builder(_logger())
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, _logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            where = f"node {err.node()}"
            if hasattr(err, "node_name"):
                where += f" ({err.node_operator()} {err.node_name()!r})"
            errors.append(f"  {where}: {err.desc()} [{err.code()}]")
        raise TensorRTError(f"TensorRT could not parse {onnx_path}:\n" + "\n".join(errors))
    return builder, network, parser


def fp32_layer_types():
    trt = _trt()
    return {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}


def pin_fp32_layers(network, fp32_node_names: set[str] = frozenset()) -> list[str]:
    """Pin the overflow-prone layers to FP32 under the FP16 flag: LayerNorm (NORMALIZATION), softmax, every
    reduction, sqrt/pow, and the layers of `fp32_node_names` (the ONNX nodes of the final L2 norm). Setting
    only `precision` lets TensorRT convert at the output; `set_output_type` pins the output too.
    Returns the names of the pinned layers."""
    trt = _trt()
    types = fp32_layer_types()
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not (layer.type in types or _is_sqrt_or_pow(layer) or _onnx_node_of(layer.name) in fp32_node_names):
            continue
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.__class__ = trt.INormalizationLayer
            if hasattr(layer, "compute_precision"):
                layer.compute_precision = trt.float32  # the mean/variance accumulation itself
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16):
                layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned


def _is_sqrt_or_pow(layer) -> bool:
    trt = _trt()
    if layer.type == trt.LayerType.UNARY:
        layer.__class__ = trt.IUnaryLayer
        return layer.op in (trt.UnaryOperation.SQRT,)
    if layer.type == trt.LayerType.ELEMENTWISE:
        layer.__class__ = trt.IElementWiseLayer
        return layer.op == trt.ElementWiseOperation.POW
    return False


def _onnx_node_of(layer_name: str) -> str:
    """The ONNX node a layer came from: the parser names a layer after its node, or, where one node becomes
    several layers, gives the node in brackets (`... [ONNX Layer: /ReduceSum]`)."""
    if "[ONNX Layer: " in layer_name:
        return layer_name.split("[ONNX Layer: ", 1)[1].rstrip("]")
    return layer_name


def config_for(builder, network, profile: Profile, *, fp16: bool, timing_cache: bytes = b""):
    """Builder config: workspace, FP16 with precision constraints obeyed, the profile, a timing cache."""
    trt = _trt()
    _check_profile_names(network, profile)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        # Without this flag the pinned precisions are hints TensorRT may ignore when FP16 is faster.
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    # The timing cache records the fastest tactic per layer configuration on this GPU, so a rebuild (new
    # weights, same architecture) skips most of the auto-tuning. A cache from another GPU/TensorRT is refused.
    try:
        accepted = config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=False)
    except Exception as e:  # a truncated or foreign file
        log.warning("timing cache unreadable (%s)", e)
        accepted = False
    if not accepted:
        if timing_cache:
            log.warning("timing cache rejected (written by another GPU / TensorRT version?); timing from scratch")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return config


def _check_profile_names(network, profile: Profile) -> None:
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(profile):
        raise TensorRTError(f"network inputs {names} differ from the profile's {sorted(profile)}; re-export the ONNX")


def io_signature(engine) -> list[dict[str, Any]]:
    """Names, modes, dtypes and shapes (-1 = dynamic) of the engine's I/O, with profile 0's range."""
    trt = _trt()
    rows = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        row = {
            "name": name,
            "mode": "input" if mode == trt.TensorIOMode.INPUT else "output",
            "dtype": str(engine.get_tensor_dtype(name)).rsplit(".", 1)[-1],
            "shape": list(engine.get_tensor_shape(name)),
        }
        if mode == trt.TensorIOMode.INPUT:
            row["profile"] = [list(s) for s in engine.get_tensor_profile_shape(name, 0)]
        rows.append(row)
    return rows


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    fp16: bool = True,
    profile: Profile,
    timing_cache_path: str | Path | None = None,
    model_id: str = "",
) -> dict[str, Any]:
    """Build a TensorRT engine from an ONNX tower and write `plan_path` and `plan_path.json` (what it was
    built for: TensorRT version, GPU, profile, source model_id). Returns that metadata."""
    import onnx

    from mim.atomic import atomic_write_bytes

    from .fp16 import pinned_node_names

    trt = _trt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    builder, network, _parser = network_from_onnx(onnx_path)
    pinned: list[str] = []
    if fp16:
        pinned = pin_fp32_layers(network, pinned_node_names(onnx.load(str(onnx_path), load_external_data=False)))
    cache_path = Path(timing_cache_path) if timing_cache_path else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config = config_for(builder, network, profile, fp16=fp16, timing_cache=cache_bytes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build {onnx_path} (see the TensorRT log above)")
    plan = bytes(serialized)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))

    engine = trt.Runtime(_logger()).deserialize_cuda_engine(plan)
    signature = io_signature(engine)
    for row in signature:
        log.info("  %s %-16s %-6s %s %s", row["mode"], row["name"], row["dtype"], row["shape"], row.get("profile", ""))
    meta = {
        **current_environment(),
        layout.MODEL_ID: model_id,
        "source_onnx": onnx_path.name,
        "fp16": fp16,
        "profile": _jsonable_profile(profile),
        "io": signature,
        "fp32_layers": len(pinned),
        "plan_sha256": hashlib.sha256(plan).hexdigest(),
    }
    atomic_write_bytes(plan_path, plan)
    atomic_write_bytes(plan_path.with_name(plan_path.name + PLAN_META_SUFFIX), dumps(meta).encode())
    log.info("built %s (%.1f MB, %d layers pinned to FP32)", plan_path, len(plan) / 1e6, len(pinned))
    return meta


def _jsonable_profile(profile: Profile) -> dict[str, list[list[int]]]:
    return {name: [list(map(int, s)) for s in shapes] for name, shapes in sorted(profile.items())}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- parity ------------------------------------------------------------------------------------------------
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32", "BOOL": "bool"}


def engine_parity(
    plan_path: str | Path,
    onnx_path: str | Path,
    *,
    model_cfg: ModelConfig | None = None,
    batches: tuple[int, ...] = (1, 7),
    min_cosine: float = ENGINE_MIN_COSINE,
) -> dict[str, Any]:
    """Run the engine (TensorRT runtime, torch CUDA tensors) and the ONNX model (ONNX Runtime, CPU) on the same
    random inputs; every output row must reach `min_cosine`. `model_cfg` defaults to the `model.json`
    beside the ONNX file (the export folder)."""
    import onnx
    import onnxruntime as ort
    import torch

    from .onnx_export import ParityError, random_inputs

    trt = _trt()
    onnx_path = Path(onnx_path)
    if model_cfg is None:
        model_cfg = ModelConfig.from_dict(json.loads((onnx_path.parent / layout.MODEL_JSON).read_text()))
    io = io_for_onnx(onnx.load(str(onnx_path), load_external_data=False))
    engine = trt.Runtime(_logger()).deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise TensorRTError(f"could not deserialize {plan_path}; was it built for this GPU / TensorRT version?")
    context = engine.create_execution_context()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out_name = io.outputs[0].name
    rows = []
    for b in batches:
        feeds = random_inputs(io, model_cfg, b, seed=100 + b)
        ref = sess.run([out_name], feeds)[0]
        keep = []  # device tensors must outlive the launch
        for name, arr in feeds.items():
            t = torch.from_numpy(arr).cuda().contiguous()
            keep.append(t)
            context.set_input_shape(name, tuple(arr.shape))
            context.set_tensor_address(name, t.data_ptr())
        shape = tuple(context.get_tensor_shape(out_name))
        dtype = getattr(torch, _TORCH_DTYPES[str(engine.get_tensor_dtype(out_name)).rsplit(".", 1)[-1]])
        out = torch.empty(shape, dtype=dtype, device="cuda")
        context.set_tensor_address(out_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError(f"{plan_path}: execute_async_v3 failed at batch {b}")
        stream.synchronize()
        p = parity(out.float().cpu().numpy(), ref)
        rows.append({"batch": b, "min_cosine": p.min_cosine, "max_abs_diff": p.max_abs_diff})
    result = {"min_cosine": min(r["min_cosine"] for r in rows), "batches": rows, "min_cosine_gate": min_cosine}
    if result["min_cosine"] < min_cosine:
        raise ParityError(
            f"{plan_path}: engine vs ONNX Runtime cosine {result['min_cosine']:.5f}; expected >= {min_cosine}. "
            "Check that the FP32 pins took effect (TensorRT log) or rebuild without FP16 to locate the layer"
        )
    return result


def io_for_onnx(model) -> contract.ModelIO:
    """The contract model whose input and output names this ONNX graph has."""
    ins = [v.name for v in model.graph.input]
    outs = [v.name for v in model.graph.output]
    for io in contract.MODELS.values():
        if [s.name for s in io.inputs] == ins and [s.name for s in io.outputs] == outs:
            return io
    raise TensorRTError(f"ONNX inputs {ins} / outputs {outs} match no model of mim.contract")


__all__ = [
    "BatchRange",
    "PLAN_META_SUFFIX",
    "TensorRTError",
    "build_engine",
    "config_for",
    "current_environment",
    "engine_is_current",
    "engine_parity",
    "engine_staleness",
    "io_for_onnx",
    "io_signature",
    "network_from_onnx",
    "pin_fp32_layers",
    "plan_filename",
    "profile_for",
    "tensorrt_unavailable_reason",
    "tower_profile",
]
