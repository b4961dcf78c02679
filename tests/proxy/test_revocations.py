"""The process-local revocation set: fed by the store, failing closed when not current."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from gateway.adapters.memory_store import MemoryStore
from gateway.clock import FixedClock
from gateway.core.errors import StoreUnavailable, TemporarilyUnavailable
from gateway.revocations import PROBE_PREFIX, RevocationSet
from tests.proxy.conftest import eventually

NOW = 1_800_000_000.0


class SilentStore(MemoryStore):
    """A store that can stop answering while its feed stays open (a silent network)."""

    silent = False

    async def is_revoked(self, jti: str) -> bool:
        if self.silent:
            raise StoreUnavailable("redis: TimeoutError")
        return await super().is_revoked(jti)

    async def revoked_snapshot(self) -> dict[str, float]:
        if self.silent:
            raise StoreUnavailable("redis: TimeoutError")
        return await super().revoked_snapshot()

    async def revoke_jti(self, jti: str, exp: float) -> None:
        if self.silent:
            raise StoreUnavailable("redis: TimeoutError")
        await super().revoke_jti(jti, exp)


@contextlib.asynccontextmanager
async def running(revocations: RevocationSet) -> AsyncIterator[RevocationSet]:
    task = asyncio.ensure_future(revocations.run())
    try:
        yield revocations
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_current_only_after_the_feed_proved_live() -> None:
    """`check` refuses until a probe came back through the feed, then answers locally."""
    clock = FixedClock(NOW)
    store = MemoryStore(clock)
    await store.revoke_jti("old", NOW + 100)
    revs = RevocationSet(store, clock)
    with pytest.raises(TemporarilyUnavailable):
        revs.check("anything")
    async with running(revs):
        async with asyncio.timeout(2):
            await revs.wait_current()
        assert revs.check("old") is True
        assert revs.check("new") is False
        await store.revoke_jti("new", NOW + 100)
        await eventually(lambda: revs.is_revoked("new"))
        assert not any(j.startswith(PROBE_PREFIX) for j in revs._revoked)


async def test_entries_expire_with_their_token() -> None:
    """A revoked jti is forgotten once its token would have expired anyway."""
    clock = FixedClock(NOW)
    store = MemoryStore(clock)
    revs = RevocationSet(store, clock)
    async with running(revs):
        async with asyncio.timeout(2):
            await revs.wait_current()
        await store.revoke_jti("j", NOW + 10)
        await eventually(lambda: revs.is_revoked("j"))
        clock.advance(11)
        assert revs.check("j") is False
        assert len(revs) == 0


async def test_silent_store_noticed_within_the_liveness_interval() -> None:
    """A store that stops answering (feed still open) makes the set not current quickly,
    and it becomes current again once the store answers."""
    clock = FixedClock(NOW)
    store = SilentStore(clock)
    revs = RevocationSet(store, clock, liveness_interval=0.05, retry_min=0.01, retry_max=0.05)
    async with running(revs):
        async with asyncio.timeout(2):
            await revs.wait_current()
        store.silent = True
        await eventually(lambda: not revs.current, within=1.0)
        with pytest.raises(TemporarilyUnavailable):
            revs.check("x")
        store.silent = False
        async with asyncio.timeout(2):
            await revs.wait_current()


async def test_broken_feed_resubscribes() -> None:
    """A feed that breaks (subscriber overflow) is resubscribed; nothing is missed."""
    clock = FixedClock(NOW)
    store = MemoryStore(clock, feed_buffer=2)
    revs = RevocationSet(store, clock, retry_min=0.01)
    async with running(revs):
        async with asyncio.timeout(2):
            await revs.wait_current()
        for i in range(20):  # overflow the subscriber's queue without yielding
            await store.revoke_jti(f"j{i}", NOW + 100)
        await eventually(lambda: all(revs.is_revoked(f"j{i}") for i in range(20)))
        async with asyncio.timeout(2):
            await revs.wait_current()
