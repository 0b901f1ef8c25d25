"""Shared fixtures. Server fixtures (a real tritonserver per session) are added by the serving tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mim.data.synth import TOY_TEXTS, generate_catalog
from mim.model.checkpoint import save_checkpoint
from mim.model.config import get_size
from mim.model.tokenizer import TextTokenizer
from mim.model.towers import MIMModel


def make_small_catalog(root: Path, **overrides):
    """A 3 categories x 2 patterns x 2 colours x 2 models catalog (24 products), generated quietly."""
    params = {
        "categories": ["mug", "hat", "shoe"],
        "patterns": ["zebra", "dots"],
        "colours": ["red", "blue"],
        "variants": 2,
        "progress": False,
        **overrides,
    }
    return generate_catalog(root, **params)


def make_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    """A random-init `tiny` model with a tokenizer trained on a few titles: fast, and enough for parity tests
    (export, serving) that compare two runtimes of the same weights."""
    torch.manual_seed(seed)
    spec = get_size("tiny")
    tok = TextTokenizer.train(list(TOY_TEXTS) * 4, vocab_size=200, context_length=spec.preprocess.context_length)
    model = MIMModel(spec.model.with_vocab(tok.vocab_size)).eval()
    return save_checkpoint(out, model, spec.preprocess, tok, {"objective": "3tower", "step": 0, "random_init": True})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


# --- serving fixtures (mim.serving): one exported tiny model, one tritonserver per test session -------------
# Reuse these from client/search tests: `served_repository` (a tmp copy of model_repository/ with the tiny
# checkpoint installed), `triton_server` (a running CPU tritonserver on free 127.0.0.1 ports: .grpc_url,
# .http_url, .metrics_url, .log_path) and `triton_client` (tritonclient.grpc client to it). Tests using the
# server must be marked `@pytest.mark.server`.


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint exported with export.onnx_export (FP32 ONNX only; parity is export's own test)."""
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "tiny"
    export_checkpoint(tiny_checkpoint, out, fp16=False, check=False)
    return out


@pytest.fixture(scope="session")
def served_repository(tmp_path_factory, tiny_export, tiny_checkpoint) -> Path:
    """A tmp COPY of the committed model_repository/ with the tiny export installed by export.engines.install
    (which also regenerates the configs for the checkpoint's dims and model id)."""
    from export.install import install
    from mim.serving.repository import prepare_repository

    repo = prepare_repository(tmp_path_factory.mktemp("serving") / "model_repository")
    install(tiny_export, repo)
    install_start_gallery(repo, tiny_checkpoint, tmp_path_factory.mktemp("gallery"))
    return repo


START_GALLERY_SIZE = 40


def install_start_gallery(repo: Path, checkpoint: Path, work: Path) -> Path:
    """A small gallery (random unit vectors, tagged with the checkpoint's model id, two categories) installed
    before the server starts, so that every model of the repository loads; the search tests install galleries
    of real embeddings over it."""
    import numpy as np

    from mim.layout import model_id_of_checkpoint
    from mim.search.knn import KnnIndex
    from mim.serving.gallery import install_gallery

    dim = get_size("tiny").model.embed_dim
    index = KnnIndex(dim, device="cpu", model_id=model_id_of_checkpoint(checkpoint))
    rng = np.random.default_rng(0)
    metas = [{"title": f"item {i}", "category": ("even", "odd")[i % 2]} for i in range(START_GALLERY_SIZE)]
    index.add(np.arange(START_GALLERY_SIZE), rng.normal(size=(START_GALLERY_SIZE, dim)), metas, normalize=True)
    index.save(work / "start.safetensors")
    return install_gallery(work / "start.safetensors", repo)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, served_repository):
    """One real tritonserver (bundled CPU build, `--model-config-name=cpu`) for the whole session."""
    from mim.serving.server import TritonServer

    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(served_repository, config="cpu", log_path=log) as server:
        yield server


@pytest.fixture(scope="session")
def triton_client(triton_server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.close()
