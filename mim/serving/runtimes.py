"""Encoder runtimes and config variants: one table, one registry.

`VARIANTS` lists every way the two encoders can be served, one row each: the variant's name (what
`tritonserver --model-config-name` and `mimsearch serve --config` select; `default` is each model's
config.pbtxt), its runtime, where its instances run and how many, how it batches, and its config parameters.
The repository generator writes one config per row and encoder (mim.serving.repository), the launcher offers the
rows' names (mim.serving.server), and the GPU benchmark picks its variants from here.

`RUNTIMES` maps each python-backend runtime to the function that builds the encoder's handler, named as
"module:function" and imported only when a model asks for it (the way fsspec's registry names its
implementations), so ONNX Runtime models never import torch. A config names its runtime in the parameter
`RUNTIME_PARAM` (absent: `DEFAULT_RUNTIME`). Every builder has one signature:

    build(name, version_dir, params, dims, device_id) -> Handler

with `params` the model config's string parameters and `dims` its per-row tensor dims. Adding a runtime is one
module holding its builder, one line in RUNTIMES and one row in VARIANTS.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mim import contract
from mim.layout import DEFAULT_CONFIG, ONNX_FP16, ONNX_FP32, TRT_PLAN, VERSION

RUNTIME_PARAM = "encoder_backend"
DEFAULT_RUNTIME = "onnx"

RUNTIMES: dict[str, str] = {
    "onnx": "mim.serving.backends:build_onnx_encoder",  # ONNX Runtime, CPU or CUDA provider
    "torch": "mim.serving.torch_backend:build_handler",  # the towers in torch, FP32 CPU or FP16 CUDA graphs
}
# Runtimes that are Triton backends of their own (no python model): runtime -> (platform, model file).
PLATFORMS: dict[str, tuple[str, str]] = {"tensorrt": ("tensorrt_plan", TRT_PLAN)}

# --- knobs, each with its reason ------------------------------------------------------------------------------
# TensorRT engines: wait up to 1 ms for a fuller batch (small against a GPU batch, and batch 1 wastes the
# engine). Preferred sizes: the engine profile's opt batch (16, export.tensorrt_build.BatchRange: the shape
# its kernels are tuned for) and its max.
TRT_QUEUE_DELAY_US = 1000
TRT_PREFERRED_BATCH_SIZES = (16, contract.MAX_BATCH_SIZE)
TRT_INSTANCES = 1  # one execution context per GPU; two overlap copies and compute at twice the memory
# ONNX Runtime on the CPU: one instance whose intra-op threads use the cores (2 here); a second instance
# would compete for the same cores. A 1 ms delay lets concurrent requests share one ORT call.
CPU_ENCODER_INSTANCES = 1
CPU_ENCODER_THREADS = 2
CPU_QUEUE_DELAY_US = 1000
# ONNX Runtime FP16 on a GPU (no TensorRT): CUDA provider, CPU provider as the fallback for unsupported ops.
GPU_ONNX_PROVIDERS = "CUDAExecutionProvider,CPUExecutionProvider"
# The towers in torch (mim.serving.torch_backend). CPU: one instance with ONE intra-op thread per tower: torch's
# OpenMP threads spin while they wait, and with two towers on 2 threads each on 2 shared cores a descheduled
# thread stalled requests by 300-700 ms (measured; 3-10 ms with one thread).
# GPU: FP16 with CUDA graphs per preferred batch size (and text length bucket), and GPU tensors handed over
# through DLPack (FORCE_CPU_ONLY_INPUT_TENSORS=no; the python backend's default copies every input to the host
# first).
TORCH_PARAMS = {"device": "cpu", "precision": "fp32", "intra_op_threads": "1"}
GPU_TORCH_PARAMS = {
    "device": "cuda",
    "precision": "fp16",
    "cuda_graph_batch_sizes": ",".join(map(str, contract.GRAPH_BATCH_SIZES)),
    "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
}

# Variant names: the `--model-config-name` that selects `configs/<variant>.pbtxt`; DEFAULT is config.pbtxt.
CPU, GPU_ONNX, TORCH, GPU_TORCH, DEFAULT = "cpu", "gpu_onnx", "torch", "gpu_torch", "default"


@dataclass(frozen=True)
class Variant:
    """One way to serve the encoders: a row of VARIANTS."""

    name: str
    runtime: str  # a key of RUNTIMES (python backend) or of PLATFORMS (a Triton backend)
    label: str  # "runtime, device" as listed to users
    gpu: bool  # instances of KIND_GPU (else KIND_CPU)
    instances: int
    queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # the reasons written into the config's header

    @property
    def relpath(self) -> str:
        """The config file inside the model folder."""
        return DEFAULT_CONFIG if self.name == DEFAULT else f"configs/{self.name}.pbtxt"

    @property
    def config_params(self) -> dict[str, str]:
        """The config's parameters, the runtime's name included where it is not the default one."""
        named = {} if self.runtime in PLATFORMS or self.runtime == DEFAULT_RUNTIME else {RUNTIME_PARAM: self.runtime}
        return {**named, **self.params}


VARIANTS: tuple[Variant, ...] = (
    Variant(
        CPU,
        "onnx",
        "ONNX Runtime, CPU",
        gpu=False,
        instances=CPU_ENCODER_INSTANCES,
        queue_delay_us=CPU_QUEUE_DELAY_US,
        params={
            "onnx_file": ONNX_FP32,
            "execution_providers": "CPUExecutionProvider",
            "intra_op_threads": str(CPU_ENCODER_THREADS),
        },
        notes=(
            f"Selected by --model-config-name={CPU}: python backend running {VERSION}/{ONNX_FP32} on ONNX Runtime.",
            f"{CPU_ENCODER_INSTANCES} instance x {CPU_ENCODER_THREADS} intra-op threads = the 2 CI cores; "
            f"{CPU_QUEUE_DELAY_US} us queue delay.",
        ),
    ),
    Variant(
        GPU_ONNX,
        "onnx",
        "ONNX Runtime, CUDA",
        gpu=True,
        instances=TRT_INSTANCES,
        queue_delay_us=TRT_QUEUE_DELAY_US,
        params={"onnx_file": ONNX_FP16, "execution_providers": GPU_ONNX_PROVIDERS, "intra_op_threads": "1"},
        notes=(
            f"Selected by --model-config-name={GPU_ONNX}: GPU without TensorRT, {VERSION}/{ONNX_FP16} "
            "(FP32 I/O) on ONNX Runtime's CUDA provider (needs onnxruntime-gpu; falls back to the CPU provider).",
        ),
    ),
    Variant(
        TORCH,
        "torch",
        "torch, CPU",
        gpu=False,
        instances=CPU_ENCODER_INSTANCES,
        queue_delay_us=CPU_QUEUE_DELAY_US,
        params=TORCH_PARAMS,
        notes=(
            f"Selected by --model-config-name={TORCH}: python backend running the tower in torch (FP32, CPU) "
            f"from {VERSION}/model.safetensors + model.json.",
        ),
    ),
    Variant(
        GPU_TORCH,
        "torch",
        "torch, CUDA",
        gpu=True,
        instances=TRT_INSTANCES,
        queue_delay_us=TRT_QUEUE_DELAY_US,
        preferred_batch_sizes=contract.GRAPH_BATCH_SIZES,
        params=GPU_TORCH_PARAMS,
        notes=(
            f"Selected by --model-config-name={GPU_TORCH}: the tower in torch on the GPU, all FP16 with fused "
            "attention (L2 norm in FP32),",
            f"CUDA graphs per preferred batch size {list(contract.GRAPH_BATCH_SIZES)} (and text length bucket); "
            "inputs and outputs stay GPU tensors (DLPack).",
            "The preprocessing models still produce host tensors: the encoder copies them to the GPU.",
        ),
    ),
    Variant(
        DEFAULT,
        "tensorrt",
        "TensorRT engines",
        gpu=True,
        instances=TRT_INSTANCES,
        queue_delay_us=TRT_QUEUE_DELAY_US,
        preferred_batch_sizes=TRT_PREFERRED_BATCH_SIZES,
        notes=(
            f"Production: TensorRT FP16 engine {VERSION}/{TRT_PLAN} built by `make engines` (NGC Triton container).",
            f"Preferred batches {list(TRT_PREFERRED_BATCH_SIZES)} within the engine's profile, "
            f"{TRT_QUEUE_DELAY_US} us queue delay.",
        ),
    ),
)


def variant_names() -> tuple[str, ...]:
    return tuple(v.name for v in VARIANTS)


def get_variant(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise ValueError(f"unknown config variant {name!r}; expected one of {list(variant_names())}")


def encoder_builder(runtime: str) -> Callable[..., Any]:
    """The handler builder of `runtime`; an unknown name is refused with the known ones."""
    if runtime not in RUNTIMES:
        raise ValueError(
            f"unknown encoder runtime {runtime!r} (model config parameter {RUNTIME_PARAM!r}); expected one of "
            f"{sorted(RUNTIMES)}: regenerate the repository (mimsearch repository --write)"
        )
    module, _, function = RUNTIMES[runtime].partition(":")
    return getattr(importlib.import_module(module), function)
