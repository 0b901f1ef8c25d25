"""Import a pretrained CLIP checkpoint into our checkpoint format (safetensors + config + tokenizer + preprocessing).

    mimsearch import-clip --hf path/to/clip-folder --out artifacts/checkpoints/clip
    mimsearch import-clip --openclip ViT-B-32.safetensors --arch ViT-B-32-quickgelu --out artifacts/checkpoints/clip

Two source layouts:
- a Hugging Face `CLIPModel` folder: `config.json`, `model.safetensors` (or `pytorch_model.bin`, read with
  `weights_only=True`), the tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`) and optionally
  `preprocessor_config.json`;
- an OpenCLIP state dict (`.safetensors`; `.pt`/`.bin` only through `torch.load(weights_only=True)`, which
  refuses pickled code) plus an architecture: a name (`ViT-B-32`, `ViT-B-16`, `ViT-L-14`, each also as
  `...-quickgelu`, which OpenAI's own weights need) or an OpenCLIP model-config JSON file. The tokenizer is
  CLIP's published vocabulary, shipped with this package.

OpenCLIP keys are first renamed to Hugging Face's (split `in_proj` into q/k/v, transpose the projections,
`c_fc`/`c_proj` -> `fc1`/`fc2`, `ln_1`/`ln_2` -> `layer_norm1`/`layer_norm2`), so both layouts share one
mapping onto our towers. Every weight is checked (missing, extra, shape) before anything is written, and the
checkpoint is written into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mim.errors import ModelError
from mim.layout import model_id_of_checkpoint
from mim.model import checkpoint as ckpt
from mim.model.config import ModelConfig, PreprocessConfig, TextConfig, VisionConfig, get_size
from mim.model.tokenizer import ClipTokenizer, clip_vocab_from_bpe_file
from mim.model.towers import MIMModel

# Hugging Face's CLIPConfig defaults, for the fields a config.json leaves out.
_HF_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
# Our LayerNorms use torch's default epsilon; a checkpoint trained with another one is refused, not approximated.
_LAYER_NORM_EPS = 1e-5
# Entries some state dicts carry that are not weights: recomputed position ids (older transformers), and the
# ints / causal mask of OpenAI's original release.
_IGNORED_KEYS = ("position_ids", "input_resolution", "context_length", "vocab_size", "attn_mask")

# OpenCLIP architecture names -> (our named size, activation). OpenCLIP's plain names use exact GELU; the
# "-quickgelu" variants (and OpenAI's weights) use QuickGELU.
OPENCLIP_ARCHS: dict[str, tuple[str, str]] = {}
for _arch, _size in (("ViT-B-32", "clip-vit-b-32"), ("ViT-B-16", "clip-vit-b-16"), ("ViT-L-14", "clip-vit-l-14")):
    OPENCLIP_ARCHS[_arch] = (_size, "gelu")
    OPENCLIP_ARCHS[f"{_arch}-quickgelu"] = (_size, "quick_gelu")

# The OpenCLIP model-config keys we implement; any other key changes the architecture and is refused.
_OPENCLIP_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
_OPENCLIP_VISION = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "patch_dropout"}
_OPENCLIP_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


class ClipImportError(ModelError):
    """A checkpoint that cannot be imported; the message names the file, key or field and what was expected."""


# --- architecture ------------------------------------------------------------------------------------------
def _activation(value: str, where: str) -> str:
    if value not in _HF_ACTIVATIONS:
        raise ClipImportError(
            f"{where}: hidden_act {value!r} is not supported; expected one of {list(_HF_ACTIVATIONS)}"
        )
    return _HF_ACTIVATIONS[value]


def _mlp_ratio(width: int, hidden: int, where: str) -> float:
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise ClipImportError(f"{where}: intermediate_size {hidden} is not representable as width {width} x a ratio")
    return ratio


def hf_model_config(raw: dict[str, Any], name: str = "clip") -> ModelConfig:
    """A Hugging Face CLIPConfig (config.json as a dict) -> our ModelConfig with CLIP's switches set."""
    if raw.get("model_type") != "clip":
        raise ClipImportError(
            f"config.json has model_type {raw.get('model_type')!r}; expected 'clip' (a transformers CLIPModel folder)"
        )
    # Configs written by old transformers versions name the sub-configs "*_config_dict".
    t = {**_HF_TEXT_DEFAULTS, **(raw.get("text_config") or raw.get("text_config_dict") or {})}
    v = {**_HF_VISION_DEFAULTS, **(raw.get("vision_config") or raw.get("vision_config_dict") or {})}
    for where, sub in (("text_config", t), ("vision_config", v)):
        if float(sub["layer_norm_eps"]) != _LAYER_NORM_EPS:
            raise ClipImportError(
                f"{where}.layer_norm_eps={sub['layer_norm_eps']}; only {_LAYER_NORM_EPS} is supported"
            )
    if v["num_channels"] != 3:
        raise ClipImportError(f"vision_config.num_channels={v['num_channels']}; expected 3 (RGB)")
    cfg = ModelConfig(
        name=name,
        embed_dim=int(raw.get("projection_dim", 512)),
        vision=VisionConfig(
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            width=v["hidden_size"],
            layers=v["num_hidden_layers"],
            heads=v["num_attention_heads"],
            mlp_ratio=_mlp_ratio(v["hidden_size"], v["intermediate_size"], "vision_config"),
            activation=_activation(v["hidden_act"], "vision_config"),
        ),
        text=TextConfig(
            vocab_size=t["vocab_size"],
            context_length=t["max_position_embeddings"],
            width=t["hidden_size"],
            layers=t["num_hidden_layers"],
            heads=t["num_attention_heads"],
            mlp_ratio=_mlp_ratio(t["hidden_size"], t["intermediate_size"], "text_config"),
            activation=_activation(t["hidden_act"], "text_config"),
            causal=True,
            pooling="eot",
        ),
        init_logit_scale=float(raw.get("logit_scale_init_value", 2.6592)),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise ClipImportError(f"config.json: {e}") from None
    return cfg


def openclip_model_config(arch: str) -> ModelConfig:
    """An OpenCLIP architecture name (OPENCLIP_ARCHS) or model-config JSON file -> our ModelConfig."""
    if arch in OPENCLIP_ARCHS:
        size, act = OPENCLIP_ARCHS[arch]
        base = get_size(size).model
        return dataclasses.replace(
            base,
            name=arch,
            vision=dataclasses.replace(base.vision, activation=act),
            text=dataclasses.replace(base.text, activation=act),
        )
    path = Path(arch)
    if not path.is_file():
        raise ClipImportError(
            f"unknown OpenCLIP architecture {arch!r}; expected one of {sorted(OPENCLIP_ARCHS)} or an OpenCLIP "
            "model-config JSON file"
        )
    raw = json.loads(path.read_text())
    for where, got, known in (
        ("", raw, _OPENCLIP_TOP),
        ("vision_cfg.", raw.get("vision_cfg", {}), _OPENCLIP_VISION),
        ("text_cfg.", raw.get("text_cfg", {}), _OPENCLIP_TEXT),
    ):
        unknown = sorted(set(got) - known)
        if unknown:
            raise ClipImportError(
                f"{path}: unsupported OpenCLIP config keys {[where + k for k in unknown]}; this importer implements "
                f"plain CLIP ViTs (keys {sorted(known)})"
            )
    v, t = raw["vision_cfg"], raw["text_cfg"]
    act = "quick_gelu" if raw.get("quick_gelu") else "gelu"
    head_width = v.get("head_width", 64)
    cfg = ModelConfig(
        name=path.stem,
        embed_dim=raw["embed_dim"],
        vision=VisionConfig(
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            width=v["width"],
            layers=v["layers"],
            heads=v["width"] // head_width,
            mlp_ratio=float(v.get("mlp_ratio", 4.0)),
            activation=act,
        ),
        text=TextConfig(
            vocab_size=t.get("vocab_size", 49408),
            context_length=t.get("context_length", 77),
            width=t["width"],
            layers=t["layers"],
            heads=t["heads"],
            mlp_ratio=float(t.get("mlp_ratio", 4.0)),
            activation=act,
            causal=True,
            pooling="eot",
        ),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise ClipImportError(f"{path}: {e}") from None
    return cfg


# --- weights -----------------------------------------------------------------------------------------------
def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or from `.pt`/`.bin` through `torch.load(weights_only=True)`. A training
    checkpoint's {"state_dict": ...} wrapper and a DistributedDataParallel "module." prefix are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise ClipImportError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ClipImportError(
                f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}); it holds pickled "
                "objects beyond tensors, which are never loaded here. Convert it to .safetensors with the code "
                "that wrote it"
            ) from None
        except RuntimeError as e:  # TorchScript archives and other non-state-dict files
            raise ClipImportError(f"{path}: not a state dict loadable with weights_only=True: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClipImportError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def openclip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenCLIP CLIP state dict into Hugging Face CLIPModel keys. Keys it does not know are kept under
    their own name, so the mapping onto our towers reports them as extra."""
    out: dict[str, torch.Tensor] = {}
    top = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
    }
    norms = {
        "visual.ln_pre.": "vision_model.pre_layrnorm.",
        "visual.ln_post.": "vision_model.post_layernorm.",
        "ln_final.": "text_model.final_layer_norm.",
    }
    layer_parts = {
        "ln_1.": "layer_norm1.",
        "ln_2.": "layer_norm2.",
        "attn.out_proj.": "self_attn.out_proj.",
        "mlp.c_fc.": "mlp.fc1.",
        "mlp.c_proj.": "mlp.fc2.",
    }
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "visual.proj":  # (W, D): OpenCLIP multiplies x @ proj; a Linear stores (D, W)
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif any(key.startswith(p) for p in norms):
            prefix = next(p for p in norms if key.startswith(p))
            out[norms[prefix] + key[len(prefix) :]] = value
        elif key.startswith(("visual.transformer.resblocks.", "transformer.resblocks.")):
            tower = "vision_model" if key.startswith("visual.") else "text_model"
            rest = key.split("resblocks.", 1)[1]
            layer, part = rest.split(".", 1)
            dst = f"{tower}.encoder.layers.{layer}."
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = part.rsplit("_", 1)[1]  # weight / bias
                for name, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{dst}self_attn.{name}_proj.{kind}"] = chunk.contiguous()
            elif any(part.startswith(p) for p in layer_parts):
                prefix = next(p for p in layer_parts if part.startswith(p))
                out[dst + layer_parts[prefix] + part[len(prefix) :]] = value
            else:
                out[key] = value
        else:
            out[key] = value
    return out


def _hf_to_ours_plan(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]]:
    """Our key -> (the Hugging Face keys it is made of, how to combine them)."""

    def same(x: torch.Tensor) -> torch.Tensor:
        return x

    def qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([q, k, v], dim=0)  # our fused qkv Linear: rows [q; k; v], as OpenCLIP's in_proj

    plan: dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]] = {
        "logit_scale": (("logit_scale",), same),
        "image.cls_token": (("vision_model.embeddings.class_embedding",), lambda x: x.reshape(1, 1, -1)),
        "image.pos_embed": (("vision_model.embeddings.position_embedding.weight",), lambda x: x[None]),
        "image.patch_embed.weight": (("vision_model.embeddings.patch_embedding.weight",), same),
        "image.proj.weight": (("visual_projection.weight",), same),
        "text.token_embed.weight": (("text_model.embeddings.token_embedding.weight",), same),
        "text.pos_embed": (("text_model.embeddings.position_embedding.weight",), lambda x: x[None]),
        "text.proj.weight": (("text_projection.weight",), same),
    }
    for ours, theirs in (
        ("image.ln_pre", "vision_model.pre_layrnorm"),
        ("image.ln_post", "vision_model.post_layernorm"),
        ("text.ln_final", "text_model.final_layer_norm"),
    ):
        for p in ("weight", "bias"):
            plan[f"{ours}.{p}"] = ((f"{theirs}.{p}",), same)
    for ours_tower, hf_tower, layers in (
        ("image", "vision_model", cfg.vision.layers),
        ("text", "text_model", cfg.text.layers),
    ):
        for i in range(layers):
            o, h = f"{ours_tower}.blocks.{i}", f"{hf_tower}.encoder.layers.{i}"
            for p in ("weight", "bias"):
                plan[f"{o}.attn.qkv.{p}"] = (tuple(f"{h}.self_attn.{n}_proj.{p}" for n in "qkv"), qkv)
                for ours_part, hf_part in (
                    ("attn.out", "self_attn.out_proj"),
                    ("ln_1", "layer_norm1"),
                    ("ln_2", "layer_norm2"),
                    ("mlp.0", "mlp.fc1"),
                    ("mlp.2", "mlp.fc2"),
                ):
                    plan[f"{o}.{ours_part}.{p}"] = ((f"{h}.{hf_part}.{p}",), same)
    return plan


def hf_to_ours(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face CLIPModel weights -> our MIMModel state dict, every key and shape checked first."""
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_KEYS)}
    plan = _hf_to_ours_plan(cfg)
    needed = {k for srcs, _ in plan.values() for k in srcs}
    missing, extra = sorted(needed - set(state)), sorted(set(state) - needed)
    if missing or extra:
        raise ClipImportError(
            f"the weights do not match a CLIP of this architecture: missing keys {_few(missing)}, extra keys "
            f"{_few(extra)}; check the architecture (--arch) or the source layout (--hf / --openclip)"
        )
    reference = MIMModel(cfg).state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, (srcs, combine) in plan.items():
        value = combine(*(state[s].float() for s in srcs))
        want = tuple(reference[ours].shape)
        if tuple(value.shape) != want:
            got = " + ".join(f"{s} {tuple(state[s].shape)}" for s in srcs)
            raise ClipImportError(f"shape mismatch: {got} gives {tuple(value.shape)} for {ours}, expected {want}")
        out[ours] = value.contiguous()
    # CLIP's patch convolution has no bias; ours does, and zeros make it the same function.
    out["image.patch_embed.bias"] = torch.zeros_like(reference["image.patch_embed.bias"])
    return out


def _few(keys: Sequence[str], n: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# --- tokenizer and preprocessing ---------------------------------------------------------------------------
def hf_tokenizer(folder: Path, context_length: int) -> ClipTokenizer:
    """The folder's CLIP vocabulary (`tokenizer.json`, or `vocab.json` + `merges.txt`) in our CLIP pipeline."""
    tok_json, vocab_json, merges_txt = folder / "tokenizer.json", folder / "vocab.json", folder / "merges.txt"
    if tok_json.is_file():
        model = json.loads(tok_json.read_text(encoding="utf-8")).get("model", {})
        if model.get("type") != "BPE":
            raise ClipImportError(f"{tok_json}: tokenizer model {model.get('type')!r}; expected CLIP's 'BPE'")
        vocab, merges = (
            model["vocab"],
            [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
        )
    elif vocab_json.is_file() and merges_txt.is_file():
        vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        lines = merges_txt.read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    else:
        raise ClipImportError(
            f"{folder} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); copy the tokenizer files "
            "from where the model came from into the folder, or pass --tokenizer clip for CLIP's own vocabulary "
            "(shipped with this package)"
        )
    try:
        return ClipTokenizer.from_vocab(vocab, merges, context_length)
    except Exception as e:
        raise ClipImportError(f"{folder}: the tokenizer files do not make a CLIP tokenizer: {e}") from None


def clip_preprocess(image_size: int, context_length: int) -> PreprocessConfig:
    """CLIP's preprocessing: bicubic shorter side, centre crop, OpenAI's mean/std, its BPE tokenizer."""
    return PreprocessConfig(
        image_size=image_size, context_length=context_length, tokenizer="clip_bpe", resize_mode="clip"
    )


def hf_preprocess(folder: Path, image_size: int, context_length: int) -> PreprocessConfig:
    """`preprocessor_config.json` -> PreprocessConfig; CLIP's defaults when the folder has none."""
    path = folder / "preprocessor_config.json"
    base = clip_preprocess(image_size, context_length)
    if not path.is_file():
        return base
    raw = json.loads(path.read_text())
    size = raw.get("size", {})
    short = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    crop = raw.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    if short != image_size or crop != image_size or raw.get("resample", 3) != 3:
        raise ClipImportError(
            f"{path}: resize shortest_edge={short}, crop={crop}, resample={raw.get('resample')}; only CLIP's own "
            f"preprocessing is implemented (shortest edge = crop = {image_size}, bicubic = 3)"
        )
    return dataclasses.replace(
        base, mean=tuple(raw.get("image_mean", base.mean)), std=tuple(raw.get("image_std", base.std))
    )


# --- import ------------------------------------------------------------------------------------------------
TOKENIZERS = ("folder", "clip")  # where import_hf takes the vocabulary from


def import_hf(folder: str | Path, out: str | Path, *, tokenizer: str = "folder") -> Path:
    """Convert a Hugging Face CLIPModel folder into a checkpoint at `out`. `tokenizer`: "folder" reads the
    folder's tokenizer files; "clip" uses CLIP's published vocabulary shipped with this package (for a folder
    saved without them), refused when the text tower's vocabulary is of another size."""
    if tokenizer not in TOKENIZERS:
        raise ClipImportError(f"tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    folder = Path(folder)
    cfg_path = folder / "config.json"
    # model.safetensors, or the older pytorch_model.bin (read with weights_only=True, like any .bin here).
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if not cfg_path.is_file() or weights is None:
        raise ClipImportError(
            f"{folder} needs config.json and model.safetensors (or pytorch_model.bin); expected a folder written "
            "by transformers' CLIPModel.save_pretrained"
        )
    cfg = hf_model_config(json.loads(cfg_path.read_text()), name=folder.name)
    state = hf_to_ours(load_state_dict(weights), cfg)
    if tokenizer == "clip":
        tok = ClipTokenizer.bundled(cfg.text.context_length)
        if tok.vocab_size != cfg.text.vocab_size:
            raise ClipImportError(
                f"--tokenizer clip: CLIP's vocabulary has {tok.vocab_size} tokens but {cfg_path} gives the text "
                f"tower {cfg.text.vocab_size}; expected the same: copy the model's own tokenizer files into {folder}"
            )
    else:
        tok = hf_tokenizer(folder, cfg.text.context_length)
    pre = hf_preprocess(folder, cfg.vision.image_size, cfg.text.context_length)
    return _write(out, cfg, state, pre, tok, {"source": "huggingface", "source_path": str(folder)})


def import_openclip(weights: str | Path, arch: str, out: str | Path) -> Path:
    """Convert an OpenCLIP state dict of architecture `arch` into a checkpoint at `out`."""
    cfg = openclip_model_config(arch)
    state = hf_to_ours(openclip_to_hf(load_state_dict(weights)), cfg)
    tok = ClipTokenizer.from_vocab(*clip_vocab_from_bpe_file(), cfg.text.context_length)
    pre = clip_preprocess(cfg.vision.image_size, cfg.text.context_length)
    return _write(out, cfg, state, pre, tok, {"source": "openclip", "source_path": str(weights), "arch": arch})


def _write(
    out: str | Path,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    pre: PreprocessConfig,
    tok: ClipTokenizer,
    meta: dict[str, Any],
) -> Path:
    """Load `state` into a model (strictly), write the checkpoint into a temporary sibling folder, then rename
    it to `out`: a crash or an error leaves no partial checkpoint behind."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ClipImportError(f"{out} already exists and is not empty; choose a new --out folder or remove it")
    if tok.vocab_size > cfg.text.vocab_size:
        raise ClipImportError(
            f"the tokenizer has {tok.vocab_size} tokens but the text tower embeds {cfg.text.vocab_size}"
        )
    model = MIMModel(cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ckpt.save_checkpoint(tmp, model, pre, tok, {"objective": "imported", "step": 0, **meta})
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def describe_import(out: str | Path) -> str:
    """One line on the checkpoint an import wrote: shapes, where it went, its model identity."""
    m = ckpt.read_config(out)["model"]
    return (
        f"imported {m['name']}: ViT {m['vision']['image_size']} px / patch {m['vision']['patch_size']}, "
        f"{m['vision']['layers']}+{m['text']['layers']} layers, embedding {m['embed_dim']} -> {out} "
        f"(model id {model_id_of_checkpoint(out)})"
    )
