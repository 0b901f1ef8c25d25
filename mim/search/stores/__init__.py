"""One interface for a gallery of embeddings, and a registry that opens one from a path or a URI.

The location picks the implementation, the way fsspec maps a protocol to a filesystem class: `REGISTRY` maps
each implementation's name to its class ("module:Class", imported on first use, with what to install when the
import fails) and to the locations it serves:

    gallery.safetensors                 exact: the embedded exact index (`stores.exact.ExactStore`, a KnnIndex
                                        persisted as one safetensors file); NumPy on the CPU, CuPy on the GPU
    gallery.db   or   gallery.db#name   milvus: a Milvus Lite data folder (collection `name`, default `gallery`)
    http://host:19530#name              milvus: a Milvus server or cluster; the token comes from $MILVUS_TOKEN

`open_store(location, dim=..., model_id=..., expected_model_id=..., options={...})` hands `options` to the
implementation untouched (the exact index takes `device`; Milvus takes `index` and `timeout_s`): callers never
name an implementation, and one it does not understand is refused with the ones it takes. Every implementation
is a class with `open(location, *, dim, model_id, expected_model_id, **options)`, `exists(location)` and
`destroy(location)` class methods, and the `VectorStore` members below; adding one is a module and a line in
REGISTRY, and tests/test_store_conformance.py runs the same suite against each.

All keep the search contract written at the top of `mim.search.knn`: inner-product scores, (Q, k) arrays best
first, padding id -1 / score -inf where a category filter leaves fewer than k items, k above the gallery
size refused. All record the embedding model's identity and refuse to be opened for another model.

May import: `mim.search.knn` and the top-level helpers; the implementations are imported by name only.
"""

from __future__ import annotations

import importlib
import inspect
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mim.errors import SearchError


class StoreError(SearchError):
    """A store that cannot be reached or used (a server that does not answer, a folder in use); its message
    says why and what to do. Input errors stay ValueError / KeyError / FileNotFoundError."""


@dataclass(frozen=True)
class Registration:
    """One implementation: its class, the locations it serves, and how to get it where it is not installed."""

    target: str  # "module:Class"
    describe: str  # the locations it serves, for messages
    suffixes: tuple[str, ...] = ()  # a location ending in one (before any "#fragment") is served by it
    schemes: tuple[str, ...] = ()  # a location starting with one is served by it
    install: str = ""  # what to install when the module does not import

    def serves(self, location: str) -> bool:
        return location.startswith(self.schemes) or location.partition("#")[0].endswith(self.suffixes)


REGISTRY: dict[str, Registration] = {
    "exact": Registration(
        "mim.search.stores.exact:ExactStore", "a KnnIndex file (*.safetensors)", suffixes=(".safetensors",)
    ),
    "milvus": Registration(
        "mim.search.stores.milvus:MilvusStore",
        "a Milvus Lite folder (*.db[#collection]) or a Milvus URI (http://host:19530[#collection])",
        suffixes=(".db",),
        schemes=("http://", "https://", "tcp://"),
        install="pip install -e '.[milvus]' (pymilvus and milvus-lite)",
    ),
}


@runtime_checkable
class VectorStore(Protocol):
    """What indexing and search need from a gallery; every registered implementation has these members."""

    @property
    def dim(self) -> int: ...

    @property
    def model_id(self) -> str | None: ...

    @property
    def ids(self) -> np.ndarray:
        """Every id held, ascending, int64 (N,)."""
        ...

    @property
    def location(self) -> str:
        """Where the store lives: what `open_store` was given (a Milvus location with its collection)."""
        ...

    @property
    def count(self) -> int:
        """Items held as far as this handle knows, without a request: exact for a store no other process
        writes to. `len(store)` asks the store itself (a network request on a server)."""
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

    def vectors(self, ids: Any) -> np.ndarray:
        """(n, dim) float32 stored embeddings of `ids`, in the order given; an id not held -> KeyError."""
        ...

    def save(self) -> None:
        """Make everything added so far durable at the store's location."""
        ...

    def close(self) -> None:
        """Release what the store holds (a connection, a lock); the store is not used afterwards."""
        ...

    def drop(self) -> None:
        """Delete the whole gallery at the location."""
        ...


def describe_locations() -> str:
    """Every kind of location the registry serves, for messages and --help."""
    return ", ".join(r.describe for r in REGISTRY.values())


def implementation(location: str | os.PathLike) -> str:
    """The registry name of the implementation that serves `location`; ValueError when none does."""
    text = str(location)
    for name, reg in REGISTRY.items():
        if reg.serves(text):
            return name
    raise ValueError(f"store location {text!r} is not {describe_locations()}")


def store_class(location: str | os.PathLike) -> type:
    """The class serving `location`, imported now; ImportError names what to install."""
    reg = REGISTRY[implementation(location)]
    module, _, cls = reg.target.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        hint = f"; install it with {reg.install}" if reg.install else ""
        raise ImportError(f"the store for {str(location)!r} needs {e.name or e}{hint}") from e


def store_exists(location: str | os.PathLike) -> bool:
    """Whether `open_store(location)` would find a gallery there (without creating anything)."""
    return bool(store_class(location).exists(str(location)))


def open_store(
    location: str | os.PathLike,
    *,
    dim: int | None = None,
    model_id: str | None = None,
    expected_model_id: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> VectorStore:
    """Open the gallery at `location`, or create an empty one when there is none and `dim` is given.

    Args:
        dim, model_id: used only to create a new gallery.
        expected_model_id: an existing gallery built with another model is refused (ValueError naming both).
        options: handed to the implementation as they are (see REGISTRY's classes); one it does not take is
            refused with a ValueError listing those it does.
    """
    cls = store_class(location)
    options = check_options(location, options)
    return cls.open(str(location), dim=dim, model_id=model_id, expected_model_id=expected_model_id, **options)


def check_options(location: str | os.PathLike, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """`options` for the store at `location`, checked without touching it: one the implementation does not
    take is refused (ValueError listing those it does), and an implementation with a `check_options` class
    method validates the values (e.g. a Milvus index spec). Lets a command refuse a bad option before it
    contacts a server or writes anything."""
    cls = store_class(location)
    options = dict(options or {})
    accepted = [
        p.name for p in inspect.signature(cls.open).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted) - {"dim", "model_id", "expected_model_id"})
    if unknown:
        own = [a for a in accepted if a not in ("dim", "model_id", "expected_model_id")]
        raise ValueError(
            f"store option(s) {unknown} are not understood by the {implementation(location)} store of "
            f"{str(location)!r}; it takes {own}"
        )
    if hasattr(cls, "check_options"):
        cls.check_options(**options)
    return options


def delete_store(location: str | os.PathLike) -> None:
    """Delete the gallery at `location` if there is one, even one that no longer opens (damaged, other model)."""
    store_class(location).destroy(str(location))


def upsert(
    store: VectorStore, ids: Any, embeddings: Any, metadata: Sequence[Mapping[str, Any]] | None = None, **kw: Any
) -> None:
    """Add items, replacing those whose id is already held (their embedding and metadata)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    held = np.intersect1d(ids, store.ids)
    if held.size:
        store.remove(held)
    store.add(ids, embeddings, metadata, **kw)


def gallery_file(store: VectorStore, copy_to: str | os.PathLike | None = None) -> Path:
    """A KnnIndex file holding the store's saved gallery (what the served `knn` model loads): the store's own
    file when it is one, else a copy of every item written to `copy_to` (default: a new temporary folder)."""
    if implementation(store.location) == "exact":
        return Path(store.location)
    from mim.search.knn import KnnIndex

    path = Path(copy_to) if copy_to is not None else Path(tempfile.mkdtemp(prefix="gallery-")) / "gallery.safetensors"
    ids = store.ids
    copy = KnnIndex(store.dim, device="cpu", model_id=store.model_id)
    copy.add(ids, store.vectors(ids), [store.get_metadata(i) for i in ids.tolist()])
    path.parent.mkdir(parents=True, exist_ok=True)
    copy.save(path)
    return path
