"""A real tritonserver (the bundled CPU build, `--model-config-name=cpu`) serving the tiny checkpoint, driven
with raw tritonclient.grpc requests: served embeddings equal the in-process torch towers, batches equal single
calls, fusion equals fusing the single-modality results, and every kind of bad input gets an error that says
what was wrong while the server keeps answering."""

from __future__ import annotations

import io
import shutil
import struct
import time
import urllib.request
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from mim import contract
from mim.model.checkpoint import load_checkpoint
from mim.search.embedding import TorchEmbedder
from mim.search.ranking import parity
from mim.serving.repository import DEFAULT_REPOSITORY
from mim.serving.server import TritonServer, TritonServerError

pytestmark = pytest.mark.server

MIN_COSINE = 0.999
TEXTS = ["blue zebra-striped ceramic mug", "red polka-dot cotton shirt", "in red", "green plaid leather shoe"]


# --- inputs ------------------------------------------------------------------------------------------------
def photo(seed: int, size=(96, 72), fmt="JPEG") -> bytes:
    """A smooth random colour field (compresses like a photo, decodes the same every time)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BILINEAR).save(buf, fmt)
    return buf.getvalue()


def noise_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header declares width x height pixels: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def bytes_input(spec: contract.TensorSpec, rows) -> grpcclient.InferInput:
    arr = np.array([[r] for r in rows], dtype=object)
    x = grpcclient.InferInput(spec.name, list(arr.shape), spec.dtype)
    x.set_data_from_numpy(arr)
    return x


def array_input(name: str, arr: np.ndarray, dtype: str) -> grpcclient.InferInput:
    x = grpcclient.InferInput(name, list(arr.shape), dtype)
    x.set_data_from_numpy(arr)
    return x


def embed(client, model: str, *, images=None, texts=None, params=None) -> np.ndarray:
    inputs = []
    if images is not None:
        inputs.append(bytes_input(contract.IMAGE, images))
    if texts is not None:
        inputs.append(bytes_input(contract.TEXT, [t.encode() if isinstance(t, str) else t for t in texts]))
    result = client.infer(model, inputs, parameters=params)
    return result.as_numpy(contract.EMBEDDING.name)


# --- the in-process reference: the torch model behind the same embedder interface ----------------------------
@pytest.fixture(scope="module")
def ref(tiny_checkpoint) -> TorchEmbedder:
    return TorchEmbedder(load_checkpoint(tiny_checkpoint))


def assert_close(got: np.ndarray, want, min_cosine: float = MIN_COSINE) -> None:
    assert got.shape == want.shape
    p = parity(got, want)
    assert p.min_cosine >= min_cosine, p
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


# --- the server --------------------------------------------------------------------------------------------
def test_server_runs_the_cpu_variant_and_listens_on_localhost_only(triton_server, triton_client):
    for name in contract.MODELS:
        assert triton_client.is_model_ready(name), name
    encoder = triton_client.get_model_config(contract.IMAGE_ENCODER).config
    assert encoder.backend == "python" and encoder.parameters["onnx_file"].string_value == "model.onnx"
    # preprocess_image has no configs/cpu.pbtxt: it falls back to its config.pbtxt
    assert triton_client.get_model_config(contract.PREPROCESS_IMAGE).config.instance_group[0].count == 2
    for port in (triton_server.grpc_port, triton_server.http_port, triton_server.metrics_port):
        assert listening_addresses(port) <= {"127.0.0.1", "::ffff:127.0.0.1"}, port
    with urllib.request.urlopen(triton_server.metrics_url, timeout=5) as r:
        assert b"nv_inference_request_success" in r.read()


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, from /proc/net/tcp{,6} (state 0A = LISTEN)."""
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                raw = bytes.fromhex(addr)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little endian
                found.add(_v6(words) if v6 else ".".join(map(str, words)))
    assert found, f"nothing listens on port {port}"
    return found


def _v6(raw: bytes) -> str:
    if raw[:12] == b"\x00" * 10 + b"\xff\xff":
        return "::ffff:" + ".".join(map(str, raw[12:]))
    return ":".join(raw[i : i + 2].hex() for i in range(0, 16, 2))


# --- parity with the torch towers --------------------------------------------------------------------------
def test_every_ensemble_matches_the_torch_model(triton_client, ref):
    images = [photo(0), photo(1, (50, 120), "PNG"), photo(2, (300, 200), "WEBP"), photo(3)]
    assert_close(embed(triton_client, "embed_image", images=images), ref.embed_images(images))
    assert_close(embed(triton_client, "embed_text", texts=TEXTS), ref.embed_texts(TEXTS))
    assert_close(
        embed(triton_client, "embed_multimodal", images=images, texts=TEXTS), ref.embed_multimodal(images, TEXTS)
    )


def test_a_batch_equals_single_calls(triton_client):
    images = [photo(i) for i in range(5)]
    texts = TEXTS + ["yellow striped canvas bag"]
    for model, kw in (
        ("embed_image", {"images": images}),
        ("embed_text", {"texts": texts}),
        ("embed_multimodal", {"images": images, "texts": texts}),
    ):
        batch = embed(triton_client, model, **kw)
        singles = np.concatenate(
            [embed(triton_client, model, **{k: v[i : i + 1] for k, v in kw.items()}) for i in range(5)]
        )
        np.testing.assert_allclose(batch, singles, atol=1e-5, err_msg=model)


@pytest.mark.parametrize("weight", [None, 0.2, 1.0, 0.0])
def test_multimodal_equals_fusing_the_single_modality_embeddings(triton_client, ref, weight):
    images, texts = [photo(10), photo(11)], TEXTS[:2]
    params = None if weight is None else {contract.FUSION_WEIGHT_PARAM: weight}
    got = embed(triton_client, "embed_multimodal", images=images, texts=texts, params=params)
    w = contract.DEFAULT_IMAGE_WEIGHT if weight is None else weight
    img = embed(triton_client, "embed_image", images=images)
    txt = embed(triton_client, "embed_text", texts=texts)
    fused = (w * img + (1 - w) * txt) / np.linalg.norm(w * img + (1 - w) * txt, axis=1, keepdims=True)
    np.testing.assert_allclose(got, fused, atol=1e-5)
    assert_close(got, ref.embed_multimodal(images, texts, image_weight=w))


def test_text_over_the_context_length_is_truncated_not_refused(triton_client, ref):
    long = "red polka-dot cotton shirt " * 300  # ~8 KB, hundreds of tokens for a 16-token context
    got = embed(triton_client, "embed_text", texts=[long])
    assert_close(got, ref.embed_texts([long]))
    assert_close(got, ref.embed_texts(["red polka-dot cotton shirt " * 4]))  # the same first 14 tokens


# --- bad inputs --------------------------------------------------------------------------------------------
def _image(rows):
    return [bytes_input(contract.IMAGE, rows)]


def _text(rows):
    return [bytes_input(contract.TEXT, rows)]


BAD_INPUTS = {
    # id: (model, inputs, parameters, what the error message must say)
    "truncated": ("embed_image", lambda: _image([noise_png(0)[:200]]), None, r"could not decode image \(200 bytes"),
    "not-an-image": (
        "embed_image",
        lambda: _image([b"%PDF-1.4 hello"]),
        None,
        r"could not decode image .*expected a JPEG, PNG or WebP",
    ),
    "zero-bytes": ("embed_image", lambda: _image([b""]), None, r"image is empty \(0 bytes\)"),
    "pixel-limit": (
        "embed_image",
        lambda: _image([png_declaring(8000, 8000)]),
        None,
        r"image is 8000x8000 = 64000000 pixels, over the limit of 40000000",
    ),
    "decompression-bomb": (
        "embed_image",
        lambda: _image([png_declaring(100_000, 100_000)]),
        None,
        r"decompression bomb|over the limit",
    ),
    "one-bad-row": (
        "embed_image",
        lambda: _image([photo(0), b"junk", photo(1)]),
        None,
        r"image row 1 of 3: could not decode image",
    ),
    "empty-text": ("embed_text", lambda: _text([b""]), None, r"text is empty"),
    "blank-text": ("embed_text", lambda: _text([b" \t\n"]), None, r"text is empty"),
    "non-utf8": (
        "embed_text",
        lambda: _text([b"caf\xe9 mug"]),
        None,
        r"text is not valid UTF-8 \(byte 0xe9 at offset 3\)",
    ),
    "text-over-byte-limit": (
        "embed_text",
        lambda: _text([b"a" * 70_000]),
        None,
        r"text is 70000 bytes, over the limit",
    ),
    "wrong-dtype": (
        "embed_image",
        lambda: [array_input("image", np.zeros((1, 1), np.float32), "FP32")],
        None,
        r"input 'image' data-type is 'FP32', but model 'embed_image' expects 'BYTES'",
    ),
    "wrong-shape": (
        "embed_image",
        lambda: [bytes_input(contract.IMAGE, [photo(0)] * 2).set_shape([1, 2])],
        None,
        r"unexpected shape for input 'image' for model 'embed_image'. Expected \[-1,1\], got \[1,2\]",
    ),
    "batch-over-max": (
        "embed_text",
        lambda: _text([b"mug"] * (contract.MAX_BATCH_SIZE + 1)),
        None,
        rf"batch-size must be <= {contract.MAX_BATCH_SIZE}",
    ),
    "missing-input": ("embed_multimodal", lambda: _image([photo(0)]), None, r"missing required input\(s\) \['text'\]"),
    "weight-out-of-range": (
        "embed_multimodal",
        lambda: _image([photo(0)]) + _text([b"mug"]),
        {contract.FUSION_WEIGHT_PARAM: 1.5},
        r"'image_weight' = 1.5 is outside \[0, 1\]",
    ),
    "weight-not-a-number": (
        "embed_multimodal",
        lambda: _image([photo(0)]) + _text([b"mug"]),
        {contract.FUSION_WEIGHT_PARAM: "lots"},
        r"'image_weight' = 'lots' is not a number",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_an_error_that_says_what_was_wrong(triton_server, triton_client, ref, case):
    model, make_inputs, params, message = BAD_INPUTS[case]
    with pytest.raises(InferenceServerException, match=message) as info:
        triton_client.infer(model, make_inputs(), parameters=params)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    # ... and the server keeps answering correctly.
    assert triton_server.is_running()
    assert_close(embed(triton_client, "embed_image", images=[photo(7)]), ref.embed_images([photo(7)]))


def test_bad_requests_batched_with_good_ones_fail_alone(triton_client, ref):
    n = 24
    images = [b"junk %d" % i if i % 4 == 1 else photo(100 + i) for i in range(n)]
    good = [i for i in range(n) if i % 4 != 1]
    want = ref.embed_images([images[i] for i in good])
    # Whether Triton folds the burst into shared executions depends on timing; a burst that ran one request per
    # execution proves nothing about mixed batches, so send it again (at most 3 bursts).
    for _attempt in range(3):
        before = _counts(triton_client, contract.PREPROCESS_IMAGE)
        results = _burst(triton_client, images)
        got = np.concatenate([results[i][0].as_numpy(contract.EMBEDDING.name) for i in good])
        assert_close(got, want)
        for i in range(1, n, 4):
            assert results[i][0] is None and "could not decode image" in results[i][1].message()
        inferences, executions = np.subtract(_counts(triton_client, contract.PREPROCESS_IMAGE), before)
        assert inferences == n
        if executions < n:  # some executions held several requests, bad and good
            break
    assert executions < n, "Triton never batched the burst: the mixed-batch path was not exercised"


def _burst(client, images: list[bytes]) -> dict[int, tuple]:
    """All requests in flight at once (so Triton can batch them); returns {i: (result, error)}."""
    results: dict[int, tuple] = {}

    def done(i):
        return lambda result, error: results.__setitem__(i, (result, error))

    for i, data in enumerate(images):
        client.async_infer("embed_image", _image([data]), done(i))
    deadline = time.monotonic() + 60
    while len(results) < len(images) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(results) == len(images)
    return results


def _counts(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model).model_stats[0]
    return stats.inference_count, stats.execution_count


# --- a deliberate failure ----------------------------------------------------------------------------------
def test_a_repository_without_exported_models_fails_to_start_with_the_log_tail(tmp_path):
    repo = tmp_path / "model_repository"
    artifacts = shutil.ignore_patterns("*.onnx", "*.plan", "*.json", "__pycache__")
    shutil.copytree(DEFAULT_REPOSITORY, repo, ignore=artifacts)
    server = TritonServer(repo, config="cpu", log_path=tmp_path / "triton.log", startup_timeout=60)
    with pytest.raises(TritonServerError, match=r"exited with code \d+ while starting") as info:
        server.start()
    assert server.process is None  # stopped and reaped
    message = str(info.value)
    assert "models that failed to load:" in message and "last lines:" in message
    assert (
        f"image_encoder: Internal: FileNotFoundError: {repo}/image_encoder/1/model.onnx not found; install" in message
    )
    assert f"preprocess_image: Internal: FileNotFoundError: {repo}/preprocess_image/1/preprocess.json" in message
