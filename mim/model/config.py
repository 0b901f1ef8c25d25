"""Typed model and preprocessing configs.

Named sizes live in `SIZES`. Every value carries the reason it has that value. A checkpoint stores its
`ModelConfig` and `PreprocessConfig` as JSON next to the weights, and everything downstream (export, the
Triton preprocessing models, the client) reads them from there, so training and serving cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from mim.errors import ModelError

# Feed-forward activations the towers implement. "gelu" is the exact (erf) GELU our own models train with;
# "quick_gelu" is x * sigmoid(1.702 x), which OpenAI's CLIP weights were trained with (a checkpoint run with the
# other one drifts measurably, so the choice travels with the weights).
ACTIVATIONS = ("gelu", "quick_gelu")
# Where the text tower reads its sentence embedding: "cls" is position 0 ([CLS], our word-piece layout);
# "eot" is the last attended position, which holds CLIP's end-of-text token.
TEXT_POOLINGS = ("cls", "eot")
# Which tokenizer a checkpoint's tokenizer.json holds: our word-piece one, or CLIP's byte-level BPE.
TOKENIZERS = ("wordpiece", "clip_bpe")


def _check_choice(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field_name}={value!r}; expected one of {list(choices)}")


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                "pick sizes where image_size % patch_size == 0"
            )
        if self.width % self.heads:
            raise ValueError(f"vision.width={self.width} is not divisible by heads={self.heads}")
        _check_choice("vision.activation", self.activation, ACTIVATIONS)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    # Causal self-attention (each token sees only those before it), as CLIP's text transformer was trained;
    # our own text tower attends both ways, which suits [CLS] pooling.
    causal: bool = False
    pooling: str = "cls"

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text.width={self.width} is not divisible by heads={self.heads}")
        if self.context_length < 2:
            raise ValueError(f"text.context_length={self.context_length}; need at least 2 ([CLS] + one token)")
        _check_choice("text.activation", self.activation, ACTIVATIONS)
        _check_choice("text.pooling", self.pooling, TEXT_POOLINGS)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    # CLIP's initial temperature 0.07, stored as the log of its inverse; clamped at 100 during training.
    init_logit_scale: float = 2.659260036932778
    max_logit_scale: float = 100.0

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate()

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        """The tokenizer is trained on the catalog, so the vocabulary size is only known after that."""
        return dataclasses.replace(self, text=dataclasses.replace(self.text, vocab_size=vocab_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything a server needs to turn raw bytes / strings into encoder inputs."""

    image_size: int
    # CLIP's RGB mean/std: the usual choice for ViTs; the towers train from scratch here, so any fixed
    # values work as long as training and serving agree, which this config guarantees.
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # Resize the shorter side to image_size (bicubic), then centre-crop a square: keeps the aspect ratio of
    # user photos instead of squashing them. "clip" is the same with the longer side truncated instead of
    # rounded, as CLIP's own preprocessing does (mim.model.preprocess).
    resize_mode: str = "shorter_side_center_crop"
    context_length: int = 16
    tokenizer_file: str = "tokenizer.json"
    tokenizer: str = "wordpiece"  # one of TOKENIZERS
    lowercase: bool = True
    # Decompression-bomb guard: refuse images whose header declares more pixels than this (about 40 MP).
    max_image_pixels: int = 40_000_000
    # Refuse encoded payloads larger than this before decoding anything.
    max_image_bytes: int = 20 * 1024 * 1024
    # Text longer than this (in UTF-8 bytes) is refused outright; shorter text is truncated to context_length
    # tokens. The bound keeps a single request from making the tokenizer chew megabytes.
    max_text_bytes: int = 64 * 1024

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        cfg = cls(**d)
        _check_choice("preprocess.tokenizer", cfg.tokenizer, TOKENIZERS)
        return cfg


@dataclass(frozen=True)
class SizeSpec:
    model: ModelConfig
    preprocess: PreprocessConfig
    why: str = field(default="", compare=False)


# vocab_size below is a placeholder; `ModelConfig.with_vocab` sets it from the trained tokenizer.
SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(
        model=ModelConfig(
            name="tiny",
            embed_dim=128,
            # 48 px with 8 px patches = 36 tokens: the product's silhouette and its pattern are still visible
            # in the synthetic photos. Width 96 x 3 layers with a 2x MLP keeps a step of 64 photo pairs at a
            # fraction of a second on 2 CPU cores (64 px x 4 layers x 128 wide was ~5x slower, measured).
            vision=VisionConfig(image_size=48, patch_size=8, width=96, layers=3, heads=3, mlp_ratio=2.0),
            # Titles are at most ~8 words; 16 tokens leaves room for short queries and reformulations.
            text=TextConfig(vocab_size=1024, context_length=16, width=96, layers=2, heads=3, mlp_ratio=2.0),
        ),
        preprocess=PreprocessConfig(image_size=48, context_length=16),
        why="trains in minutes on 2 CPU cores; tests and the demo",
    ),
    "base": SizeSpec(
        model=ModelConfig(
            name="base",
            embed_dim=512,
            # ViT-B/16 at 224 px (196 patches + [CLS]); about 35 GFLOP per image.
            vision=VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12),
            # CLIP-base text transformer: 12 layers, 512 wide, 8 heads, 77-token context.
            text=TextConfig(vocab_size=49408, context_length=77, width=512, layers=12, heads=8),
        ),
        preprocess=PreprocessConfig(image_size=224, context_length=77),
        why="GPU serving benchmarks at a production-like size",
    ),
}


def _clip_size(name: str, patch: int, vision: tuple[int, int, int], text: tuple[int, int, int], embed: int) -> SizeSpec:
    """A CLIP shape as OpenAI published it: 224 px, 77-token causal text with end-of-text pooling, QuickGELU,
    CLIP's BPE vocabulary (49,408 tokens). `vision` and `text` are (width, layers, heads)."""
    (vw, vl, vh), (tw, tl, th) = vision, text
    return SizeSpec(
        model=ModelConfig(
            name=name,
            embed_dim=embed,
            vision=VisionConfig(
                image_size=224, patch_size=patch, width=vw, layers=vl, heads=vh, activation="quick_gelu"
            ),
            text=TextConfig(
                vocab_size=49408,
                context_length=77,
                width=tw,
                layers=tl,
                heads=th,
                activation="quick_gelu",
                causal=True,
                pooling="eot",
            ),
        ),
        preprocess=PreprocessConfig(image_size=224, context_length=77, tokenizer="clip_bpe", resize_mode="clip"),
        why="the shape of a pretrained CLIP checkpoint (mimsearch import-clip)",
    )


# Heads are width / 64 in every CLIP ViT, as in OpenAI's release.


def _at_image_size(spec: SizeSpec, name: str, image_size: int, why: str) -> SizeSpec:
    """`spec` with its towers unchanged and photos of `image_size` px (more patch tokens of the same size)."""
    model = dataclasses.replace(
        spec.model, name=name, vision=dataclasses.replace(spec.model.vision, image_size=image_size)
    )
    return SizeSpec(model, dataclasses.replace(spec.preprocess, image_size=image_size), why)


# tiny's towers on 64 px photos (64 tokens of 8 px): the resolution question of `make quality-64`, with width and
# depth held fixed so that only the image size moves.
SIZES["tiny-64"] = _at_image_size(
    SIZES["tiny"], "tiny-64", 64, "tiny at 64 px: does a larger image move the comparison"
)
SIZES["clip-vit-b-32"] = _clip_size("clip-vit-b-32", 32, (768, 12, 12), (512, 12, 8), 512)
SIZES["clip-vit-b-16"] = _clip_size("clip-vit-b-16", 16, (768, 12, 12), (512, 12, 8), 512)
SIZES["clip-vit-l-14"] = _clip_size("clip-vit-l-14", 14, (1024, 24, 16), (768, 12, 12), 768)


def get_size(name: str) -> SizeSpec:
    try:
        return SIZES[name]
    except KeyError:
        raise ModelError(f"unknown model size {name!r}; expected one of {sorted(SIZES)}") from None


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
