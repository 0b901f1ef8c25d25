"""One embedder interface, and its in-process implementations.

Anything that turns encoded images and texts into L2-normalised (N, D) float32 embeddings is an `Embedder`:

    TorchEmbedder(checkpoint)              the in-process torch model (training's own forward pass)
    mim.serving.onnx_embedder.OnnxEmbedder the exported ONNX towers in ONNX Runtime, with the serving code's
                                           preprocessing and encoder runner (what Triton's CPU models run)
    client.triton_client.EmbeddingClient   the served ensembles over gRPC

Evaluation, search, the FP16 gate, the tests and the benchmarks take an `Embedder` and never ask which one it
is. The in-process ones share `LocalEmbedder`: batching, empty inputs, the same text checks as the served
`preprocess_text` model, and fusion by `mim.search.ranking.fuse`, the function the served `fuse` model runs.

This module imports neither torch nor ONNX Runtime: `TorchEmbedder` imports torch when one is made, so the
search path loads without either.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from mim import contract
from mim.model.config import PreprocessConfig
from mim.model.preprocess import decode_text, preprocess_image_bytes
from mim.model.tokenizer import Tokenizers
from mim.search.ranking import fuse

if TYPE_CHECKING:
    from mim.model.checkpoint import Checkpoint


@runtime_checkable
class Embedder(Protocol):
    """Encoded image files and texts -> (N, D) float32 L2-normalised embeddings, one row per item, in order."""

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_multimodal(
        self, images: Sequence[bytes], texts: Sequence[str], image_weight: float | None = None
    ) -> np.ndarray:
        """normalize(w * image + (1 - w) * text), one text per image; w defaults to contract.DEFAULT_IMAGE_WEIGHT."""
        ...


def check_image_weight(image_weight: float | None) -> float:
    """The fusion weight to use: the contract's default for None, else a number in [0, 1] (ValueError if not)."""
    w = contract.DEFAULT_IMAGE_WEIGHT if image_weight is None else image_weight
    if isinstance(w, bool) or not isinstance(w, (int, float, np.floating)) or not math.isfinite(w) or not 0 <= w <= 1:
        raise ValueError(f"image_weight={image_weight!r}; expected a number in [0, 1] (1 = image only, 0 = text only)")
    return float(w)


class LocalEmbedder(ABC):
    """An `Embedder` computed in this process: subclasses embed one batch of decoded inputs at a time."""

    def __init__(
        self,
        embed_dim: int,
        pre_cfg: PreprocessConfig,
        tokenizer: Tokenizers,
        image_batch: int | None,
        text_batch: int | None,
    ):
        self.embed_dim, self.pre_cfg, self.tokenizer = int(embed_dim), pre_cfg, tokenizer
        # Rows per forward pass (None: the whole list in one pass).
        self.image_batch, self.text_batch = image_batch, text_batch

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        return self._batched(list(images), self.image_batch, self._images_batch)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._batched(list(texts), self.text_batch, self._texts_batch)

    def embed_multimodal(
        self, images: Sequence[bytes], texts: Sequence[str], image_weight: float | None = None
    ) -> np.ndarray:
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images and {len(texts)} texts; expected one text per image")
        w = check_image_weight(image_weight)
        return fuse(self.embed_images(images), self.embed_texts(texts), w)

    def _images_batch(self, images: list[bytes]) -> np.ndarray:
        pixels = np.stack([preprocess_image_bytes(b, self.pre_cfg) for b in images])  # (B, 3, S, S)
        return self.encode_pixels(pixels)

    def _texts_batch(self, texts: list[str]) -> np.ndarray:
        # decode_text refuses what the served preprocess_text model refuses (empty, non-UTF-8, too long).
        ids, mask = self.tokenizer.encode_batch([decode_text(t, self.pre_cfg) for t in texts])  # (B, T) each
        return self.encode_tokens(ids, mask)

    def _batched(self, items: list, batch: int | None, embed_batch) -> np.ndarray:
        step = batch or max(1, len(items))
        out = [np.zeros((0, self.embed_dim), np.float32)]
        for i in range(0, len(items), step):
            out.append(np.asarray(embed_batch(items[i : i + step]), dtype=np.float32))
        return np.concatenate(out)

    @abstractmethod
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, D) embeddings."""

    @abstractmethod
    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) int64 ids and mask -> (B, D) embeddings."""


class TorchEmbedder(LocalEmbedder):
    """The in-process torch model of a loaded checkpoint (`mim.model.checkpoint.load_checkpoint`)."""

    # Token batches take less memory than pixel batches, so texts go through in larger ones.
    def __init__(self, ck: Checkpoint, image_batch: int = 256, text_batch: int = 512):
        import torch  # here, not at module level: the rest of the module runs without torch

        super().__init__(ck.model_cfg.embed_dim, ck.pre_cfg, ck.tokenizer, image_batch, text_batch)
        self.model, self._torch = ck.model, torch

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model.encode_image(self._torch.from_numpy(pixels)).numpy()

    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        t = self._torch
        with t.inference_mode():
            return self.model.encode_text(t.from_numpy(input_ids), t.from_numpy(attention_mask)).numpy()
