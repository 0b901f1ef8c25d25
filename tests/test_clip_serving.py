"""An imported CLIP served end to end: import a tiny random CLIP, export and install it, serve it from the
bundled tritonserver (CPU configs), and compare every ensemble and a search with the transformers reference."""

from __future__ import annotations

import numpy as np
import pytest
from _client_helpers import assert_same_ranking
from _clip_helpers import TITLES, HFEmbeddings, more_photos, random_clip, save_hf_folder

from client.search import SearchService
from client.triton_client import EmbeddingClient
from mim.model.import_clip import import_hf
from mim.search.ranking import row_cosines as cosines
from mim.search.stores.exact import ExactStore

pytestmark = pytest.mark.server

MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def clip_served(tmp_path_factory):
    from export.engines import build_and_install
    from mim.serving.repository import prepare_repository
    from mim.serving.server import TritonServer

    root = tmp_path_factory.mktemp("clip-e2e")
    model = random_clip(seed=3)
    folder = save_hf_folder(model, root / "hf")
    ckpt = import_hf(folder, root / "ckpt")
    repo = prepare_repository(root / "model_repository")
    build_and_install(ckpt, repo, export_dir=root / "export", tensorrt=False, check=True)  # `make engines`
    with TritonServer(repo, config="cpu", log_path=root / "tritonserver.log") as server:
        with EmbeddingClient(server.grpc_url, timeout_s=60) as client:
            yield client, HFEmbeddings(model, folder)


def test_served_clip_matches_transformers(clip_served):
    client, ref = clip_served
    photos = more_photos()
    img = cosines(client.embed_images(photos), ref.embed_images(photos))
    txt = cosines(client.embed_texts(TITLES), ref.embed_texts(TITLES))
    n = min(len(photos), len(TITLES))
    mm = [
        cosines(
            client.embed_multimodal(photos[:n], TITLES[:n], image_weight=w),
            ref.embed_multimodal(photos[:n], TITLES[:n], w),
        )
        for w in (None, 0.3)
    ]
    print(
        f"served imported CLIP vs transformers: embed_image min cosine {img.min():.6f}, embed_text "
        f"{txt.min():.6f}, embed_multimodal {min(m.min() for m in mm):.6f}"
    )
    assert img.min() >= MIN_COSINE and txt.min() >= MIN_COSINE and min(m.min() for m in mm) >= MIN_COSINE
    assert client.embed_dim() == ref.embed_texts(["x"]).shape[1]


def test_search_through_the_client(clip_served):
    client, ref = clip_served
    photos = more_photos()
    ids = np.arange(100, 100 + len(photos))
    served_index, ref_index = ExactStore(client.embed_dim(), device="cpu"), ExactStore(client.embed_dim(), device="cpu")
    served_index.add(ids, client.embed_images(photos), normalize=True)
    ref_index.add(ids, ref.embed_images(photos), normalize=True)
    served, want = SearchService(client, served_index), SearchService(ref, ref_index)
    for i in (0, 4, 7):
        got = served.by_image(photos[i], k=5)
        assert got[0].id == ids[i]  # a gallery photo finds itself first
        assert_same_ranking(got, want.by_image(photos[i], k=5))
    for title in TITLES[:4]:
        assert_same_ranking(served.by_text(title, k=5), want.by_text(title, k=5))
    assert_same_ranking(served.by_image_text(photos[2], "in red", k=5), want.by_image_text(photos[2], "in red", k=5))
