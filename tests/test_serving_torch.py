"""The `torch` config variant (towers in torch inside python-backend models, tensors through DLPack) served by
a real tritonserver next to the ONNX Runtime variant: every ensemble gives the same embeddings, and bad tensors
sent straight to a torch encoder are refused per request while the server keeps answering."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_serving import TEXTS, array_input, embed, photo
from tritonclient.utils import InferenceServerException

from mim import contract
from mim.search.ranking import parity
from mim.serving.runtimes import TORCH
from mim.serving.server import TritonServer

pytestmark = pytest.mark.server

MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def torch_client(tmp_path_factory, served_repository):
    log = tmp_path_factory.mktemp("triton_torch") / "tritonserver.log"
    with TritonServer(served_repository, config=TORCH, log_path=log) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        yield client
        client.close()


def test_the_torch_variant_serves_the_towers_in_torch(torch_client):
    for name in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER):
        params = torch_client.get_model_config(name).config.parameters
        assert params["encoder_backend"].string_value == "torch"


def test_every_ensemble_equals_the_onnx_variant(torch_client, triton_client):
    images = [photo(0), photo(1, (50, 120), "PNG"), photo(2, (300, 200), "WEBP"), photo(3)]
    for model, kw in (
        (contract.EMBED_IMAGE, {"images": images}),
        (contract.EMBED_TEXT, {"texts": TEXTS}),
        (contract.EMBED_MULTIMODAL, {"images": images, "texts": TEXTS}),
    ):
        got, want = embed(torch_client, model, **kw), embed(triton_client, model, **kw)
        assert got.shape == want.shape == (4, want.shape[1])
        assert parity(got, want).min_cosine >= MIN_COSINE, model


def test_bad_tensors_are_refused_and_the_next_request_is_answered(torch_client):
    cfg = torch_client.get_model_config(contract.TEXT_ENCODER).config
    t = cfg.input[0].dims[0]
    ids = np.full((1, t), 5, dtype=np.int64)
    mask = np.ones((1, t), dtype=np.int64)
    bad_ids = ids.copy()
    bad_ids[0, 2] = -3
    inputs = [array_input("input_ids", bad_ids, "INT64"), array_input("attention_mask", mask, "INT64")]
    with pytest.raises(InferenceServerException, match=r"input_ids: has token id -3; expected ids in \[0, "):
        torch_client.infer(contract.TEXT_ENCODER, inputs)
    pixels = np.zeros((2, *cfg_dims(torch_client, contract.IMAGE_ENCODER)), dtype=np.float32)
    pixels[1, 0, 0, 0] = np.inf
    with pytest.raises(InferenceServerException, match="pixel_values row 1 of 2: contains NaN or infinity"):
        torch_client.infer(contract.IMAGE_ENCODER, [array_input("pixel_values", pixels, "FP32")])
    good = [array_input("input_ids", ids, "INT64"), array_input("attention_mask", mask, "INT64")]
    out = torch_client.infer(contract.TEXT_ENCODER, good).as_numpy(contract.TEXT_EMBEDS.name)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def cfg_dims(client, model: str) -> tuple[int, ...]:
    return tuple(client.get_model_config(model).config.input[0].dims)
