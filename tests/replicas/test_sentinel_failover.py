"""A real Sentinel failover under load: a primary, one replica and `redis-sentinel`, a store on
`redis+sentinel://`, takers redeeming codes while `SENTINEL FAILOVER` runs.

What must hold (DESIGN §7.8 fail closed; R16/R17 single use; R22 revocation feed):
- an operation in flight fails only with `StoreUnavailable`, never another exception and never a
  wrong answer (a code is never handed out twice, nor reported used when it was not);
- the same store object recovers by itself: it re-asks Sentinel when the deposed primary stops
  acknowledging writes, and after the failover writes and reads succeed again;
- the revocation feed breaks (so the caller resubscribes) instead of staying on the deposed
  primary, which no longer receives revocations;
- every code taken before or during the failover stays taken afterwards.

The old primary stays writable for ~10 s after the promotion (until Sentinel reconfigures it);
writes it accepted then are thrown away. Every write therefore waits for one replica's
acknowledgement (`replica_acks`, default 1), which is also why writes stay unavailable until
the old primary has rejoined as the new primary's replica. With one replica, Sentinel has no
choice of which replica to promote, so every acknowledged write survives.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ResponseError

from gateway.adapters.redis_store import RedisStore
from gateway.clock import SystemClock
from gateway.core.errors import StoreUnavailable
from tests.fixtures.redis_server import SentinelGroup

pytestmark = pytest.mark.redis

SERVICE = "gwfailover"
LONG = 600.0
CODES = 2000
TAKERS = 4
PREFIX = "fo:"


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Poll `check` until it is true; the monotonic time it became true."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


async def primary_port(sentinel_port: int) -> int:
    """The primary's port as Sentinel names it now."""
    sentinel = Sentinel([("127.0.0.1", sentinel_port)], socket_timeout=1.0)  # type: ignore[no-untyped-call]
    try:
        _, port = await sentinel.discover_master(SERVICE)
        return int(port)
    finally:
        await sentinel.aclose()


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A primary, its replica (acknowledging writes) and a Sentinel that knows the replica and
    declares the primary down after 1 s; stopped after the test."""
    group = SentinelGroup(tmp_path, SERVICE, down_after_ms=1000)
    try:
        group.start()
        yield group
    finally:
        group.stop()


async def quicken_sentinel(sentinel_port: int) -> None:
    """Shorten Sentinel's own pace for a test: it reconfigures a deposed primary as a replica
    4 publish periods after noticing it (by default 8 s after an INFO sent every 10 s)."""
    raw = aioredis.Redis(port=sentinel_port, decode_responses=True)
    try:
        await raw.execute_command(  # type: ignore[no-untyped-call]
            "SENTINEL", "DEBUG", "info-period", 200, "publish-period", 250
        )
    finally:
        await raw.aclose()


async def start_failover(sentinel_port: int) -> None:
    """`SENTINEL FAILOVER`, retried while Sentinel still judges the replica unsuitable."""
    raw = aioredis.Redis(port=sentinel_port, decode_responses=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                await raw.sentinel_failover(SERVICE)
                return
            except ResponseError as exc:
                if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await raw.aclose()


async def feed_break_time(feed: AsyncIterator[tuple[str, float]]) -> float:
    """Drain a revocation feed until it raises StoreUnavailable; when that happened."""
    try:
        async for _ in feed:
            pass
    except StoreUnavailable:
        return time.monotonic()
    raise AssertionError("the revocation feed ended without raising StoreUnavailable")


@pytest.mark.timeout(30)
async def test_failover_keeps_one_time_operations_one_time(replicated: SentinelGroup) -> None:
    """Under load through `SENTINEL FAILOVER`: in-flight takes fail only with StoreUnavailable,
    no code is handed out twice or wrongly reported used, the feed breaks within seconds, and
    the same store object works again on the new primary (DESIGN §7.8; R16, R17, R22)."""
    started = time.monotonic()
    store = RedisStore.from_url(
        replicated.url, clock=SystemClock(), key_prefix=PREFIX, timeout=0.5, heartbeat=0.2
    )
    raw_new = aioredis.Redis(port=replicated.replica.port, decode_responses=True)
    feed: Any = None
    try:
        assert store.replica_acks == 1
        assert await primary_port(replicated.sentinel.port) == replicated.primary.port
        await quicken_sentinel(replicated.sentinel.port)
        for batch in range(0, CODES, 20):
            await asyncio.gather(
                *(store.put_code(f"c{i}", {"i": i}, LONG) for i in range(batch, batch + 20))
            )
        used_before = list(range(20))
        for i in used_before:
            assert await store.take_code(f"c{i}") == {"i": i}
        exp = time.time() + LONG  # noqa: TID251 - Redis expires by wall time
        await store.revoke_jti("before", exp)
        feed = store.watch_revocations()
        assert await anext(feed) == ("before", exp)
        feed_broken = asyncio.ensure_future(feed_break_time(feed))

        pending = deque(range(len(used_before), CODES))
        outcomes: dict[int, str] = {}
        stop = asyncio.Event()

        async def taker() -> None:
            while not stop.is_set() and pending:
                i = pending.popleft()
                try:
                    got = await store.take_code(f"c{i}")
                except StoreUnavailable:
                    outcomes[i] = "unavailable"
                else:
                    outcomes[i] = "taken" if got == {"i": i} else f"wrong answer {got!r}"
                await asyncio.sleep(0.005)

        takers = [asyncio.ensure_future(taker()) for _ in range(TAKERS)]
        await asyncio.sleep(0.3)  # load running on the old primary
        failover_at = time.monotonic()
        await start_failover(replicated.sentinel.port)

        async def promoted() -> bool:
            return await primary_port(replicated.sentinel.port) == replicated.replica.port

        await eventually(promoted, 8, "Sentinel to promote the replica")

        async def store_works() -> bool:
            probe = f"probe-{time.monotonic_ns()}"
            try:
                await store.put_code(probe, {"probe": 1}, LONG)
                return await store.take_code(probe) == {"probe": 1}
            except StoreUnavailable:
                return False

        recovered_at = await eventually(store_works, 20, "the same store to work again")
        stop.set()
        await asyncio.gather(*takers)  # a taker that met any other exception fails the test
        broke_at = await asyncio.wait_for(feed_broken, 5)

        wrong = {i: o for i, o in outcomes.items() if o not in ("taken", "unavailable")}
        assert wrong == {}
        taken = [i for i, o in outcomes.items() if o == "taken"]
        failed = [i for i, o in outcomes.items() if o == "unavailable"]
        assert taken  # load really ran through the failover
        assert failed
        # the feed noticed the deposed primary long before Sentinel reconfigures it (~10 s)
        assert broke_at - failover_at < 5.0
        assert recovered_at - started < 25.0

        # writes the deposed primary accepted are gone once it has rejoined as a replica
        raw_old = aioredis.Redis(port=replicated.primary.port, decode_responses=True)
        try:

            async def rejoined() -> bool:
                info = await raw_old.info("replication")
                return bool(
                    info.get("role") == "slave"
                    and info.get("master_port") == replicated.replica.port
                    and info.get("master_link_status") == "up"
                )

            await eventually(rejoined, 10, "the deposed primary to rejoin as a replica")
        finally:
            await raw_old.aclose()

        # one-time operations stayed one-time across the failover
        for i in used_before + taken:
            assert await store.take_code(f"c{i}") is None, i
        for i in failed:  # the take failed: the code may be redeemable once now, never twice
            assert await store.take_code(f"c{i}") in (None, {"i": i}), i
            assert await store.take_code(f"c{i}") is None, i
        for i in list(pending)[:200]:  # never touched: exactly once
            assert await store.take_code(f"c{i}") == {"i": i}, i
            assert await store.take_code(f"c{i}") is None, i

        # new writes land on the new primary; a new feed on the same store works
        await store.put_code("after", {"after": 1}, LONG)
        assert await raw_new.get(PREFIX + "code:{after}") == '{"after":1}'
        assert (await raw_new.info("replication"))["role"] == "master"
        feed = store.watch_revocations()
        assert await asyncio.wait_for(anext(feed), 5) == ("before", exp)
        await store.revoke_jti("after", exp)
        assert await asyncio.wait_for(anext(feed), 5) == ("after", exp)
    finally:
        if feed is not None:
            await feed.aclose()
        await raw_new.aclose()
        await store.close()


@pytest.mark.timeout(30)
async def test_deposed_primary_is_left_behind(replicated: SentinelGroup) -> None:
    """Right after a failover the deposed primary still runs as a writable primary (Sentinel
    reconfigures it only seconds later). A store's next write is not acknowledged there, so the
    store re-asks Sentinel and drops its connections: its reads then reach the new primary. A
    store that only watches revocations notices at its next heartbeat and breaks the feed. Both
    happen while the deposed primary is still a primary, so they are the store's doing, not
    Sentinel's (DESIGN §7.8; R22)."""
    store = RedisStore.from_url(
        replicated.url, clock=SystemClock(), key_prefix=PREFIX, timeout=0.5, heartbeat=0.2
    )
    watcher = RedisStore.from_url(
        replicated.url, clock=SystemClock(), key_prefix=PREFIX, timeout=0.5, heartbeat=0.5
    )
    raw_old = aioredis.Redis(port=replicated.primary.port, decode_responses=True)
    raw_new = aioredis.Redis(port=replicated.replica.port, decode_responses=True)
    feed: Any = None
    try:
        await store.put_blob("k", "old", None)
        exp = time.time() + LONG  # noqa: TID251 - Redis expires by wall time
        await store.revoke_jti("before", exp)
        feed = watcher.watch_revocations()
        assert await anext(feed) == ("before", exp)
        feed_broken = asyncio.ensure_future(feed_break_time(feed))

        failover_at = time.monotonic()
        await start_failover(replicated.sentinel.port)

        async def promoted() -> bool:
            return await primary_port(replicated.sentinel.port) == replicated.replica.port

        await eventually(promoted, 8, "Sentinel to promote the replica")
        assert (await raw_old.info("replication"))["role"] == "master"  # deposed, yet writable
        await raw_new.set(PREFIX + "blob:{k}", "new")  # another gateway, on the new primary

        with pytest.raises(StoreUnavailable, match="acknowledged"):
            await store.put_blob("k2", "lost", None)
        assert await store.get_blob("k") == "new"
        broke_at = await asyncio.wait_for(feed_broken, 3)
        assert broke_at - failover_at < 3.0
        assert (await raw_old.info("replication"))["role"] == "master"
    finally:
        if feed is not None:
            await feed.aclose()
        await raw_old.aclose()
        await raw_new.aclose()
        await store.close()
        await watcher.close()
