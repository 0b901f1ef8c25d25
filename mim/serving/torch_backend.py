"""The towers in torch, as the encoder of a python-backend model (the `torch` and `gpu_torch` config variants).

`TorchEncoder` sits beside `backends.OnnxEncoder` and keeps its interface: built from a version folder and the
model's config dims, called with a dict of NumPy arrays, returning float32 embeddings. `forward` is the same on
torch tensors, wherever they live, and is what the Triton model calls:

    CPU (`torch`):      FP32, eager; the tests serve it next to the ONNX variant and compare.
    CUDA (`gpu_torch`): FP16 weights and matmuls with LayerNorm, softmax and the final L2 normalisation in FP32
                        (the same islands as export/fp16.py pins in the FP16 ONNX), replayed from one CUDA graph
                        per batch size in `graph_batch_sizes`; inputs arrive and outputs leave as GPU tensors
                        through DLPack (no host copy inside the model).

Where the copy happens: the preprocessing models produce host tensors, so on a GPU the pixels (and token ids)
cross to the device in `forward`, copied straight into the captured graph's static input. That copy is
N x 3 x S x S x 4 bytes (602 KB per 224 px image); benchmarks/gpu.py measures it next to the tower.

Weights: `<version>/model.safetensors` holds the tower's own state dict and `<version>/model.json` the
ModelConfig that shapes it; the exporter installs both (export/engines.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.overrides import TorchFunctionMode

from mim import contract, layout
from mim.model.config import ModelConfig
from mim.model.preprocess import InputError
from mim.model.towers import MIMModel

from . import backends

log = logging.getLogger(__name__)

# Files in the encoder's version folder (written by export.engines.install).
WEIGHTS_FILE, MODEL_JSON = layout.TORCH_WEIGHTS, layout.MODEL_JSON
PRECISIONS = ("fp32", "fp16")

_TORCH_DTYPES = {"FP32": torch.float32, "FP16": torch.float16, "INT64": torch.int64, "INT32": torch.int32}


# --- precision ---------------------------------------------------------------------------------------------
class Fp32Islands(TorchFunctionMode):
    """Runs LayerNorm and softmax in FP32 inside an FP16 forward: their inputs are cast up, the result back down
    to the input's dtype. The sums of squares and exponentials they reduce overflow FP16's 65504 on real
    activations; every other op keeps FP16 (tensor-core matmuls accumulate in FP32 anyway)."""

    FUNCS = frozenset(
        {torch.nn.functional.layer_norm, torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.FUNCS:
            return func(*args, **kwargs)
        x = args[0]
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.float16):
            return func(*args, **kwargs)
        up = [_up(a) for a in args]
        out = func(*up, **{k: _up(v) for k, v in kwargs.items()})
        return out.to(x.dtype)


def _up(a: Any) -> Any:
    return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a


def to_fp16(tower: nn.Module) -> nn.Module:
    """FP16 copy of the tower's weights except LayerNorm's (kept FP32, used by `Fp32Islands`), and the final
    projection's output cast to FP32 so the L2 normalisation after it runs in FP32. Run under `Fp32Islands`."""
    tower = tower.half()
    for m in tower.modules():
        if isinstance(m, nn.LayerNorm):
            m.float()
    proj = getattr(tower, "proj", None)
    if not isinstance(proj, nn.Module):
        raise ValueError(
            f"{type(tower).__name__} has no `proj` module; the FP16 policy needs the projection that precedes "
            "the L2 normalisation to cast its output to FP32"
        )
    proj.register_forward_hook(lambda _m, _inputs, out: out.float())
    return tower


# --- loading -----------------------------------------------------------------------------------------------
def load_tower(version_dir: str | Path, name: str) -> tuple[nn.Module, ModelConfig]:
    """The tower `name` (image_encoder / text_encoder) from `<version_dir>/model.safetensors` + `model.json`,
    on the CPU in FP32, in eval mode."""
    version_dir = Path(version_dir)
    weights, cfg_path = version_dir / WEIGHTS_FILE, version_dir / MODEL_JSON
    for path in (weights, cfg_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; the torch encoder needs the tower weights and model config that the exporter "
                "installs (`make engines`, or export.engines.install)"
            )
    model_cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
    with torch.device("meta"):  # shapes only: the weights come from the file (assign=True)
        model = MIMModel(model_cfg)
    towers = {contract.IMAGE_ENCODER: model.image, contract.TEXT_ENCODER: model.text}
    if name not in towers:
        raise ValueError(f"no tower for model {name!r}; expected one of {sorted(towers)}")
    tower = towers[name]
    tower.load_state_dict(load_file(str(weights)), strict=True, assign=True)
    return tower.eval().requires_grad_(False), model_cfg


def tower_state_dict(model: MIMModel, name: str) -> dict[str, torch.Tensor]:
    """What `load_tower` reads back: the tower's own parameters, contiguous, on the CPU."""
    tower = {contract.IMAGE_ENCODER: model.image, contract.TEXT_ENCODER: model.text}[name]
    return {k: v.detach().contiguous().cpu() for k, v in tower.state_dict().items()}


# --- CUDA graphs -------------------------------------------------------------------------------------------
class GraphRunner:
    """One CUDA graph per batch size. A batch of n rows replays the smallest captured size >= n: the rows are
    copied into the graph's static inputs (rows past n keep earlier valid inputs) and the first n output rows
    are cloned out before the next replay overwrites them. Larger batches run in chunks of the largest size.
    Captured largest first into one shared memory pool, so the pool is sized by the largest graph."""

    def __init__(self, fn: Callable[..., torch.Tensor], example: Mapping[str, torch.Tensor], sizes: Sequence[int]):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"graph batch sizes {list(sizes)}; expected positive sizes")
        self.sizes = sorted({int(s) for s in sizes})
        self.static_in: dict[int, dict[str, torch.Tensor]] = {}
        self.static_out: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for size in reversed(self.sizes):
            inputs = {k: _repeat_rows(v, size).clone() for k, v in example.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS handles, lazy inits)
                for _ in range(2):
                    fn(**inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = fn(**inputs)
            pool = graph.pool()
            self.static_in[size], self.static_out[size], self.graphs[size] = inputs, out, graph

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = len(next(iter(inputs.values())))
        largest = self.sizes[-1]
        if n > largest:
            return torch.cat([self({k: v[a : a + largest] for k, v in inputs.items()}) for a in range(0, n, largest)])
        size = next(s for s in self.sizes if s >= n)
        for k, v in inputs.items():
            self.static_in[size][k][:n].copy_(v, non_blocking=True)
        self.graphs[size].replay()
        return self.static_out[size][:n].clone()


def _repeat_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // len(t))
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:n]


def _check_dims(io: contract.ModelIO, model_cfg: ModelConfig, dims: Mapping[str, Sequence[int]], path: Path) -> None:
    for spec in (*io.inputs, *io.outputs):
        want = tuple(spec.resolve_dims(model_cfg))
        got = tuple(int(d) for d in dims.get(spec.name, want))
        if got != want:
            raise ValueError(
                f"{path.parent}: {spec.name} per-row shape {list(want)} from {MODEL_JSON}, the repository "
                f"config says {list(got)}; write the repository with the checkpoint's configs"
            )


# --- the encoder -------------------------------------------------------------------------------------------
def cuda_unavailable_reason() -> str | None:
    """None when torch can use a CUDA device, else why not (for skips and the benchmark's table)."""
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return f"torch {torch.__version__} sees no CUDA device" + ("" if built else " (a CPU-only build)")
    return None


class TorchEncoder:
    """One tower in torch. Same interface as `backends.OnnxEncoder` (`__call__` on NumPy feeds, `io`, `path`),
    plus `forward` on torch tensors for zero-copy serving."""

    def __init__(
        self,
        tower: nn.Module,
        model_cfg: ModelConfig,
        io: contract.ModelIO,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        graph_batch_sizes: Sequence[int] = (),
        threads: int | None = None,
        path: Path | None = None,
    ):
        """`tower`: the FP32 module (ImageTower / TextTower) with forward arguments named as the contract inputs."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            reason = cuda_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"device {device!r} requested but {reason}; use the `torch` (CPU) variant")
        elif graph_batch_sizes:
            raise ValueError(f"CUDA graphs need a CUDA device; got device {device!r}")
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(max(1, int(threads)))
        self.io, self.precision, self.model_cfg = io, precision, model_cfg
        self.path = path
        tower = tower.eval().requires_grad_(False).to(self.device)
        self.tower = to_fp16(tower) if precision == "fp16" else tower
        # The contract's float inputs are FP32; an FP16 tower takes them in FP16 (cast on the device).
        self.float_dtype = torch.float16 if precision == "fp16" else torch.float32
        self.graphs: GraphRunner | None = None
        if graph_batch_sizes:
            example = self._device_inputs(self._example(), contiguous=True)
            with torch.no_grad():
                self.graphs = GraphRunner(self._eager, example, graph_batch_sizes)

    @classmethod
    def from_version_dir(
        cls, version_dir: str | Path, io: contract.ModelIO, dims: Mapping[str, Sequence[int]], **kw: Any
    ) -> TorchEncoder:
        """The tower installed in a repository version folder; its dims checked against the model config's."""
        tower, model_cfg = load_tower(version_dir, io.name)
        path = Path(version_dir) / WEIGHTS_FILE
        _check_dims(io, model_cfg, dims, path)
        return cls(tower, model_cfg, io, path=path, **kw)

    def _example(self) -> dict[str, torch.Tensor]:
        """One valid row per input: zeros for pixels and ids, a mask keeping position 0."""
        out = {}
        for spec in self.io.inputs:
            t = torch.zeros((1, *spec.resolve_dims(self.model_cfg)), dtype=_TORCH_DTYPES[spec.dtype])
            if spec == contract.ATTENTION_MASK:
                t[:, 0] = 1
            out[spec.name] = t
        return out

    def _device_inputs(self, feeds: Mapping[str, torch.Tensor], contiguous: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in feeds.items():
            dtype = self.float_dtype if v.is_floating_point() else v.dtype
            t = v.to(self.device, dtype=dtype, non_blocking=True)
            out[k] = t.contiguous() if contiguous else t
        return out

    def _eager(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.precision == "fp16":
            with Fp32Islands():
                return self.tower(**inputs).float()
        return self.tower(**inputs).float()

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Torch tensors (any device; float inputs FP32) -> (N, D) float32 on the encoder's device."""
        if self.graphs is not None:  # the graph copies host or device inputs into its static buffers
            with torch.no_grad():
                return self.graphs(feeds)
        with torch.inference_mode():
            return self._eager(**self._device_inputs(feeds))

    def __call__(self, feeds: backends.Arrays) -> np.ndarray:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        return self.forward(tensors).cpu().numpy()


# --- the Triton model's handler ----------------------------------------------------------------------------
class TorchEncoderHandler(backends.EncoderHandler):
    """`EncoderHandler` on torch tensors: the same checks, computed where the tensors are (a GPU batch is
    checked on the GPU; only one boolean per row comes back to the host), batched with torch.cat, and the
    embeddings handed back as torch tensors (Triton takes them through DLPack)."""

    tensor_io = True  # python_backend: inputs as torch tensors through DLPack, outputs through DLPack

    @staticmethod
    def concat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(parts))

    def input(self, request: backends.Request, spec: contract.TensorSpec) -> torch.Tensor:
        if spec.name not in request.inputs:
            raise InputError(f"missing input {spec.name!r}; got inputs {sorted(request.inputs)}")
        value = request.inputs[spec.name]
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        want, dims = _TORCH_DTYPES[spec.dtype], self.dims[spec.name]
        if t.dtype != want:
            raise InputError(f"input {spec.name!r} has dtype {t.dtype}; expected {spec.dtype} ({want})")
        if t.ndim != 1 + len(dims) or tuple(t.shape[1:]) != tuple(dims) or t.shape[0] < 1:
            raise InputError(
                f"input {spec.name!r} has shape {list(t.shape)}; expected [batch >= 1, {', '.join(map(str, dims))}]"
            )
        return t

    @staticmethod
    def _check_finite(name: str, arr: torch.Tensor) -> None:
        bad = (~torch.isfinite(arr.reshape(len(arr), -1)).all(dim=1)).cpu().tolist()
        backends.raise_row_errors(
            name, ["contains NaN or infinity; expected finite values" if b else None for b in bad]
        )

    def _check_ids(self, ids: torch.Tensor) -> None:
        hi = self.vocab_size if self.vocab_size is not None else torch.iinfo(torch.int64).max
        bad = (ids < 0) | (ids >= hi)
        rows = bad.any(dim=1).cpu().tolist()
        if not any(rows):
            return
        expected = f"ids in [0, {self.vocab_size})" if self.vocab_size is not None else "ids >= 0"
        errors = []
        for i, b in enumerate(rows):
            first = int(ids[i][bad[i]][0]) if b else None
            errors.append(
                f"has token id {first}; expected {expected}; tokenize with the model's tokenizer" if b else None
            )
        backends.raise_row_errors(contract.INPUT_IDS.name, errors)

    @staticmethod
    def _check_mask(mask: torch.Tensor) -> None:
        bad = ((mask != 0) & (mask != 1)).any(dim=1).cpu().tolist()
        backends.raise_row_errors(contract.ATTENTION_MASK.name, ["must hold only 0 and 1" if b else None for b in bad])

    def run(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.encoder.forward(batch)
        if out.is_cuda:
            # Triton reads the output through DLPack without knowing our stream: finish the work first.
            torch.cuda.current_stream(out.device).synchronize()
        return {self.io.outputs[0].name: out}


def graph_sizes(text: str) -> tuple[int, ...]:
    """The `cuda_graph_batch_sizes` config parameter ("1,2,4") -> (1, 2, 4); empty text -> ()."""
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"cuda_graph_batch_sizes {text!r}; expected comma-separated integers") from None


def build_handler(
    name: str, version_dir: Path, params: Mapping[str, str], dims: Mapping[str, tuple[int, ...]], device_id: int = 0
) -> TorchEncoderHandler:
    """Parameters (configs/torch.pbtxt, configs/gpu_torch.pbtxt): device (cpu | cuda; a GPU instance runs on
    the device Triton gives it), precision (fp32 | fp16), cuda_graph_batch_sizes, intra_op_threads."""
    io = contract.MODELS[name]
    device = params.get("device", "cpu")
    if device == "cuda":
        device = f"cuda:{device_id}"
    encoder = TorchEncoder.from_version_dir(
        version_dir,
        io,
        dims,
        device=device,
        precision=params.get("precision", "fp32"),
        graph_batch_sizes=graph_sizes(params.get("cuda_graph_batch_sizes", "")),
        threads=int(params.get("intra_op_threads", "1")),
    )
    vocab = encoder.model_cfg.text.vocab_size if name == contract.TEXT_ENCODER else None
    return TorchEncoderHandler(encoder, io, dims, vocab)
