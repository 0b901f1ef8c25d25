"""The torch encoder backend (mim.serving.torch_backend): the same towers as the ONNX encoders, the same request
checks on torch tensors, the half-precision policy and its gate on real photos and titles, text length
buckets, torch.compile, and the CUDA paths (which skip with a reason on a CPU)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from mim import contract
from mim.contract import random_inputs
from mim.model.config import ModelConfig, get_size
from mim.model.preprocess import InputError
from mim.model.towers import MIMModel, QuickGELU
from mim.search.ranking import parity
from mim.serving import backends
from mim.serving.backends import OnnxEncoder, Request
from mim.serving.torch_backend import (
    HALF_MIN_COSINE,
    TorchEncoder,
    bucket_for,
    build_handler,
    cuda_unavailable_reason,
    default_text_buckets,
    graph_sizes,
    load_tower,
    precision_gate,
    text_length,
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


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ENCODERS)
def test_half_precision_runs_the_whole_tower_in_it(served_repository, model_cfg, name, precision):
    """The half-precision policy runs on the CPU too (same code as on the GPU, slower): every weight in the half
    dtype (no FP32 islands), embeddings out in FP32, within the gate on random inputs."""
    io = contract.MODELS[name]
    fp32 = encoder(served_repository, name, model_cfg)
    half = encoder(served_repository, name, model_cfg, precision=precision)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert {p.dtype for p in half.tower.parameters()} == {dtype}
    feeds = random_inputs(io, model_cfg, batch=5, seed=1)
    got = half(feeds)
    assert got.dtype == np.float32
    assert parity(got, fp32(feeds)).min_cosine >= HALF_MIN_COSINE


def test_quick_gelu_folds_into_silu(tmp_path):
    """CLIP's QuickGELU MLPs run as SiLU with the scale folded into the Linears: the same embeddings."""
    ckpt = _imported_clip(tmp_path)
    for name, tower in ((contract.IMAGE_ENCODER, ckpt.model.image), (contract.TEXT_ENCODER, ckpt.model.text)):
        io = contract.MODELS[name]
        enc = TorchEncoder(copy.deepcopy(tower), ckpt.model_cfg, io)
        assert not any(isinstance(m, QuickGELU) for m in enc.tower.modules())
        assert any(isinstance(m, torch.nn.SiLU) for m in enc.tower.modules())
        feeds = random_inputs(io, ckpt.model_cfg, batch=3, seed=4)
        with torch.no_grad():
            want = tower(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        np.testing.assert_allclose(enc(feeds), want, atol=1e-6)


def test_bad_precision_and_compile_mode_are_refused(served_repository, model_cfg):
    with pytest.raises(ValueError, match=r"precision 'fp8'; expected one of \('fp32', 'fp16', 'bf16'\)"):
        encoder(served_repository, contract.IMAGE_ENCODER, model_cfg, precision="fp8")
    with pytest.raises(ValueError, match=r"compile mode 'reduce-overhead'; expected one of \('none', 'default'"):
        encoder(served_repository, contract.IMAGE_ENCODER, model_cfg, compile_mode="reduce-overhead")


# --- the gate: half precision against FP32 on real photos and titles ---------------------------------------
def _photos() -> list[bytes]:
    pytest.importorskip("skimage", reason="scikit-image (dev extra) ships the photos the gate uses")
    from benchmarks.preprocess import skimage_photos

    return [p.data for p in skimage_photos(megapixels=())]  # astronaut, coffee, chelsea, rocket at native size


def _gate(ckpt, titles, device: str, precisions=("fp16", "bf16")) -> dict[tuple[str, str], float]:
    from benchmarks.gpu import real_inputs

    inputs = real_inputs(ckpt, _photos(), titles)
    towers = {contract.IMAGE_ENCODER: ckpt.model.image, contract.TEXT_ENCODER: ckpt.model.text}
    out = {}
    for name, tower in towers.items():
        for precision in precisions:
            io = contract.MODELS[name]
            out[name, precision] = precision_gate(tower, ckpt.model_cfg, io, inputs[name], precision, device=device)
    print(device, ckpt.model_cfg.name, {f"{k[0]} {k[1]}": round(v, 6) for k, v in out.items()})
    return out


def _imported_clip(tmp_path, text=None, vision=None, embed=None):
    from _clip_helpers import TINY_EMBED, random_clip, save_hf_folder

    from mim.model.checkpoint import load_checkpoint
    from mim.model.import_clip import import_hf

    model = random_clip(text, vision, embed=embed or TINY_EMBED, seed=3)
    return load_checkpoint(import_hf(save_hf_folder(model, tmp_path / "hf"), tmp_path / "ours"))


def test_half_precision_gate_on_cpu(tiny_checkpoint, tmp_path):
    """The gate's code path on the CPU: our tiny towers and a tiny imported CLIP (causal text, end-of-text
    pooling, QuickGELU), FP16 and BF16 against FP32 on real photos and titles. The GPU tests below run the same
    at base size on CUDA kernels."""
    from _clip_helpers import TITLES

    from mim.model.checkpoint import load_checkpoint

    for ckpt in (load_checkpoint(tiny_checkpoint), _imported_clip(tmp_path)):
        cosines = _gate(ckpt, TITLES, "cpu")
        assert min(cosines.values()) >= HALF_MIN_COSINE, cosines


# --- text length buckets -----------------------------------------------------------------------------------
def test_text_length_and_buckets():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert text_length(mask) == 3
    assert text_length(torch.tensor([[1, 0, 0, 1, 0]])) == 4  # counted to the last 1, never cut short
    assert text_length(torch.zeros(2, 5, dtype=torch.long)) == 1
    assert default_text_buckets(77) == (16, 32, 64, 77) and default_text_buckets(16) == (16,)
    assert [bucket_for(n, (16, 32, 64, 77)) for n in (1, 16, 17, 65, 77)] == [16, 16, 32, 77, 77]


@pytest.mark.parametrize(("causal", "pooling"), [(False, "cls"), (True, "eot")], ids=["bidirectional", "causal"])
def test_text_trimmed_to_its_length_gives_the_full_context_embedding(causal, pooling):
    """Right-padded text run at its longest row's length (eager) or at a bucket gives the embedding of the full
    77-token context: the same to float rounding, for our bidirectional tower and CLIP's causal one."""
    base = get_size("tiny").model
    text = dataclasses.replace(base.text, context_length=77, causal=causal, pooling=pooling)
    cfg = dataclasses.replace(base, text=text)
    torch.manual_seed(0)
    tower = MIMModel(cfg).text.eval()
    io = contract.MODELS[contract.TEXT_ENCODER]
    full = TorchEncoder(copy.deepcopy(tower), cfg, io, trim_text=False)
    exact = TorchEncoder(copy.deepcopy(tower), cfg, io)
    rng = np.random.default_rng(0)
    for lengths in ([1], [3, 9, 14], [5, 20], [77, 2]):
        ids = rng.integers(4, cfg.text.vocab_size, size=(len(lengths), 77))
        mask = (np.arange(77)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        feeds = {contract.INPUT_IDS.name: ids, contract.ATTENTION_MASK.name: mask}
        assert exact.run_length({k: torch.from_numpy(v) for k, v in feeds.items()}) == max(lengths)
        want = full(feeds)
        np.testing.assert_allclose(exact(feeds), want, atol=1e-6, rtol=0)
        # A bucket longer than the text: what the CUDA graphs run (the CPU runs the same module at that length).
        bucket = bucket_for(max(lengths), default_text_buckets(77))
        with torch.no_grad():
            trimmed = exact.tower(**{k: torch.from_numpy(v[:, :bucket]) for k, v in feeds.items()}).numpy()
        np.testing.assert_allclose(trimmed, want, atol=1e-6, rtol=0)


def test_bad_text_buckets_are_refused(served_repository, model_cfg):
    context = model_cfg.text.context_length
    with pytest.raises(ValueError, match=rf"text buckets \[4, 8\]; expected positive lengths ending at .* {context}"):
        encoder(served_repository, contract.TEXT_ENCODER, model_cfg, text_buckets=(4, 8))
    with pytest.raises(ValueError, match=r"text_buckets '8,x'; expected comma-separated integers"):
        name = contract.TEXT_ENCODER
        build_handler(name, served_repository / name / "1", {"text_buckets": "8,x"}, dims_of(name, model_cfg))


@pytest.mark.slow
def test_torch_compile_gives_the_same_embeddings(served_repository, model_cfg):
    """torch.compile (inductor's C++ code on a CPU, ~30 s to compile here) runs the same function; the text
    tower compiles at its bucket lengths."""
    name = contract.TEXT_ENCODER
    io = contract.MODELS[name]
    plain = encoder(served_repository, name, model_cfg)
    compiled = encoder(served_repository, name, model_cfg, compile_mode="default")
    feeds = random_inputs(io, model_cfg, batch=4, seed=2)
    np.testing.assert_allclose(compiled(feeds), plain(feeds), atol=1e-5)
    assert compiled.setup_seconds >= 0


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


def test_handler_refuses_masks_that_are_not_right_padded(text_handler, model_cfg):
    good = text_request(model_cfg, 0)
    mask = good.inputs[contract.ATTENTION_MASK.name].clone()
    mask[1] = 1
    mask[1, 1] = 0
    with pytest.raises(InputError, match=r"attention_mask row 1 of 2: must be right-padded \(ones, then zeros\)"):
        text_handler.check(text_request(model_cfg, 0, attention_mask=mask))


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


@needs_cuda
@pytest.mark.gpu
def test_cuda_graphs_per_text_bucket_on_a_clip(tmp_path):
    """CLIP's 77-token causal text in graphs captured per (batch size, length bucket): the same embeddings as
    the eager FP16 tower at full context, within the gate of FP32."""
    ckpt = _imported_clip(tmp_path)
    io, tower, cfg = contract.MODELS[contract.TEXT_ENCODER], ckpt.model.text, ckpt.model_cfg
    graphs = TorchEncoder(copy.deepcopy(tower), cfg, io, device="cuda", precision="fp16", graph_batch_sizes=(1, 4))
    assert sorted(graphs.graphs) == [16, 32, 64, 77]
    full = TorchEncoder(copy.deepcopy(tower), cfg, io, device="cuda", precision="fp16", trim_text=False)
    fp32 = TorchEncoder(copy.deepcopy(tower), cfg, io)
    rng = np.random.default_rng(0)
    for lengths in ([3], [10, 20, 5], [40, 2, 7, 9, 11], [77]):
        ids = rng.integers(4, cfg.text.vocab_size, size=(len(lengths), 77))
        feeds = {
            contract.INPUT_IDS.name: ids,
            contract.ATTENTION_MASK.name: (np.arange(77)[None, :] < np.array(lengths)[:, None]).astype(np.int64),
        }
        got = graphs(feeds)
        np.testing.assert_allclose(got, full(feeds), atol=2e-3)
        assert parity(got, fp32(feeds)).min_cosine >= HALF_MIN_COSINE


@needs_cuda
@pytest.mark.gpu
@pytest.mark.slow
def test_torch_compile_under_cuda_graphs(served_repository, model_cfg):
    name = contract.IMAGE_ENCODER
    io = contract.MODELS[name]
    eager = encoder(served_repository, name, model_cfg, device="cuda", precision="fp16")
    compiled = encoder(
        served_repository,
        name,
        model_cfg,
        device="cuda",
        precision="fp16",
        graph_batch_sizes=(1, 4),
        compile_mode="default",
    )
    for batch in (1, 3, 6):
        feeds = random_inputs(io, model_cfg, batch=batch, seed=batch)
        np.testing.assert_allclose(compiled(feeds), eager(feeds), atol=2e-3)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.slow
def test_half_precision_gate_at_base_size_on_gpu(tmp_path):
    """The gate on CUDA kernels at production size: a random `base` checkpoint (ViT-B/16, 77-token
    bidirectional text) and an imported random CLIP ViT-B/16, FP16 against FP32 on real photos and titles.
    (BF16, the fallback, is gated on the CPU above; here FP16 only, to keep `make gpu-check` within its time.)"""
    from _clip_helpers import TITLES

    from benchmarks.gpu import random_checkpoint
    from mim.model.checkpoint import load_checkpoint

    text = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12}
    text |= {"num_attention_heads": 8, "max_position_embeddings": 77}
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
    vision |= {"image_size": 224, "patch_size": 16}
    for ckpt in (
        load_checkpoint(random_checkpoint("base", tmp_path / "base")),
        _imported_clip(tmp_path, text, vision, 512),
    ):
        cosines = _gate(ckpt, TITLES, "cuda", precisions=("fp16",))
        assert min(cosines.values()) >= HALF_MIN_COSINE, cosines
