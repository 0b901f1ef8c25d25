"""The torch encoder backend (mim.serving.torch_backend): the same towers as the ONNX encoders, the same request
checks on torch tensors, the FP16 precision policy, and the CUDA paths (which skip with a reason on a CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.onnx_export import random_inputs
from mim import contract
from mim.model.config import ModelConfig
from mim.model.preprocess import InputError
from mim.search.ranking import parity
from mim.serving import backends
from mim.serving.backends import OnnxEncoder, Request
from mim.serving.torch_backend import (
    Fp32Islands,
    TorchEncoder,
    build_handler,
    cuda_unavailable_reason,
    graph_sizes,
    load_tower,
)

ENCODERS = (contract.IMAGE_ENCODER, contract.TEXT_ENCODER)
CUDA_REASON = cuda_unavailable_reason()
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"needs a CUDA device: {CUDA_REASON}")


@pytest.fixture(scope="module")
def model_cfg(served_repository) -> ModelConfig:
    _, cfg = load_tower(served_repository / contract.IMAGE_ENCODER / "1", contract.IMAGE_ENCODER)
    return cfg


def dims_of(name: str, model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    io = contract.MODELS[name]
    return {s.name: s.resolve_dims(model_cfg) for s in (*io.inputs, *io.outputs)}


def encoder(repo, name, model_cfg, **kw) -> TorchEncoder:
    return TorchEncoder.from_version_dir(repo / name / "1", contract.MODELS[name], dims_of(name, model_cfg), **kw)


@pytest.mark.parametrize("name", ENCODERS)
def test_torch_encoder_equals_the_onnx_encoder(served_repository, model_cfg, name):
    io, dims = contract.MODELS[name], dims_of(name, model_cfg)
    onnx = OnnxEncoder(served_repository / name / "1" / "model.onnx", io, dims)
    torch_enc = encoder(served_repository, name, model_cfg)
    feeds = random_inputs(io, model_cfg, batch=7, seed=3)
    got, want = torch_enc(feeds), onnx(feeds)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert parity(got, want).min_cosine >= 0.99999
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", ENCODERS)
def test_fp16_policy_keeps_the_embeddings_within_the_fp16_gate(served_repository, model_cfg, name):
    """The FP16 path (half weights, FP32 islands) runs on the CPU too: same code as on the GPU, slower."""
    io = contract.MODELS[name]
    fp32 = encoder(served_repository, name, model_cfg)
    fp16 = encoder(served_repository, name, model_cfg, precision="fp16")
    assert all(m.weight.dtype == torch.float32 for m in fp16.tower.modules() if isinstance(m, torch.nn.LayerNorm))
    assert fp16.tower.proj.weight.dtype == torch.float16
    feeds = random_inputs(io, model_cfg, batch=5, seed=1)
    got = fp16(feeds)
    assert got.dtype == np.float32
    assert parity(got, fp32(feeds)).min_cosine >= 0.999


def test_fp32_islands_compute_layernorm_and_softmax_in_fp32():
    x = (torch.randn(4, 64) * 300).half()  # squares of 300 overflow FP16 when summed naively
    w, b = torch.ones(64), torch.zeros(64)
    with Fp32Islands():
        ln = torch.nn.functional.layer_norm(x, (64,), w, b)
        sm = x.softmax(dim=-1)
        mm = x @ x.T  # not an island: stays FP16
    assert ln.dtype == sm.dtype == mm.dtype == torch.float16
    torch.testing.assert_close(ln, torch.nn.functional.layer_norm(x.float(), (64,), w, b).half())
    torch.testing.assert_close(sm, x.float().softmax(dim=-1).half())


def test_missing_weights_say_what_installs_them(tmp_path, model_cfg):
    with pytest.raises(FileNotFoundError, match=r"model.safetensors not found; .*export.engines.install"):
        load_tower(tmp_path, contract.IMAGE_ENCODER)


def test_repository_dims_of_another_size_are_refused(served_repository, model_cfg):
    dims = dims_of(contract.IMAGE_ENCODER, model_cfg)
    dims[contract.PIXEL_VALUES.name] = (3, 224, 224)
    with pytest.raises(ValueError, match=r"pixel_values per-row shape \[3, 48, 48\] .* config says \[3, 224, 224\]"):
        TorchEncoder.from_version_dir(
            served_repository / contract.IMAGE_ENCODER / "1", contract.MODELS[contract.IMAGE_ENCODER], dims
        )


def test_cuda_graphs_without_cuda_are_refused_with_a_reason(served_repository, model_cfg):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        encoder(served_repository, contract.IMAGE_ENCODER, model_cfg, graph_batch_sizes=(1, 2))
    if CUDA_REASON is not None:
        with pytest.raises(RuntimeError, match="use the `torch` \\(CPU\\) variant"):
            encoder(served_repository, contract.IMAGE_ENCODER, model_cfg, device="cuda")


def test_graph_sizes_parameter():
    assert graph_sizes("1, 2,64") == (1, 2, 64)
    assert graph_sizes("") == ()
    with pytest.raises(ValueError, match="expected comma-separated integers"):
        graph_sizes("1,two")


# --- the handler: the EncoderHandler checks, on torch tensors --------------------------------------------
@pytest.fixture(scope="module")
def text_handler(served_repository, model_cfg):
    name = contract.TEXT_ENCODER
    return build_handler(name, served_repository / name / "1", {"device": "cpu"}, dims_of(name, model_cfg))


def text_request(model_cfg, seed=0, **override) -> Request:
    feeds = {
        k: torch.from_numpy(v)
        for k, v in random_inputs(contract.MODELS[contract.TEXT_ENCODER], model_cfg, 2, seed).items()
    }
    feeds.update(override)
    return Request(feeds)


def test_handler_runs_good_requests_together_and_bad_ones_fail_alone(text_handler, model_cfg):
    assert text_handler.tensor_io and text_handler.vocab_size == model_cfg.text.vocab_size
    good = text_request(model_cfg, 0)
    ids = good.inputs[contract.INPUT_IDS.name].clone()
    ids[1, 3] = model_cfg.text.vocab_size
    nan_mask = good.inputs[contract.ATTENTION_MASK.name].clone()
    nan_mask[0, 0] = 2
    wrong_dtype = good.inputs[contract.INPUT_IDS.name].to(torch.int32)
    requests = [
        good,
        text_request(model_cfg, 0, input_ids=ids),
        text_request(model_cfg, 0, attention_mask=nan_mask),
        text_request(model_cfg, 0, input_ids=wrong_dtype),
        text_request(model_cfg, 1),
    ]
    out = text_handler(requests)
    assert [r.ok for r in out] == [True, False, False, False, True]
    assert f"input_ids row 1 of 2: has token id {model_cfg.text.vocab_size}; expected ids in [0, " in out[1].error
    assert "attention_mask row 0 of 2: must hold only 0 and 1" in out[2].error
    assert "has dtype torch.int32; expected INT64" in out[3].error
    emb = out[0].outputs[contract.TEXT_EMBEDS.name]
    assert isinstance(emb, torch.Tensor) and emb.shape == (2, model_cfg.embed_dim)
    alone = text_handler([text_request(model_cfg, 1)])[0].outputs[contract.TEXT_EMBEDS.name]
    torch.testing.assert_close(out[4].outputs[contract.TEXT_EMBEDS.name], alone, atol=1e-5, rtol=0)


def test_handler_refuses_non_finite_pixels(served_repository, model_cfg):
    name = contract.IMAGE_ENCODER
    handler = build_handler(name, served_repository / name / "1", {}, dims_of(name, model_cfg))
    pixels = torch.from_numpy(random_inputs(contract.MODELS[name], model_cfg, 3)[contract.PIXEL_VALUES.name])
    pixels[2, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="pixel_values row 2 of 3: contains NaN or infinity"):
        handler.check(Request({contract.PIXEL_VALUES.name: pixels}))


def test_make_handler_picks_the_torch_backend_from_the_config(served_repository, model_cfg):
    name = contract.IMAGE_ENCODER
    io = contract.MODELS[name]
    config = {
        "input": [{"name": s.name, "dims": list(s.resolve_dims(model_cfg))} for s in io.inputs],
        "output": [{"name": s.name, "dims": list(s.resolve_dims(model_cfg))} for s in io.outputs],
        "parameters": {"encoder_backend": {"string_value": "torch"}, "device": {"string_value": "cpu"}},
    }
    handler = backends.make_handler(name, served_repository / name / "1", config)
    assert type(handler).__name__ == "TorchEncoderHandler"
    del config["parameters"]["encoder_backend"]
    assert type(backends.make_handler(name, served_repository / name / "1", config)).__name__ == "EncoderHandler"


# --- CUDA only ---------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ENCODERS)
def test_cuda_graphs_replay_the_fp16_tower(served_repository, model_cfg, name):
    io = contract.MODELS[name]
    eager = encoder(served_repository, name, model_cfg, device="cuda", precision="fp16")
    graphs = encoder(served_repository, name, model_cfg, device="cuda", precision="fp16", graph_batch_sizes=(1, 4, 8))
    fp32 = encoder(served_repository, name, model_cfg)
    for batch in (1, 3, 8, 11):  # exact sizes, padded sizes and a batch over the largest graph
        feeds = random_inputs(io, model_cfg, batch=batch, seed=batch)
        got = graphs(feeds)
        np.testing.assert_allclose(got, eager(feeds), atol=2e-3)
        assert parity(got, fp32(feeds)).min_cosine >= 0.999


@needs_cuda
@pytest.mark.gpu
def test_gpu_tensors_stay_on_the_gpu(served_repository, model_cfg):
    name = contract.TEXT_ENCODER
    handler = build_handler(
        name, served_repository / name / "1", {"device": "cuda", "precision": "fp16"}, dims_of(name, model_cfg)
    )
    req = Request({k: v.cuda() for k, v in text_request(model_cfg).inputs.items()})
    (resp,) = handler([req])
    assert resp.ok and resp.outputs[contract.TEXT_EMBEDS.name].is_cuda
