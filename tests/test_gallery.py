"""The `knn` model without a server: its handler (mixed k and filters in one batch, bad parameters), and the
gallery files (install as new versions, refusal of missing, corrupt and foreign galleries)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mim import contract, layout
from mim.atomic import atomic_write_dir
from mim.search.knn import KnnIndex
from mim.serving import backends as B
from mim.serving import gallery as G
from mim.serving.repository import write_repository
from mim.serving.server import TritonServer

DIM = 128  # the tiny size's embed_dim, which write_repository's configs use
MODEL = "model-a"


def make_index(n: int = 30, model_id: str = MODEL, seed: int = 0, id_offset: int = 0) -> KnnIndex:
    rng = np.random.default_rng(seed)
    index = KnnIndex(DIM, device="cpu", model_id=model_id)
    metas = [{"title": f"item {i}", "category": ("mug", "shoe", "bag")[i % 3]} for i in range(n)]
    index.add(np.arange(n) + id_offset, rng.normal(size=(n, DIM)), metas, normalize=True)
    return index


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "model_repository"
    write_repository(repo)
    for tower in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER):
        (repo / tower / "1" / layout.EXPORT_JSON).write_text(json.dumps({layout.MODEL_ID: MODEL}))
    return repo


def saved(index: KnnIndex, path):
    index.save(path)
    return path


# --- handler ---------------------------------------------------------------------------------------------------
def request(q: np.ndarray, **params) -> B.Request:
    return B.Request({contract.EMBEDDING.name: q.astype(np.float32)}, params)


def test_mixed_k_and_filters_in_one_batch_equal_separate_searches():
    index = make_index()
    handler = B.KnnHandler(index, {contract.EMBEDDING.name: (DIM,)}, default_k=4)
    rng = np.random.default_rng(1)
    specs = [{}, {"k": 1}, {"k": 9, "categories": '["mug"]'}, {"k": 15, "categories": '["mug"]'}, {"k": 3}]
    queries = [rng.normal(size=(2, DIM)) for _ in specs]
    responses = handler([request(q, **p) for q, p in zip(queries, specs)])
    for q, p, r in zip(queries, specs, responses):
        assert r.ok, r.error
        cats = json.loads(p["categories"]) if "categories" in p else None
        scores, ids = index.search(q.astype(np.float32), p.get("k", 4), categories=cats)
        np.testing.assert_array_equal(r.outputs[contract.IDS.name], ids)
        # BLAS rounding varies with the number of query rows in one product
        np.testing.assert_allclose(r.outputs[contract.SCORES.name], scores, atol=1e-5)
        metas = r.outputs[contract.ITEM_METADATA.name]
        for row_ids, row_meta in zip(ids, metas):
            assert [json.loads(m) for m in row_meta] == [index.get_metadata(i) if i >= 0 else {} for i in row_ids]
    # 10 mugs in 30 items: k=15 with the mug filter pads 5 columns
    padded = responses[3].outputs[contract.IDS.name]
    assert (padded[:, 10:] == -1).all() and (padded[:, :10] >= 0).all()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"k": 0}, r"knn: request parameter 'k' = 0 is outside \[1, 30\] \(the gallery holds 30 items\)"),
        ({"k": 31}, r"'k' = 31 is outside \[1, 30\]"),
        ({"k": True}, r"'k' = True is not an integer"),
        ({"k": 2.5}, r"'k' = 2.5 is not an integer"),
        ({"categories": '["hat"]'}, r"unknown categories \['hat'\]; the gallery has \['bag', 'mug', 'shoe'\]"),
        ({"categories": "[]"}, r"'categories' = '\[\]' is not a JSON list of category names"),
        ({"categories": "{"}, r"is not a JSON list of category names"),
    ],
)
def test_bad_parameters_fail_only_their_request(params, message):
    handler = B.KnnHandler(make_index(), {contract.EMBEDDING.name: (DIM,)})
    q = np.ones((1, DIM))
    bad, good = handler([request(q, **params), request(q, k=2)])
    assert bad.code == B.INVALID_ARG and bad.error is not None
    assert re.search(message, bad.error), bad.error
    assert good.ok and good.outputs[contract.IDS.name].shape == (1, 2)


def test_non_finite_or_misshapen_queries_are_refused():
    handler = B.KnnHandler(make_index(), {contract.EMBEDDING.name: (DIM,)})
    q = np.ones((2, DIM))
    q[1, 3] = np.nan
    (r,) = handler([request(q)])
    assert r.code == B.INVALID_ARG and "embedding row 1 of 2: contains NaN or infinity" in r.error
    (r,) = handler([request(np.ones((1, DIM + 1)))])
    assert "input 'embedding' has shape [1, 129]; expected [batch >= 1, 128]" in r.error


def test_tensor_queries_are_searched_where_they_are_and_a_bad_one_fails_alone():
    """The GPU variant takes queries as torch tensors (DLPack from Triton) and leaves the finiteness check to
    the search, so that nothing is read back before it: a NaN request then fails only itself. Run here on CPU
    tensors, the same code path."""
    import torch

    index = make_index()
    handler = B.KnnHandler(index, {contract.EMBEDDING.name: (DIM,)})
    handler.tensor_io = True  # what a gallery on a GPU sets
    rng = np.random.default_rng(4)
    qs = [torch.from_numpy(rng.normal(size=(n, DIM)).astype(np.float32)) for n in (2, 1, 3)]
    qs[1][0, 5] = float("nan")
    specs = [{"k": 3}, {"k": 2}, {"k": 5, "categories": '["mug"]'}]
    reqs = [B.Request({contract.EMBEDDING.name: q}, p) for q, p in zip(qs, specs)]
    reqs.append(B.Request({contract.EMBEDDING.name: qs[0].double()}, {}))
    good, bad, filtered, wrong_dtype = handler(reqs)
    assert bad.code == B.INVALID_ARG and "queries row 0 contains NaN or inf" in bad.error
    assert wrong_dtype.code == B.INVALID_ARG and "has dtype torch.float64; expected FP32" in wrong_dtype.error
    for r, q, p in ((good, qs[0], specs[0]), (filtered, qs[2], specs[2])):
        assert r.ok, r.error
        cats = json.loads(p["categories"]) if "categories" in p else None
        scores, ids = index.search(q.numpy(), p["k"], categories=cats)
        np.testing.assert_array_equal(r.outputs[contract.IDS.name], ids)
        np.testing.assert_allclose(r.outputs[contract.SCORES.name], scores, atol=1e-5)


# --- gallery files ---------------------------------------------------------------------------------------------
def test_install_adds_versions_and_keeps_the_served_and_previous_one(repo, tmp_path):
    assert G.servable_models(repo) == [m for m in contract.MODELS if m not in (contract.KNN, *G.SEARCH_ENSEMBLES)]
    for n in range(4):
        v = G.install_gallery(saved(make_index(seed=n), tmp_path / f"g{n}.safetensors"), repo)
        assert v.name == str(n + 2) and (v / G.GALLERY_FILE).is_file() and (v / "model.py").is_file()
    assert G.versions(repo) == [1, 4, 5]  # the generated 1/, the previous and the newest
    assert G.latest_gallery(repo) == repo / contract.KNN / "5" / G.GALLERY_FILE
    assert G.servable_models(repo) == list(contract.MODELS)
    assert not [p for p in (repo / contract.KNN).iterdir() if p.name.startswith(".")]  # no temp folder left
    index = G.load_gallery(repo / contract.KNN / "5", dim=DIM, device="cpu")
    assert len(index) == 30 and index.model_id == MODEL
    # A new export (other encoders) leaves the old gallery out of the start-up until one of its model arrives.
    for tower in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER):
        (repo / tower / "1" / layout.EXPORT_JSON).write_text(json.dumps({layout.MODEL_ID: "model-b"}))
    assert contract.KNN not in G.servable_models(repo) and not G.gallery_fits(repo)


def test_missing_corrupt_foreign_and_misfit_galleries_are_refused(repo, tmp_path):
    vdir = repo / contract.KNN / "1"
    with pytest.raises(G.GalleryError, match=rf"{vdir}/gallery.safetensors not found: the knn model has no gallery"):
        G.load_gallery(vdir)
    path = saved(make_index(), vdir / G.GALLERY_FILE)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(G.GalleryError, match=rf"gallery refused: {path} is corrupted: the SHA-256"):
        G.load_gallery(vdir)
    saved(make_index(model_id="model-b"), path)
    with pytest.raises(G.GalleryError, match=r"built with model_id='model-b' but expected_model_id='model-a'"):
        G.load_gallery(vdir)
    with pytest.raises(G.GalleryError, match=r"not installing .*model_id='model-b'"):
        G.install_gallery(path, repo)
    saved(make_index(), path)
    with pytest.raises(G.GalleryError, match=r"holds 128-d embeddings; the knn model config expects 64"):
        G.load_gallery(vdir, dim=64)
    with pytest.raises(ValueError, match=r"no python-backend handler|not found"):
        B.make_handler(contract.KNN, repo / contract.KNN / "7", {"input": [{"name": "embedding", "dims": [DIM]}]})


def test_encoders_of_two_checkpoints_or_without_a_record_are_refused(repo, tmp_path):
    (repo / contract.TEXT_ENCODER / "1" / layout.EXPORT_JSON).write_text(json.dumps({layout.MODEL_ID: "model-b"}))
    with pytest.raises(G.GalleryError, match=r"the encoders come from different checkpoints"):
        G.encoders_model_id(repo)
    (repo / contract.TEXT_ENCODER / "1" / layout.EXPORT_JSON).unlink()
    with pytest.raises(G.GalleryError, match=r"text_encoder/1/export.json is missing or unreadable"):
        G.install_gallery(saved(make_index(), tmp_path / "g.safetensors"), repo)


def test_atomic_write_dir_leaves_nothing_on_failure(tmp_path):
    def fail(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        atomic_write_dir(tmp_path / "v2", fail)
    assert list(tmp_path.iterdir()) == []
    atomic_write_dir(tmp_path / "v2", lambda tmp: (tmp / "f").write_text("ok"))
    assert (tmp_path / "v2" / "f").read_text() == "ok"
    with pytest.raises(FileExistsError, match="already exists"):
        atomic_write_dir(tmp_path / "v2", lambda tmp: None)


def test_server_loads_servable_models_explicitly(repo, tmp_path):
    server = TritonServer(repo)
    args = server._model_control_args()
    assert args[0] == "--model-control-mode=explicit"
    assert f"--load-model={contract.KNN}" not in args and f"--load-model={contract.EMBED_IMAGE}" in args
    G.install_gallery(saved(make_index(), tmp_path / "g.safetensors"), repo)
    assert f"--load-model={contract.SEARCH_MULTIMODAL}" in server._model_control_args()
    assert TritonServer(repo, model_control="none")._model_control_args() == []
    with pytest.raises(ValueError, match=r"model_control='poll'; expected one of"):
        TritonServer(repo, model_control="poll")


@pytest.mark.gpu
def test_the_knn_model_loads_its_gallery_on_the_gpu_and_answers_as_on_the_cpu(repo, tmp_path):
    from mim.search.knn import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the knn model's CuPy path needs a usable CUDA device: {reason}")
    vdir = G.install_gallery(saved(make_index(n=5000), tmp_path / "g.safetensors"), repo)
    dims = {contract.EMBEDDING.name: (DIM,)}
    gpu = B.KnnHandler(G.load_gallery(vdir, dim=DIM, device="auto"), dims)
    cpu = B.KnnHandler(G.load_gallery(vdir, dim=DIM, device="cpu"), dims)
    assert gpu.index.device == "cuda"
    q = np.random.default_rng(3).normal(size=(8, DIM))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    reqs = [request(q, k=50), request(q[:2], k=5, categories='["bag"]')]
    for a, b in zip(gpu(reqs), cpu(reqs)):
        assert a.ok and b.ok
        # fp16 storage on the GPU: scores within fp16 rounding, and the ids a top-k up to near-ties
        got_s, want_s = a.outputs[contract.SCORES.name], b.outputs[contract.SCORES.name]
        np.testing.assert_allclose(got_s, want_s, atol=5e-3)
        ids_a, ids_b = a.outputs[contract.IDS.name], b.outputs[contract.IDS.name]
        assert np.mean(ids_a == ids_b) > 0.9
