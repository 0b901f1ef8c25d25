"""The tensor contract: one source of truth for every Triton model's inputs and outputs.

The ONNX exporter names its graph inputs/outputs from here, the TensorRT builder takes its profile shapes from
here, the config.pbtxt generator writes its inputs/outputs from here, and the client and the perf_analyzer
input files build their requests from here. Dims exclude the batch dimension (Triton's `max_batch_size`
convention); symbolic dims ("image_size", "context_length", "embed_dim") are resolved from the model's saved
configs with `resolve_dims`, so the same contract serves the `tiny` and the `base` sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mim.model.config import ModelConfig, PreprocessConfig

Dim = int | str

_NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "BYTES": np.object_}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type without the TYPE_ prefix: FP32, INT64, BYTES, ...
    dims: tuple[Dim, ...]  # per-item dims, batch excluded

    @property
    def numpy_dtype(self) -> type:
        return _NUMPY[self.dtype]

    @property
    def triton_type(self) -> str:
        """Name used in config.pbtxt (`data_type: TYPE_FP32`); the gRPC wire name is `self.dtype`."""
        return "TYPE_STRING" if self.dtype == "BYTES" else f"TYPE_{self.dtype}"

    def resolve_dims(self, model: ModelConfig | None = None, pre: PreprocessConfig | None = None) -> tuple[int, ...]:
        values = {}
        if pre is not None:
            values.update(image_size=pre.image_size, context_length=pre.context_length)
        if model is not None:
            values.update(
                image_size=model.vision.image_size,
                context_length=model.text.context_length,
                embed_dim=model.embed_dim,
            )
        out = []
        for d in self.dims:
            if isinstance(d, str):
                if d not in values:
                    raise ValueError(f"dim {d!r} of tensor {self.name!r} needs the model/preprocess config to resolve")
                out.append(int(values[d]))
            else:
                out.append(d)
        return tuple(out)


# --- tensors -----------------------------------------------------------------------------------------------
IMAGE = TensorSpec("image", "BYTES", (1,))  # encoded JPEG/PNG/WebP bytes, one per batch row
TEXT = TensorSpec("text", "BYTES", (1,))  # UTF-8 text, one per batch row
PIXEL_VALUES = TensorSpec("pixel_values", "FP32", (3, "image_size", "image_size"))
INPUT_IDS = TensorSpec("input_ids", "INT64", ("context_length",))
ATTENTION_MASK = TensorSpec("attention_mask", "INT64", ("context_length",))  # 1 = real token, 0 = padding
IMAGE_EMBEDS = TensorSpec("image_embeds", "FP32", ("embed_dim",))  # L2-normalised
TEXT_EMBEDS = TensorSpec("text_embeds", "FP32", ("embed_dim",))  # L2-normalised
EMBEDDING = TensorSpec("embedding", "FP32", ("embed_dim",))  # L2-normalised output of every embed_* ensemble
# Search results, k columns per query row, best first (k varies per request, hence -1). Padding as KnnIndex
# pads when a category filter matches fewer than k items: id -1, score -inf, metadata "{}".
IDS = TensorSpec("ids", "INT64", (-1,))  # gallery ids
SCORES = TensorSpec("scores", "FP32", (-1,))  # inner products (cosine) with the query embedding
ITEM_METADATA = TensorSpec("item_metadata", "BYTES", (-1,))  # UTF-8 JSON object per result (title, category, ...)

# --- model names -------------------------------------------------------------------------------------------
PREPROCESS_IMAGE = "preprocess_image"
PREPROCESS_TEXT = "preprocess_text"
IMAGE_ENCODER = "image_encoder"
TEXT_ENCODER = "text_encoder"
FUSE = "fuse"
EMBED_IMAGE = "embed_image"
EMBED_TEXT = "embed_text"
EMBED_MULTIMODAL = "embed_multimodal"
KNN = "knn"
SEARCH_IMAGE = "search_image"
SEARCH_TEXT = "search_text"
SEARCH_MULTIMODAL = "search_multimodal"


@dataclass(frozen=True)
class ModelIO:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


MODELS: dict[str, ModelIO] = {
    m.name: m
    for m in (
        ModelIO(PREPROCESS_IMAGE, (IMAGE,), (PIXEL_VALUES,)),
        ModelIO(PREPROCESS_TEXT, (TEXT,), (INPUT_IDS, ATTENTION_MASK)),
        ModelIO(IMAGE_ENCODER, (PIXEL_VALUES,), (IMAGE_EMBEDS,)),
        ModelIO(TEXT_ENCODER, (INPUT_IDS, ATTENTION_MASK), (TEXT_EMBEDS,)),
        ModelIO(FUSE, (IMAGE_EMBEDS, TEXT_EMBEDS), (EMBEDDING,)),
        ModelIO(EMBED_IMAGE, (IMAGE,), (EMBEDDING,)),
        ModelIO(EMBED_TEXT, (TEXT,), (EMBEDDING,)),
        ModelIO(EMBED_MULTIMODAL, (IMAGE, TEXT), (EMBEDDING,)),
        ModelIO(KNN, (EMBEDDING,), (IDS, SCORES, ITEM_METADATA)),
        ModelIO(SEARCH_IMAGE, (IMAGE,), (IDS, SCORES, ITEM_METADATA)),
        ModelIO(SEARCH_TEXT, (TEXT,), (IDS, SCORES, ITEM_METADATA)),
        ModelIO(SEARCH_MULTIMODAL, (IMAGE, TEXT), (IDS, SCORES, ITEM_METADATA)),
    )
}

# Largest batch any model accepts (Triton max_batch_size, the TensorRT profile's max). Clients split larger
# lists into requests of at most this many rows.
MAX_BATCH_SIZE = 64


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """CUDA graph batch sizes up to `max_batch`: powers of two up to 32, where a batch is launch-bound and
    padding it costs little, then every 16 up to 64 and every 32 beyond (48, 96, 160, 192, 224, ...), where a
    batch is compute-bound and padding 33 rows to 64 would nearly double the work: past 32 at most a third of a
    replay is padding. `max_batch` itself is always a size."""
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch}; expected >= 1")
    sizes = {s for s in (1, 2, 4, 8, 16, 32) if s <= max_batch}
    sizes |= set(range(48, min(max_batch, 64) + 1, 16)) | set(range(96, max_batch + 1, 32)) | {max_batch}
    return tuple(sorted(sizes))


# Batch sizes the GPU torch towers capture CUDA graphs for, and the dynamic batcher's preferred sizes in that
# variant (a batch between two sizes runs padded to the next one).
GRAPH_BATCH_SIZES = graph_batch_sizes(MAX_BATCH_SIZE)

# Multimodal fusion: embedding = normalize(w * image + (1 - w) * text). 0.5 weighs both modalities equally;
# a request may override it with the request parameter named FUSION_WEIGHT_PARAM.
DEFAULT_IMAGE_WEIGHT = 0.5
FUSION_WEIGHT_PARAM = "image_weight"

# Server-side search (`knn` and the search_* ensembles): request parameters, like the fusion weight. K_PARAM is
# the number of results (1..gallery size, default DEFAULT_K); CATEGORIES_PARAM, when present, is a JSON list of
# category names and keeps only gallery items of those categories.
K_PARAM = "k"
DEFAULT_K = 10
CATEGORIES_PARAM = "categories"


# --- random inputs (exporter traces, parity checks, benchmarks) --------------------------------------------
def random_inputs(io: ModelIO, model_cfg: ModelConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a tower, never zeros: pixels ~ N(0, 1) (roughly what normalised photos look like);
    token ids uniform in [4, vocab) (past the special tokens); attention masks of random length that always
    keep position 0 (the pooled [CLS] position)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in io.inputs:
        shape = (batch, *spec.resolve_dims(model_cfg))
        if spec == PIXEL_VALUES:
            out[spec.name] = rng.standard_normal(shape).astype(spec.numpy_dtype)
        elif spec == INPUT_IDS:
            out[spec.name] = rng.integers(4, model_cfg.text.vocab_size, size=shape).astype(spec.numpy_dtype)
        elif spec == ATTENTION_MASK:
            lengths = rng.integers(1, shape[1] + 1, size=batch)  # (B,) in [1, T]
            out[spec.name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(spec.numpy_dtype)
        else:
            raise ValueError(f"no random generator for contract tensor {spec.name!r}; add one to random_inputs")
    return out
