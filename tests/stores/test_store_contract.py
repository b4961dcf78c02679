"""One contract for every store adapter (`gateway.ports`), run on MemoryStore and real Redis.

Round trips, TTL expiry, single use, and races of 100 concurrent callers on every one-time
operation: what the flows rely on so that codes, states, TOTP steps and refresh tokens are used at
most once across all processes (DESIGN §7.4, §7.5).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from gateway.ports import RotateOutcome, Store, TotpRecord
from tests.stores.conftest import Timeline

SHORT = 0.3  # a TTL that the test lets pass
PAST = 0.4  # long enough for SHORT to be over
LONG = 60.0  # a TTL that never passes during a test
RACERS = 100
T = TypeVar("T")


async def race(store: Store, call: Callable[[int], Awaitable[T]]) -> list[T]:
    """Run RACERS calls at once. Connections are opened first (RACERS concurrent pings), so on
    Redis the calls really overlap instead of queueing behind connection set-up."""
    await asyncio.gather(*(store.ping() for _ in range(RACERS)))
    return await asyncio.gather(*(call(i) for i in range(RACERS)))


async def close_feed(feed: AsyncIterator[Any]) -> None:
    aclose = getattr(feed, "aclose", None)
    if aclose is not None:
        await aclose()


class TestTransactions:
    async def test_round_trip(self, store: Store) -> None:
        """A stored transaction reads back equal, as a JSON object (DESIGN §2.6)."""
        tx = {"client_id": "c1", "scope": "mcp", "amr_upstream": ["pwd"], "created_at": 1.5}
        await store.put_transaction("tx1", tx, LONG)
        assert await store.get_transaction("tx1") == tx
        assert await store.get_transaction("other") is None

    async def test_reads_are_copies(self, store: Store) -> None:
        """Mutating a returned transaction does not change the stored one."""
        await store.put_transaction("tx1", {"stage": "consent"}, LONG)
        got = await store.get_transaction("tx1")
        assert got is not None
        got["stage"] = "done"
        assert await store.get_transaction("tx1") == {"stage": "consent"}

    async def test_take_is_single_use(self, store: Store) -> None:
        """take_transaction returns the data once, then nothing (R16)."""
        await store.put_transaction("tx1", {"stage": "totp"}, LONG)
        assert await store.take_transaction("tx1") == {"stage": "totp"}
        assert await store.take_transaction("tx1") is None
        assert await store.get_transaction("tx1") is None

    async def test_expires(self, store: Store, timeline: Timeline) -> None:
        """A transaction is gone once its TTL has passed (DESIGN §2.6: ~10 min)."""
        await store.put_transaction("tx1", {"stage": "consent"}, SHORT)
        assert await store.get_transaction("tx1") == {"stage": "consent"}
        await timeline.elapse(PAST)
        assert await store.get_transaction("tx1") is None
        assert await store.take_transaction("tx1") is None

    async def test_put_overwrites(self, store: Store) -> None:
        """put_transaction replaces the stored state (stage changes)."""
        await store.put_transaction("tx1", {"stage": "consent"}, LONG)
        await store.put_transaction("tx1", {"stage": "upstream"}, LONG)
        assert await store.get_transaction("tx1") == {"stage": "upstream"}

    async def test_upstream_state_single_use(self, store: Store) -> None:
        """An upstream `state` maps to its transaction exactly once (R16)."""
        await store.bind_upstream_state("st", "tx1", LONG)
        assert await store.take_upstream_state("st") == "tx1"
        assert await store.take_upstream_state("st") is None
        assert await store.take_upstream_state("never-bound") is None

    async def test_upstream_state_expires(self, store: Store, timeline: Timeline) -> None:
        """An upstream `state` is refused after its short expiry (R16)."""
        await store.bind_upstream_state("st", "tx1", SHORT)
        await timeline.elapse(PAST)
        assert await store.take_upstream_state("st") is None

    async def test_upstream_state_race(self, store: Store) -> None:
        """Of 100 concurrent callbacks with one `state`, exactly one gets the transaction (R16)."""
        await store.bind_upstream_state("st", "tx1", LONG)
        results = await race(store, lambda _: store.take_upstream_state("st"))
        assert Counter(results) == Counter({"tx1": 1, None: RACERS - 1})


class TestCodes:
    async def test_take_is_single_use(self, store: Store) -> None:
        """A code's data is returned once; the second redemption gets None (R17)."""
        data = {"client_id": "c1", "sub": "alice", "amr": ["pwd", "otp", "mfa"]}
        await store.put_code("h1", data, LONG)
        assert await store.take_code("h1") == data
        assert await store.take_code("h1") is None

    async def test_expires(self, store: Store, timeline: Timeline) -> None:
        """A code is dead after its TTL (R10: short-lived)."""
        await store.put_code("h1", {"sub": "alice"}, SHORT)
        await timeline.elapse(PAST)
        assert await store.take_code("h1") is None

    async def test_race_has_one_winner(self, store: Store) -> None:
        """100 concurrent redemptions of one code: exactly one gets the data (R17)."""
        await store.put_code("h1", {"sub": "alice"}, LONG)
        results = await race(store, lambda _: store.take_code("h1"))
        winners = [r for r in results if r is not None]
        assert winners == [{"sub": "alice"}]
        assert results.count(None) == RACERS - 1

    async def test_used_marker(self, store: Store, timeline: Timeline) -> None:
        """A redeemed code remembers its family for replay revocation, until its TTL (R17)."""
        assert await store.code_used_by("h1") is None
        await store.mark_code_used("h1", "fam1", SHORT)
        assert await store.code_used_by("h1") == "fam1"
        assert await store.code_used_by("h2") is None
        await timeline.elapse(PAST)
        assert await store.code_used_by("h1") is None

    async def test_used_marker_is_not_the_code(self, store: Store) -> None:
        """Marking a code used neither revives nor shadows the code's own entry."""
        await store.mark_code_used("h1", "fam1", LONG)
        assert await store.take_code("h1") is None
        await store.put_code("h2", {"sub": "bob"}, LONG)
        await store.mark_code_used("h2", "fam2", LONG)
        assert await store.take_code("h2") == {"sub": "bob"}
        assert await store.code_used_by("h2") == "fam2"


class TestClients:
    async def test_round_trip_without_ttl(self, store: Store, timeline: Timeline) -> None:
        """A client stored without TTL stays (dynamic registration, RFC 7591)."""
        meta = {"client_id": "c1", "redirect_uris": ["http://127.0.0.1/cb"]}
        await store.put_client("c1", meta, None)
        await timeline.elapse(PAST)
        assert await store.get_client("c1") == meta
        assert await store.get_client("c2") is None

    async def test_cached_document_expires(self, store: Store, timeline: Timeline) -> None:
        """A cached client-ID metadata document expires with its TTL (R24)."""
        await store.put_client("https://c.example/id", {"client_name": "C"}, SHORT)
        assert await store.get_client("https://c.example/id") == {"client_name": "C"}
        await timeline.elapse(PAST)
        assert await store.get_client("https://c.example/id") is None

    async def test_put_without_ttl_clears_expiry(self, store: Store, timeline: Timeline) -> None:
        """Re-storing a client without TTL makes it permanent, not still expiring."""
        await store.put_client("c1", {"v": 1}, SHORT)
        await store.put_client("c1", {"v": 2}, None)
        await timeline.elapse(PAST)
        assert await store.get_client("c1") == {"v": 2}


class TestTotp:
    async def test_record_round_trip(self, store: Store) -> None:
        """A TOTP record reads back equal; unknown users have none (R34)."""
        record = TotpRecord(user="alice", sealed_seed="v1.n.ct", created_at=1.25, confirmed=False)
        await store.put_totp(record)
        assert await store.get_totp("alice") == record
        assert await store.get_totp("bob") is None

    async def test_list_and_delete(self, store: Store) -> None:
        """Users are listed sorted; delete is True once and removes the user from the list."""
        for user in ("carol", "alice", "bob"):
            await store.put_totp(TotpRecord(user=user, sealed_seed="s", created_at=0.0))
        assert await store.list_totp_users() == ["alice", "bob", "carol"]
        assert await store.delete_totp("bob") is True
        assert await store.delete_totp("bob") is False
        assert await store.get_totp("bob") is None
        assert await store.list_totp_users() == ["alice", "carol"]

    async def test_delete_removes_recovery_codes_and_steps(self, store: Store) -> None:
        """A reset removes recovery codes and the burned-step history with the seed."""
        await store.put_totp(TotpRecord(user="alice", sealed_seed="s", created_at=0.0))
        await store.set_recovery_codes("alice", ["r1", "r2"])
        assert await store.burn_step("alice", 100, LONG) is True
        assert await store.delete_totp("alice") is True
        assert await store.count_recovery_codes("alice") == 0
        assert await store.use_recovery_code("alice", "r1") is False
        assert await store.burn_step("alice", 50, LONG) is True

    async def test_recovery_codes_single_use(self, store: Store) -> None:
        """Each recovery code works once; unknown codes never (R34)."""
        await store.set_recovery_codes("alice", ["r1", "r2", "r3"])
        assert await store.count_recovery_codes("alice") == 3
        assert await store.use_recovery_code("alice", "r2") is True
        assert await store.use_recovery_code("alice", "r2") is False
        assert await store.use_recovery_code("alice", "nope") is False
        assert await store.use_recovery_code("bob", "r1") is False
        assert await store.count_recovery_codes("alice") == 2

    async def test_recovery_codes_replaced(self, store: Store) -> None:
        """set_recovery_codes replaces the old set entirely (old codes die)."""
        await store.set_recovery_codes("alice", ["old1", "old2"])
        await store.set_recovery_codes("alice", ["new1"])
        assert await store.use_recovery_code("alice", "old1") is False
        assert await store.count_recovery_codes("alice") == 1
        await store.set_recovery_codes("alice", [])
        assert await store.count_recovery_codes("alice") == 0
        assert await store.use_recovery_code("alice", "new1") is False

    async def test_recovery_code_race(self, store: Store) -> None:
        """100 concurrent uses of one recovery code: exactly one succeeds (R34)."""
        await store.set_recovery_codes("alice", ["r1", "r2"])
        results = await race(store, lambda _: store.use_recovery_code("alice", "r1"))
        assert results.count(True) == 1
        assert await store.count_recovery_codes("alice") == 1


class TestStepReplayGuard:
    async def test_steps_strictly_increase(self, store: Store) -> None:
        """A step is accepted once; an older or equal step after it is refused (R34)."""
        assert await store.burn_step("alice", 1000, LONG) is True
        assert await store.burn_step("alice", 1000, LONG) is False
        assert await store.burn_step("alice", 999, LONG) is False
        assert await store.burn_step("alice", 1001, LONG) is True
        assert await store.burn_step("alice", 1000, LONG) is False

    async def test_users_are_independent(self, store: Store) -> None:
        """One user's burned step does not block another user (R34 is per user)."""
        assert await store.burn_step("alice", 1000, LONG) is True
        assert await store.burn_step("bob", 1000, LONG) is True
        assert await store.burn_step("bob", 999, LONG) is False

    async def test_race_has_one_winner(self, store: Store) -> None:
        """100 concurrent submissions of one step: exactly one is accepted (R34)."""
        results = await race(store, lambda _: store.burn_step("alice", 5000, LONG))
        assert results.count(True) == 1

    async def test_race_of_many_steps(self, store: Store) -> None:
        """Concurrent steps 0..99 in any order: the highest is always accepted and stays the
        watermark, so nothing at or below it is accepted afterwards (R34)."""
        results = await race(store, lambda i: store.burn_step("alice", RACERS - 1 - i, LONG))
        assert results[0] is True
        assert await store.burn_step("alice", RACERS - 1, LONG) is False
        assert await store.burn_step("alice", 0, LONG) is False

    async def test_history_expires(self, store: Store, timeline: Timeline) -> None:
        """The burned-step record lives for its TTL (callers size it past the TOTP window)."""
        assert await store.burn_step("alice", 7, SHORT) is True
        assert await store.burn_step("alice", 7, SHORT) is False
        await timeline.elapse(PAST)
        assert await store.burn_step("alice", 7, SHORT) is True


class TestCountersAndLocks:
    async def test_counts_and_clears(self, store: Store) -> None:
        """Failures count up per key and clear to zero (R34 throttling)."""
        assert await store.get_counter("u:alice") == 0
        assert [await store.incr_counter("u:alice", LONG) for _ in range(3)] == [1, 2, 3]
        assert await store.get_counter("u:alice") == 3
        assert await store.get_counter("u:bob") == 0
        await store.clear_counter("u:alice")
        assert await store.get_counter("u:alice") == 0
        assert await store.incr_counter("u:alice", LONG) == 1

    async def test_window_starts_at_first_hit(self, store: Store, timeline: Timeline) -> None:
        """Later hits do not extend the window: it ends `window` after the first (R34)."""
        assert await store.incr_counter("ip:1", 0.6) == 1
        await timeline.elapse(0.3)
        assert await store.incr_counter("ip:1", 0.6) == 2
        await timeline.elapse(0.35)
        assert await store.get_counter("ip:1") == 0
        assert await store.incr_counter("ip:1", 0.6) == 1

    async def test_concurrent_increments_all_count(self, store: Store) -> None:
        """100 concurrent failures count 100 (lockouts hold across replicas, R34)."""
        results = await race(store, lambda _: store.incr_counter("u:alice", LONG))
        assert sorted(results) == list(range(1, RACERS + 1))
        assert await store.get_counter("u:alice") == RACERS

    async def test_lock_expires(self, store: Store, timeline: Timeline) -> None:
        """A lockout holds for its TTL, then lifts (R34)."""
        assert await store.is_locked("u:alice") is False
        await store.set_lock("u:alice", SHORT)
        assert await store.is_locked("u:alice") is True
        assert await store.is_locked("u:bob") is False
        await timeline.elapse(PAST)
        assert await store.is_locked("u:alice") is False

    async def test_locks_and_counters_are_separate(self, store: Store) -> None:
        """A lock key and a counter key of the same name do not interfere."""
        await store.set_lock("k", LONG)
        assert await store.get_counter("k") == 0
        assert await store.incr_counter("k", LONG) == 1
        await store.clear_counter("k")
        assert await store.is_locked("k") is True


class TestConsent:
    async def test_round_trip_and_expiry(self, store: Store, timeline: Timeline) -> None:
        """Consent is per (subject, client) and expires (R15)."""
        await store.put_consent("alice", "c1", SHORT)
        assert await store.has_consent("alice", "c1") is True
        assert await store.has_consent("alice", "c2") is False
        assert await store.has_consent("bob", "c1") is False
        await timeline.elapse(PAST)
        assert await store.has_consent("alice", "c1") is False

    async def test_keys_are_unambiguous(self, store: Store) -> None:
        """Consent of ("a:b", "c") grants nothing to ("a", "b:c") or brace tricks (R15)."""
        await store.put_consent("a:b", "c", LONG)
        await store.put_consent("x}", "y", LONG)
        assert await store.has_consent("a", "b:c") is False
        assert await store.has_consent("a:b:c", "") is False
        assert await store.has_consent("x", "}y") is False
        assert await store.has_consent("x}", "y") is True


class TestRefreshFamilies:
    async def test_create_and_rotate(self, store: Store) -> None:
        """The current token rotates; the new one is then current (R20)."""
        await store.create_family("f1", "t1", {"sub": "alice", "scope": "mcp"}, LONG)
        assert await store.get_family("f1") == {"sub": "alice", "scope": "mcp"}
        assert await store.rotate_refresh("f1", "t1", "t2", LONG) is RotateOutcome.ROTATED
        assert await store.rotate_refresh("f1", "t2", "t3", LONG) is RotateOutcome.ROTATED
        assert await store.get_family("f1") == {"sub": "alice", "scope": "mcp"}

    async def test_reuse_revokes_family(self, store: Store) -> None:
        """A rotated-out token coming back is REUSED: family gone, its jtis returned (R20)."""
        await store.create_family("f1", "t1", {"sub": "alice"}, LONG)
        await store.add_family_jti("f1", "j1", 2_000_000_000.0)
        assert await store.rotate_refresh("f1", "t1", "t2", LONG) is RotateOutcome.ROTATED
        await store.add_family_jti("f1", "j2", 2_000_000_600.0)
        assert await store.rotate_refresh("f1", "t1", "t9", LONG) is RotateOutcome.REUSED
        assert await store.get_family("f1") is None
        # the current token of the revoked family is dead too
        assert await store.rotate_refresh("f1", "t2", "t3", LONG) is RotateOutcome.INVALID
        assert await store.revoke_family("f1") == [("j1", 2_000_000_000.0), ("j2", 2_000_000_600.0)]
        assert await store.revoke_family("f1") == []

    async def test_unknown_token_is_invalid(self, store: Store) -> None:
        """A token never issued is INVALID and leaves the family intact (R20)."""
        await store.create_family("f1", "t1", {"sub": "alice"}, LONG)
        assert await store.rotate_refresh("f1", "forged", "t2", LONG) is RotateOutcome.INVALID
        assert await store.rotate_refresh("nofam", "t1", "t2", LONG) is RotateOutcome.INVALID
        assert await store.get_family("f1") == {"sub": "alice"}
        assert await store.rotate_refresh("f1", "t1", "t2", LONG) is RotateOutcome.ROTATED

    async def test_race_has_one_rotation(self, store: Store) -> None:
        """100 concurrent refreshes with one token: one ROTATED, others REUSED or INVALID,
        and any REUSED leaves the family revoked (R20)."""
        await store.create_family("f1", "t0", {"sub": "alice"}, LONG)
        results = await race(store, lambda i: store.rotate_refresh("f1", "t0", f"n{i}", LONG))
        counts = Counter(results)
        assert counts[RotateOutcome.ROTATED] == 1
        assert counts[RotateOutcome.REUSED] + counts[RotateOutcome.INVALID] == RACERS - 1
        assert counts[RotateOutcome.REUSED] >= 1
        assert await store.get_family("f1") is None

    async def test_expires(self, store: Store, timeline: Timeline) -> None:
        """An expired family is unknown: get None, rotation INVALID (R20)."""
        await store.create_family("f1", "t1", {"sub": "alice"}, SHORT)
        await timeline.elapse(PAST)
        assert await store.get_family("f1") is None
        assert await store.rotate_refresh("f1", "t1", "t2", LONG) is RotateOutcome.INVALID

    async def test_rotation_extends_ttl(self, store: Store, timeline: Timeline) -> None:
        """Rotation gives the family the new token's TTL."""
        await store.create_family("f1", "t1", {"sub": "alice"}, 0.5)
        await timeline.elapse(0.3)
        assert await store.rotate_refresh("f1", "t1", "t2", 1.0) is RotateOutcome.ROTATED
        await timeline.elapse(0.3)
        assert await store.get_family("f1") == {"sub": "alice"}
        assert await store.rotate_refresh("f1", "t2", "t3", LONG) is RotateOutcome.ROTATED

    async def test_update_keeps_ttl(self, store: Store, timeline: Timeline) -> None:
        """update_family replaces data but not the expiry."""
        await store.create_family("f1", "t1", {"v": 1}, SHORT)
        await store.update_family("f1", {"v": 2})
        assert await store.get_family("f1") == {"v": 2}
        await timeline.elapse(PAST)
        assert await store.get_family("f1") is None

    async def test_update_does_not_resurrect(self, store: Store) -> None:
        """Updating a missing or revoked family does not create one."""
        await store.update_family("ghost", {"v": 1})
        assert await store.get_family("ghost") is None
        await store.create_family("f1", "t1", {"v": 1}, LONG)
        await store.revoke_family("f1")
        await store.update_family("f1", {"v": 2})
        assert await store.get_family("f1") is None
        assert await store.rotate_refresh("f1", "t1", "t2", LONG) is RotateOutcome.INVALID

    async def test_revoke_returns_jtis(self, store: Store) -> None:
        """revoke_family deletes the family and returns the access tokens it issued (R22)."""
        await store.create_family("f1", "t1", {"sub": "alice"}, LONG)
        await store.add_family_jti("f1", "j1", 2_000_000_000.0)
        await store.add_family_jti("f1", "j2", 2_000_000_001.5)
        assert await store.revoke_family("f1") == [("j1", 2_000_000_000.0), ("j2", 2_000_000_001.5)]
        assert await store.get_family("f1") is None
        assert await store.rotate_refresh("f1", "t1", "t2", LONG) is RotateOutcome.INVALID
        assert await store.revoke_family("unknown") == []

    async def test_jti_of_revoked_family_is_revoked(self, store: Store, timeline: Timeline) -> None:
        """An access token attached to a family that is already gone is denied at once."""
        exp = timeline.now() + LONG
        await store.add_family_jti("ghost", "j-late", exp)
        assert await store.is_revoked("j-late") is True

    async def test_create_replaces_old_state(self, store: Store) -> None:
        """Re-creating a family id starts clean: old tokens and jtis do not carry over."""
        await store.create_family("f1", "t1", {"v": 1}, LONG)
        await store.add_family_jti("f1", "j1", 2_000_000_000.0)
        assert await store.rotate_refresh("f1", "t1", "t2", LONG) is RotateOutcome.ROTATED
        await store.create_family("f1", "u1", {"v": 2}, LONG)
        assert await store.rotate_refresh("f1", "t1", "x", LONG) is RotateOutcome.INVALID
        assert await store.rotate_refresh("f1", "t2", "x", LONG) is RotateOutcome.INVALID
        assert await store.revoke_family("f1") == []


class TestRevocations:
    async def test_revoke_until_exp(self, store: Store, timeline: Timeline) -> None:
        """A revoked jti is denied until its exp, then forgotten (R22)."""
        now = timeline.now()
        await store.revoke_jti("short", now + SHORT)
        await store.revoke_jti("long", now + LONG)
        assert await store.is_revoked("short") is True
        assert await store.is_revoked("long") is True
        assert await store.is_revoked("other") is False
        assert await store.revoked_snapshot() == {"short": now + SHORT, "long": now + LONG}
        await timeline.elapse(PAST)
        assert await store.is_revoked("short") is False
        assert await store.is_revoked("long") is True
        assert await store.revoked_snapshot() == {"long": now + LONG}

    async def test_already_expired_is_not_stored(self, store: Store, timeline: Timeline) -> None:
        """Revoking a token that has already expired leaves no entry."""
        await store.revoke_jti("old", timeline.now() - 10)
        assert await store.is_revoked("old") is False
        assert await store.revoked_snapshot() == {}

    async def test_watch_replays_snapshot_then_streams(
        self, store: Store, timeline: Timeline
    ) -> None:
        """The feed yields what was revoked before, then a revocation made after (R22)."""
        now = timeline.now()
        await store.revoke_jti("before", now + LONG)
        feed = store.watch_revocations()
        try:
            async with asyncio.timeout(5):
                assert await anext(feed) == ("before", now + LONG)
                await store.revoke_jti("after", now + 2 * LONG)
                assert await anext(feed) == ("after", now + 2 * LONG)
        finally:
            await close_feed(feed)

    async def test_every_watcher_gets_the_event(self, store: Store, timeline: Timeline) -> None:
        """Two subscribers both see one revocation (every replica's deny-list updates)."""
        now = timeline.now()
        await store.revoke_jti("marker", now + LONG)
        feeds = [store.watch_revocations() for _ in range(2)]
        try:
            async with asyncio.timeout(5):
                for feed in feeds:
                    assert await anext(feed) == ("marker", now + LONG)
                await store.revoke_jti("j1", now + LONG)
                for feed in feeds:
                    assert await anext(feed) == ("j1", now + LONG)
        finally:
            for feed in feeds:
                await close_feed(feed)


class TestSessions:
    async def test_first_owner_wins(self, store: Store) -> None:
        """A session is bound to its first subject; another subject gets that owner back (R32)."""
        assert await store.bind_session("s1", "alice", LONG) == "alice"
        assert await store.bind_session("s1", "mallory", LONG) == "alice"
        assert await store.bind_session("s1", "alice", LONG) == "alice"
        assert await store.session_owner("s1") == "alice"
        assert await store.session_owner("s2") is None

    async def test_drop_and_expiry(self, store: Store, timeline: Timeline) -> None:
        """A dropped or expired session can be bound anew (R32: terminated session)."""
        await store.bind_session("s1", "alice", LONG)
        await store.drop_session("s1")
        assert await store.session_owner("s1") is None
        await store.bind_session("s2", "alice", SHORT)
        await timeline.elapse(PAST)
        assert await store.session_owner("s2") is None
        assert await store.bind_session("s2", "bob", LONG) == "bob"

    async def test_owner_rebind_slides_ttl(self, store: Store, timeline: Timeline) -> None:
        """The owner's re-bind extends the binding; another subject's attempt does not."""
        await store.bind_session("s1", "alice", 0.5)
        await timeline.elapse(0.3)
        assert await store.bind_session("s1", "mallory", 5.0) == "alice"
        assert await store.bind_session("s1", "alice", 0.5) == "alice"
        await timeline.elapse(0.3)
        assert await store.session_owner("s1") == "alice"

    async def test_race_binds_one_owner(self, store: Store) -> None:
        """100 subjects binding one session concurrently all see the same single owner (R32)."""
        results = await race(store, lambda i: store.bind_session("s1", f"user{i}", LONG))
        assert len(set(results)) == 1
        assert await store.session_owner("s1") == results[0]


class TestBlobs:
    async def test_round_trip_delete_and_expiry(self, store: Store, timeline: Timeline) -> None:
        """Sealed blobs round-trip, delete, and expire with their TTL."""
        await store.put_blob("upstream:g1", "v1.nonce.ct", None)
        await store.put_blob("upstream:g2", "v1.nonce.ct2", SHORT)
        assert await store.get_blob("upstream:g1") == "v1.nonce.ct"
        assert await store.get_blob("upstream:g2") == "v1.nonce.ct2"
        await timeline.elapse(PAST)
        assert await store.get_blob("upstream:g2") is None
        assert await store.get_blob("upstream:g1") == "v1.nonce.ct"
        await store.delete_blob("upstream:g1")
        assert await store.get_blob("upstream:g1") is None


class TestGeneral:
    async def test_ping(self, store: Store) -> None:
        """A healthy store answers ping (readiness, DESIGN §6)."""
        await store.ping()

    @pytest.mark.parametrize("ttl", [0, -1.0, math.nan, math.inf])
    async def test_bad_ttl_is_a_bug(self, store: Store, ttl: float) -> None:
        """A non-positive or non-finite TTL is refused, not stored forever."""
        with pytest.raises(ValueError, match="ttl"):
            await store.put_code("h", {"x": 1}, ttl)
        assert await store.take_code("h") is None
