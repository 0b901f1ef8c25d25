"""One interface for a gallery of embeddings, and the function that opens one from a path or a URI.

Two implementations share it:

* `mim.search.knn.KnnIndex`: the embedded exact index (NumPy on the CPU, CuPy on the GPU), persisted as one
  safetensors file. The default: exact, no service to run, fast up to a few million items.
* `mim.search.stores.milvus.MilvusStore`: a Milvus collection through `pymilvus.MilvusClient`, for a catalog that
  outgrows one process's memory. A local ``.db`` path runs Milvus Lite in-process; an ``http(s)://`` URI
  connects to a Milvus server or cluster (GPU indexes live there).

A location picks the implementation (`open_store`):

    gallery.safetensors                 KnnIndex file
    gallery.db   or   gallery.db#name   Milvus Lite data folder (collection `name`, default `gallery`)
    http://host:19530#name              Milvus server or cluster; the token comes from $MILVUS_TOKEN

Both keep the search contract written at the top of `mim.search.knn`: inner-product scores, (Q, k) arrays best
first, padding id -1 / score -inf where a category filter leaves fewer than k items, k above the gallery
size refused. Both record the embedding model's identity and refuse to be opened for another model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mim.search.stores.milvus import MILVUS_LITE_SUFFIX, is_milvus_location

KNN_SUFFIX = ".safetensors"


@runtime_checkable
class VectorStore(Protocol):
    """What indexing and search need from a gallery. `KnnIndex` has exactly these members."""

    @property
    def dim(self) -> int: ...

    @property
    def model_id(self) -> str | None: ...

    @property
    def ids(self) -> np.ndarray:
        """Every id held, ascending, int64 (N,)."""
        ...

    def __len__(self) -> int: ...

    def add(
        self, ids: Any, embeddings: Any, metadata: Sequence[Mapping[str, Any]] | None = None, *, normalize: bool = False
    ) -> None:
        """Add new items; an id already held is refused (use `upsert` to replace)."""
        ...

    def remove(self, ids: Any) -> None:
        """Remove items; an id not held raises KeyError and nothing is removed."""
        ...

    def search(
        self, queries: Any, k: int, *, categories: str | Iterable[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) queries -> scores float32 (Q, k) and ids int64 (Q, k), best first."""
        ...

    def get_metadata(self, id: int) -> dict: ...

    def save(self, path: str | os.PathLike) -> None:
        """Make everything added so far durable at `path` (the location the store was opened from)."""
        ...


def describe_locations() -> str:
    return (
        f"a KnnIndex file (*{KNN_SUFFIX}), a Milvus Lite folder (*{MILVUS_LITE_SUFFIX}[#collection]) or a Milvus "
        "URI (http://host:19530[#collection])"
    )


def store_exists(location: str | os.PathLike) -> bool:
    """Whether `open_store(location)` would find a gallery there (without creating anything)."""
    if is_milvus_location(location):
        from mim.search.stores.milvus import MilvusStore

        return MilvusStore.exists(str(location))
    return Path(location).exists()


def open_store(
    location: str | os.PathLike,
    *,
    dim: int | None = None,
    model_id: str | None = None,
    expected_model_id: str | None = None,
    device: str = "auto",
    milvus_index: Any = None,
) -> VectorStore:
    """Open the gallery at `location`, or create an empty one when there is none and `dim` is given.

    Args:
        dim, model_id: used only to create a new gallery.
        expected_model_id: an existing gallery built with another model is refused (ValueError naming both).
        device: KnnIndex only ("auto", "cpu", "cuda").
        milvus_index: a `mim.search.stores.milvus.MilvusIndexConfig` (index type and search parameters); Milvus only.
    """
    text = str(location)
    if is_milvus_location(text):
        from mim.search.stores.milvus import MilvusStore

        return MilvusStore.open(
            text, dim=dim, model_id=model_id, expected_model_id=expected_model_id, index=milvus_index
        )
    if not text.endswith(KNN_SUFFIX):
        raise ValueError(f"store location {text!r} is not {describe_locations()}")
    from mim.search.knn import KnnIndex

    path = Path(text)
    if path.exists():
        return KnnIndex.load(path, expected_model_id=expected_model_id, device=device)
    if dim is None:
        raise FileNotFoundError(f"no gallery at {path}; build it first (index command) or check the path")
    return KnnIndex(dim, device=device, model_id=model_id)


def upsert(
    store: VectorStore, ids: Any, embeddings: Any, metadata: Sequence[Mapping[str, Any]] | None = None, **kw: Any
) -> None:
    """Add items, replacing those whose id is already held (their embedding and metadata)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    held = np.intersect1d(ids, store.ids)
    if held.size:
        store.remove(held)
    store.add(ids, embeddings, metadata, **kw)
