"""Checkpoints: a folder with `model.safetensors`, `config.json` (model + preprocessing + training facts) and
`tokenizer.json`; optionally `train_state.safetensors` (optimizer moments) for resuming. No pickle anywhere.

Every file is written atomically and `config.json` last, so a folder with a config is always complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mim.atomic import atomic_write, atomic_write_text
from mim.errors import ModelError
from mim.layout import CHECKPOINT_WEIGHTS, model_id_of_checkpoint
from mim.model.config import ModelConfig, PreprocessConfig, dumps
from mim.model.tokenizer import Tokenizers, load_tokenizer
from mim.model.towers import MIMModel

FORMAT = "mim-checkpoint"
VERSION = 1
WEIGHTS, CONFIG, TOKENIZER, TRAIN_STATE = (
    CHECKPOINT_WEIGHTS,
    "config.json",
    "tokenizer.json",
    "train_state.safetensors",
)


class CheckpointError(ModelError):
    pass


@dataclass
class Checkpoint:
    model: MIMModel
    model_cfg: ModelConfig
    pre_cfg: PreprocessConfig
    tokenizer: Tokenizers
    meta: dict[str, Any] = field(default_factory=dict)  # objective, step, seed, ...
    path: Path | None = None

    @property
    def model_id(self) -> str:
        """Identity of the embedding model: a hash of its weights file (stable across copies of it)."""
        if self.path is None:
            raise CheckpointError("model_id needs a saved checkpoint")
        return model_id_of_checkpoint(self.path)


def save_checkpoint(
    out_dir: str | Path,
    model: MIMModel,
    pre_cfg: PreprocessConfig,
    tokenizer: Tokenizers,
    meta: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda p: save_file(state, str(p)))
    atomic_write_text(out / TOKENIZER, tokenizer.to_str())
    if optimizer is not None:
        opt = _flatten_optimizer(model, optimizer)
        atomic_write(out / TRAIN_STATE, lambda p: save_file(opt, str(p)))
    cfg = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.cfg.to_dict(),
        "preprocess": pre_cfg.to_dict(),
        "meta": meta or {},
    }
    atomic_write_text(out / CONFIG, dumps(cfg))
    return out


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} not found; expected a checkpoint folder written by `mimsearch train`")
    cfg = json.loads(path.read_text())
    if cfg.get("format") != FORMAT or cfg.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: format {cfg.get('format')!r} version {cfg.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return cfg


def load_checkpoint(ckpt_dir: str | Path, expected: ModelConfig | None = None) -> Checkpoint:
    """Load a checkpoint. With `expected`, a checkpoint of another architecture is refused with the
    differing fields named, instead of failing deep inside `load_state_dict`."""
    ckpt_dir = Path(ckpt_dir)
    raw = read_config(ckpt_dir)
    model_cfg = ModelConfig.from_dict(raw["model"])
    pre_cfg = PreprocessConfig.from_dict(raw["preprocess"])
    if expected is not None and expected != model_cfg:
        diff = _diff(expected.to_dict(), model_cfg.to_dict())
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match the expected model config: {diff}")
    if pre_cfg.image_size != model_cfg.vision.image_size or pre_cfg.context_length != model_cfg.text.context_length:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: preprocess (image_size={pre_cfg.image_size}, context_length="
            f"{pre_cfg.context_length}) disagrees with the model (image_size={model_cfg.vision.image_size}, "
            f"context_length={model_cfg.text.context_length})"
        )
    tokenizer = load_tokenizer(ckpt_dir / TOKENIZER, pre_cfg.tokenizer, pre_cfg.context_length)
    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the text tower embeds only {model_cfg.text.vocab_size}"
        )
    if not (ckpt_dir / WEIGHTS).is_file():
        raise CheckpointError(
            f"{ckpt_dir / WEIGHTS} not found; expected the weights beside {CONFIG} in a checkpoint folder written by "
            "`mimsearch train` or `mimsearch import-clip`"
        )
    model = MIMModel(model_cfg)
    state = load_file(str(ckpt_dir / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt_dir}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return Checkpoint(model, model_cfg, pre_cfg, tokenizer, raw.get("meta", {}), ckpt_dir)


def load_train_state(ckpt_dir: str | Path, model: MIMModel, optimizer: torch.optim.Optimizer) -> bool:
    path = Path(ckpt_dir) / TRAIN_STATE
    if not path.is_file():
        return False
    flat = load_file(str(path))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            st = {k.split("|", 1)[1]: v for k, v in flat.items() if k.split("|", 1)[0] == n}
            if st:
                optimizer.state[p] = {k: v.clone() for k, v in st.items()}
    return True


def _flatten_optimizer(model: MIMModel, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    flat = {}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            flat[f"{names[id(p)]}|{k}"] = t.detach().contiguous().cpu()
    return flat


def _diff(a: dict, b: dict, prefix: str = "") -> str:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _diff(va, vb, f"{prefix}{k}.")
            if d:
                out.append(d)
        elif va != vb:
            out.append(f"{prefix}{k}: expected {va!r}, got {vb!r}")
    return "; ".join(out)
