"""The towers in torch, as the encoder of a python-backend model (the `torch` and `gpu_torch` config variants).

`TorchEncoder` sits beside `backends.OnnxEncoder` and keeps its interface: built from a version folder and the
model's config dims, called with a dict of NumPy arrays, returning float32 embeddings. `forward` is the same on
torch tensors, wherever they live, and is what the Triton model calls:

    CPU (`torch`):      FP32, eager; the tests serve it next to the ONNX variant and compare.
    CUDA (`gpu_torch`): the whole tower in FP16 (or BF16), replayed from CUDA graphs, one per (batch size, text
                        length bucket); inputs arrive and outputs leave as GPU tensors through DLPack (no host
                        copy inside the model).

Precision: no FP32 islands here. The ONNX/TensorRT FP16 graphs keep LayerNorm and softmax in FP32
(export/fp16.py) because a graph compiler may decompose them into FP16 elementwise ops that overflow. In torch
they are single kernels that already accumulate in FP32 for half inputs (LayerNorm's mean and variance, and the
fused attention's running max and sum, which never writes the score matrix), so casting around them would only
add memory traffic and, as a TorchFunctionMode, Python on every op. The one cast kept is the projection's
(B, D) output to FP32, so the L2 normalisation squares and sums in FP32. Whether that holds is measured, not
assumed: FP16 and BF16 are gated on cosine >= 0.999 to FP32 on real photos and titles (tests/test_torch_backend.py,
benchmarks/towers_peer.py).

Text length buckets: titles are much shorter than the context, and with right padding the real positions of
a shorter input give exactly the same embedding (padded keys get zero weight; causal attention never reads
later positions). So the text tower runs at the longest real row of the batch (eager), or at the smallest
bucket that holds it (CUDA graphs and torch.compile need a few fixed shapes).

Where the copy happens: the preprocessing models produce host tensors, so on a GPU the pixels (and token ids)
cross to the device in `forward`, copied straight into the captured graph's static input. That copy is
N x 3 x S x S x 4 bytes (602 KB per 224 px image); benchmarks/gpu.py measures it next to the tower.

Weights: `<version>/model.safetensors` holds the tower's own state dict and `<version>/model.json` the
ModelConfig that shapes it; the exporter installs both (export/engines.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mim import contract, layout
from mim.model.config import ModelConfig
from mim.model.preprocess import InputError
from mim.model.towers import Block, MIMModel, QuickGELU
from mim.search.ranking import parity

from . import backends

log = logging.getLogger(__name__)

# Files in the encoder's version folder (written by export.engines.install).
WEIGHTS_FILE, MODEL_JSON = layout.TORCH_WEIGHTS, layout.MODEL_JSON
PRECISIONS = ("fp32", "fp16", "bf16")
# torch.compile modes that leave CUDA graphs to `GraphRunner` ("reduce-overhead" and "max-autotune" capture
# their own graphs, which cannot be captured again); "none" runs the module as written.
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs")

_TORCH_DTYPES = {"FP32": torch.float32, "FP16": torch.float16, "INT64": torch.int64, "INT32": torch.int32}
_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- precision ---------------------------------------------------------------------------------------------
def cast_tower(tower: nn.Module, precision: str) -> nn.Module:
    """The tower's weights in `precision` (all of them: see the module docstring), with the projection that
    precedes the L2 normalisation returning FP32, so the normalisation runs in FP32. FP32 returns the tower."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "fp32":
        return tower
    proj = getattr(tower, "proj", None)
    if not isinstance(proj, nn.Module):
        raise ValueError(
            f"{type(tower).__name__} has no `proj` module; the half-precision policy needs the projection that "
            "precedes the L2 normalisation to cast its output to FP32"
        )
    tower = tower.to(_FLOAT_DTYPES[precision])
    proj.register_forward_hook(lambda _m, _inputs, out: out.float())
    return tower


def fold_quick_gelu(tower: nn.Module) -> nn.Module:
    """Each QuickGELU MLP as a SiLU one, in place: x * sigmoid(a x) = silu(a x) / a (a = 1.702), so the first
    Linear scaled by a and the second by 1 / a compute the same function with torch's fused SiLU, one
    elementwise pass over the (B, T, 4W) hidden activations instead of three. Equal to float rounding."""
    for block in tower.modules():
        if isinstance(block, Block) and isinstance(block.mlp[1], QuickGELU):
            fc1, act, fc2 = block.mlp
            with torch.no_grad():
                fc1.weight.mul_(act.SCALE)
                fc1.bias.mul_(act.SCALE)
                fc2.weight.div_(act.SCALE)
            block.mlp[1] = nn.SiLU()
    return tower


# The gate every half-precision torch path passes: per-row cosine to the FP32 tower on real photos and titles,
# the same threshold as the exported FP16 graphs (export.onnx_export.FP16_MIN_COSINE).
HALF_MIN_COSINE = 0.999


def precision_gate(
    tower: nn.Module,
    model_cfg: ModelConfig,
    io: contract.ModelIO,
    feeds: backends.Arrays,
    precision: str,
    *,
    device: str = "cpu",
    **encoder_kw: Any,
) -> float:
    """The lowest per-row cosine between the tower in `precision` and in FP32 on `feeds` (real inputs: photos
    and titles, never zeros), both through `TorchEncoder` on `device`. `tower` is copied, never modified."""
    fp32 = TorchEncoder(copy.deepcopy(tower), model_cfg, io, device=device)
    low = TorchEncoder(copy.deepcopy(tower), model_cfg, io, device=device, precision=precision, **encoder_kw)
    got = low(feeds)
    if not np.isfinite(got).all():
        return float("nan")
    return parity(got, fp32(feeds)).min_cosine


# --- text length buckets -----------------------------------------------------------------------------------
def default_text_buckets(context_length: int) -> tuple[int, ...]:
    """16, 32 and 64 tokens below the context, and the context itself: product titles and short queries are
    10-25 CLIP tokens, so most batches run at 16 or 32 instead of 77."""
    return tuple(sorted({b for b in (16, 32, 64) if b < context_length} | {context_length}))


def text_length(mask: torch.Tensor) -> int:
    """Tokens needed to hold every row's real tokens: the position after the last 1 of any row (at least 1).
    Counted from the last 1, not the sum, so a mask with a hole is never cut short. One host sync on a GPU."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return max(1, int((mask.ne(0) * positions).amax()))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (`buckets` sorted, the last one the context length)."""
    return next(b for b in buckets if b >= length)


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
    Captured largest first into one memory pool (`pool`: shared with other runners, e.g. the other text length
    buckets), so the pool is sized by the largest graph."""

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        example: Mapping[str, torch.Tensor],
        sizes: Sequence[int],
        pool: Any = None,
    ):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"graph batch sizes {list(sizes)}; expected positive sizes")
        self.sizes = sorted({int(s) for s in sizes})
        self.static_in: dict[int, dict[str, torch.Tensor]] = {}
        self.static_out: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
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
        self.pool = pool

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
    plus `forward` on torch tensors for zero-copy serving. `setup_seconds` is what construction took (weights to
    the device, torch.compile and the CUDA graph captures)."""

    def __init__(
        self,
        tower: nn.Module,
        model_cfg: ModelConfig,
        io: contract.ModelIO,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        graph_batch_sizes: Sequence[int] = (),
        compile_mode: str = "none",
        text_buckets: Sequence[int] | None = None,
        trim_text: bool = True,
        threads: int | None = None,
        path: Path | None = None,
    ):
        """`tower`: the FP32 module (ImageTower / TextTower) with forward arguments named as the contract inputs.
        `text_buckets`: the lengths the text tower is compiled / captured at (default `default_text_buckets`);
        `trim_text=False` runs every batch at the full context (for comparisons)."""
        t0 = time.perf_counter()
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {compile_mode!r}; expected one of {COMPILE_MODES}")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            reason = cuda_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"device {device!r} requested but {reason}; use the `torch` (CPU) variant")
        elif graph_batch_sizes:
            raise ValueError(f"CUDA graphs need a CUDA device; got device {device!r}")
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(max(1, int(threads)))
        self.io, self.precision, self.model_cfg, self.compile_mode = io, precision, model_cfg, compile_mode
        self.path = path
        tower = fold_quick_gelu(tower.eval().requires_grad_(False).to(self.device))
        self.tower = cast_tower(tower, precision)
        # dynamic=False: one specialised graph per shape, and the shapes are few (batch sizes x buckets).
        self.run_tower = (
            self.tower if compile_mode == "none" else torch.compile(self.tower, mode=compile_mode, dynamic=False)
        )
        # The contract's float inputs are FP32; a half-precision tower takes them in its dtype (cast on the device).
        self.float_dtype = _FLOAT_DTYPES[precision]
        self.is_text = contract.ATTENTION_MASK in io.inputs
        context = model_cfg.text.context_length
        buckets = (
            default_text_buckets(context) if text_buckets is None else tuple(sorted({int(b) for b in text_buckets}))
        )
        if self.is_text and (not buckets or buckets[0] < 1 or buckets[-1] != context):
            raise ValueError(
                f"text buckets {list(buckets)}; expected positive lengths ending at the context length {context}"
            )
        self.trim_text = trim_text
        # Fixed shapes (graphs, compiled code) run at a bucket; plain eager runs at the exact length.
        self.buckets = buckets if trim_text else (context,)
        self.exact_length = trim_text and not graph_batch_sizes and compile_mode == "none"
        self.graphs: dict[int, GraphRunner] = {}
        if graph_batch_sizes:
            lengths = self.buckets if self.is_text else (0,)
            pool = None
            with torch.no_grad(), self._compile_limits(len(graph_batch_sizes) * len(lengths)):
                for length in sorted(lengths, reverse=True):  # largest first: the shared pool fits them all
                    example = self._device_inputs(self._trim(self._example(), length), contiguous=True)
                    runner = GraphRunner(self._eager, example, graph_batch_sizes, pool=pool)
                    self.graphs[length], pool = runner, runner.pool
        self.setup_seconds = time.perf_counter() - t0

    def _compile_limits(self, shapes: int) -> contextlib.AbstractContextManager:
        """While capturing a compiled tower: up to `shapes` (batch sizes x buckets) specialisations compile, past
        dynamo's recompile limit (8) it would silently run the eager code inside the graphs, so the limit is
        raised and hitting it fails loudly."""
        if self.compile_mode == "none":
            return contextlib.nullcontext()
        return torch._dynamo.config.patch(recompile_limit=shapes + 8, fail_on_recompile_limit_hit=True)

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

    def run_length(self, feeds: Mapping[str, torch.Tensor]) -> int:
        """The text length a batch runs at (0 for the image tower): exact, or the bucket holding it."""
        if not self.is_text:
            return 0
        context = self.model_cfg.text.context_length
        if not self.trim_text:
            return context
        length = text_length(feeds[contract.ATTENTION_MASK.name])
        return length if self.exact_length else bucket_for(length, self.buckets)

    @staticmethod
    def _trim(feeds: Mapping[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """Text inputs cut to their first `length` positions (views); image inputs (length 0) unchanged."""
        return {k: v[:, :length] for k, v in feeds.items()} if length else dict(feeds)

    def _device_inputs(self, feeds: Mapping[str, torch.Tensor], contiguous: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in feeds.items():
            dtype = self.float_dtype if v.is_floating_point() else v.dtype
            t = v.to(self.device, dtype=dtype, non_blocking=True)
            out[k] = t.contiguous() if contiguous else t
        return out

    def _eager(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.run_tower(**inputs).float()

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Torch tensors (any device; float inputs FP32) -> (N, D) float32 on the encoder's device."""
        length = self.run_length(feeds)
        feeds = self._trim(feeds, length)
        if self.graphs:  # the graph copies host or device inputs into its static buffers
            with torch.no_grad():
                return self.graphs[length](feeds)
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
        # The fused causal attention and the length buckets are exact for right padding (ones, then zeros): a 1
        # after a 0 would make a padded position visible. Every tokenizer here pads on the right.
        holes = (mask[:, 1:] > mask[:, :-1]).any(dim=1).cpu().tolist()
        backends.raise_row_errors(
            contract.ATTENTION_MASK.name,
            [
                "must be right-padded (ones, then zeros); got a 1 after a 0: tokenize with padding on the right"
                if h
                else None
                for h in holes
            ],
        )

    def run(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.encoder.forward(batch)
        if out.is_cuda:
            # Triton reads the output through DLPack without knowing our stream: finish the work first.
            torch.cuda.current_stream(out.device).synchronize()
        return {self.io.outputs[0].name: out}


def graph_sizes(text: str, name: str = "cuda_graph_batch_sizes") -> tuple[int, ...]:
    """A comma-separated config parameter ("1,2,4") -> (1, 2, 4); empty text -> ()."""
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{name} {text!r}; expected comma-separated integers") from None


def build_handler(
    name: str, version_dir: Path, params: Mapping[str, str], dims: Mapping[str, tuple[int, ...]], device_id: int = 0
) -> TorchEncoderHandler:
    """Parameters (configs/torch.pbtxt, configs/gpu_torch.pbtxt): device (cpu | cuda; a GPU instance runs on
    the device Triton gives it), precision (fp32 | fp16 | bf16), cuda_graph_batch_sizes, torch_compile (one of
    COMPILE_MODES; default none), text_buckets (default: default_text_buckets), intra_op_threads."""
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
        compile_mode=params.get("torch_compile", "none"),
        text_buckets=graph_sizes(params["text_buckets"], "text_buckets") if params.get("text_buckets") else None,
        threads=int(params.get("intra_op_threads", "1")),
    )
    vocab = encoder.model_cfg.text.vocab_size if name == contract.TEXT_ENCODER else None
    return TorchEncoderHandler(encoder, io, dims, vocab)
