"""The logic behind the python-backend models, in plain NumPy / ONNX Runtime (no Triton import).

Each Triton model is one `Handler`: `handler(requests) -> responses`, one response per request. A handler
first checks every request on its own (`check`: a bad request becomes an error response whose message is safe
to return), then runs the good requests of the batch TOGETHER in one call (`run`), and splits the result back
per request. `mim.serving.python_backend` only converts between Triton tensors and these dataclasses, so
everything here is unit-tested without a server.

    preprocess_image  image (N, 1) bytes        -> pixel_values (N, 3, S, S) float32
    preprocess_text   text (N, 1) bytes         -> input_ids, attention_mask (N, T) int64
    image_encoder     pixel_values              -> image_embeds (N, D) float32   (ONNX Runtime)
    text_encoder      input_ids, attention_mask -> text_embeds (N, D) float32    (ONNX Runtime)
    fuse              image_embeds, text_embeds -> embedding = normalize(w * img + (1 - w) * txt)
    knn               embedding (N, D)          -> ids, scores, item_metadata (N, k)   (KnnIndex)
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mim import contract
from mim.layout import MODEL_JSON, ONNX_FP32, PREPROCESS_JSON
from mim.model.config import ModelConfig, PreprocessConfig
from mim.model.preprocess import InputError, decode_text, preprocess_image_bytes
from mim.model.tokenizer import Tokenizers, load_tokenizer
from mim.search.ranking import fuse
from mim.serving import runtimes

log = logging.getLogger(__name__)

INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

Arrays = dict[str, np.ndarray]


@dataclass
class Request:
    inputs: Arrays  # contract input name -> array with the batch dim first
    params: dict[str, Any] = field(default_factory=dict)  # the request's parameters (Triton forwards them)


@dataclass
class Response:
    outputs: Arrays | None = None
    error: str | None = None
    code: str = INVALID_ARG  # INVALID_ARG: the caller's input; INTERNAL: ours

    @property
    def ok(self) -> bool:
        return self.error is None


# --- helpers shared by the handlers ------------------------------------------------------------------------
def rows_label(name: str, row: int, n: int) -> str:
    return name if n == 1 else f"{name} row {row} of {n}"


def raise_row_errors(name: str, errors: Sequence[str | None]) -> None:
    """One message for all failing rows of a request: a response is all-or-nothing in Triton."""
    bad = [(i, e) for i, e in enumerate(errors) if e is not None]
    if bad:
        n = len(errors)
        raise InputError("; ".join(f"{rows_label(name, i, n)}: {e}" for i, e in bad))


def get_input(request: Request, spec: contract.TensorSpec, dims: Sequence[int]) -> np.ndarray:
    """The request's input `spec`, checked for presence, dtype and per-row shape. Triton checks these too
    before a request reaches a model; checking again keeps the handlers safe to call directly."""
    if spec.name not in request.inputs:
        raise InputError(f"missing input {spec.name!r}; got inputs {sorted(request.inputs)}")
    arr = np.asarray(request.inputs[spec.name])
    want = np.dtype(spec.numpy_dtype)
    ok_dtype = arr.dtype == want or (spec.dtype == "BYTES" and arr.dtype.kind in "OSU")
    if not ok_dtype:
        raise InputError(f"input {spec.name!r} has dtype {arr.dtype}; expected {spec.dtype} ({want})")
    if arr.ndim != 1 + len(dims) or tuple(arr.shape[1:]) != tuple(dims) or arr.shape[0] < 1:
        raise InputError(
            f"input {spec.name!r} has shape {list(arr.shape)}; expected [batch >= 1, {', '.join(map(str, dims))}]"
        )
    return arr


def byte_rows(arr: np.ndarray) -> list[bytes]:
    """(N, 1) BYTES tensor -> N byte strings (Triton hands BYTES over as an object array of `bytes`)."""
    out = []
    for v in arr.reshape(arr.shape[0]):
        out.append(v.encode("utf-8") if isinstance(v, str) else bytes(v))
    return out


def run_together(
    requests: Sequence[Request],
    check: Callable[[Request], Arrays],
    run: Callable[[Arrays], Arrays],
    model: str,
    concat: Callable[[Sequence[Any]], Any] = np.concatenate,
) -> list[Response]:
    """Check each request alone, run the good ones as ONE batch, split the outputs back per request.

    `check` returns arrays with the request's rows first (or raises InputError); `run` maps the
    concatenated arrays to output arrays with the same number of rows. Should the joint run fail (say a
    value no check caught), each good request is run alone, so only the culprit gets the error."""
    responses: list[Response | None] = [None] * len(requests)
    good: list[tuple[int, Arrays]] = []
    for i, req in enumerate(requests):
        try:
            good.append((i, check(req)))
        except Exception as e:  # a bug in a check must not fail the other requests of the batch either
            responses[i] = _error(model, e)
    if good:
        try:
            outputs = _run_split(run, [arrays for _, arrays in good], concat)
        except Exception as e:
            if len(good) == 1:
                responses[good[0][0]] = _error(model, e)
            else:
                log.warning("%s: a batch of %d requests failed; running them one by one", model, len(good))
                for i, arrays in good:
                    responses[i] = _run_alone(model, arrays, run)
        else:
            for (i, _), out in zip(good, outputs):
                responses[i] = Response(outputs=out)
    return [r if r is not None else Response(error=f"{model}: no response", code=INTERNAL) for r in responses]


def _run_split(
    run: Callable[[Arrays], Arrays], parts: list[Arrays], concat: Callable[[Sequence[Any]], Any] = np.concatenate
) -> list[Arrays]:
    counts = [len(next(iter(p.values()))) for p in parts]
    batch = {k: concat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
    out = run(batch)
    for k, v in out.items():
        if len(v) != sum(counts):
            raise RuntimeError(f"output {k!r} has {len(v)} rows for a batch of {sum(counts)}")
    bounds = np.cumsum([0, *counts])
    return [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def _run_alone(model: str, arrays: Arrays, run: Callable[[Arrays], Arrays]) -> Response:
    try:
        return Response(outputs=run(arrays))
    except Exception as e:
        return _error(model, e)


def _error(model: str, e: Exception, input_error: bool = False) -> Response:
    """The response for a failed run: the caller's fault for an InputError (or when `input_error`), ours
    otherwise."""
    if input_error or isinstance(e, InputError):
        return Response(error=f"{model}: {e}", code=INVALID_ARG)
    log.error("%s failed: %s: %s", model, type(e).__name__, e)
    return Response(error=f"{model}: {type(e).__name__}: {e}", code=INTERNAL)


class Handler(ABC):
    """One served model: contract I/O + per-request `check` + batched `run`."""

    io: contract.ModelIO
    # False: inputs arrive as NumPy arrays on the host, outputs leave as NumPy arrays. True (the torch encoder):
    # both are torch tensors, exchanged with Triton through DLPack wherever they live (mim.serving.python_backend).
    tensor_io = False
    # Joins the checked inputs of several requests into one batch.
    concat: Callable[[Sequence[Any]], Any] = staticmethod(np.concatenate)

    def __init__(self, dims: Mapping[str, Sequence[int]]):
        # Concrete per-row dims of every input, from the model's config.pbtxt.
        self.dims = {s.name: tuple(int(d) for d in dims[s.name]) for s in self.io.inputs}

    def __call__(self, requests: Sequence[Request]) -> list[Response]:
        return run_together(requests, self.check, self.run, self.io.name, self.concat)

    def input(self, request: Request, spec: contract.TensorSpec) -> np.ndarray:
        return get_input(request, spec, self.dims[spec.name])

    @abstractmethod
    def check(self, request: Request) -> Arrays: ...

    @abstractmethod
    def run(self, batch: Arrays) -> Arrays: ...


def read_preprocess(version_dir: Path) -> PreprocessConfig:
    path = Path(version_dir) / PREPROCESS_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; the exporter writes it (`make engines`, or export.engines.install) so that "
            "serving preprocesses exactly like training"
        )
    return PreprocessConfig.from_dict(json.loads(path.read_text()))


# --- preprocessing -----------------------------------------------------------------------------------------
class ImagePreprocessor:
    """Encoded bytes -> normalised pixels, with one error message per bad row instead of an exception."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def decode_batch(self, rows: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """N byte rows -> (N, 3, S, S) float32 and N errors (None where the row decoded; its pixels are 0
        where it did not)."""
        s = self.cfg.image_size
        out = np.zeros((len(rows), 3, s, s), dtype=np.float32)
        errors: list[str | None] = [None] * len(rows)
        for i, data in enumerate(rows):
            try:
                out[i] = preprocess_image_bytes(data, self.cfg)
            except InputError as e:
                errors[i] = str(e)
        return out, errors


class PreprocessImageHandler(Handler):
    io = contract.MODELS[contract.PREPROCESS_IMAGE]

    def __init__(self, cfg: PreprocessConfig, dims: Mapping[str, Sequence[int]] | None = None):
        super().__init__(dims or {contract.IMAGE.name: contract.IMAGE.dims})
        self.pre = ImagePreprocessor(cfg)

    def check(self, request: Request) -> Arrays:
        pixels, errors = self.pre.decode_batch(byte_rows(self.input(request, contract.IMAGE)))
        raise_row_errors(contract.IMAGE.name, errors)
        return {contract.PIXEL_VALUES.name: pixels}

    def run(self, batch: Arrays) -> Arrays:
        return batch  # decoding is per image; the batch is the concatenation of the requests' pixels


class TextPreprocessor:
    def __init__(self, cfg: PreprocessConfig, tokenizer: Tokenizers):
        if tokenizer.context_length != cfg.context_length:
            raise ValueError(
                f"tokenizer context_length={tokenizer.context_length}, preprocess config {cfg.context_length}"
            )
        self.cfg = cfg
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, version_dir: Path) -> TextPreprocessor:
        cfg = read_preprocess(version_dir)
        return cls(cfg, load_tokenizer(Path(version_dir) / cfg.tokenizer_file, cfg.tokenizer, cfg.context_length))

    def decode_batch(self, rows: Sequence[bytes]) -> tuple[list[str], list[str | None]]:
        texts, errors = [], []
        for data in rows:
            try:
                texts.append(decode_text(data, self.cfg))
                errors.append(None)
            except InputError as e:
                texts.append("")
                errors.append(str(e))
        return texts, errors

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts longer than the context are truncated, not refused."""
        return self.tokenizer.encode_batch(list(texts))


class PreprocessTextHandler(Handler):
    io = contract.MODELS[contract.PREPROCESS_TEXT]

    def __init__(self, pre: TextPreprocessor, dims: Mapping[str, Sequence[int]] | None = None):
        super().__init__(dims or {contract.TEXT.name: contract.TEXT.dims})
        self.pre = pre

    def check(self, request: Request) -> Arrays:
        texts, errors = self.pre.decode_batch(byte_rows(self.input(request, contract.TEXT)))
        raise_row_errors(contract.TEXT.name, errors)
        return {contract.TEXT.name: np.array(texts, dtype=object)}

    def run(self, batch: Arrays) -> Arrays:
        ids, mask = self.pre.encode(list(batch[contract.TEXT.name]))  # one tokenizer call for all requests
        return {contract.INPUT_IDS.name: ids, contract.ATTENTION_MASK.name: mask}


# --- encoders ----------------------------------------------------------------------------------------------
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OnnxEncoder:
    """One ONNX Runtime session for one tower, its I/O checked against the contract at load time."""

    def __init__(
        self,
        path: str | Path,
        io: contract.ModelIO,
        dims: Mapping[str, Sequence[int]],
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 1,
    ):
        import onnxruntime as ort  # lazily: the preprocessing models never need it

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; install the exported towers into the repository first "
                "(`make engines`, or export.engines.install)"
            )
        opts = ort.SessionOptions()
        # Bounded threads: Triton may run several models on the same cores; ORT's default takes them all.
        opts.intra_op_num_threads = max(1, int(intra_op_threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # No busy-waiting between runs: the idle threads would spin on cores the other models need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        if chosen != list(providers):
            log.warning(
                "%s: providers %s requested, %s available; using %s",
                io.name,
                list(providers),
                sorted(available),
                chosen,
            )
        self.session = ort.InferenceSession(str(path), opts, providers=chosen)
        self.io = io
        self.path = path
        self.input_types = self._check_io(dims)

    def _check_io(self, dims: Mapping[str, Sequence[int]]) -> dict[str, type]:
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        want_in, want_out = [s.name for s in self.io.inputs], [s.name for s in self.io.outputs]
        if got_in != want_in or got_out != want_out:
            raise ValueError(
                f"{self.path}: inputs {got_in} / outputs {got_out}; the contract (mim.contract) expects "
                f"{want_in} / {want_out}; re-export with export.onnx_export"
            )
        types = {}
        for node in self.session.get_inputs():
            shape = list(node.shape[1:])
            want = list(dims[node.name])
            if shape != want:  # symbolic dims would show as strings and fail here too: the contract fixes them
                raise ValueError(
                    f"{self.path}: input {node.name!r} has per-row shape {shape}; the repository config expects "
                    f"{want}; the repository and the exported model come from different sizes (write the "
                    "repository with the checkpoint's configs)"
                )
            types[node.name] = _ORT_TYPES.get(node.type, np.float32)
        return types

    def __call__(self, feeds: Arrays) -> np.ndarray:
        feeds = {k: np.ascontiguousarray(v, dtype=self.input_types[k]) for k, v in feeds.items()}
        (out,) = self.session.run([self.io.outputs[0].name], feeds)
        return np.asarray(out, dtype=np.float32)


def read_model_config(version_dir: str | Path) -> ModelConfig:
    """The checkpoint's ModelConfig installed next to an encoder (`mim.layout.MODEL_JSON`): the vocabulary size
    the text encoder checks token ids against."""
    path = Path(version_dir) / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; the exporter installs it next to the encoder: run `mimsearch engines --checkpoint "
            "CKPT --repository REPO`"
        )
    return ModelConfig.from_dict(json.loads(path.read_text()))


class EncoderHandler(Handler):
    """Runs an encoder on the batch of all good requests. Checks only what would otherwise fail the whole
    batch or silently poison a row: non-finite pixels, token ids outside the vocabulary (ONNX Gather would
    also wrap negative ids around), masks other than 0/1."""

    def __init__(
        self,
        encoder: Callable[[Arrays], np.ndarray],
        io: contract.ModelIO,
        dims: Mapping[str, Sequence[int]],
        vocab_size: int | None = None,
    ):
        self.io = io
        super().__init__(dims)
        self.encoder = encoder
        self.vocab_size = vocab_size

    def check(self, request: Request) -> Arrays:
        out = {}
        for spec in self.io.inputs:
            arr = self.input(request, spec)
            if spec == contract.PIXEL_VALUES:
                self._check_finite(spec.name, arr)
            elif spec == contract.INPUT_IDS:
                self._check_ids(arr)
            elif spec == contract.ATTENTION_MASK:
                self._check_mask(arr)
            out[spec.name] = arr
        return out

    def run(self, batch: Arrays) -> Arrays:
        return {self.io.outputs[0].name: self.encoder(batch)}

    @staticmethod
    def _check_finite(name: str, arr: np.ndarray) -> None:
        bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
        raise_row_errors(name, [("contains NaN or infinity; expected finite values" if b else None) for b in bad])

    def _check_ids(self, ids: np.ndarray) -> None:
        lo, hi = 0, self.vocab_size if self.vocab_size is not None else np.iinfo(np.int64).max
        expected = f"ids in [0, {self.vocab_size})" if self.vocab_size is not None else "ids >= 0"
        errors = []
        for row in ids:
            bad = row[(row < lo) | (row >= hi)]
            if bad.size:
                errors.append(f"has token id {int(bad[0])}; expected {expected}; tokenize with the model's tokenizer")
            else:
                errors.append(None)
        raise_row_errors(contract.INPUT_IDS.name, errors)

    @staticmethod
    def _check_mask(mask: np.ndarray) -> None:
        bad = ((mask != 0) & (mask != 1)).any(axis=1)
        raise_row_errors(contract.ATTENTION_MASK.name, ["must hold only 0 and 1" if b else None for b in bad])


# --- fusion (the arithmetic is mim.search.ranking.fuse, shared with evaluation and the client) ---------------------
def parse_image_weight(params: Mapping[str, Any], default: float) -> float:
    """The fusion weight from a request's parameters, `default` if absent; refuses non-numbers and values
    outside [0, 1] with a message naming the parameter."""
    name = contract.FUSION_WEIGHT_PARAM
    if name not in params:
        return default
    value = params[name]
    try:
        if isinstance(value, bool):
            raise TypeError
        w = float(value)
    except (TypeError, ValueError):
        raise InputError(
            f"request parameter {name!r} = {value!r} is not a number; send a float in [0, 1] "
            "(1 = image only, 0 = text only)"
        ) from None
    if not (math.isfinite(w) and 0.0 <= w <= 1.0):
        raise InputError(f"request parameter {name!r} = {value!r} is outside [0, 1] (1 = image only, 0 = text only)")
    return w


class FuseHandler(Handler):
    io = contract.MODELS[contract.FUSE]

    def __init__(self, dims: Mapping[str, Sequence[int]], default_image_weight: float = contract.DEFAULT_IMAGE_WEIGHT):
        super().__init__(dims)
        # The default goes through the same check as a request's value.
        self.default_image_weight = parse_image_weight({contract.FUSION_WEIGHT_PARAM: default_image_weight}, 0.0)

    def check(self, request: Request) -> Arrays:
        w = parse_image_weight(request.params, self.default_image_weight)
        out = {}
        for spec in self.io.inputs:
            arr = self.input(request, spec)
            EncoderHandler._check_finite(spec.name, arr)
            out[spec.name] = arr
        n = len(out[contract.IMAGE_EMBEDS.name])
        if len(out[contract.TEXT_EMBEDS.name]) != n:
            raise InputError(
                f"{contract.IMAGE_EMBEDS.name} has {n} rows but {contract.TEXT_EMBEDS.name} has "
                f"{len(out[contract.TEXT_EMBEDS.name])}; send one text per image"
            )
        out["weight"] = np.full((n, 1), w, dtype=np.float32)  # per row: each request keeps its own weight
        return out

    def run(self, batch: Arrays) -> Arrays:
        fused = fuse(batch[contract.IMAGE_EMBEDS.name], batch[contract.TEXT_EMBEDS.name], batch["weight"])
        return {contract.EMBEDDING.name: fused}


# --- server-side search ------------------------------------------------------------------------------------
def parse_k(params: Mapping[str, Any], default: int, n_items: int) -> int:
    """The number of results from a request's parameters (`default` if absent), in [1, n_items]."""
    name = contract.K_PARAM
    value = params.get(name, default)
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        k = int(value)
    except (TypeError, ValueError):
        raise InputError(
            f"request parameter {name!r} = {value!r} is not an integer; send an int in [1, {n_items}]"
        ) from None
    if not 1 <= k <= n_items:
        raise InputError(
            f"request parameter {name!r} = {value!r} is outside [1, {n_items}] (the gallery holds {n_items} items)"
        )
    return k


def parse_categories(params: Mapping[str, Any], known: frozenset[str]) -> frozenset[str] | None:
    """The category filter from a request's parameters: None when absent, else the set of names, each of which
    the gallery must know (a typo would otherwise silently return nothing)."""
    name = contract.CATEGORIES_PARAM
    if name not in params:
        return None
    raw = params[name]
    try:
        cats = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        cats = None
    if not isinstance(cats, list) or not cats or not all(isinstance(c, str) for c in cats):
        raise InputError(
            f"request parameter {name!r} = {raw!r} is not a JSON list of category names; send e.g. '[\"mug\"]'"
        )
    unknown = sorted(set(cats) - known)
    if unknown:
        raise InputError(f"request parameter {name!r}: unknown categories {unknown}; the gallery has {sorted(known)}")
    return frozenset(cats)


class KnnHandler(Handler):
    """Exact top-k over the gallery (`mim.search.knn.KnnIndex`, the client's search code) for a batch of queries.

    Requests of one batch may ask for different k and filters: requests with the same filter are searched
    together at their largest k, and each gets the first k columns (KnnIndex orders ties by id, so that prefix
    is exactly a search at k).

    With the gallery on a GPU the queries are taken as torch tensors where Triton put them (`tensor_io`: the
    encoders' GPU outputs arrive through DLPack, no host copy) and checked on the device without a
    synchronisation: a non-finite row fails the group's search, which is then re-run request by request, so
    only the culprit gets the error."""

    io = contract.MODELS[contract.KNN]

    def __init__(self, index: Any, dims: Mapping[str, Sequence[int]], default_k: int = contract.DEFAULT_K):
        super().__init__(dims)
        self.index = index
        self.tensor_io = getattr(index, "device", "cpu") == "cuda"
        ids = index.ids
        metas = [index.get_metadata(i) for i in ids.tolist()]
        self.categories = frozenset(m["category"] for m in metas if isinstance(m.get("category"), str))
        # Result metadata as sent: one JSON object per gallery row (ids ascending), "{}" for padding.
        self._ids = ids
        self._meta = np.array([json.dumps(m).encode("utf-8") for m in metas] + [b"{}"], dtype=object)
        self.default_k = parse_k({}, default_k, len(ids))

    def check(self, request: Request) -> Arrays:  # per request; __call__ does the grouping
        spec = contract.EMBEDDING
        value = request.inputs.get(spec.name)
        if self.tensor_io and value is not None and not isinstance(value, np.ndarray):
            return {spec.name: _tensor_rows(spec, value, self.dims[spec.name])}  # finiteness: KnnIndex.search
        q = self.input(request, spec)
        EncoderHandler._check_finite(spec.name, q)
        return {spec.name: q}

    def run(self, batch: Arrays) -> Arrays:
        raise NotImplementedError("KnnHandler searches per filter group in __call__")

    def __call__(self, requests: Sequence[Request]) -> list[Response]:
        responses: list[Response | None] = [None] * len(requests)
        groups: dict[frozenset[str] | None, list[tuple[int, np.ndarray, int]]] = {}
        for i, req in enumerate(requests):
            try:
                q = self.check(req)[contract.EMBEDDING.name]
                k = parse_k(req.params, self.default_k, len(self._ids))
                cats = parse_categories(req.params, self.categories)
            except Exception as e:
                responses[i] = _error(self.io.name, e)
                continue
            groups.setdefault(cats, []).append((i, q, k))
        for cats, members in groups.items():
            k_max = max(k for _, _, k in members)
            try:
                scores, ids = self.index.search(_concat([q for _, q, _ in members]), k_max, categories=cats)
            except Exception as e:
                if len(members) == 1:
                    responses[members[0][0]] = _error(self.io.name, e, input_error=isinstance(e, ValueError))
                else:  # one bad request must not fail the others: search each alone
                    for i, q, k in members:
                        responses[i] = self._search_alone(q, k, cats)
                continue
            start = 0
            for i, q, k in members:
                rows = slice(start, start + len(q))
                start += len(q)
                responses[i] = Response(outputs=self._outputs(scores[rows, :k], ids[rows, :k]))
        missing = Response(error=f"{self.io.name}: no response", code=INTERNAL)
        return [r if r is not None else missing for r in responses]

    def _search_alone(self, q: Any, k: int, cats: frozenset[str] | None) -> Response:
        try:
            scores, ids = self.index.search(q, k, categories=cats)
        except Exception as e:
            return _error(self.io.name, e, input_error=isinstance(e, ValueError))
        return Response(outputs=self._outputs(scores, ids))

    def _outputs(self, scores: np.ndarray, ids: np.ndarray) -> Arrays:
        # Gallery row of each id (ids are sorted); padding (-1) points at the trailing "{}".
        rows = np.where(ids >= 0, np.searchsorted(self._ids, ids), len(self._ids))
        return {
            contract.IDS.name: ids.astype(np.int64, copy=False),
            contract.SCORES.name: scores.astype(np.float32, copy=False),
            contract.ITEM_METADATA.name: self._meta[rows],
        }


def _tensor_rows(spec: contract.TensorSpec, t: Any, dims: Sequence[int]) -> Any:
    """A torch tensor input checked for dtype and per-row shape (metadata only: nothing is read back)."""
    if str(t.dtype).removeprefix("torch.") != np.dtype(spec.numpy_dtype).name:
        raise InputError(f"input {spec.name!r} has dtype {t.dtype}; expected {spec.dtype}")
    if t.ndim != 1 + len(dims) or tuple(t.shape[1:]) != tuple(dims) or t.shape[0] < 1:
        raise InputError(
            f"input {spec.name!r} has shape {list(t.shape)}; expected [batch >= 1, {', '.join(map(str, dims))}]"
        )
    return t


def _concat(parts: Sequence[Any]) -> Any:
    """Rows of several requests as one batch: NumPy arrays, or torch tensors (moved to the first one's device)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    import torch

    device = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.cat([torch.as_tensor(p).to(device) for p in parts])


# --- construction from a Triton model config ---------------------------------------------------------------
def config_params(model_config: Mapping[str, Any]) -> dict[str, str]:
    """`parameters { key: .. value { string_value: .. } }` of a Triton model config (JSON form) -> dict."""
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def config_dims(model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> per-row dims, for every input and output of a Triton model config (JSON form)."""
    return {
        t["name"]: tuple(int(d) for d in t.get("dims", []))
        for t in [*(model_config.get("input") or []), *(model_config.get("output") or [])]
    }


def make_handler(name: str, version_dir: str | Path, model_config: Mapping[str, Any], device_id: int = 0) -> Handler:
    """Build the handler of model `name` from its version folder (artifacts) and its config (JSON form, as
    Triton passes it to `initialize`): parameters and concrete dims come from the config. `device_id` is the
    GPU Triton gave a KIND_GPU instance."""
    known = sorted([*BUILDERS, *ENCODERS])
    if name not in known:
        raise ValueError(f"no python-backend handler for model {name!r}; expected one of {known}")
    params, dims = config_params(model_config), config_dims(model_config)
    if name in ENCODERS:  # the runtime named by the config variant builds it (imported only now)
        build = runtimes.encoder_builder(params.get(runtimes.RUNTIME_PARAM, runtimes.DEFAULT_RUNTIME))
        return build(name, Path(version_dir), params, dims, device_id)
    if name == contract.KNN:
        return _knn(name, Path(version_dir), params, dims, device_id)
    return BUILDERS[name](name, Path(version_dir), params, dims)


Dims = dict[str, tuple[int, ...]]
ENCODERS = (contract.IMAGE_ENCODER, contract.TEXT_ENCODER)  # built by their runtime (mim.serving.runtimes)


def _preprocess_image(name: str, version_dir: Path, params: dict[str, str], dims: Dims) -> Handler:
    cfg = read_preprocess(version_dir)
    _check_dims(contract.PIXEL_VALUES, dims, (3, cfg.image_size, cfg.image_size), version_dir)
    return PreprocessImageHandler(cfg, dims)


def _preprocess_text(name: str, version_dir: Path, params: dict[str, str], dims: Dims) -> Handler:
    pre = TextPreprocessor.from_dir(version_dir)
    _check_dims(contract.INPUT_IDS, dims, (pre.cfg.context_length,), version_dir)
    return PreprocessTextHandler(pre, dims)


def build_onnx_encoder(
    name: str, version_dir: Path, params: Mapping[str, str], dims: Dims, device_id: int = 0
) -> EncoderHandler:
    """Parameters (configs/<variant>.pbtxt): onnx_file, execution_providers (comma-separated, in order of
    preference), intra_op_threads."""
    io = contract.MODELS[name]
    path = version_dir / params.get("onnx_file", ONNX_FP32)
    providers = [p.strip() for p in params.get("execution_providers", "CPUExecutionProvider").split(",")]
    threads = int(params.get("intra_op_threads", "1"))
    encoder = OnnxEncoder(path, io, dims, providers=[p for p in providers if p], intra_op_threads=threads)
    vocab = read_model_config(version_dir).text.vocab_size if name == contract.TEXT_ENCODER else None
    return EncoderHandler(encoder, io, dims, vocab)


def _fuse(name: str, version_dir: Path, params: dict[str, str], dims: Dims) -> Handler:
    return FuseHandler(dims, float(params.get("default_image_weight", contract.DEFAULT_IMAGE_WEIGHT)))


def _knn(name: str, version_dir: Path, params: dict[str, str], dims: Dims, device_id: int = 0) -> Handler:
    """Parameters (config.pbtxt): default_k, device (auto | cpu | cuda, as KnnIndex), threads (BLAS / OpenMP
    threads of the CPU search). On a GPU the gallery goes to `device_id`, the GPU of the KIND_GPU instance."""
    from mim.search.knn import resolve_device
    from mim.serving.gallery import load_gallery  # only this model needs the gallery code

    (dim,) = dims[contract.EMBEDDING.name]
    device = resolve_device(params.get("device", "auto"))
    if device == "cuda":
        import torch

        torch.cuda.set_device(device_id)  # this stub process serves one instance: its GPU becomes the current one
    index = load_gallery(version_dir, dim=dim, device=device)
    # One search before the limit: it loads the libraries the search uses (BLAS, torch's OpenMP for top-k),
    # so that the limit reaches all of them.
    index.search(np.zeros((1, dim), dtype=np.float32), 1)
    limit_threads(int(params.get("threads", "1")))
    return KnnHandler(index, dims, int(params.get("default_k", contract.DEFAULT_K)))


def limit_threads(n: int) -> None:
    """Bound the BLAS and OpenMP thread pools of this process (the model's stub) to `n` threads."""
    import sys

    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=max(1, n))  # stays in effect: the returned object restores only when asked
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, n))


BUILDERS: dict[str, Callable[[str, Path, dict[str, str], Dims], Handler]] = {
    contract.PREPROCESS_IMAGE: _preprocess_image,
    contract.PREPROCESS_TEXT: _preprocess_text,
    contract.FUSE: _fuse,
    contract.KNN: _knn,
}


def _check_dims(spec: contract.TensorSpec, dims: Dims, want: tuple[int, ...], where: Path) -> None:
    got = tuple(dims.get(spec.name, ()))
    if got != want:
        raise ValueError(
            f"{where}/{PREPROCESS_JSON} gives {spec.name} per-row shape {list(want)} but the model config says "
            f"{list(got)}; write the repository with the checkpoint's configs (mim.serving.repository)"
        )
