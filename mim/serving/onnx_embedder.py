"""The exported ONNX towers as an in-process `Embedder`, run by the serving code itself.

`OnnxEmbedder` is what Triton's CPU encoder models compute, without Triton: the same ONNX Runtime runner
(`backends.OnnxEncoder`), the same preprocessing files and thread count. The FP16 gate, the served-vs-in-process
checks and the serving benchmarks use it. It lives with the serving code it borrows, so `mim.search` never
imports `mim.serving`.

    OnnxEmbedder.from_repository(repo)     the FP32 towers and preprocessing installed in a Triton repository
    OnnxEmbedder.from_files(...)           two exported ONNX files (FP32 or FP16) and a checkpoint's configs
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mim import contract, layout
from mim.model.config import ModelConfig, PreprocessConfig
from mim.model.tokenizer import Tokenizers
from mim.search.embedding import LocalEmbedder
from mim.serving.backends import OnnxEncoder, TextPreprocessor, read_model_config, read_preprocess
from mim.serving.runtimes import CPU_ENCODER_THREADS


class OnnxEmbedder(LocalEmbedder):
    """The exported towers run by the serving code's ONNX Runtime runner (`mim.serving.backends.OnnxEncoder`)."""

    def __init__(
        self,
        image_encoder,
        text_encoder,
        embed_dim: int,
        pre_cfg: PreprocessConfig,
        tokenizer: Tokenizers,
        batch_size: int | None = contract.MAX_BATCH_SIZE,
    ):
        super().__init__(embed_dim, pre_cfg, tokenizer, batch_size, batch_size)
        self.image_encoder, self.text_encoder = image_encoder, text_encoder

    @classmethod
    def from_files(
        cls,
        image_onnx: str | Path,
        text_onnx: str | Path,
        model_cfg: ModelConfig,
        pre_cfg: PreprocessConfig,
        tokenizer: Tokenizers,
        *,
        threads: int = 2,
        batch_size: int | None = contract.MAX_BATCH_SIZE,
    ) -> OnnxEmbedder:
        """Two exported ONNX files (FP32 or FP16; both keep FP32 inputs and outputs) and the checkpoint's configs."""

        def encoder(path: str | Path, name: str) -> OnnxEncoder:
            io = contract.MODELS[name]
            dims = {t.name: t.resolve_dims(model_cfg) for t in io.inputs}
            return OnnxEncoder(path, io, dims, intra_op_threads=threads)

        img, txt = encoder(image_onnx, contract.IMAGE_ENCODER), encoder(text_onnx, contract.TEXT_ENCODER)
        return cls(img, txt, model_cfg.embed_dim, pre_cfg, tokenizer, batch_size)

    @classmethod
    def from_repository(
        cls, repository: str | Path, *, threads: int | None = None, batch_size: int | None = contract.MAX_BATCH_SIZE
    ) -> OnnxEmbedder:
        """The FP32 towers and preprocessing files installed in a Triton repository, with the served thread count."""
        image_dir = layout.version_dir(repository, contract.IMAGE_ENCODER)
        text_dir = layout.version_dir(repository, contract.TEXT_ENCODER)
        text = TextPreprocessor.from_dir(layout.version_dir(repository, contract.PREPROCESS_TEXT))
        return cls.from_files(
            image_dir / layout.ONNX_FP32,
            text_dir / layout.ONNX_FP32,
            read_model_config(image_dir),
            read_preprocess(layout.version_dir(repository, contract.PREPROCESS_IMAGE)),
            text.tokenizer,
            threads=threads or CPU_ENCODER_THREADS,
            batch_size=batch_size,
        )

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.image_encoder({contract.PIXEL_VALUES.name: pixels})

    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.text_encoder({contract.INPUT_IDS.name: input_ids, contract.ATTENTION_MASK.name: attention_mask})
