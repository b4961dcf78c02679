"""What only the embedded store has: bounded memory, bounded feeds, and refusing use once closed
(the shared behaviour is in test_store_contract.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.adapters.memory_store import MemoryStore
from gateway.clock import FixedClock
from gateway.core.errors import StoreUnavailable
from gateway.ports import TotpRecord


async def test_sweep_drops_expired_entries() -> None:
    """Expired entries that nobody reads again are swept, so memory does not grow unbounded."""
    clock = FixedClock()
    store = MemoryStore(clock, sweep_interval=60.0)
    for i in range(200):
        await store.put_code(f"h{i}", {"i": i}, 10.0)
        await store.bind_upstream_state(f"s{i}", "tx", 10.0)
    await store.put_client("kept", {"a": 1}, None)
    assert store.entry_count() == 401
    clock.advance(61.0)
    await store.put_code("fresh", {"a": 1}, 10.0)
    assert store.entry_count() == 2


async def test_no_sweep_before_interval() -> None:
    """Between sweeps expired entries are only dropped when touched (lazy expiry)."""
    clock = FixedClock()
    store = MemoryStore(clock, sweep_interval=60.0)
    await store.put_code("a", {"a": 1}, 1.0)
    await store.put_code("b", {"b": 1}, 1.0)
    clock.advance(2.0)
    assert await store.take_code("a") is None
    assert store.entry_count() == 1


async def test_slow_subscriber_is_cut_off() -> None:
    """A subscriber that falls behind by more than the buffer gets StoreUnavailable (then
    resubscribes and re-reads the snapshot) instead of growing memory without bound."""
    clock = FixedClock()
    store = MemoryStore(clock, feed_buffer=3)
    await store.revoke_jti("first", clock.now() + 60)
    feed = store.watch_revocations()
    assert await anext(feed) == ("first", clock.now() + 60)
    for i in range(4):
        await store.revoke_jti(f"j{i}", clock.now() + 60)
    with pytest.raises(StoreUnavailable):
        await anext(feed)


async def test_feed_within_buffer_is_complete() -> None:
    """A subscriber within the buffer receives every revocation, in order."""
    clock = FixedClock()
    store = MemoryStore(clock, feed_buffer=3)
    await store.revoke_jti("first", clock.now() + 60)
    feed = store.watch_revocations()
    await anext(feed)
    for i in range(3):
        await store.revoke_jti(f"j{i}", clock.now() + 60)
    assert [(await anext(feed))[0] for _ in range(3)] == ["j0", "j1", "j2"]


async def test_closed_store_fails_closed() -> None:
    """After close every call raises StoreUnavailable and open feeds break (DESIGN §7.8)."""
    clock = FixedClock()
    store = MemoryStore(clock)
    await store.put_totp(TotpRecord("alice", "sealed", 0.0))
    await store.revoke_jti("marker", clock.now() + 60)
    feed = store.watch_revocations()
    await anext(feed)
    waiting = asyncio.ensure_future(anext(feed))
    await asyncio.sleep(0)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.get_totp("alice")
    with pytest.raises(StoreUnavailable):
        await store.burn_step("alice", 1, 60.0)
    with pytest.raises(StoreUnavailable):
        await anext(store.watch_revocations())


async def test_payload_must_be_json() -> None:
    """A payload that Redis could not hold is refused here too (the adapters stay alike)."""
    store = MemoryStore(FixedClock())
    with pytest.raises(TypeError):
        await store.put_transaction("t", {"x": object()}, 60.0)
    assert await store.get_transaction("t") is None
