"""Search in one request: typed clients of the `search_image`, `search_text` and `search_multimodal` ensembles.

    with SearchClient("127.0.0.1:8001") as c:
        c.wait_ready(60)
        c.by_image(photo_bytes, k=10)
        c.by_text("zebra mug", k=10, categories=["mug"])
        c.by_image_text(photo_bytes, "in blue", k=10, image_weight=0.5)

The server embeds the query and searches the gallery installed in its `knn` model (`mim.serving.gallery`),
so the client holds no index: each result carries the title, category and image path stored with the
gallery. Results are `client.search.SearchResult`s, the same as `SearchService` returns from a local index
with the same gallery. k and the category filter travel as request parameters (`contract.K_PARAM`,
`contract.CATEGORIES_PARAM`), like the fusion weight. Photo + text is fusion only: refine re-ranks image
candidates with the gallery's embeddings, which stay in the server; use `SearchService` for it.

`SearchClient` extends `EmbeddingClient` (same retries, errors, batching at the models' max batch), and
`AsyncSearchClient` is its asyncio twin.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException

from mim import contract
from mim.checks import is_positive_int
from mim.search.ranking import DEFAULT_REFINE_WEIGHT, REFINE_TOP_N

from .search import SearchResult
from .triton_client import (
    AsyncEmbeddingClient,
    Chunk,
    ClientError,
    EmbeddingClient,
    call_error,
    gather_bounded,
    plan_images,
    plan_multimodal,
    plan_texts,
)

SEARCH_MODELS = (contract.SEARCH_IMAGE, contract.SEARCH_TEXT, contract.SEARCH_MULTIMODAL)
OUTPUTS = (contract.IDS, contract.SCORES, contract.ITEM_METADATA)
Categories = str | Iterable[str] | None


def search_parameters(model: str, k: int, categories: Categories) -> dict[str, Any]:
    """The request parameters of one search; k's upper bound (the gallery size) is the server's to check."""
    if not is_positive_int(k):
        raise ClientError(f"{model}: k={k!r}; expected a positive int (results per query)", model=model)
    params: dict[str, Any] = {contract.K_PARAM: int(k)}
    if categories is not None:
        cats = [categories] if isinstance(categories, str) else list(categories)
        if not cats or not all(isinstance(c, str) for c in cats):
            raise ClientError(f"{model}: categories={categories!r}; expected a str or a non-empty list of str")
        params[contract.CATEGORIES_PARAM] = json.dumps(cats)
    return params


def with_parameters(chunks: list[Chunk], params: dict[str, Any]) -> list[Chunk]:
    return [replace(c, parameters={**(c.parameters or {}), **params}) for c in chunks]


def parse_results(chunk: Chunk, result: Any) -> list[list[SearchResult]]:
    """One response -> per query row, its results best first; padding (id -1, from a filter) is dropped."""
    n = chunk.stop - chunk.start
    arrays = {spec.name: result.as_numpy(spec.name) for spec in OUTPUTS}
    ids, scores, metas = arrays[contract.IDS.name], arrays[contract.SCORES.name], arrays[contract.ITEM_METADATA.name]
    if any(a is None or a.ndim != 2 or a.shape[0] != n for a in (ids, scores, metas)) or not (
        ids.shape == scores.shape == metas.shape
    ):
        shapes = {k: None if a is None else tuple(a.shape) for k, a in arrays.items()}
        raise ClientError(
            f"{chunk.model}: outputs came back as {shapes}; expected ({n}, k) each for {chunk.describe()}",
            model=chunk.model,
        )
    return [_row(ids[r], scores[r], metas[r]) for r in range(n)]


def _row(ids: np.ndarray, scores: np.ndarray, metas: np.ndarray) -> list[SearchResult]:
    out: list[SearchResult] = []
    for i, s, m in zip(ids.tolist(), scores.tolist(), metas.tolist()):
        if i < 0:
            continue
        meta = json.loads(m.decode("utf-8") if isinstance(m, bytes) else m)
        out.append(
            SearchResult(
                len(out) + 1, int(i), float(s), meta.get("title"), meta.get("category"), meta.get("image"), meta
            )
        )
    return out


def _check_mode(mode: str) -> None:
    if mode != "fusion":
        raise ValueError(
            f"mode={mode!r}: server-side search does fusion only (refine needs the gallery embeddings, which stay "
            "in the server); use SearchService with a local index for refine"
        )


class SearchClient(EmbeddingClient):
    """Blocking client of the search ensembles (and, inherited, of the embedding ensembles)."""

    def wait_ready(self, timeout: float = 60.0, models: Sequence[str] = SEARCH_MODELS) -> None:
        super().wait_ready(timeout, models)

    # --- batches: one list of results per query --------------------------------------------------------------
    def search_images(
        self, images: Sequence[bytes], k: int = contract.DEFAULT_K, *, categories: Categories = None
    ) -> list[list[SearchResult]]:
        m = contract.SEARCH_IMAGE
        chunks = plan_images(images, self.max_batch, m)
        return self._search(with_parameters(chunks, search_parameters(m, k, categories)))

    def search_texts(
        self, texts: Sequence[str], k: int = contract.DEFAULT_K, *, categories: Categories = None
    ) -> list[list[SearchResult]]:
        m = contract.SEARCH_TEXT
        chunks = plan_texts(texts, self.max_batch, m)
        return self._search(with_parameters(chunks, search_parameters(m, k, categories)))

    def search_multimodal(
        self,
        images: Sequence[bytes],
        texts: Sequence[str],
        k: int = contract.DEFAULT_K,
        *,
        image_weight: float | None = None,
        categories: Categories = None,
    ) -> list[list[SearchResult]]:
        m = contract.SEARCH_MULTIMODAL
        chunks = plan_multimodal(images, texts, image_weight, self.max_batch, m)
        return self._search(with_parameters(chunks, search_parameters(m, k, categories)))

    # --- one query, as SearchService ---------------------------------------------------------------------------
    def by_image(
        self, image: bytes, k: int = contract.DEFAULT_K, *, categories: Categories = None
    ) -> list[SearchResult]:
        return self.search_images([image], k, categories=categories)[0]

    def by_text(self, text: str, k: int = contract.DEFAULT_K, *, categories: Categories = None) -> list[SearchResult]:
        return self.search_texts([text], k, categories=categories)[0]

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
    ) -> list[SearchResult]:
        """`client.search.Searcher.by_image_text`; the server fuses, so `text_weight` and `top_n` (refine's) are
        accepted for the shared signature and a refine `mode` is refused."""
        _check_mode(mode)
        return self.search_multimodal([image], [text], k, image_weight=image_weight, categories=categories)[0]

    # --- gallery updates -------------------------------------------------------------------------------------
    def reload_gallery(self) -> None:
        """Load the latest installed gallery (the newest `knn` version) through the model-control API, then the
        search ensembles. Triton loads the new version next to the old one and retires the old one after its
        requests in flight are answered. Needs a server started with explicit model control (the default of
        mim.serving.server). With several replicas, every one of them loads it."""
        for replica in self.replicas.replicas:
            for model in (contract.KNN, *SEARCH_MODELS):
                try:
                    replica.client.load_model(model, client_timeout=max(self.timeout_s, 120))
                except InferenceServerException as e:
                    raise call_error(model)(e, replica.url, 1) from None

    def _search(self, chunks: list[Chunk]) -> list[list[SearchResult]]:
        return [row for c in chunks for row in self._infer(c, OUTPUTS, parse_results)]


class AsyncSearchClient(AsyncEmbeddingClient):
    """Coroutine twin of `SearchClient`; the chunks of one call run concurrently (at most `max_concurrency`)."""

    async def wait_ready(self, timeout: float = 60.0, models: Sequence[str] = SEARCH_MODELS) -> None:
        await super().wait_ready(timeout, models)

    async def search_images(
        self, images: Sequence[bytes], k: int = contract.DEFAULT_K, *, categories: Categories = None
    ) -> list[list[SearchResult]]:
        m = contract.SEARCH_IMAGE
        chunks = plan_images(images, self.max_batch, m)
        return await self._search(with_parameters(chunks, search_parameters(m, k, categories)))

    async def search_texts(
        self, texts: Sequence[str], k: int = contract.DEFAULT_K, *, categories: Categories = None
    ) -> list[list[SearchResult]]:
        m = contract.SEARCH_TEXT
        chunks = plan_texts(texts, self.max_batch, m)
        return await self._search(with_parameters(chunks, search_parameters(m, k, categories)))

    async def search_multimodal(
        self,
        images: Sequence[bytes],
        texts: Sequence[str],
        k: int = contract.DEFAULT_K,
        *,
        image_weight: float | None = None,
        categories: Categories = None,
    ) -> list[list[SearchResult]]:
        m = contract.SEARCH_MULTIMODAL
        chunks = plan_multimodal(images, texts, image_weight, self.max_batch, m)
        return await self._search(with_parameters(chunks, search_parameters(m, k, categories)))

    async def by_image(
        self, image: bytes, k: int = contract.DEFAULT_K, *, categories: Categories = None
    ) -> list[SearchResult]:
        return (await self.search_images([image], k, categories=categories))[0]

    async def by_text(
        self, text: str, k: int = contract.DEFAULT_K, *, categories: Categories = None
    ) -> list[SearchResult]:
        return (await self.search_texts([text], k, categories=categories))[0]

    async def by_image_text(
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
    ) -> list[SearchResult]:
        _check_mode(mode)
        found = await self.search_multimodal([image], [text], k, image_weight=image_weight, categories=categories)
        return found[0]

    async def _search(self, chunks: list[Chunk]) -> list[list[SearchResult]]:
        parts = await gather_bounded(lambda c: self._infer(c, OUTPUTS, parse_results), chunks, self.max_concurrency)
        return [row for part in parts for row in part]
