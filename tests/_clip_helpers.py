"""Helpers for the CLIP import tests: tiny random CLIP models built offline with transformers (the reference),
written in the Hugging Face and OpenCLIP layouts, real photos and titles, and the parity figures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mim import contract
from mim.model.tokenizer import clip_vocab_from_bpe_file
from mim.search import ranking

transformers = pytest.importorskip("transformers", reason="transformers (the `dev` extra) builds the reference CLIP")

# 2 layers, widths 48 (vision) and 32 (text), 32 px images in 16 px patches: a CLIP in every respect but size,
# built and run in well under a second. The text tower keeps CLIP's real 49,408-token vocabulary and 77-token
# context, so the real tokenizer drives it.
TINY_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
}
TINY_VISION = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "image_size": 32,
    "patch_size": 16,
}
TINY_EMBED = 24

TITLES = [
    "Blue zebra-striped ceramic mug",
    "red polka-dot cotton shirt, long sleeves",
    "Men's waterproof hiking boots (size 44)",
    "Vintage Leather Messenger Bag — brown",
    "naïve café table lamp",
    "北京 ceramic tea set 🍵",
    "kids' 🦄 unicorn backpack!!!",
    "stainless steel water bottle 750ml",
    "like this, but in red",
    "   extra   spaces\tand\nnewlines   ",
    "word " * 120,  # longer than the context: truncated, end-of-text kept
]


def random_clip(
    text: dict | None = None,
    vision: dict | None = None,
    *,
    embed: int = TINY_EMBED,
    seed: int = 0,
    act: str = "quick_gelu",
):
    """A randomly initialised transformers CLIPModel (eval mode). Defaults: the tiny shapes above."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config={**(TINY_TEXT if text is None else text), "hidden_act": act},
        vision_config={**(TINY_VISION if vision is None else vision), "hidden_act": act},
        projection_dim=embed,
    )
    model = transformers.CLIPModel(cfg).eval()
    # Non-trivial LayerNorm affine parameters and biases: default init (ones/zeros) would hide a swapped key.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "layrnorm.weight", "layernorm.weight", "norm.weight")):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.02 * torch.randn_like(p))
    return model


def write_clip_vocab(folder: Path) -> None:
    """CLIP's vocabulary as Hugging Face model folders ship it: vocab.json + merges.txt."""
    vocab, merges = clip_vocab_from_bpe_file()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "\n".join(" ".join(m) for m in merges)
    (folder / "merges.txt").write_text(f"#version: 0.2\n{lines}\n", encoding="utf-8")


def save_hf_folder(model, folder: Path) -> Path:
    """A complete Hugging Face CLIP folder: weights + config, tokenizer files, preprocessor config."""
    model.save_pretrained(folder)
    write_clip_vocab(folder)
    s = model.config.vision_config.image_size
    hf_image_processor(s).save_pretrained(folder)
    return folder


def hf_image_processor(size: int):
    # The PIL backend: transformers' default CLIPImageProcessor needs torchvision.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def hf_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the importer's renaming, written independently: HF CLIPModel keys -> OpenCLIP keys."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        k2 = k
        for a, b in (
            ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
            ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
            ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
            ("vision_model.pre_layrnorm", "visual.ln_pre"),
            ("vision_model.post_layernorm", "visual.ln_post"),
            ("vision_model.encoder.layers", "visual.transformer.resblocks"),
            ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
            ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
            ("text_model.final_layer_norm", "ln_final"),
            ("text_model.encoder.layers", "transformer.resblocks"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
            ("self_attn.out_proj", "attn.out_proj"),
        ):
            k2 = k2.replace(a, b)
        if k2 == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k2 == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif "self_attn." in k2:  # q/k/v_proj.weight|bias -> attn.in_proj_weight|bias, rows [q; k; v]
            block, rest = k2.split(".self_attn.")
            which, kind = rest.split("_proj.")
            qkv.setdefault(f"{block}.attn.in_proj_{kind}", {})[which] = v
        else:
            out[k2] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]]).contiguous()
    return out


def openclip_arch_json(path: Path, *, quick_gelu: bool = True) -> Path:
    """The tiny shapes as an OpenCLIP model-config file."""
    cfg = {
        "embed_dim": TINY_EMBED,
        "quick_gelu": quick_gelu,
        "vision_cfg": {
            "image_size": TINY_VISION["image_size"],
            "layers": TINY_VISION["num_hidden_layers"],
            "width": TINY_VISION["hidden_size"],
            "patch_size": TINY_VISION["patch_size"],
            "head_width": TINY_VISION["hidden_size"] // TINY_VISION["num_attention_heads"],
            "mlp_ratio": TINY_VISION["intermediate_size"] / TINY_VISION["hidden_size"],
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": TINY_TEXT["hidden_size"],
            "heads": TINY_TEXT["num_attention_heads"],
            "layers": TINY_TEXT["num_hidden_layers"],
            "mlp_ratio": TINY_TEXT["intermediate_size"] / TINY_TEXT["hidden_size"],
        },
    }
    path.write_text(json.dumps(cfg))
    return path


def real_photos() -> list[bytes]:
    """Real photographs (matplotlib's sample photo of Grace Hopper, and crops of it at other aspect ratios)
    and a real product-like PNG, re-encoded losslessly as PNG so decoding is exact on both sides."""
    from matplotlib import cbook

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    pack = Image.open(cbook.get_sample_data("Minduka_Present_Blue_Pack.png")).convert("RGB")
    images = [photo, photo.crop((0, 0, 512, 300)), photo.crop((10, 20, 333, 471)), photo.crop((0, 0, 97, 601)), pack]
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def parity(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(min cosine per row, max abs diff) of our unit embeddings against transformers' projected features,
    which are not normalised: normalised here first, as our towers end."""
    p = ranking.parity(ours, ranking.l2_normalize(np.asarray(ref, np.float32)))
    return p.min_cosine, p.max_abs_diff


def hf_image_embeddings(model, photos: list[bytes]) -> np.ndarray:
    proc = hf_image_processor(model.config.vision_config.image_size)
    pixels = proc([Image.open(io.BytesIO(p)).convert("RGB") for p in photos], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixels).pooler_output.numpy()


def hf_text_embeddings(model, tokenizer_dir: Path, texts: list[str]) -> np.ndarray:
    tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    enc = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model.get_text_features(**enc).pooler_output.numpy()


class HFEmbeddings:
    """The transformers reference behind the client's interface (images, texts, multimodal): the embeddings a
    served imported model must reproduce. Fusion is normalize(w * image + (1 - w) * text), as served."""

    def __init__(self, model, tokenizer_dir: Path):
        self.model, self.tokenizer_dir = model, tokenizer_dir

    def embed_images(self, images: list[bytes]) -> np.ndarray:
        return ranking.l2_normalize(hf_image_embeddings(self.model, list(images)))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return ranking.l2_normalize(hf_text_embeddings(self.model, self.tokenizer_dir, list(texts)))

    def embed_multimodal(self, images, texts, image_weight: float | None = None) -> np.ndarray:
        w = contract.DEFAULT_IMAGE_WEIGHT if image_weight is None else image_weight
        return ranking.fuse(self.embed_images(images), self.embed_texts(texts), w)


def more_photos() -> list[bytes]:
    """real_photos() and mirrored, rotated and grey copies of them: a small gallery. PNG, so that both sides
    decode the same pixels (a JPEG decoder may legitimately differ in the last bit)."""
    out = list(real_photos())
    for data in real_photos():
        im = Image.open(io.BytesIO(data)).convert("RGB")
        for edit in (lambda x: x.transpose(Image.FLIP_LEFT_RIGHT), lambda x: x.rotate(90, expand=True).convert("L")):
            buf = io.BytesIO()
            edit(im).convert("RGB").save(buf, "PNG")
            out.append(buf.getvalue())
    return out
