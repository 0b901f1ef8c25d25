"""A gallery in a Milvus collection, through `pymilvus.MilvusClient`: the `mim.search.stores.VectorStore` for catalogs
that outgrow one process.

    store = MilvusStore.open("gallery.db", dim=512, model_id="3f2a...")        # Milvus Lite, in-process
    store = MilvusStore.open("http://10.0.0.5:19530#products", expected_model_id="3f2a...")   # server/cluster
    store.add(ids, embeddings, [{"title": ..., "category": ..., "image": ...}, ...])
    store.save()                                                               # flush
    scores, ids = store.search(queries, k=10, categories={"mug"})

Schema (one collection per gallery):

    id        INT64 primary key (the product id; ids are >= 0 as in KnnIndex)
    vector    FLOAT_VECTOR(dim), L2-normalised; metric IP, so scores are cosines as in KnnIndex
    category  VARCHAR   the filter field ("" = none)
    title     VARCHAR
    image     VARCHAR   path of the product image
    extra     JSON      any other metadata keys

The collection's properties hold the format name and the embedding model's identity (`model_id`), so a gallery
is refused when opened for another model, as a KnnIndex file is.

Index types (`MilvusIndexConfig`): FLAT is exact (same ids as KnnIndex up to ties) and the default; HNSW (ef)
and IVF_FLAT (nprobe) trade recall for speed; GPU_CAGRA and GPU_IVF_FLAT exist only on a Milvus server with
GPUs. Every one is built with metric IP on normalised rows, which the GPU indexes require (they have no COSINE).

Rows inserted but not flushed are searched by brute force (10-30x slower at scale), so `save()` flushes, and
so does an `add` of `FLUSH_ROWS` rows or more. A Milvus Lite data folder can be opened by one process at a
time; to share one, run `python -m milvus_lite server --data-dir FOLDER --port P` and connect by URI.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mim.checks import is_positive_int
from mim.errors import SearchInputError
from mim.search.knn import DEFAULT_NORM_TOL, check_categories, check_ids, check_matrix, check_metadata
from mim.search.stores import StoreError

# Locations (which ones come here is the store registry's, mim.search.stores.REGISTRY): a local folder runs
# Milvus Lite in-process, a URI reaches a server; an optional "#name" picks the collection.
MILVUS_TOKEN_ENV = "MILVUS_TOKEN"  # a token is a secret: taken from the environment, never from a flag
DEFAULT_COLLECTION = "gallery"


def split_collection(location: str) -> tuple[str, str]:
    """ "uri#name" -> ("uri", "name"); without a fragment the collection is `DEFAULT_COLLECTION`."""
    uri, _, name = str(location).partition("#")
    return uri, name or DEFAULT_COLLECTION


FORMAT = "mim-gallery/1"
PROP_FORMAT = "mim.format"
PROP_MODEL_ID = "mim.model_id"  # JSON: a string, or null for a gallery of unknown origin

ID, VECTOR, CATEGORY, TITLE, IMAGE, EXTRA = "id", "vector", "category", "title", "image", "extra"
TEXT_FIELDS = {CATEGORY: 512, TITLE: 2048, IMAGE: 4096}  # VARCHAR max_length (characters)

MAX_TOPK = 16384  # Milvus refuses a larger limit
INSERT_ROWS = 2000  # rows per insert request: 2000 x 512 fp32 = 4 MB, well under gRPC's 64 MB message cap
QUERY_IDS = 1000  # ids per `id in [...]` expression
SEARCH_QUERIES = 256  # queries per search request
FLUSH_ROWS = 10000  # an add this large flushes at once
CONNECT_TIMEOUT_S = 10.0
INDEX_WAIT_S = 1800.0  # how long `save` waits for the index build to catch up (HNSW on 1e7 rows takes long)


class MilvusStoreError(StoreError):
    """Milvus could not be reached or opened; the message names the URI and what to do."""


class MilvusIndexError(SearchInputError):
    """An index type or parameter Milvus would not take, or another index than the collection's."""


# --- index configuration -----------------------------------------------------------------------------------
# Build and search parameters per index type. HNSW: M (graph degree) and efConstruction at build, ef (>= k) at
# search. IVF_FLAT: nlist cells (about sqrt(N) up to 4*sqrt(N)), nprobe cells searched. GPU_CAGRA: graph
# degrees at build, itopk_size (>= k) at search.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "FLAT": ({}, {}),
    "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 64}),
    "IVF_FLAT": ({"nlist": 1024}, {"nprobe": 16}),
    "GPU_CAGRA": ({"intermediate_graph_degree": 64, "graph_degree": 32}, {"itopk_size": 128}),
    "GPU_IVF_FLAT": ({"nlist": 1024}, {"nprobe": 16}),
}
SEARCH_KEYS = {"ef", "nprobe", "itopk_size", "search_width"}


@dataclass(frozen=True)
class MilvusIndexConfig:
    """The vector index: type, build parameters (used when a collection is created) and search parameters."""

    index_type: str = "FLAT"
    build: Mapping[str, Any] = field(default_factory=dict)
    search: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def named(cls, index_type: str, **params: Any) -> MilvusIndexConfig:
        """A preset with overrides, e.g. named("HNSW", ef=128) or named("IVF_FLAT", nlist=256, nprobe=8)."""
        kind = index_type.upper()
        if kind not in PRESETS:
            raise MilvusIndexError(f"index type {index_type!r} is not one of {sorted(PRESETS)}")
        build, search = dict(PRESETS[kind][0]), dict(PRESETS[kind][1])
        allowed = {*build, *search} | ({"search_width"} if kind == "GPU_CAGRA" else set())
        unknown = sorted(set(params) - allowed)
        if unknown:
            known = sorted(allowed) or "none"
            raise MilvusIndexError(f"{kind} takes no parameter {', '.join(unknown)}; expected one of: {known}")
        for key, value in params.items():
            (search if key in SEARCH_KEYS else build)[key] = value
        return cls(kind, build, search)

    @classmethod
    def parse(cls, text: str) -> MilvusIndexConfig:
        """ "HNSW", "HNSW:ef=128", "IVF_FLAT:nlist=256,nprobe=8" (the command-line form)."""
        kind, _, rest = text.partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise MilvusIndexError(f"index parameter {item!r} in {text!r}; expected key=value (e.g. HNSW:ef=128)")
            params[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
        return cls.named(kind.strip(), **params)


# --- connection ----------------------------------------------------------------------------------------------
def _is_lite(uri: str) -> bool:
    return "://" not in uri  # a folder path; a server is reached by URI


def _lite_locked(folder: Path) -> bool:
    """Whether another process holds Milvus Lite's lock on `folder` (an flock on its LOCK file)."""
    import fcntl

    from milvus_lite.db import LOCK_FILENAME

    lock = folder / LOCK_FILENAME
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def connect(uri: str, collection: str = "gallery", timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """A MilvusClient for `uri`, or MilvusStoreError saying why not and what to do (within about timeout_s)."""
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:
        raise MilvusStoreError(
            f"Milvus stores need pymilvus and milvus-lite ({exc}); install them with pip install -e '.[milvus]'"
        ) from None
    from pymilvus.exceptions import MilvusException

    if _is_lite(uri):
        folder = Path(uri).resolve()
        folder.parent.mkdir(parents=True, exist_ok=True)  # Milvus Lite creates the folder, not its parents
        locked = MilvusStoreError(
            f"{folder} is in use by another process: Milvus Lite opens a data folder in one process only. "
            f"Serve it with `python -m milvus_lite server --data-dir {folder} --port 19530` and connect "
            f"every process by URI (http://127.0.0.1:19530#{collection})"
        )
        # Milvus Lite logs its own traceback when it cannot start (a held lock, most often) before pymilvus
        # raises; the error below says what happened and what to do, so that log is muted meanwhile.
        lite_log = logging.getLogger("milvus_lite")
        level = lite_log.level
        lite_log.setLevel(logging.CRITICAL + 1)  # setLevel: clears the level cache of its child loggers
        try:
            return MilvusClient(uri=str(folder))
        except MilvusException as exc:
            if _lite_locked(folder):
                raise locked from None
            raise MilvusStoreError(f"cannot open Milvus Lite folder {folder}: {exc}") from None
        finally:
            lite_log.setLevel(level)
    try:
        return MilvusClient(uri=uri, token=os.environ.get(MILVUS_TOKEN_ENV, ""), timeout=timeout_s)
    except MilvusException as exc:
        raise MilvusStoreError(
            f"Milvus at {uri} did not answer within {timeout_s:g}s ({exc.message}); check the URI, that the server "
            f"is running and reachable, and ${MILVUS_TOKEN_ENV} if it needs a token"
        ) from None


def _release_lite(uri: str) -> None:
    """Stop the in-process Milvus Lite server of a data folder, which frees its lock for other processes."""
    from milvus_lite import server_manager_instance

    server_manager_instance.release_server(str(Path(uri).resolve()))


def _wait_lite_background(uri: str, collection: str, timeout_s: float = INDEX_WAIT_S) -> None:
    """Wait until in-process Milvus Lite has indexed what was flushed.

    Lite builds the indexes of flushed segments in a background worker and searches them by brute force until
    then (exact, slower, and not what HNSW/IVF will return). Its API has no call that waits for that worker,
    so this reaches the in-process server's collection and drains the worker (milvus-lite 3.2's
    `Collection._wait_for_bg`). Where that is missing (another milvus-lite), it fails loudly rather than return
    a gallery that silently searches by brute force."""
    from importlib.metadata import version

    from milvus_lite import server_manager_instance

    try:
        entry = server_manager_instance._servers[str(Path(uri).resolve())]
        wait = entry[1].get_collection(collection)._wait_for_bg
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        raise MilvusStoreError(
            f"cannot wait for Milvus Lite to index {uri}#{collection}: milvus-lite {version('milvus-lite')} lacks "
            f"what this store uses ({type(e).__name__}: {e}); install the pinned milvus-lite==3.2.2 "
            "(pip install -e '.[milvus]')"
        ) from e
    wait(timeout_s)


# --- filter expressions ------------------------------------------------------------------------------------------
def _quote(value: str) -> str:
    """A Milvus string literal. Backslash and double quote are escaped, so a category can never end the literal
    and inject an expression."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def category_filter(categories: str | Iterable[str]) -> str:
    cats = sorted(check_categories(categories))
    return f"{CATEGORY} in [{', '.join(_quote(c) for c in cats)}]"


def _id_filter(ids: Sequence[int]) -> str:
    return f"{ID} in [{', '.join(str(int(i)) for i in ids)}]"


# --- rows <-> metadata ---------------------------------------------------------------------------------------------
def _row(i: int, vec: np.ndarray, meta: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {ID: i, VECTOR: vec}
    for name, limit in TEXT_FIELDS.items():
        value = meta.get(name)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"id {i}: metadata[{name!r}] must be a str; got {type(value).__name__}")
        if value is not None and len(value) > limit:
            raise ValueError(f"id {i}: metadata[{name!r}] has {len(value)} characters; at most {limit} are stored")
        if name == CATEGORY and value == "":
            raise ValueError(f"id {i}: metadata['category'] is empty; leave the key out for an item with no category")
        row[name] = value or ""
    row[EXTRA] = {k: v for k, v in meta.items() if k not in TEXT_FIELDS}
    return row


def _metadata(entity: Mapping[str, Any]) -> dict[str, Any]:
    meta = dict(entity.get(EXTRA) or {})
    for name in TEXT_FIELDS:
        if entity.get(name):
            meta[name] = entity[name]
    return meta


def _unit_rows(emb: np.ndarray, normalize: bool, norm_tol: float) -> np.ndarray:
    """The rows as stored: L2-normalised here with `normalize`, else checked to be unit norm already."""
    norms = np.sqrt((emb * emb).sum(axis=1))  # (n,)
    if normalize:
        zero = np.nonzero(norms == 0)[0]
        if zero.size:
            raise ValueError(f"embeddings row {int(zero[0])} is all zeros and cannot be normalised")
        return emb / norms[:, None]
    off = np.nonzero(np.abs(norms - 1) > norm_tol)[0]
    if off.size:
        r = int(off[0])
        raise ValueError(
            f"embeddings row {r} has L2 norm {float(norms[r]):.6g}; expected unit norm (|norm - 1| <= {norm_tol:g}). "
            "Normalise rows first or pass normalize=True."
        )
    return emb


# --- the store --------------------------------------------------------------------------------------------------
class MilvusStore:
    """A gallery in one Milvus collection. Create or open it with `MilvusStore.open` (or `stores.open_store`)."""

    def __init__(
        self, client: Any, uri: str, collection: str, dim: int, model_id: str | None, index: MilvusIndexConfig
    ) -> None:
        self._client, self.uri, self.collection = client, uri, collection
        self._dim, self._model_id, self.index = dim, model_id, index
        self._count: int | None = None  # items as this handle knows them (see `count`)

    # ---- opening --------------------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, index: MilvusIndexConfig | str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """The options' values checked without a server: an index spec that does not parse is refused."""
        if isinstance(index, str):
            MilvusIndexConfig.parse(index)

    @classmethod
    def open(
        cls,
        location: str,
        *,
        dim: int | None = None,
        model_id: str | None = None,
        expected_model_id: str | None = None,
        index: MilvusIndexConfig | str | None = None,
        timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> MilvusStore:
        """Open the collection at `location` ("uri#collection"), or create it when absent and `dim` is given.

        index: the index a new collection is built with (a MilvusIndexConfig, or its text form "HNSW:ef=128");
        an existing collection keeps its own, with these search parameters where the type matches."""
        if isinstance(index, str):
            index = MilvusIndexConfig.parse(index)
        uri, name = split_collection(location)
        client = connect(uri, name, timeout_s)
        try:
            if client.has_collection(name):
                store = cls._existing(client, uri, name, index)
                if expected_model_id is not None and store.model_id != expected_model_id:
                    raise ValueError(
                        f"{location} was built with model_id={store.model_id!r} but expected_model_id="
                        f"{expected_model_id!r}; re-embed the gallery with the expected model or search it with "
                        "the matching model"
                    )
                return store
            if dim is None:
                raise FileNotFoundError(f"no gallery collection {name!r} at {uri}; build it first (index command)")
            return cls._create(client, uri, name, dim, model_id, index or MilvusIndexConfig())
        except BaseException:
            cls._close_client(client, uri)
            raise

    @staticmethod
    def exists(location: str) -> bool:
        uri, name = split_collection(location)
        if _is_lite(uri) and not Path(uri).exists():
            return False  # do not create an empty data folder just to look
        client = connect(uri, name)
        try:
            return bool(client.has_collection(name))
        finally:
            MilvusStore._close_client(client, uri)

    @classmethod
    def destroy(cls, location: str) -> None:
        """Drop the collection at `location` if it exists (whatever it holds)."""
        if not cls.exists(location):
            return
        uri, name = split_collection(location)
        client = connect(uri, name)
        try:
            client.drop_collection(name)
        finally:
            cls._close_client(client, uri)

    @classmethod
    def _existing(cls, client: Any, uri: str, name: str, index: MilvusIndexConfig | None) -> MilvusStore:
        desc = client.describe_collection(name)
        props = desc.get("properties") or {}
        fields = {f["name"]: f for f in desc["fields"]}
        if props.get(PROP_FORMAT) != FORMAT or VECTOR not in fields:
            raise ValueError(
                f"collection {name!r} at {uri} is not a gallery written by this package (format "
                f"{props.get(PROP_FORMAT)!r}, fields {sorted(fields)}); use another collection name (uri#name)"
            )
        dim = int(fields[VECTOR]["params"]["dim"])
        model_id = json.loads(props.get(PROP_MODEL_ID, "null"))
        built = client.describe_index(name, VECTOR) or {}
        kind = str(built.get("index_type", "FLAT")).upper()
        if index is not None and index.index_type != kind:
            # Keeping the old index silently would measure another index than the one asked for.
            raise MilvusIndexError(
                f"collection {name!r} at {uri} has a {kind} index, not the {index.index_type} asked for; "
                f"expected the same type: give --milvus-index {kind}, or another collection (uri#name) for "
                f"{index.index_type}"
            )
        if index is None:
            # The search parameters must suit the index the collection was built with.
            index = MilvusIndexConfig.named(kind) if kind in PRESETS else MilvusIndexConfig(kind)
        client.load_collection(name)
        return cls(client, uri, name, dim, model_id, index)

    @classmethod
    def _create(
        cls, client: Any, uri: str, name: str, dim: int, model_id: str | None, index: MilvusIndexConfig
    ) -> MilvusStore:
        from pymilvus import DataType, MilvusClient

        if not is_positive_int(dim):
            raise ValueError(f"dim must be a positive int; got {dim!r}")
        if model_id is not None and not isinstance(model_id, str):
            raise TypeError(f"model_id must be a str or None; got {type(model_id).__name__}")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=int(dim))
        for fname, limit in TEXT_FIELDS.items():
            schema.add_field(fname, DataType.VARCHAR, max_length=limit)
        schema.add_field(EXTRA, DataType.JSON)
        params = client.prepare_index_params()
        # Build parameters nested under "params" (the classic wire form): Milvus servers read it, and Milvus Lite
        # reads only that form (it ignores parameters sent as top-level keys).
        params.add_index(
            field_name=VECTOR, index_type=index.index_type, metric_type="IP", params={"params": dict(index.build)}
        )
        client.create_collection(
            name,
            schema=schema,
            index_params=params,
            consistency_level="Strong",  # a search sees every add that returned, as with KnnIndex
            properties={PROP_FORMAT: FORMAT, PROP_MODEL_ID: json.dumps(model_id)},
        )
        store = cls(client, uri, name, int(dim), model_id, index)
        store._count = 0  # just created
        return store

    # ---- properties -----------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def model_id(self) -> str | None:
        return self._model_id

    @property
    def location(self) -> str:
        return f"{self.uri}#{self.collection}"

    def __len__(self) -> int:
        """The collection's row count, asked of Milvus (a request); refreshes `count`."""
        res = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        self._count = int(res[0]["count(*)"])
        return self._count

    @property
    def count(self) -> int:
        """Rows as this handle knows them: asked once, then kept up to date by this handle's adds and removes
        (no request per search). Rows another process adds count after `len(store)` or a reopen."""
        if self._count is None:
            return len(self)
        return self._count

    def __repr__(self) -> str:
        return (
            f"MilvusStore({self.location!r}, dim={self._dim}, index={self.index.index_type}, "
            f"model_id={self._model_id!r})"
        )

    @property
    def ids(self) -> np.ndarray:
        """Every id held, ascending (one pass over the collection with a query iterator)."""
        it = self._client.query_iterator(self.collection, batch_size=10000, filter="", output_fields=[ID])
        out: list[int] = []
        try:
            while batch := it.next():
                out.extend(int(r[ID]) for r in batch)
        finally:
            it.close()
        return np.sort(np.asarray(out, dtype=np.int64))

    def get_metadata(self, id: int) -> dict:
        """The metadata stored for `id` ({} if none was given). Unknown id -> KeyError."""
        rows = self._client.get(self.collection, ids=[int(id)], output_fields=[*TEXT_FIELDS, EXTRA])
        if not rows:
            raise KeyError(f"id {int(id)} is not in the gallery {self.location}")
        return _metadata(rows[0])

    def vectors(self, ids: Any) -> np.ndarray:
        """(n, dim) float32 stored embeddings of `ids`, in the order given; an id not held -> KeyError."""
        ids = check_ids(ids)
        found: dict[int, Any] = {}
        for s in range(0, ids.size, QUERY_IDS):
            part = ids[s : s + QUERY_IDS].tolist()
            for r in self._client.get(self.collection, ids=part, output_fields=[VECTOR]):
                found[int(r[ID])] = r[VECTOR]
        missing = [i for i in ids.tolist() if i not in found]
        if missing:
            raise KeyError(f"id {missing[0]} is not in the gallery {self.location}")
        return np.asarray([found[i] for i in ids.tolist()], dtype=np.float32).reshape(ids.size, self._dim)

    def _held(self, ids: np.ndarray) -> np.ndarray:
        """The subset of `ids` already in the collection."""
        held: list[int] = []
        for s in range(0, ids.size, QUERY_IDS):
            part = ids[s : s + QUERY_IDS].tolist()
            rows = self._client.query(self.collection, filter=_id_filter(part), output_fields=[ID])
            held.extend(int(r[ID]) for r in rows)
        return np.asarray(sorted(held), dtype=np.int64)

    # ---- mutation -------------------------------------------------------------------------------------------
    def add(
        self,
        ids: Any,
        embeddings: Any,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        *,
        normalize: bool = False,
        norm_tol: float = DEFAULT_NORM_TOL,
    ) -> None:
        """Add new items (same checks and messages as `KnnIndex.add`); an id already held is refused."""
        ids = check_ids(ids)
        emb = check_matrix(np, embeddings, self._dim, "embeddings")
        if emb.shape[0] != ids.shape[0]:
            raise ValueError(f"got {ids.shape[0]} ids but {emb.shape[0]} embedding rows; pass one row per id")
        metas = check_metadata(metadata, ids.shape[0])
        if ids.size == 0:
            return
        emb = _unit_rows(emb.astype(np.float32), normalize, norm_tol)
        rows = [_row(i, v, m) for i, v, m in zip(ids.tolist(), emb, metas)]  # checks every row before writing
        clash = self._held(ids) if len(self) else ids[:0]  # an empty collection (a bulk load) holds none of them
        if clash.size:
            raise ValueError(
                f"id {int(clash[0])} is already in the gallery {self.location}; remove it first, use "
                "mim.search.stores.upsert, or use a new id"
            )
        for s in range(0, len(rows), INSERT_ROWS):
            self._client.insert(self.collection, rows[s : s + INSERT_ROWS])
            if self._count is not None:
                self._count += len(rows[s : s + INSERT_ROWS])
        if len(rows) >= FLUSH_ROWS:
            self.save()

    def remove(self, ids: Any) -> None:
        """Remove items by id. An id not held raises KeyError naming it (nothing is removed then)."""
        ids = check_ids(ids)
        if ids.size == 0:
            return
        missing = np.setdiff1d(ids, self._held(ids))
        if missing.size:
            raise KeyError(f"id {int(missing[0])} is not in the gallery {self.location}; nothing was removed")
        for s in range(0, ids.size, QUERY_IDS):
            self._client.delete(self.collection, ids=ids[s : s + QUERY_IDS].tolist())
            if self._count is not None:
                self._count -= len(ids[s : s + QUERY_IDS])

    def save(self, path: str | os.PathLike | None = None) -> None:
        """Flush: every row added so far is written to the collection's segments (and indexed)."""
        if path is not None and str(path) not in (self.location, self.uri):
            raise ValueError(
                f"{self!r} lives at {self.location}; it cannot be saved to {str(path)!r} (copy with the index command)"
            )
        self._client.flush(self.collection)
        if _is_lite(self.uri):
            _wait_lite_background(self.uri, self.collection)
        self._wait_indexed()

    def _wait_indexed(self, timeout_s: float = INDEX_WAIT_S) -> None:
        """Block until the vector index covers every flushed row: until then Milvus searches the rest by brute
        force, which is slower and (for HNSW/IVF) gives other results than the index will."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self._client.describe_index(self.collection, VECTOR) or {}
            pending = int(info.get("pending_index_rows", 0))
            if pending == 0 and int(info.get("indexed_rows", 0)) >= int(info.get("total_rows", 0)):
                return
            if time.monotonic() > deadline:
                raise MilvusStoreError(
                    f"{self.location}: the {self.index.index_type} index still has {pending} rows to build after "
                    f"{timeout_s:g}s; searches stay correct but slow until it is done"
                )
            time.sleep(0.2)

    def drop(self) -> None:
        """Delete the whole collection."""
        self._client.drop_collection(self.collection)

    def close(self) -> None:
        self._close_client(self._client, self.uri)

    @staticmethod
    def _close_client(client: Any, uri: str) -> None:
        client.close()
        if _is_lite(uri):
            _release_lite(uri)

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- search ---------------------------------------------------------------------------------------------
    def search(
        self, queries: Any, k: int, *, categories: str | Iterable[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product, with `KnnIndex.search`'s contract: scores float32 (Q, k) descending, ids int64
        (Q, k), equal scores by ascending id, padding -1 / -inf where a filter leaves fewer than k items."""
        n = self.count
        if n == 0:
            raise ValueError(f"the gallery {self.location} is empty; add items before searching")
        if not is_positive_int(k):
            raise ValueError(f"k must be a positive int; got {k!r}")
        k = int(k)
        if k > n:
            raise ValueError(
                f"k={k} is larger than the gallery ({n} items); expected 1 <= k <= {n}. Lower k or add items."
            )
        if k > MAX_TOPK:
            raise ValueError(f"k={k} is above Milvus's limit of {MAX_TOPK} results per query; lower k")
        q = check_matrix(np, queries, self._dim, "queries").astype(np.float32, copy=False)
        expr = category_filter(categories) if categories is not None else ""
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        params = {"metric_type": "IP", "params": dict(self.index.search)}
        for s in range(0, q.shape[0], SEARCH_QUERIES):
            hits = self._client.search(
                self.collection, data=q[s : s + SEARCH_QUERIES], limit=k, filter=expr, search_params=params
            )
            for r, row in enumerate(hits, start=s):
                # Milvus's order among equal scores is its own: make it KnnIndex's (score desc, id asc).
                best = sorted((-float(h["distance"]), int(h["id"])) for h in row)[:k]
                for c, (neg, i) in enumerate(best):
                    scores[r, c], ids[r, c] = -neg, i
        return scores, ids
