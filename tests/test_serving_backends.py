"""The logic behind the python-backend models, without Triton: per-row errors, batched runs equal to single
runs, served numerics equal to the torch towers, and the Triton glue driven with a stand-in `pb_utils`."""

from __future__ import annotations

import io
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format
from PIL import Image

from mim import contract
from mim.model.checkpoint import load_checkpoint
from mim.model.config import get_size
from mim.model.preprocess import InputError, preprocess_image_bytes
from mim.search.ranking import fuse, l2_normalize, parity
from mim.serving import backends as B
from mim.serving import python_backend
from mim.serving.repository import build_configs

PRE = get_size("tiny").preprocess
S, T = PRE.image_size, PRE.context_length


def png(seed: int, size=(80, 50)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def byte_tensor(*rows: bytes) -> np.ndarray:
    return np.array([[r] for r in rows], dtype=object)  # (N, 1) BYTES, as Triton hands it over


def triton_json(model: str, variant: str = "config.pbtxt") -> dict:
    """A generated config in the JSON form the python backend passes to `initialize` (int64 dims as strings)."""
    cfg = next(c.config for c in build_configs() if c.model == model and c.relpath.endswith(variant))
    return json_format.MessageToDict(cfg, preserving_proto_field_name=True)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def repo(served_repository) -> Path:
    return served_repository


# --- images ------------------------------------------------------------------------------------------------
def test_batch_decode_equals_single_decode_and_flags_bad_rows():
    rows = [png(0), b"not an image", png(1, (40, 90)), b"", png(2)[:100]]
    pixels, errors = B.ImagePreprocessor(PRE).decode_batch(rows)
    assert pixels.shape == (5, 3, S, S) and pixels.dtype == np.float32
    for i in (0, 2):
        assert errors[i] is None
        np.testing.assert_array_equal(pixels[i], preprocess_image_bytes(rows[i], PRE))
    assert "could not decode image" in errors[1]
    assert "image is empty (0 bytes)" in errors[3]
    assert "could not decode image" in errors[4]  # truncated PNG
    assert not pixels[[1, 3, 4]].any()


def test_preprocess_image_answers_bad_requests_alone():
    handler = B.PreprocessImageHandler(PRE)
    requests = [
        B.Request({"image": byte_tensor(png(0), png(1))}),
        B.Request({"image": byte_tensor(png(2), b"garbage", b"")}),
        B.Request({"image": byte_tensor(png(3))}),
    ]
    good, bad, single = handler(requests)
    assert good.ok and single.ok
    assert good.outputs["pixel_values"].shape == (2, 3, S, S)
    np.testing.assert_array_equal(single.outputs["pixel_values"][0], preprocess_image_bytes(png(3), PRE))
    assert bad.code == B.INVALID_ARG
    assert "image row 1 of 3: could not decode image" in bad.error
    assert "image row 2 of 3: image is empty" in bad.error
    assert bad.error.startswith("preprocess_image: ")


def test_shape_and_dtype_are_checked_when_called_directly():
    handler = B.PreprocessImageHandler(PRE)
    wrong_shape, wrong_dtype, missing = handler(
        [
            B.Request({"image": np.array([[png(0), png(1)]], dtype=object)}),
            B.Request({"image": np.zeros((1, 1), np.float32)}),
            B.Request({}),
        ]
    )
    assert "has shape [1, 2]; expected [batch >= 1, 1]" in wrong_shape.error
    assert "has dtype float32; expected BYTES" in wrong_dtype.error
    assert "missing input 'image'" in missing.error


# --- text --------------------------------------------------------------------------------------------------
def test_text_rows_are_checked_one_by_one_and_tokenized_together(reference):
    pre = B.TextPreprocessor(PRE, reference.tokenizer)
    handler = B.PreprocessTextHandler(pre)
    long_text = ("zebra mug " * 500).encode()  # far over the context length: truncated, not refused
    ok, bad, too_big, long = handler(
        [
            B.Request({"text": byte_tensor(b"red polka-dot shirt", b"blue mug")}),
            B.Request({"text": byte_tensor(b"ok", b"   ", b"\xff\xfe")}),
            B.Request({"text": byte_tensor(b"x" * (PRE.max_text_bytes + 1))}),
            B.Request({"text": byte_tensor(long_text)}),
        ]
    )
    ids, mask = reference.tokenizer.encode_batch(["red polka-dot shirt", "blue mug"])
    np.testing.assert_array_equal(ok.outputs["input_ids"], ids)
    np.testing.assert_array_equal(ok.outputs["attention_mask"], mask)
    assert "text row 1 of 3: text is empty" in bad.error
    assert "text row 2 of 3: text is not valid UTF-8 (byte 0xff at offset 0)" in bad.error
    assert f"over the limit of {PRE.max_text_bytes}" in too_big.error
    assert long.ok and long.outputs["attention_mask"].sum() == PRE.context_length


# --- encoders ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_handler(repo) -> B.EncoderHandler:
    return B.make_handler(contract.IMAGE_ENCODER, repo / "image_encoder/1", triton_json("image_encoder", "cpu.pbtxt"))


@pytest.fixture(scope="module")
def text_handler(repo) -> B.EncoderHandler:
    return B.make_handler(contract.TEXT_ENCODER, repo / "text_encoder/1", triton_json("text_encoder", "cpu.pbtxt"))


def test_onnx_encoders_match_torch_and_batch_equals_single(reference, image_handler, text_handler):
    pixels = np.stack([preprocess_image_bytes(png(i), PRE) for i in range(5)])
    with torch.no_grad():
        want = reference.model.encode_image(torch.from_numpy(pixels)).numpy()
    responses = image_handler([B.Request({"pixel_values": pixels[:3]}), B.Request({"pixel_values": pixels[3:]})])
    batched = np.concatenate([r.outputs["image_embeds"] for r in responses])
    assert parity(batched, want).min_cosine >= 0.9999
    singles = [image_handler([B.Request({"pixel_values": p[None]})])[0].outputs["image_embeds"] for p in pixels]
    np.testing.assert_allclose(batched, np.concatenate(singles), atol=1e-5)

    ids, mask = reference.tokenizer.encode_batch(["zebra mug", "red polka-dot cotton shirt"])
    with torch.no_grad():
        want_t = reference.model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    (got,) = text_handler([B.Request({"input_ids": ids, "attention_mask": mask})])
    assert parity(got.outputs["text_embeds"], want_t).min_cosine >= 0.9999


def test_encoder_refuses_rows_that_would_poison_the_batch(reference, image_handler, text_handler):
    pixels = np.zeros((2, 3, S, S), np.float32)
    pixels[1, 0, 0, 0] = np.nan
    good, nan = image_handler([B.Request({"pixel_values": pixels[:1]}), B.Request({"pixel_values": pixels})])
    assert good.ok and "pixel_values row 1 of 2: contains NaN or infinity" in nan.error

    ids, mask = reference.tokenizer.encode_batch(["zebra mug"])
    vocab = reference.tokenizer.vocab_size
    assert text_handler.vocab_size == vocab  # read from the installed model.json
    big, neg, bad_mask = ids.copy(), ids.copy(), mask.copy()
    big[0, 1], neg[0, 1], bad_mask[0, 2] = vocab, -1, 7
    responses = text_handler(
        [
            B.Request({"input_ids": big, "attention_mask": mask}),
            B.Request({"input_ids": neg, "attention_mask": mask}),
            B.Request({"input_ids": ids, "attention_mask": bad_mask}),
            B.Request({"input_ids": ids, "attention_mask": mask}),
        ]
    )
    assert f"input_ids: has token id {vocab}; expected ids in [0, {vocab})" in responses[0].error
    assert "has token id -1" in responses[1].error
    assert "attention_mask: must hold only 0 and 1" in responses[2].error
    assert responses[3].ok


def test_encoder_load_errors_say_what_to_do(repo, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.onnx not found; install the exported towers"):
        B.make_handler(contract.IMAGE_ENCODER, tmp_path, triton_json("image_encoder", "cpu.pbtxt"))
    with pytest.raises(ValueError, match=r"inputs \['pixel_values'\].*the contract \(mim.contract\) expects"):
        B.OnnxEncoder(repo / "image_encoder/1/model.onnx", contract.MODELS[contract.TEXT_ENCODER], {})
    cfg = triton_json("image_encoder", "cpu.pbtxt")
    cfg["input"][0]["dims"] = [3, 224, 224]
    with pytest.raises(ValueError, match=rf"per-row shape \[3, {S}, {S}\]; the repository config expects \[3, 224"):
        B.make_handler(contract.IMAGE_ENCODER, repo / "image_encoder" / "1", cfg)


def test_preprocess_load_errors_say_what_to_do(repo, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"preprocess.json not found; the exporter writes it"):
        B.make_handler(contract.PREPROCESS_IMAGE, tmp_path, triton_json("preprocess_image"))
    cfg = triton_json("preprocess_text")
    cfg["output"][0]["dims"] = ["77"]
    with pytest.raises(ValueError, match=rf"input_ids per-row shape \[{T}\] but the model config says \[77\]"):
        B.make_handler(contract.PREPROCESS_TEXT, repo / "preprocess_text" / "1", cfg)


# --- fusion (the arithmetic itself: tests/test_ranking.py) ----------------------------------------------------
def unit_rows(n: int, seed: int) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, 128)).astype(np.float32))


@pytest.mark.parametrize(
    "value, message",
    [
        (1.5, r"= 1.5 is outside \[0, 1\]"),
        (-0.1, "= -0.1 is outside"),
        (float("nan"), "= nan is outside"),
        ("abc", "= 'abc' is not a number"),
        (True, "= True is not a number"),
        (None, "= None is not a number"),
    ],
)
def test_bad_fusion_weights_are_refused(value, message):
    with pytest.raises(InputError, match=rf"request parameter 'image_weight' {message}"):
        B.parse_image_weight({contract.FUSION_WEIGHT_PARAM: value}, 0.5)


def test_fuse_handler_keeps_each_requests_weight_in_one_batch():
    handler = B.make_handler(contract.FUSE, Path("."), triton_json("fuse"))
    assert handler.default_image_weight == contract.DEFAULT_IMAGE_WEIGHT
    img, txt = unit_rows(4, 0), unit_rows(4, 1)
    calls = []
    run = handler.run
    handler.run = lambda batch: calls.append(len(batch["weight"])) or run(batch)  # count the joint runs
    default, weighted, bad, as_text = handler(
        [
            B.Request({"image_embeds": img[:2], "text_embeds": txt[:2]}),
            B.Request({"image_embeds": img[2:3], "text_embeds": txt[2:3]}, {"image_weight": 0.9}),
            B.Request({"image_embeds": img[3:], "text_embeds": txt[3:]}, {"image_weight": 2}),
            B.Request({"image_embeds": img[3:], "text_embeds": txt[3:]}, {"image_weight": "0.25"}),
        ]
    )
    assert calls == [4]  # the three good requests, one run
    np.testing.assert_allclose(default.outputs["embedding"], fuse(img[:2], txt[:2], 0.5), atol=1e-6)
    np.testing.assert_allclose(weighted.outputs["embedding"], fuse(img[2:3], txt[2:3], 0.9), atol=1e-6)
    np.testing.assert_allclose(as_text.outputs["embedding"], fuse(img[3:], txt[3:], 0.25), atol=1e-6)
    assert "outside [0, 1]" in bad.error and bad.code == B.INVALID_ARG


# --- run_together ------------------------------------------------------------------------------------------
def test_a_failing_joint_run_falls_back_to_one_run_per_request():
    def check(req):
        return {"x": req.inputs["x"]}

    def run(batch):
        if (batch["x"] < 0).any():
            raise RuntimeError("negative value reached the runtime")
        return {"y": batch["x"] * 2}

    requests = [B.Request({"x": np.array(x)}) for x in ([1.0, 2.0], [-1.0], [3.0])]
    a, b, c = B.run_together(requests, check, run, "toy")
    np.testing.assert_array_equal(a.outputs["y"], [2.0, 4.0])
    np.testing.assert_array_equal(c.outputs["y"], [6.0])
    assert (b.code, b.error) == (B.INTERNAL, "toy: RuntimeError: negative value reached the runtime")


# --- the Triton glue with a stand-in pb_utils --------------------------------------------------------------
class FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array

    def is_cpu(self):
        return True


class FakeDeviceTensor(FakeTensor):
    """Stands in for a GPU input (FORCE_CPU_ONLY_INPUT_TENSORS=no): as_numpy() is refused, DLPack works."""

    def as_numpy(self):
        raise RuntimeError("as_numpy() is only for CPU tensors")

    def is_cpu(self):
        return False

    def to_dlpack(self):
        import torch

        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self.array))


def test_device_tensors_are_read_through_dlpack():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(python_backend.host_array(FakeDeviceTensor("x", x)), x)
    np.testing.assert_array_equal(python_backend.host_array(FakeTensor("x", x)), x)


class FakeError:
    INVALID_ARG, INTERNAL = "invalid-arg-code", "internal-code"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class FakeRequest:
    def __init__(self, tensors, params=None, raw=None):
        self.tensors, self.params, self.raw = tensors, params, raw

    def parameters(self):
        return self.raw if self.raw is not None else json.dumps(self.params or {})


def fake_pb_utils():
    def get_input_tensor_by_name(request, name):
        return request.tensors.get(name)

    def response(output_tensors=None, error=None):
        return types.SimpleNamespace(outputs={t.name: t.array for t in output_tensors or []}, error=error)

    return types.SimpleNamespace(
        Tensor=FakeTensor,
        TritonError=FakeError,
        InferenceResponse=response,
        get_input_tensor_by_name=get_input_tensor_by_name,
    )


def test_glue_builds_the_handler_from_initialize_args_and_answers_each_request(repo):
    args = {
        "model_config": json.dumps(triton_json("preprocess_text")),
        "model_repository": str(repo / "preprocess_text"),  # the python backend passes the MODEL folder
        "model_version": "1",
    }
    handler = python_backend.make_handler("preprocess_text", args)
    pb_utils = fake_pb_utils()
    good = FakeRequest({"text": FakeTensor("text", byte_tensor(b"zebra mug"))}, {"image_weight": 0.2})
    bad = FakeRequest({"text": FakeTensor("text", byte_tensor(b""))})
    r_good, r_bad = python_backend.execute(pb_utils, handler, [good, bad])
    assert r_good.error is None and r_good.outputs["input_ids"].shape == (1, T)
    assert r_bad.error.code == FakeError.INVALID_ARG
    assert r_bad.error.message == "preprocess_text: text: text is empty; expected a non-empty query or title"
    assert python_backend.request_params(good) == {"image_weight": 0.2}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[1, 2]", r"request parameters must be a JSON object; got list '\[1, 2\]'"),
        ('"k=3"', r"request parameters must be a JSON object; got str"),
        ("{k: 3", r"request parameters are not JSON \(.*\): '\{k: 3'; expected a JSON object"),
    ],
)
def test_parameters_that_are_not_a_json_object_are_that_request_s_error(repo, raw, message):
    args = {
        "model_config": json.dumps(triton_json("preprocess_text")),
        "model_repository": str(repo / "preprocess_text"),
        "model_version": "1",
    }
    handler = python_backend.make_handler("preprocess_text", args)
    with pytest.raises(InputError, match=message):
        python_backend.request_params(FakeRequest({}, raw=raw))
    text = {"text": FakeTensor("text", byte_tensor(b"zebra mug"))}
    bad, good = FakeRequest(text, raw=raw), FakeRequest(text)
    r_bad, r_good = python_backend.execute(fake_pb_utils(), handler, [bad, good])
    assert r_bad.error.code == FakeError.INVALID_ARG and r_bad.error.message.startswith("preprocess_text: request")
    assert r_good.error is None and r_good.outputs["input_ids"].shape == (1, T)  # the batch still runs
    assert python_backend.request_params(FakeRequest({}, raw="")) == {}  # no parameters: the defaults


def test_glue_without_error_codes_still_reports_the_message():
    class OldError:  # python backends before 23.10: TritonError(message) only
        def __init__(self, message):
            self.message = message

    err = python_backend.triton_error(types.SimpleNamespace(TritonError=OldError), "bad", B.INVALID_ARG)
    assert err.message == "bad"


def test_a_crashing_check_fails_only_its_own_request():
    def check(req):
        if "x" not in req.inputs:
            raise KeyError("x")
        return {"x": req.inputs["x"]}

    ok, crashed = B.run_together([B.Request({"x": np.ones(2)}), B.Request({})], check, lambda b: b, "toy")
    assert ok.ok and (crashed.code, crashed.error) == (B.INTERNAL, "toy: KeyError: 'x'")
