"""The ensembles on a GPU under perf_analyzer: the repository's `gpu_onnx` config (python-backend models,
FP16 ONNX towers on ONNX Runtime's CUDA provider), with the python backend allowed to hand GPU tensors to the
models (`FORCE_CPU_ONLY_INPUT_TENSORS: no`, so tensors between the GPU steps need not round-trip through host
memory).

Where there is no GPU (or no CUDA build of ONNX Runtime, or no gpu_onnx config / FP16 export in the
repository) the run is skipped and `unavailable_reason()` says why; benchmarks.run prints it and writes it into
RESULTS.md. Where TensorRT engines exist the `default` config would be the production path; that variant is
not coded here: it needs TensorRT (the `tensorrt` extra, from NVIDIA's package index), which the project could
not test against.

Known gap to check on a GPU machine: mim.serving.python_backend reads inputs with `Tensor.as_numpy()`, which
only works for CPU tensors; with FORCE_CPU_ONLY_INPUT_TENSORS=no an input that lands on the GPU needs
`Tensor.to_dlpack()`. `--force-cpu-inputs yes` measures the configuration that works with today's backend.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from google.protobuf import text_format

from mim import contract, layout

from . import perf

GPU_CONFIG = "gpu_onnx"
FORCE_CPU_ONLY = "FORCE_CPU_ONLY_INPUT_TENSORS"
# The python models that run on the GPU in the gpu_onnx config and so may receive GPU tensors.
GPU_MODELS = (contract.IMAGE_ENCODER, contract.TEXT_ENCODER)


def unavailable_reason(repository: Path | None = None) -> str | None:
    """None when the GPU ensemble can run here, else the first missing piece."""
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        return "no NVIDIA GPU on this machine (no /dev/nvidia0, no nvidia-smi)"
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu for the "
            f"{GPU_CONFIG} config)"
        )
    if repository is not None:
        for model in GPU_MODELS:
            cfg = repository / model / "configs" / f"{GPU_CONFIG}.pbtxt"
            if not cfg.is_file():
                return (
                    f"{cfg} missing: the repository has no {GPU_CONFIG} variant "
                    "(python -m mim.serving.repository --write)"
                )
            fp16 = layout.version_dir(repository, model) / layout.ONNX_FP16
            if not fp16.is_file():
                return f"{fp16.relative_to(repository)} missing: export with FP16 (make engines)"
    return None


def allow_gpu_inputs(repository: Path, force_cpu_inputs: str = "no") -> list[Path]:
    """Set FORCE_CPU_ONLY_INPUT_TENSORS in the gpu_onnx configs of the GPU models of a (benchmark copy of
    the) repository; returns the files changed. Parsed and written as Triton's own protobuf."""
    from tritonclient.grpc import model_config_pb2 as pb

    if force_cpu_inputs not in ("yes", "no"):
        raise ValueError(f"force_cpu_inputs={force_cpu_inputs!r}; expected 'yes' or 'no'")
    changed = []
    for model in GPU_MODELS:
        path = repository / model / "configs" / f"{GPU_CONFIG}.pbtxt"
        text = path.read_text()
        header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
        cfg = text_format.Parse(text, pb.ModelConfig())
        cfg.parameters[FORCE_CPU_ONLY].string_value = force_cpu_inputs
        note = f"# benchmarks.gpu: {FORCE_CPU_ONLY}={force_cpu_inputs} set in this benchmark copy\n"
        path.write_text(header + note + text_format.MessageToString(cfg))
        changed.append(path)
    return changed


def run(
    pa: perf.PerfAnalyzer,
    repository: Path,
    input_files: dict[str, Path],
    settings: perf.PerfSettings,
    out: Path,
    *,
    force_cpu_inputs: str = "no",
    log=print,
) -> perf.SweepResult:
    """Serve `repository` (a copy this function may modify) with the gpu_onnx config and sweep every model in
    `input_files`; writes <out>/perf.* like the CPU sweep."""
    from mim.serving.server import TritonServer

    allow_gpu_inputs(repository, force_cpu_inputs)
    out.mkdir(parents=True, exist_ok=True)
    with TritonServer(repository, config=GPU_CONFIG, log_path=out / "tritonserver.log") as server:
        result = perf.run_sweeps(pa, server.grpc_url, list(input_files), input_files, settings, out / "logs", log=log)
    meta = {"config": GPU_CONFIG, FORCE_CPU_ONLY: force_cpu_inputs, "device": os.environ.get("CUDA_VISIBLE_DEVICES")}
    perf.write_outputs(result, out, meta)
    return result
