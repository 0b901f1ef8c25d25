"""Category filters reach every query kind of the client-side search service (image, text, image + text by
fusion and by refine), with a fixed embedder over a small exact store: no model, no server."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from client.search import Searcher, SearchService
from client.search_client import AsyncSearchClient, SearchClient
from mim.search.stores.exact import ExactStore

CATS = ("mug", "shirt")


class Fixed:
    """Every image embeds to e0, every text to e1: the gallery decides the ranking."""

    def embed_images(self, images):
        return np.tile(np.eye(4, dtype=np.float32)[0], (len(images), 1))

    def embed_texts(self, texts):
        return np.tile(np.eye(4, dtype=np.float32)[1], (len(texts), 1))

    def embed_multimodal(self, images, texts, image_weight=None):
        v = np.eye(4, dtype=np.float32)[0] + np.eye(4, dtype=np.float32)[1]
        return np.tile(v / np.linalg.norm(v), (len(images), 1))


@pytest.fixture()
def service():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20, 4)).astype(np.float32)
    store = ExactStore(4, device="cpu")
    store.add(np.arange(20), emb, [{"category": CATS[i % 2], "title": f"t{i}"} for i in range(20)], normalize=True)
    return SearchService(Fixed(), store)


@pytest.mark.parametrize(
    "query",
    [
        lambda s, **kw: s.by_image(b"x", **kw),
        lambda s, **kw: s.by_text("x", **kw),
        lambda s, **kw: s.by_image_text(b"x", "y", mode="fusion", **kw),
        lambda s, **kw: s.by_image_text(b"x", "y", mode="refine", top_n=6, **kw),
    ],
    ids=["image", "text", "fusion", "refine"],
)
def test_every_query_kind_filters_by_category(service, query):
    everything = query(service, k=8)
    assert {r.category for r in everything} == set(CATS)
    mugs = query(service, k=8, categories=["mug"])
    assert len(mugs) == 8 and {r.category for r in mugs} == {"mug"}


def test_refine_with_a_filter_that_leaves_few_candidates_returns_fewer(service):
    assert len(service.by_image_text(b"x", "y", k=15, mode="refine", categories="mug")) == 10
    assert service.by_image_text(b"x", "y", mode="refine", categories="hat") == []


@pytest.mark.parametrize("front_end", [SearchService, SearchClient, AsyncSearchClient])
def test_both_front_ends_take_the_searcher_s_arguments(front_end):
    for method in ("by_image", "by_text", "by_image_text"):
        want = inspect.signature(getattr(Searcher, method)).parameters
        got = inspect.signature(getattr(front_end, method)).parameters
        assert [(p.name, p.kind, p.default) for p in got.values()] == [
            (p.name, p.kind, p.default) for p in want.values()
        ], (front_end.__name__, method)
