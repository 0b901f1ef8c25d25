"""Search over a gallery (`mim.search.stores.VectorStore`: a KnnIndex or a Milvus collection) with query embeddings
from an embedding client.

    service = SearchService(EmbeddingClient(url), open_store("gallery.safetensors"))
    service.by_image(photo_bytes, k=10)
    service.by_text("zebra mug", k=10)
    service.by_image_text(photo_bytes, "in blue", k=10, mode="fusion", image_weight=0.5)
    service.by_image_text(photo_bytes, "in blue", k=10, mode="refine", text_weight=1.0, top_n=50)

The two multimodal modes (docs/METHOD.md, "Multimodal search"):
- fusion: one kNN on normalize(a * image + (1 - a) * text), the embedding the server's `embed_multimodal`
  ensemble computes (its `fuse` model);
- refine: image kNN for the top N, re-ranked by cos(q, p) + b * cos(s, p) with `mim.search.ranking.refine`, the same
  function the offline evaluation uses.

`client` is any `mim.search.embedding.Embedder`: `EmbeddingClient`, or an in-process embedder for tests and offline
use. Results carry the metadata the index was built with (title, category, image path). Nothing here imports
torch: the search path runs where only NumPy, the gRPC client and the index are installed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mim import contract
from mim.checks import is_positive_int
from mim.search.embedding import Embedder
from mim.search.ranking import DEFAULT_REFINE_WEIGHT, REFINE_TOP_N, refine, refine_scores
from mim.search.stores import VectorStore

MODES = ("fusion", "refine")
Categories = str | Iterable[str] | None


@dataclass(frozen=True)
class SearchResult:
    rank: int  # 1-based
    id: int
    score: float  # inner product (cosine) for image/text/fusion; cos(q, p) + b * cos(s, p) for refine
    title: str | None
    category: str | None
    image: str | None  # path of the product image, as stored in the index metadata
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def results_from(index: VectorStore, scores: np.ndarray, ids: np.ndarray) -> list[SearchResult]:
    """One query's (k,) scores and ids -> results; padding (id -1, from a category filter) is dropped."""
    out = []
    for s, i in zip(scores.tolist(), ids.tolist()):
        if i < 0:
            continue
        meta = index.get_metadata(i)
        out.append(
            SearchResult(
                len(out) + 1, int(i), float(s), meta.get("title"), meta.get("category"), meta.get("image"), meta
            )
        )
    return out


@runtime_checkable
class Searcher(Protocol):
    """One query at a time, with the same features and results on both front ends: `SearchService` (a store
    searched here) and `client.search_client.SearchClient` (the server's gallery, one request per query). Every
    query kind takes a category filter; image + text comes by fusion or by refine (`mode`). A front end that
    cannot do a mode (the server does fusion only) refuses it with a ValueError that names the other one."""

    def by_image(
        self, image: bytes, k: int = contract.DEFAULT_K, *, categories: Categories = None
    ) -> list[SearchResult]: ...

    def by_text(
        self, text: str, k: int = contract.DEFAULT_K, *, categories: Categories = None
    ) -> list[SearchResult]: ...

    def by_image_text(
        self,
        image: bytes,
        text: str,
        k: int = contract.DEFAULT_K,
        *,
        mode: str = "fusion",
        image_weight: float | None = None,
        text_weight: float = DEFAULT_REFINE_WEIGHT,
        top_n: int = REFINE_TOP_N,
        categories: Categories = None,
    ) -> list[SearchResult]: ...


class SearchService:
    """The `Searcher` over a vector store searched in this process, with query embeddings from `client`."""

    def __init__(self, client: Embedder, index: VectorStore) -> None:
        self.client, self.index = client, index

    # --- queries ----------------------------------------------------------------------------------------------
    def by_image(
        self, image: bytes, k: int = contract.DEFAULT_K, *, categories: str | Iterable[str] | None = None
    ) -> list[SearchResult]:
        return self.search_embedding(self.client.embed_images([image]), k, categories=categories)

    def by_text(
        self, text: str, k: int = contract.DEFAULT_K, *, categories: str | Iterable[str] | None = None
    ) -> list[SearchResult]:
        return self.search_embedding(self.client.embed_texts([text]), k, categories=categories)

    def by_image_text(
        self,
        image: bytes,
        text: str,
        k: int = contract.DEFAULT_K,
        *,
        mode: str = "fusion",
        image_weight: float | None = None,
        text_weight: float = DEFAULT_REFINE_WEIGHT,
        top_n: int = REFINE_TOP_N,
        categories: str | Iterable[str] | None = None,
    ) -> list[SearchResult]:
        """Photo + reformulation text. `image_weight` (a) is fusion's, `text_weight` (b) and `top_n` refine's;
        `categories` filters either mode (refine re-ranks only candidates of those categories)."""
        if mode == "fusion":
            w = contract.DEFAULT_IMAGE_WEIGHT if image_weight is None else image_weight
            query = self.client.embed_multimodal([image], [text], image_weight=w)
            return self.search_embedding(query, k, categories=categories)
        if mode == "refine":
            q = self.client.embed_images([image])
            s = self.client.embed_texts([text])
            return self.refine_embeddings(q, s, k, text_weight=text_weight, top_n=top_n, categories=categories)
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")

    # --- the embedding-level API (also used for batched evaluation) ----------------------------------------------
    def search_embedding(
        self, query: np.ndarray, k: int, *, categories: str | Iterable[str] | None = None
    ) -> list[SearchResult]:
        """One (1, D) query embedding -> top-k results."""
        scores, ids = self.index.search(query, self._k(k), categories=categories)
        return results_from(self.index, scores[0], ids[0])

    def refine_embeddings(
        self,
        q_img: np.ndarray,
        q_txt: np.ndarray,
        k: int,
        *,
        text_weight: float = DEFAULT_REFINE_WEIGHT,
        top_n: int = REFINE_TOP_N,
        categories: str | Iterable[str] | None = None,
    ) -> list[SearchResult]:
        """Image kNN for `top_n` candidates from the index (of `categories` only, when given), re-ranked by
        `mim.search.ranking.refine`. A filter that leaves fewer than k candidates gives fewer results."""
        if not is_positive_int(top_n):
            raise ValueError(f"top_n={top_n!r}; expected a positive int (candidates re-ranked by refine)")
        k = self._k(k)
        n = min(max(int(top_n), k), self.index.count)
        _, cand = self.index.search(q_img, n, categories=categories)  # (1, n) best first, -1 padding
        # Candidates in ascending id order, so refine's "ties by lower row" is "ties by lower id", as in search.
        cand_ids = np.sort(cand[0][cand[0] >= 0])
        if cand_ids.size == 0:
            return []
        k, n = min(k, cand_ids.size), cand_ids.size
        sub = self._embeddings_of(cand_ids)  # (n, D)
        rows = refine(q_img, q_txt, sub, k, top_n=n, text_weight=text_weight)[0]  # (k,) rows of sub
        score = refine_scores(q_img[:1], q_txt[:1], sub[rows][None], text_weight)[0]  # the score refine ranked by
        return results_from(self.index, score, cand_ids[rows])

    # --- internals ------------------------------------------------------------------------------------------------
    def _k(self, k: int) -> int:
        if not is_positive_int(k):
            raise ValueError(f"k={k!r}; expected a positive int")
        if self.index.count == 0:
            raise ValueError("the index is empty; build it first (python -m client.cli index ...)")
        return min(int(k), self.index.count)

    def _embeddings_of(self, ids: np.ndarray) -> np.ndarray:
        # Only the candidates' rows: fetched by id from a server, or taken from the exact index's host copy.
        return np.asarray(self.index.vectors(ids), dtype=np.float32)
