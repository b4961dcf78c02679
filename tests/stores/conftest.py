"""The `store` fixture of the contract suite: every test runs on MemoryStore, on a real Redis, on
a real three-node Redis Cluster, and through a real Sentinel to a primary with a replica.

`timeline` hides the one difference: the memory store's clock is a `FixedClock` that tests move
instantly, while Redis expires keys by its own clock, so there the test really sleeps (TTLs in the
suite are short for that reason).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from gateway.adapters.memory_store import MemoryStore
from gateway.clock import FixedClock, SystemClock
from gateway.ports import Store


@dataclass(frozen=True)
class Timeline:
    """`now()` as the store under test sees it, and a way to let `seconds` pass for it."""

    now: Callable[[], float]
    elapse: Callable[[float], Awaitable[None]]


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
        pytest.param("sentinel", marks=pytest.mark.redis),
    ]
)
def store(request: pytest.FixtureRequest, clock: FixedClock) -> Store:
    """The store under test: MemoryStore on a FixedClock, or RedisStore on the real server, on
    the real cluster, or through a real Sentinel (every write waiting for the replica)."""
    if request.param == "memory":
        return MemoryStore(clock)
    redis_store: Store = request.getfixturevalue(_REDIS_FIXTURES[request.param])
    return redis_store


_REDIS_FIXTURES = {
    "redis": "redis_store",
    "cluster": "redis_cluster_store",
    "sentinel": "redis_sentinel_store",
}


@pytest.fixture
def timeline(store: Store, clock: FixedClock) -> Timeline:
    if isinstance(store, MemoryStore):

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        return Timeline(now=clock.now, elapse=advance)
    return Timeline(now=SystemClock().now, elapse=asyncio.sleep)
