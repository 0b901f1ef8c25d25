"""Typed gRPC clients of the three embedding ensembles (`embed_image`, `embed_text`, `embed_multimodal`).

    with EmbeddingClient("127.0.0.1:8001") as c:
        c.wait_ready(60)
        gallery = c.embed_images([open(p, "rb").read() for p in paths])    # (N, D) float32, L2-normalised
        q = c.embed_multimodal([photo], ["in blue"], image_weight=0.7)      # (1, D)

Every model/tensor name, dtype and the largest batch come from `mim.contract`. Lists longer than `max_batch`
are split into server-sized requests and the rows are put back in order. A request that fails with gRPC
UNAVAILABLE (server starting, restarting, or not there) is retried with exponential backoff; nothing else is
retried, because every other failure (a bad image, a wrong tensor, a timeout) would fail again or must not be
repeated blindly. Failures raise `ClientError`, whose message names the model, the tensor, what was sent and
what was expected, and carries the server's own message verbatim.

`EmbeddingClient` is a `mim.search.embedding.Embedder`, like the in-process torch and ONNX embedders, so evaluation
and search take it unchanged. `AsyncEmbeddingClient` has the same methods as coroutines (tritonclient.grpc.aio)
and runs the chunks of one call concurrently, at most `max_concurrency` in flight.

Both take several server URLs (a list, or "h1:p1,h2:p2") for several Triton replicas serving the same
repository: requests go to healthy replicas in turn, and a request whose replica stops answering (UNAVAILABLE or
DEADLINE_EXCEEDED) is sent again at once to another one, while the failed replica is taken out and probed back
in later (`client.replicas`). With one URL the behaviour is the plain retry on UNAVAILABLE described above.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from mim import contract
from mim.checks import is_int, is_positive_int
from mim.errors import MimFailure
from mim.search import embedding

from .replicas import PROBE_TIMEOUT_S, UNAVAILABLE, Failover, ReplicaPool, ReplicaStats, parse_urls

DEFAULT_URL = "127.0.0.1:8001"
ENSEMBLES = (contract.EMBED_IMAGE, contract.EMBED_TEXT, contract.EMBED_MULTIMODAL)

T = TypeVar("T")


class ClientError(MimFailure):
    """A request that could not be answered. `status` is the gRPC status (e.g. "StatusCode.INVALID_ARGUMENT")
    when the server or the channel gave one, `server_message` the server's own words."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        tensor: str | None = None,
        status: str | None = None,
        server_message: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.model, self.tensor, self.status = model, tensor, status
        self.server_message, self.attempts = server_message, attempts


# --- retry policy ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: base * 2**i, capped, with +-25 % jitter so many clients do not retry in step."""

    base_s: float = 0.2
    cap_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.cap_s, self.base_s * 2**attempt) * random.uniform(0.75, 1.25)


# --- request building and response parsing (shared by both clients) --------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """One request: rows [start, stop) of the caller's lists."""

    model: str
    start: int
    stop: int
    inputs: dict[str, np.ndarray]  # tensor name -> (n, 1) np.object_ array of bytes
    parameters: dict[str, Any] | None = None

    def describe(self) -> str:
        shapes = ", ".join(f"{name!r} {_spec(name).dtype} shape {tuple(a.shape)}" for name, a in self.inputs.items())
        rows = f"row {self.start}" if self.stop - self.start == 1 else f"rows {self.start}..{self.stop - 1}"
        return f"{rows} sent as {shapes}"


def _spec(name: str) -> contract.TensorSpec:
    for io in contract.MODELS.values():
        for t in io.inputs + io.outputs:
            if t.name == name:
                return t
    raise KeyError(name)


def _bytes_column(spec: contract.TensorSpec, rows: Sequence[bytes]) -> np.ndarray:
    """BYTES tensors travel as (n, 1) object arrays of `bytes`: one element per batch row (dims (1,))."""
    out = np.empty((len(rows), 1), dtype=spec.numpy_dtype)
    for i, r in enumerate(rows):
        out[i, 0] = r
    return out


def image_column(model: str, images: Sequence[bytes], offset: int = 0) -> np.ndarray:
    spec = contract.IMAGE
    for i, b in enumerate(images):
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise ClientError(
                f"{model}: input {spec.name!r} row {offset + i} is {type(b).__name__}; expected the encoded image "
                "file as bytes (JPEG/PNG/WebP), e.g. Path(p).read_bytes()",
                model=model,
                tensor=spec.name,
            )
        if len(b) == 0:
            raise ClientError(
                f"{model}: input {spec.name!r} row {offset + i} is empty (0 bytes); expected an "
                "encoded JPEG/PNG/WebP file",
                model=model,
                tensor=spec.name,
            )
    return _bytes_column(spec, [bytes(b) for b in images])


def text_column(model: str, texts: Sequence[str], offset: int = 0) -> np.ndarray:
    spec = contract.TEXT
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ClientError(
                f"{model}: input {spec.name!r} row {offset + i} is {type(t).__name__}; expected str (sent as UTF-8)",
                model=model,
                tensor=spec.name,
            )
    return _bytes_column(spec, [t.encode("utf-8") for t in texts])


def _as_list(x: Sequence[Any] | bytes | str, what: str) -> list[Any]:
    if isinstance(x, (bytes, bytearray, str)):
        raise ClientError(
            f"{what} must be a list (one item per row), got a single {type(x).__name__}; wrap it "
            f"in a list: [{what[:-1]}]"
        )
    return list(x)


def check_image_weight(image_weight: float | None) -> float:
    """The weight sent as the request parameter: the same check the in-process embedders make."""
    try:
        return embedding.check_image_weight(image_weight)
    except ValueError as e:
        raise ClientError(
            f"{contract.EMBED_MULTIMODAL}: {e} (request parameter {contract.FUSION_WEIGHT_PARAM!r})",
            model=contract.EMBED_MULTIMODAL,
        ) from None


def plan_images(images: Sequence[bytes], max_batch: int, model: str = contract.EMBED_IMAGE) -> list[Chunk]:
    images = _as_list(images, "images")
    m = model
    return [
        Chunk(m, s, s + len(part), {contract.IMAGE.name: image_column(m, part, s)})
        for s, part in _chunks(images, max_batch)
    ]


def plan_texts(texts: Sequence[str], max_batch: int, model: str = contract.EMBED_TEXT) -> list[Chunk]:
    texts = _as_list(texts, "texts")
    m = model
    return [
        Chunk(m, s, s + len(part), {contract.TEXT.name: text_column(m, part, s)})
        for s, part in _chunks(texts, max_batch)
    ]


def plan_multimodal(
    images: Sequence[bytes],
    texts: Sequence[str],
    image_weight: float | None,
    max_batch: int,
    model: str = contract.EMBED_MULTIMODAL,
) -> list[Chunk]:
    images, texts = _as_list(images, "images"), _as_list(texts, "texts")
    m = model
    if len(images) != len(texts):
        raise ClientError(
            f"{m}: got {len(images)} images and {len(texts)} texts; expected one text per image "
            f"(inputs {contract.IMAGE.name!r} and {contract.TEXT.name!r} share the batch dim)",
            model=m,
        )
    params = {contract.FUSION_WEIGHT_PARAM: check_image_weight(image_weight)}
    return [
        Chunk(
            m,
            s,
            s + len(ip),
            {
                contract.IMAGE.name: image_column(m, ip, s),
                contract.TEXT.name: text_column(m, texts[s : s + len(ip)], s),
            },
            params,
        )
        for s, ip in _chunks(images, max_batch)
    ]


def _chunks(items: list[Any], size: int):
    for s in range(0, len(items), size):
        yield s, items[s : s + size]


def infer_args(chunk: Chunk, outputs: Sequence[contract.TensorSpec] = (contract.EMBEDDING,)) -> dict[str, Any]:
    """Keyword arguments of `infer` (the same InferInput/InferRequestedOutput types serve both clients)."""
    inputs = []
    for name, arr in chunk.inputs.items():
        x = grpcclient.InferInput(name, list(arr.shape), _spec(name).dtype)
        x.set_data_from_numpy(arr)
        inputs.append(x)
    requested = [grpcclient.InferRequestedOutput(spec.name) for spec in outputs]
    return {"model_name": chunk.model, "inputs": inputs, "outputs": requested, "parameters": chunk.parameters}


def parse_result(chunk: Chunk, result: Any) -> np.ndarray:
    """The (n, D) float32 embedding of one response, checked against the contract."""
    spec = contract.EMBEDDING
    out = result.as_numpy(spec.name)
    n = chunk.stop - chunk.start
    if out is None:
        raise ClientError(
            f"{chunk.model}: the response has no output {spec.name!r} ({chunk.describe()})",
            model=chunk.model,
            tensor=spec.name,
        )
    if out.dtype != spec.numpy_dtype or out.ndim != 2 or out.shape[0] != n:
        raise ClientError(
            f"{chunk.model}: output {spec.name!r} came back as {out.dtype} shape {tuple(out.shape)}; expected "
            f"{np.dtype(spec.numpy_dtype)} shape ({n}, embed_dim) for {chunk.describe()}",
            model=chunk.model,
            tensor=spec.name,
        )
    return out


def request_error(chunk: Chunk, exc: InferenceServerException, url: str, attempts: int) -> ClientError:
    status, msg = exc.status(), exc.message()
    if status == UNAVAILABLE:
        head = f"{chunk.model}: server at {url} unavailable after {attempts} attempt(s)"
        hint = "; is tritonserver running and listening there? (`make serve`, or wait_ready() first)"
    elif status == "StatusCode.DEADLINE_EXCEEDED":
        head = f"{chunk.model}: no answer from {url} within the client timeout"
        hint = "; raise timeout_s or send smaller batches (max_batch)"
    else:
        head = f"{chunk.model}: the server refused the request"
        hint = ""
    tensor = _tensor_named_in(msg or "", list(chunk.inputs))
    expected = ", ".join(
        f"{n!r} {_spec(n).dtype} shape (n, {', '.join(map(str, _spec(n).dims))}) with n <= {contract.MAX_BATCH_SIZE}"
        for n in chunk.inputs
    )
    return ClientError(
        # The cause first (the server's words), then what was sent and what the contract takes.
        f"{head}: {msg}{hint} ({status}; {chunk.describe()}; expected {expected})",
        model=chunk.model,
        tensor=tensor,
        status=status,
        server_message=msg,
        attempts=attempts,
    )


def _tensor_named_in(message: str, names: list[str]) -> str | None:
    """The input the server's message is about: the first input name it mentions as a word (the only input
    when there is one). Python-backend messages read "preprocess_text: text row 1 of 2: ..."."""
    if len(names) == 1:
        return names[0]
    hits = [(m.start(), n) for n in names for m in [re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message)] if m]
    return min(hits)[1] if hits else None


def _empty(dim: int | None) -> np.ndarray:
    return np.zeros((0, dim or 0), dtype=contract.EMBEDDING.numpy_dtype)


def _validate_settings(timeout_s: float, retries: int, max_batch: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r}; expected a positive number of seconds")
    if not is_int(retries) or retries < 0:
        raise ValueError(f"retries={retries!r}; expected an int >= 0 (retries after the first attempt)")
    if not is_int(max_batch) or not 1 <= max_batch <= contract.MAX_BATCH_SIZE:
        raise ValueError(f"max_batch={max_batch!r}; expected 1..{contract.MAX_BATCH_SIZE} (the models' max_batch_size)")


# --- the synchronous client ------------------------------------------------------------------------------------
class EmbeddingClient:
    """Blocking client, the served implementation of `mim.search.embedding.Embedder`. `retries` is the number of extra
    attempts on UNAVAILABLE (0 = try once); with several replicas an attempt sent to another replica after a
    failover counts as one of them."""

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        max_batch: int = contract.MAX_BATCH_SIZE,
        backoff: Backoff = Backoff(),
    ) -> None:
        _validate_settings(timeout_s, retries, max_batch)
        urls = parse_urls(url)
        self.url, self.timeout_s, self.retries, self.max_batch, self.backoff = (
            ",".join(urls),
            timeout_s,
            retries,
            max_batch,
            backoff,
        )
        self.replicas = ReplicaPool(urls, grpcclient.InferenceServerClient)
        self._dim: int | None = None

    @property
    def _client(self) -> Any:
        """The first replica's tritonclient (the only one with a single URL)."""
        return self.replicas.replicas[0].client

    @_client.setter
    def _client(self, client: Any) -> None:
        self.replicas.replicas[0].client = client

    @property
    def stats(self) -> ReplicaStats:
        return self.replicas.stats

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for r in self.replicas.replicas:
            r.client.close()

    def __repr__(self) -> str:
        return (
            f"EmbeddingClient(url={self.url!r}, timeout_s={self.timeout_s}, retries={self.retries}, "
            f"max_batch={self.max_batch})"
        )

    # public API
    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded image files -> (N, D) float32 L2-normalised embeddings, one row per image, in order."""
        return self._run(plan_images(images, self.max_batch))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(plan_texts(texts, self.max_batch))

    def embed_multimodal(
        self, images: Sequence[bytes], texts: Sequence[str], image_weight: float | None = None
    ) -> np.ndarray:
        """normalize(w * image + (1 - w) * text) computed by the server's `fuse` model; w defaults to the contract's."""
        return self._run(plan_multimodal(images, texts, image_weight, self.max_batch))

    def wait_ready(self, timeout: float = 60.0, models: Sequence[str] = ENSEMBLES) -> None:
        """Block until every replica is ready with every model in `models` loaded. After `timeout` s, replicas
        still not ready are taken out (and probed later) if at least one is ready; else ClientError."""
        deadline = time.monotonic() + timeout
        pending = {r.url: r for r in self.replicas.replicas}
        last = dict.fromkeys(pending, "no answer yet")
        while True:
            for url, r in list(pending.items()):
                last[url] = _readiness(r.client, models)
                if last[url] is None:
                    del pending[url]
            if not pending:
                return
            if time.monotonic() >= deadline:
                _give_up_waiting(self.replicas, pending, last, timeout)
                return
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def embed_dim(self) -> int:
        """Width of the served embedding, from the `embed_image` model metadata (cached)."""
        if self._dim is None:
            meta = self._call(
                lambda c: c.get_model_metadata(contract.EMBED_IMAGE, client_timeout=self.timeout_s),
                contract.EMBED_IMAGE,
            )
            self._dim = _dim_from_metadata(meta)
        return self._dim

    def model_config(self, model: str) -> Any:
        """The served config.pbtxt as a ModelConfig protobuf."""
        return self._call(lambda c: c.get_model_config(model, client_timeout=self.timeout_s), model).config

    # internals
    def _run(self, chunks: list[Chunk]) -> np.ndarray:
        if not chunks:
            return _empty(self.embed_dim())
        out = np.concatenate([self._infer(c) for c in chunks])
        self._dim = out.shape[1]
        return out

    def _infer(
        self,
        chunk: Chunk,
        outputs: Sequence[contract.TensorSpec] = (contract.EMBEDDING,),
        parse: Callable[[Chunk, Any], Any] = parse_result,
    ) -> Any:
        args = infer_args(chunk, outputs)
        return self._call(
            lambda client: parse(chunk, client.infer(**args, client_timeout=self.timeout_s)),
            chunk.model,
            lambda e, url, attempts: request_error(chunk, e, url, attempts),
        )

    def _call(
        self,
        fn: Callable[[Any], T],
        model: str,
        error: Callable[[InferenceServerException, str, int], ClientError] | None = None,
    ) -> T:
        """`fn(tritonclient)` on a replica; on a replica failure, again on another one (or after a backoff). The
        decisions are `Failover`'s; this loop only sends, probes and sleeps."""
        call = Failover(self.replicas, self.retries, self.backoff.delay)
        while True:
            replica = self._replica(call)
            call.sending()
            try:
                out = fn(replica.client)
                call.answered(replica)
                return out
            except InferenceServerException as e:
                wait = call.failed(replica, e.status())
                if wait is None:
                    raise (error or call_error(model))(e, replica.url, call.attempts) from None
                if wait:
                    time.sleep(wait)

    def _replica(self, call: Failover) -> Any:
        """The replica for the next attempt; one that is out is first probed with a readiness check."""
        while True:
            replica, probe = call.next()
            if not probe:
                return replica
            self.replicas.renew(replica).close()
            try:
                if replica.client.is_server_ready(client_timeout=PROBE_TIMEOUT_S):
                    return replica
            except InferenceServerException:
                pass
            self.replicas.failed(replica, probe=True)


def call_error(model: str) -> Callable[[InferenceServerException, str, int], ClientError]:
    """The ClientError for a failed non-inference call (metadata, config, model control) to a replica."""

    def make(e: InferenceServerException, url: str, attempts: int) -> ClientError:
        return ClientError(
            f"{model}: {e.status()}: {e.message()} (server {url}, {attempts} attempt(s))",
            model=model,
            status=e.status(),
            server_message=e.message(),
            attempts=attempts,
        )

    return make


def _readiness(client: Any, models: Sequence[str]) -> str | None:
    """None when the server is ready with every model in `models`, else what is missing (sync client)."""
    try:
        pending = [m for m in models if not client.is_model_ready(m, client_timeout=2.0)]
        if client.is_server_ready(client_timeout=2.0) and not pending:
            return None
        if not pending:
            return "server not ready"
        return f"models not ready: {pending}" + _why_not_ready(pending, client.get_model_repository_index(as_json=True))
    except InferenceServerException as e:
        return f"{e.status()}: {e.message()}"


GALLERY_MODELS = (contract.KNN, contract.SEARCH_IMAGE, contract.SEARCH_TEXT, contract.SEARCH_MULTIMODAL)


def _why_not_ready(pending: Sequence[str], index: Any) -> str:
    """What the server's repository index says of the pending models (state and reason of a failed load), and
    the usual cause when the gallery's models are among them: no gallery of the served encoders' model."""
    rows = {m.get("name"): m for m in (index or {}).get("models", [])}
    said = [
        f"{name}: {rows[name].get('state') or 'not loaded'}"
        + (f" ({rows[name]['reason']})" if rows[name].get("reason") else "")
        for name in pending
        if name in rows
    ]
    text = f"; {'; '.join(said)}" if said else ""
    if set(pending) & set(GALLERY_MODELS):
        text += (
            "; the knn model and the search ensembles load only with a gallery built with the served model "
            "(`mimsearch serve` prints why not): run `mimsearch index ... --install REPO`"
        )
    return text


def _give_up_waiting(pool: ReplicaPool, pending: dict[str, Any], last: dict[str, str | None], timeout: float) -> None:
    """At the wait_ready deadline: take the replicas still not ready out, or raise when none is ready."""
    if len(pending) == len(pool.replicas):
        if len(pending) == 1:
            url = next(iter(pending))
            # Nothing listening is the common first mistake: say how to get a server.
            hint = "; start one with `mimsearch serve` or give its --url" if "UNAVAILABLE" in str(last[url]) else ""
            raise ClientError(f"server at {url} not ready within {timeout:g}s (last: {last[url]}){hint}")
        why = "; ".join(f"{u}: {last[u]}" for u in pending)
        raise ClientError(f"no replica ready within {timeout:g}s (last: {why})")
    for r in pending.values():
        pool.failed(r)


def _dim_from_metadata(meta: Any) -> int:
    for out in meta.outputs:
        if out.name == contract.EMBEDDING.name:
            return int(out.shape[-1])
    raise ClientError(
        f"{meta.name}: model metadata has no output {contract.EMBEDDING.name!r}",
        model=meta.name,
        tensor=contract.EMBEDDING.name,
    )


# --- the asyncio client ----------------------------------------------------------------------------------------
async def gather_bounded(fn: Callable[[Any], Awaitable[T]], items: Sequence[Any], limit: int) -> list[T]:
    """`await fn(item)` for every item concurrently, at most `limit` at a time; results in the items' order.
    The first failure wins: the other calls are cancelled (none is left running) and it is raised."""
    gate = asyncio.Semaphore(limit)

    async def one(item: Any) -> T:
        async with gate:
            return await fn(item)

    tasks = [asyncio.ensure_future(one(item)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class AsyncEmbeddingClient:
    """Coroutine twin of `EmbeddingClient`; create and use it inside one running event loop.

    The chunks of one call are sent concurrently, at most `max_concurrency` in flight (a bound that keeps one
    big call from queueing hundreds of requests in front of everyone else's).
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        max_batch: int = contract.MAX_BATCH_SIZE,
        max_concurrency: int = 4,
        backoff: Backoff = Backoff(),
    ) -> None:
        _validate_settings(timeout_s, retries, max_batch)
        if not is_positive_int(max_concurrency):
            raise ValueError(f"max_concurrency={max_concurrency!r}; expected an int >= 1")
        urls = parse_urls(url)
        self.url, self.timeout_s, self.retries, self.max_batch, self.backoff = (
            ",".join(urls),
            timeout_s,
            retries,
            max_batch,
            backoff,
        )
        self.max_concurrency = max_concurrency
        self.replicas = ReplicaPool(urls, grpcclient_aio.InferenceServerClient)
        self._dim: int | None = None

    @property
    def _client(self) -> Any:
        return self.replicas.replicas[0].client

    @property
    def stats(self) -> ReplicaStats:
        return self.replicas.stats

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for r in self.replicas.replicas:
            await r.client.close()

    async def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        return await self._run(plan_images(images, self.max_batch))

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return await self._run(plan_texts(texts, self.max_batch))

    async def embed_multimodal(
        self, images: Sequence[bytes], texts: Sequence[str], image_weight: float | None = None
    ) -> np.ndarray:
        return await self._run(plan_multimodal(images, texts, image_weight, self.max_batch))

    async def wait_ready(self, timeout: float = 60.0, models: Sequence[str] = ENSEMBLES) -> None:
        """As `EmbeddingClient.wait_ready`."""
        deadline = time.monotonic() + timeout
        pending = {r.url: r for r in self.replicas.replicas}
        last = dict.fromkeys(pending, "no answer yet")
        while True:
            for url, r in list(pending.items()):
                last[url] = await _readiness_async(r.client, models)
                if last[url] is None:
                    del pending[url]
            if not pending:
                return
            if time.monotonic() >= deadline:
                _give_up_waiting(self.replicas, pending, last, timeout)
                return
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    async def embed_dim(self) -> int:
        if self._dim is None:
            meta = await self._call(
                lambda c: c.get_model_metadata(contract.EMBED_IMAGE, client_timeout=self.timeout_s),
                contract.EMBED_IMAGE,
            )
            self._dim = _dim_from_metadata(meta)
        return self._dim

    async def _run(self, chunks: list[Chunk]) -> np.ndarray:
        if not chunks:
            return _empty(await self.embed_dim())
        out = np.concatenate(await gather_bounded(self._infer, chunks, self.max_concurrency))
        self._dim = out.shape[1]
        return out

    async def _infer(
        self,
        chunk: Chunk,
        outputs: Sequence[contract.TensorSpec] = (contract.EMBEDDING,),
        parse: Callable[[Chunk, Any], Any] = parse_result,
    ) -> Any:
        args = infer_args(chunk, outputs)
        result = await self._call(
            lambda c: c.infer(**args, client_timeout=self.timeout_s),
            chunk.model,
            lambda e, url, attempts: request_error(chunk, e, url, attempts),
        )
        return parse(chunk, result)

    async def _call(
        self,
        fn: Callable[[Any], Any],
        model: str,
        error: Callable[[InferenceServerException, str, int], ClientError] | None = None,
    ) -> Any:
        """As `EmbeddingClient._call`, awaiting `fn(tritonclient)`: the same `Failover` decisions."""
        call = Failover(self.replicas, self.retries, self.backoff.delay)
        while True:
            replica = await self._replica(call)
            call.sending()
            try:
                out = await fn(replica.client)
                call.answered(replica)
                return out
            except InferenceServerException as e:
                wait = call.failed(replica, e.status())
                if wait is None:
                    raise (error or call_error(model))(e, replica.url, call.attempts) from None
                if wait:
                    await asyncio.sleep(wait)

    async def _replica(self, call: Failover) -> Any:
        while True:
            replica, probe = call.next()
            if not probe:
                return replica
            await self.replicas.renew(replica).close()
            try:
                if await replica.client.is_server_ready(client_timeout=PROBE_TIMEOUT_S):
                    return replica
            except InferenceServerException:
                pass
            self.replicas.failed(replica, probe=True)


async def _readiness_async(client: Any, models: Sequence[str]) -> str | None:
    try:
        pending = [m for m in models if not await client.is_model_ready(m, client_timeout=2.0)]
        if await client.is_server_ready(client_timeout=2.0) and not pending:
            return None
        if not pending:
            return "server not ready"
        index = await client.get_model_repository_index(as_json=True)
        return f"models not ready: {pending}" + _why_not_ready(pending, index)
    except InferenceServerException as e:
        return f"{e.status()}: {e.message()}"
