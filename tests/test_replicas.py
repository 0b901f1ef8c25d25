"""Several Triton replicas behind one client: turn-taking, failover when a replica dies (SIGKILL, real servers on
loopback), probing back in, and bad input that is never retried."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _client_helpers import small_catalog

from client.replicas import ReplicaPool, parse_urls
from client.triton_client import AsyncEmbeddingClient, Backoff, ClientError, EmbeddingClient
from mim.model.checkpoint import load_checkpoint
from mim.search.embedding import TorchEmbedder
from mim.search.ranking import row_cosines as cosines
from mim.serving.server import TritonServer, free_port

FAST = Backoff(base_s=0.02, cap_s=0.2)
LOAD, CONCURRENCY, KILL_AFTER = 400, 8, 120


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[bytes]:
    cat = small_catalog(tmp_path_factory.mktemp("replicas") / "catalog")
    return [cat.read_bytes(p.image) for p in cat.products[:8]] + [cat.read_bytes(q.image) for q in cat.queries[:8]]


@pytest.fixture(scope="module")
def reference(images, tiny_checkpoint) -> np.ndarray:
    return TorchEmbedder(load_checkpoint(tiny_checkpoint)).embed_images(images)  # (16, D)


def _closed() -> str:
    return f"127.0.0.1:{free_port()}"


# --- the pool's bookkeeping ----------------------------------------------------------------------------------------
def test_urls_are_parsed_and_checked():
    assert parse_urls("a:1, b:2") == ["a:1", "b:2"] and parse_urls(["a:1"]) == ["a:1"]
    with pytest.raises(ValueError, match=r"replica a:1 is listed twice"):
        parse_urls("a:1,a:1")
    with pytest.raises(ValueError, match=r"expected host:port, or several separated by commas"):
        parse_urls("a:1,,b:2")


def test_pool_takes_turns_takes_out_and_probes_back():
    pool = ReplicaPool(["a", "b", "c"], make_client=lambda url: url, probe_s=1.0)  # long enough for a loaded CI
    assert [pool.next(set())[0].url for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    b = pool.replicas[1]
    pool.failed(b)
    pool.failed(b)  # a second request that was in flight on it changes nothing
    assert pool.stats.taken_out == 1 and b.out
    assert {pool.next(set())[0].url for _ in range(4)} == {"a", "c"}
    assert pool.next({"a", "c"}) == (b, False)  # nothing else left: the attempt itself probes
    b.probe_at = time.monotonic()  # its interval has passed
    assert pool.next(set()) == (b, True)  # due: probed before it gets work again
    pool.failed(b, probe=True)
    assert b.failed_probes == 1 and b.probe_at - time.monotonic() > 1.0  # the interval doubled to 2 s
    pool.answered(b)
    assert not b.out and pool.stats.back_in == 1


# --- real servers ---------------------------------------------------------------------------------------------------
@pytest.mark.server
def test_a_dead_replica_is_taken_out_and_bad_input_is_not_retried(triton_server, images, reference):
    dead = _closed()
    with EmbeddingClient([dead, triton_server.grpc_url], timeout_s=30, backoff=FAST) as c:
        got = c.embed_images(images)
        assert cosines(got, reference).min() >= 0.999
        assert c.stats.taken_out == 1 and c.replicas.replicas[0].out
        live = c.replicas.replicas[1].client
        calls = []
        real = live.infer
        live.infer = lambda **kw: calls.append(1) or real(**kw)
        with pytest.raises(ClientError, match=r"refused the request: .*could not decode image.*INVALID_ARGUMENT") as e:
            c.embed_images([b"not an image"])
        assert e.value.attempts == 1 and len(calls) == 1 and c.stats.failovers == 1  # the one from the first call


@pytest.mark.server
def test_every_request_gets_one_answer_when_a_replica_is_killed(
    triton_server, served_repository, images, reference, tmp_path
):
    """Two tritonservers on loopback. (1) The second one is not up yet: it is taken out. (2) It starts: a probe
    brings it back in and it answers. (3) 400 requests at concurrency 8 over both, and the second server is killed
    with SIGKILL in the middle: every request gets exactly one answer, equal to the in-process embedding."""
    second = TritonServer(served_repository, config="cpu", log_path=tmp_path / "second.log")
    urls = [triton_server.grpc_url, second.grpc_url]
    try:
        # (1) and (2), sync client shared by 4 threads
        with EmbeddingClient(urls, timeout_s=30, backoff=FAST) as c:
            c.replicas.probe_s = 0.2
            for i in range(4):
                c.embed_images(images[i : i + 1])
            assert c.replicas.replicas[1].out and c.stats.taken_out == 1
            second.start()
            # Keep traffic going until a probe finds it ready (bounded): a probe that lands while the new server
            # still loads its models fails and doubles the wait, so a fixed number of requests can end too soon.
            deadline = time.monotonic() + 30
            with ThreadPoolExecutor(4) as pool:
                while True:
                    out = list(pool.map(lambda i: c.embed_images(images[i % 16 : i % 16 + 1])[0], range(40)))
                    assert cosines(np.stack(out), reference[np.arange(40) % 16]).min() >= 0.999
                    if c.stats.back_in or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            assert c.stats.back_in == 1 and not c.replicas.replicas[1].out and c.replicas.replicas[1].answers > 0

        # (3) async client under load; SIGKILL the second server (and its python-backend stubs) mid-way
        answers: dict[int, np.ndarray] = {}
        killed = threading.Event()

        async def load() -> AsyncEmbeddingClient:
            async with AsyncEmbeddingClient(urls, timeout_s=30, backoff=FAST) as c:
                queue = list(range(LOAD))

                async def worker() -> None:
                    while queue:
                        i = queue.pop(0)
                        emb = await c.embed_images([images[i % 16]])
                        assert i not in answers, f"request {i} answered twice"
                        answers[i] = emb[0]
                        if len(answers) == KILL_AFTER and not killed.is_set():
                            os.killpg(second.process.pid, signal.SIGKILL)
                            killed.set()

                await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), timeout=300)
                return c

        t0 = time.monotonic()
        c = asyncio.run(load())
        seconds = time.monotonic() - t0
        assert killed.is_set() and second.process.poll() is not None
        assert sorted(answers) == list(range(LOAD))
        got = np.stack([answers[i] for i in range(LOAD)])
        assert cosines(got, reference[np.arange(LOAD) % 16]).min() >= 0.999
        first, dead = c.replicas.replicas
        assert dead.out and c.stats.taken_out == 1 and c.stats.failovers >= 1
        assert first.answers + dead.answers == LOAD
        print(
            f"\nfailover: {LOAD} requests at concurrency {CONCURRENCY} in {seconds:.1f} s, SIGKILL after "
            f"{KILL_AFTER} answers; answered by {first.url}: {first.answers}, by the killed {dead.url}: "
            f"{dead.answers}; retried on the other replica: {c.stats.failovers}; probes of the dead one: "
            f"{c.stats.probes}; lost: {LOAD - len(answers)}, answered twice: 0"
        )
    finally:
        second.stop()
