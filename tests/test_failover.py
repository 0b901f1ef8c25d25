"""The retry and failover decisions both clients share (`client.replicas.Failover`) and the bounded gather of
the async clients, without a server: the pool holds plain objects, statuses are gRPC status strings."""

from __future__ import annotations

import asyncio

import pytest

from client.replicas import DEADLINE_EXCEEDED, UNAVAILABLE, Failover, ReplicaPool
from client.triton_client import gather_bounded

INVALID = "StatusCode.INVALID_ARGUMENT"


def pool(n: int) -> ReplicaPool:
    return ReplicaPool([f"h{i}:8001" for i in range(n)], make_client=lambda url: f"client of {url}")


def delays(attempt: int) -> float:
    return 10.0 + attempt  # recognisable backoff values


def attempt(call: Failover, status: str):
    replica, probe = call.next()
    call.sending()
    return replica, probe, call.failed(replica, status)


def test_a_failed_replica_hands_the_request_to_another_at_once_then_backs_off():
    p = pool(2)
    call = Failover(p, retries=5, delay=delays)
    first, _, wait = attempt(call, UNAVAILABLE)
    assert wait == 0.0 and p.stats.failovers == 1 and p.stats.taken_out == 1
    second, probe, wait = attempt(call, DEADLINE_EXCEEDED)
    assert second.url != first.url and not probe
    assert wait == delays(1)  # both failed: wait, then try every replica again
    assert call.tried == set()
    third, _, _ = attempt(call, UNAVAILABLE)
    assert third.url in {first.url, second.url}


def test_the_request_s_own_fault_is_raised_at_once():
    call = Failover(pool(2), retries=5, delay=delays)
    replica, _, wait = attempt(call, INVALID)
    assert wait is None and not replica.out


def test_retries_are_bounded():
    call = Failover(pool(1), retries=2, delay=delays)
    waits = [attempt(call, UNAVAILABLE)[2] for _ in range(3)]
    assert waits == [delays(0), delays(1), None]  # one replica: plain retry with backoff, then raise
    assert call.attempts == 3


def test_one_replica_is_never_taken_out_and_a_deadline_is_the_request_s():
    p = pool(1)
    call = Failover(p, retries=3, delay=delays)
    assert attempt(call, DEADLINE_EXCEEDED)[2] is None
    assert attempt(Failover(p, retries=3, delay=delays), UNAVAILABLE)[2] == delays(0)
    assert p.stats.taken_out == 0 and not p.replicas[0].out


def test_an_answer_brings_a_replica_back():
    p = pool(2)
    call = Failover(p, retries=5, delay=delays)
    replica, _, _ = attempt(call, UNAVAILABLE)
    assert replica.out
    call.answered(replica)
    assert not replica.out and p.stats.back_in == 1


def test_gather_bounded_keeps_order_and_bound():
    running, peak = 0, 0

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01 * (5 - i % 5))
        running -= 1
        return i * i

    assert asyncio.run(gather_bounded(work, range(12), 3)) == [i * i for i in range(12)]
    assert peak == 3


def test_gather_bounded_raises_the_first_failure_and_cancels_the_rest():
    finished = []

    async def work(i: int) -> int:
        if i == 1:
            raise ValueError("row 1 is bad")
        await asyncio.sleep(0.5)
        finished.append(i)
        return i

    with pytest.raises(ValueError, match="row 1 is bad"):
        asyncio.run(gather_bounded(work, range(6), 6))
    assert finished == []
