"""Several Triton replicas behind one embedding client: requests go to healthy replicas in turn, a replica that
stops answering is taken out, and it is probed back in after a while.

    pool = ReplicaPool(["10.0.0.1:8001", "10.0.0.2:8001"], make_client=grpcclient.InferenceServerClient)
    replica, probe = pool.next(exclude=set())     # probe: check readiness before sending it real work

A replica is taken out when a request to it fails with UNAVAILABLE (refused connection, reset, server gone) or
DEADLINE_EXCEEDED (hung or overloaded). The request is then sent again at once to another healthy replica;
embedding a request twice on two servers is harmless (no state changes), and the caller still gets one answer.
Every other status (INVALID_ARGUMENT above all) is the request's own fault and is never retried.

A replica that is out is probed with a readiness check after `probe_s` seconds, doubling after each failed probe
up to `probe_cap_s`; a ready one is back in the rotation. With one URL nothing is taken out: the client keeps
the plain retry-with-backoff on UNAVAILABLE it has always had.

The pool holds no lock across a request, only around its small bookkeeping, so one sync client can be shared by
threads and one async client by the tasks of one event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

UNAVAILABLE = "StatusCode.UNAVAILABLE"
DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"
FAILOVER_STATUSES = (UNAVAILABLE, DEADLINE_EXCEEDED)
PROBE_S = 1.0
PROBE_CAP_S = 30.0
PROBE_TIMEOUT_S = 2.0  # the readiness check of a replica that is out


def parse_urls(url: str | Sequence[str]) -> list[str]:
    """ "host:port", "h1:p1,h2:p2" or a list of them -> the list of replica addresses."""
    urls = [u.strip() for u in (url.split(",") if isinstance(url, str) else url)]
    if not urls or any(not u for u in urls):
        raise ValueError(f"url={url!r}; expected host:port, or several separated by commas (one per replica)")
    dup = sorted({u for u in urls if urls.count(u) > 1})
    if dup:
        raise ValueError(f"replica {dup[0]} is listed twice in {urls}; list each replica once")
    return urls


@dataclass
class Replica:
    url: str
    client: Any  # a tritonclient InferenceServerClient (grpc or grpc.aio)
    out: bool = False  # taken out of the rotation
    failed_probes: int = 0
    probe_at: float = 0.0  # time.monotonic() when it may be probed
    answers: int = 0  # requests it answered


@dataclass
class ReplicaStats:
    """Counters since the client was created."""

    failovers: int = 0  # requests sent again to another replica after theirs failed
    taken_out: int = 0
    probes: int = 0
    back_in: int = 0


class ReplicaPool:
    def __init__(
        self,
        urls: Sequence[str],
        make_client: Callable[[str], Any],
        *,
        probe_s: float = PROBE_S,
        probe_cap_s: float = PROBE_CAP_S,
    ) -> None:
        self.make_client = make_client
        self.replicas = [Replica(u, make_client(u)) for u in urls]
        self.probe_s, self.probe_cap_s = probe_s, probe_cap_s
        self.stats = ReplicaStats()
        self._turn = 0
        self._lock = threading.Lock()

    @property
    def single(self) -> bool:
        return len(self.replicas) == 1

    def failover_status(self, status: str | None) -> bool:
        """Whether a failure with this gRPC status is the replica's (send elsewhere) rather than the request's."""
        return status == UNAVAILABLE if self.single else status in FAILOVER_STATUSES

    def next(self, exclude: set[str]) -> tuple[Replica, bool]:
        """The replica for the next attempt and whether to probe it first.

        Order: a replica that is out and due for a probe (so replicas come back even under steady load), then
        the healthy ones in turn, skipping `exclude` (replicas this request already failed on). When none is
        left, the replica due back soonest is returned without a probe: the attempt itself is the probe.
        """
        with self._lock:
            now = time.monotonic()
            n = len(self.replicas)
            if not self.single:
                for r in self.replicas:
                    if r.out and r.probe_at <= now and r.url not in exclude:
                        r.probe_at = now + self._interval(r)  # one prober at a time
                        return r, True
            for j in range(n):
                r = self.replicas[(self._turn + j) % n]
                if not r.out and r.url not in exclude:
                    self._turn = (self._turn + j + 1) % n
                    return r, False
            left = [r for r in self.replicas if r.url not in exclude] or self.replicas
            return min(left, key=lambda r: r.probe_at), False

    def has_healthy(self, exclude: set[str]) -> bool:
        with self._lock:
            return any(not r.out and r.url not in exclude for r in self.replicas)

    def failed(self, replica: Replica, *, probe: bool = False) -> None:
        """A request or a probe to `replica` failed for the replica's fault: take it out, or keep it out for
        longer after a failed probe. Requests that were in flight when it went out change nothing more."""
        if self.single:
            return
        with self._lock:
            if not replica.out:
                replica.out = True
                self.stats.taken_out += 1
            elif probe:
                replica.failed_probes += 1
            else:
                return
            replica.probe_at = time.monotonic() + self._interval(replica)

    def answered(self, replica: Replica) -> None:
        with self._lock:
            replica.answers += 1
            if replica.out:
                replica.out, replica.failed_probes = False, 0
                self.stats.back_in += 1

    def renew(self, replica: Replica) -> Any:
        """Give a replica about to be probed a new client and return the old one (for the caller to close).

        A gRPC channel whose connection failed waits out its own reconnect backoff (1 s growing to 2 min)
        and answers UNAVAILABLE meanwhile, so a probe on it could miss a server that is back; a new channel
        connects at once. Counts the probe."""
        with self._lock:
            self.stats.probes += 1
            old, replica.client = replica.client, self.make_client(replica.url)
        return old

    def count_failover(self) -> None:
        with self._lock:
            self.stats.failovers += 1

    def _interval(self, r: Replica) -> float:
        return min(self.probe_cap_s, self.probe_s * 2**r.failed_probes)

    def describe(self) -> str:
        return ", ".join(f"{r.url} ({'out' if r.out else 'in'})" for r in self.replicas)


class Failover:
    """The decisions of ONE call over the pool, without I/O: which replica gets the next attempt, and after a
    failure whether to raise, to try another replica at once, or to wait and then try them all again.

    The sync and the async client share it and only do the I/O around it (send, probe, sleep), the way httpx's
    base client holds the decisions its two clients share, so the two cannot drift apart:

        call = Failover(pool, retries, backoff.delay)
        while True:
            replica, probe = call.next()             # probe first when `probe`; a failed probe: call.probe_failed
            call.sending()
            try: answer = send(replica); call.answered(replica); return answer
            except failure as e:
                wait = call.failed(replica, status(e))
                if wait is None: raise ...           # the request's own fault, or no attempt left
                sleep(wait)                          # 0: another replica is healthy, go at once
    """

    def __init__(self, pool: ReplicaPool, retries: int, delay: Callable[[int], float]) -> None:
        self.pool, self.retries, self.delay = pool, retries, delay
        self.tried: set[str] = set()  # replicas this call failed on since it last waited
        self.attempts = 0

    def next(self) -> tuple[Replica, bool]:
        """The replica for the next attempt and whether to probe it first (ReplicaPool.next)."""
        return self.pool.next(self.tried)

    def probe_failed(self, replica: Replica) -> None:
        self.pool.failed(replica, probe=True)

    def sending(self) -> None:
        self.attempts += 1

    def answered(self, replica: Replica) -> None:
        self.pool.answered(replica)

    def failed(self, replica: Replica, status: str | None) -> float | None:
        """After an attempt failed with gRPC `status`: None to raise (the request's own fault, or `retries`
        retries spent), else the seconds to wait before the next attempt (0: another replica is healthy)."""
        if not self.pool.failover_status(status) or self.attempts > self.retries:
            return None
        self.pool.failed(replica)
        self.tried.add(replica.url)
        if self.pool.has_healthy(self.tried):
            self.pool.count_failover()
            return 0.0
        self.tried.clear()  # every replica failed: back off, then start over
        return self.delay(self.attempts - 1)
