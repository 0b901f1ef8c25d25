"""Shared fixtures. Server fixtures (a real tritonserver per session) are added by the serving tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mim.checkpoint import save_checkpoint
from mim.config import get_size
from mim.model import MIMModel
from mim.tokenizer import TextTokenizer

TOY_TEXTS = [
    "blue zebra-striped ceramic mug",
    "red polka-dot cotton shirt",
    "green plaid leather shoe",
    "yellow striped canvas bag",
    "zebra mug",
    "in red",
    "with polka dots",
]


def make_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    """A random-init `tiny` model with a tokenizer trained on a few titles: fast, and enough for parity tests
    (export, serving) that compare two runtimes of the same weights."""
    torch.manual_seed(seed)
    spec = get_size("tiny")
    tok = TextTokenizer.train(TOY_TEXTS * 4, vocab_size=200, context_length=spec.preprocess.context_length)
    model = MIMModel(spec.model.with_vocab(tok.vocab_size)).eval()
    return save_checkpoint(out, model, spec.preprocess, tok, {"objective": "3tower", "step": 0, "random_init": True})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
