"""What only the Redis adapter has: URLs (unix, Sentinel), key schema, secrets at rest as Redis
holds them, and failing closed when Redis is down, paused or returns garbage (DESIGN §7.8)."""

from __future__ import annotations

import asyncio
import inspect
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import RedisError
from redis.utils import HIREDIS_AVAILABLE

from gateway.adapters.redis_store import RedisStore, SentinelTarget, parse_sentinel_url
from gateway.clock import SystemClock
from gateway.core.errors import StoreUnavailable
from gateway.crypto import Sealer, new_token, token_hash
from gateway.ports import RotateOutcome, Store, TotpRecord
from tests.fixtures.redis_server import (
    RedisServerProcess,
    _free_port,
    delete_prefix,
    redis_server_binary,
)

pytestmark = pytest.mark.redis

LONG = 60.0


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the session server, to look at what the store wrote."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[RedisServerProcess]:
    """A server of this test's own, which the test may stop, pause or restart."""
    server = RedisServerProcess(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def dump_prefix(raw: aioredis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under `prefix` with its whole value, whatever the type."""
    out: dict[str, Any] = {}
    async for key in raw.scan_iter(match=prefix + "*"):
        kind = await raw.type(key)
        if kind == "string":
            out[key] = await raw.get(key)
        elif kind == "hash":
            out[key] = await raw.hgetall(key)
        elif kind == "set":
            out[key] = sorted(await raw.smembers(key))
        elif kind == "zset":
            out[key] = await raw.zrange(key, 0, -1, withscores=True)
        else:
            raise AssertionError(f"unexpected type {kind!r} at {key!r}")
    return out


def every_call(store: Store) -> dict[str, Callable[[], Awaitable[object]]]:
    """One call of every store method, keyed by method name."""

    async def first_revocation() -> object:
        return await anext(store.watch_revocations())

    return {
        "ping": store.ping,
        "put_transaction": lambda: store.put_transaction("t", {"a": 1}, LONG),
        "get_transaction": lambda: store.get_transaction("t"),
        "take_transaction": lambda: store.take_transaction("t"),
        "bind_upstream_state": lambda: store.bind_upstream_state("s", "t", LONG),
        "take_upstream_state": lambda: store.take_upstream_state("s"),
        "put_code": lambda: store.put_code("h", {"a": 1}, LONG),
        "take_code": lambda: store.take_code("h"),
        "mark_code_used": lambda: store.mark_code_used("h", "f", LONG),
        "code_used_by": lambda: store.code_used_by("h"),
        "put_client": lambda: store.put_client("c", {"a": 1}, None),
        "get_client": lambda: store.get_client("c"),
        "put_totp": lambda: store.put_totp(TotpRecord("u", "s", 0.0)),
        "get_totp": lambda: store.get_totp("u"),
        "delete_totp": lambda: store.delete_totp("u"),
        "list_totp_users": store.list_totp_users,
        "set_recovery_codes": lambda: store.set_recovery_codes("u", ["r"]),
        "use_recovery_code": lambda: store.use_recovery_code("u", "r"),
        "count_recovery_codes": lambda: store.count_recovery_codes("u"),
        "burn_step": lambda: store.burn_step("u", 1, LONG),
        "incr_counter": lambda: store.incr_counter("k", LONG),
        "get_counter": lambda: store.get_counter("k"),
        "clear_counter": lambda: store.clear_counter("k"),
        "set_lock": lambda: store.set_lock("k", LONG),
        "is_locked": lambda: store.is_locked("k"),
        "put_consent": lambda: store.put_consent("u", "c", LONG),
        "has_consent": lambda: store.has_consent("u", "c"),
        "create_family": lambda: store.create_family("f", "t", {"a": 1}, LONG),
        "get_family": lambda: store.get_family("f"),
        "rotate_refresh": lambda: store.rotate_refresh("f", "t", "n", LONG),
        "update_family": lambda: store.update_family("f", {"a": 2}),
        "add_family_jti": lambda: store.add_family_jti("f", "j", 2e9),
        "revoke_family": lambda: store.revoke_family("f"),
        "revoke_jti": lambda: store.revoke_jti("j", 2e9),
        "is_revoked": lambda: store.is_revoked("j"),
        "revoked_snapshot": store.revoked_snapshot,
        "watch_revocations": first_revocation,
        "bind_session": lambda: store.bind_session("s", "u", LONG),
        "session_owner": lambda: store.session_owner("s"),
        "drop_session": lambda: store.drop_session("s"),
        "put_blob": lambda: store.put_blob("b", "sealed", None),
        "get_blob": lambda: store.get_blob("b"),
        "delete_blob": lambda: store.delete_blob("b"),
    }


def store_methods() -> set[str]:
    """Every method the Store protocol declares, except close."""
    names = {n for n, v in inspect.getmembers(Store) if not n.startswith("_") and callable(v)}
    return names - {"close"}


class TestFailClosed:
    async def test_closed_port_raises_store_unavailable_everywhere(self) -> None:
        """Every operation on an unreachable Redis raises StoreUnavailable, never a redis
        exception, so callers fail closed (DESIGN §7.8)."""
        store = RedisStore.from_url(
            f"redis://127.0.0.1:{_free_port()}/0", clock=SystemClock(), timeout=0.5
        )
        calls = every_call(store)
        assert set(calls) == store_methods()
        try:
            for name, call in calls.items():
                with pytest.raises(StoreUnavailable) as caught:
                    await call()
                assert type(caught.value) is StoreUnavailable, name
                assert isinstance(caught.value.__cause__, RedisError | OSError), name
        finally:
            await store.close()

    async def test_stopped_server_fails_then_recovers(
        self, private_server: RedisServerProcess
    ) -> None:
        """When Redis dies, calls and the revocation feed raise StoreUnavailable; after it is
        back the same store works again without a restart (DESIGN §7.8)."""
        store = RedisStore.from_url(private_server.url, clock=SystemClock(), timeout=1.0)
        try:
            await store.put_code("h", {"a": 1}, LONG)
            feed = store.watch_revocations()
            waiting = asyncio.ensure_future(anext(feed))
            await asyncio.sleep(0.1)
            private_server.stop()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(waiting, 5)
            with pytest.raises(StoreUnavailable):
                await store.take_code("h")
            private_server.start()
            await store.ping()
            await store.put_code("h2", {"b": 2}, LONG)
            assert await store.take_code("h2") == {"b": 2}
        finally:
            await store.close()

    async def test_paused_server_times_out(self, private_server: RedisServerProcess) -> None:
        """A Redis that stops answering makes a call fail within the store time-out, and the
        feed's heartbeat notices the silence (DESIGN §7.8: a time-out on every call)."""
        store = RedisStore.from_url(
            private_server.url, clock=SystemClock(), timeout=0.3, heartbeat=0.2
        )
        try:
            await store.ping()
            feed = store.watch_revocations()
            waiting = asyncio.ensure_future(anext(feed))
            await asyncio.sleep(0.1)
            private_server.pause()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.ping()
            assert time.monotonic() - started < 1.0
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(waiting, 3)
        finally:
            private_server.resume()
            await store.close()

    async def test_silent_feed_noticed_within_heartbeat_plus_timeout(
        self, private_server: RedisServerProcess
    ) -> None:
        """A silent Redis breaks the feed one heartbeat plus one store time-out after the last
        message (the PONG is due within the time-out), not after a second heartbeat: the
        window in which a replica trusts a stale deny-list stays bounded (DESIGN §7.8, R22)."""
        store = RedisStore.from_url(
            private_server.url, clock=SystemClock(), timeout=0.1, heartbeat=1.0
        )
        try:
            feed = store.watch_revocations()
            waiting = asyncio.ensure_future(anext(feed))
            await asyncio.sleep(0.05)  # subscribed, idle, heartbeat running
            private_server.pause()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="stopped answering"):
                await asyncio.wait_for(waiting, 5)
            assert time.monotonic() - started < 1.6
        finally:
            private_server.resume()
            await store.close()

    async def test_idle_feed_survives_heartbeats(self, redis_url: str) -> None:
        """An idle feed answers many heartbeat PINGs without breaking, then still delivers (a
        false 'stopped answering' would make every replica resubscribe needlessly)."""
        store = RedisStore.from_url(
            redis_url, clock=SystemClock(), key_prefix="idle-t:", heartbeat=0.1
        )
        exp = time.time() + LONG  # noqa: TID251
        feed = store.watch_revocations()
        try:
            await store.revoke_jti("marker", exp)
            assert await anext(feed) == ("marker", exp)
            waiting = asyncio.ensure_future(anext(feed))
            await asyncio.sleep(0.6)  # six heartbeats
            assert not waiting.done()
            await store.revoke_jti("later", exp)
            assert await asyncio.wait_for(waiting, 5) == ("later", exp)
        finally:
            await feed.aclose()  # type: ignore[attr-defined]
            await store.close()
            await delete_prefix(redis_url, "idle-t:")

    async def test_corrupt_value_is_unavailable(
        self, redis_store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """A stored value that is not what the store wrote is refused, not half-parsed."""
        await raw.set(redis_store.key_prefix + "tx:{t1}", "not json")
        await raw.set(redis_store.key_prefix + "totp:{u1}", '{"user": "u1"}')
        with pytest.raises(StoreUnavailable):
            await redis_store.get_transaction("t1")
        with pytest.raises(StoreUnavailable):
            await redis_store.get_totp("u1")

    async def test_malformed_feed_message_breaks_feed(
        self, redis_store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """A revocation message the gateway did not write breaks the feed (resubscribe, fail
        closed) instead of being skipped."""
        await redis_store.revoke_jti("marker", time.time() + LONG)  # noqa: TID251
        feed = redis_store.watch_revocations()
        try:
            assert (await anext(feed))[0] == "marker"
            await raw.publish(redis_store.key_prefix + "rev:feed", '{"jti": 1}')
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(anext(feed), 5)
        finally:
            await feed.aclose()  # type: ignore[attr-defined]


class TestSecretsAtRest:
    async def test_plaintext_secrets_never_reach_redis(
        self, redis_store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """After storing a sealed TOTP seed, a refresh family carrying a sealed upstream token,
        a sealed blob and hashed codes, no plaintext secret appears in any Redis key or value
        (DESIGN §7.10; R34 key store in a secure area)."""
        sealer = Sealer(secrets.token_bytes(32))
        seed = pyotp.random_base32()
        upstream_access = "upstream-at-" + new_token()
        upstream_refresh = "upstream-rt-" + new_token()
        code, refresh, recovery = new_token(), new_token(), "4821-9930"
        sealed_seed = sealer.seal(seed.encode(), "totp:alice")

        await redis_store.put_totp(TotpRecord("alice", sealed_seed, 1.0))
        await redis_store.set_recovery_codes("alice", [token_hash(recovery)])
        await redis_store.create_family(
            "g1",
            token_hash(refresh),
            {"sub": "alice", "upstream": sealer.seal(upstream_access.encode(), "upstream:g1")},
            LONG,
        )
        await redis_store.put_blob(
            "upstream:g1", sealer.seal(upstream_refresh.encode(), "upstream:g1"), None
        )
        await redis_store.put_code(token_hash(code), {"sub": "alice"}, LONG)

        dump = await dump_prefix(raw, redis_store.key_prefix)
        text = repr(dump)
        assert sealed_seed in text  # we are looking at the right data
        for secret in (seed, upstream_access, upstream_refresh, code, refresh, recovery):
            assert secret not in text
        record = await redis_store.get_totp("alice")
        assert record is not None
        assert sealer.open(record.sealed_seed, "totp:alice") == seed.encode()


class TestKeySchema:
    async def test_keys_of_one_operation_share_a_slot(
        self, redis_store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """Every multi-key operation's keys share a hash tag (works on Redis Cluster)."""
        p = redis_store.key_prefix
        await redis_store.create_family("f1", "t1", {"a": 1}, LONG)
        await redis_store.add_family_jti("f1", "j1", time.time() + LONG)  # noqa: TID251
        assert await redis_store.rotate_refresh("f1", "t1", "t2", LONG) is RotateOutcome.ROTATED
        await redis_store.put_totp(TotpRecord("alice", "s", 0.0))
        await redis_store.set_recovery_codes("alice", ["r"])
        await redis_store.burn_step("alice", 1, LONG)
        await redis_store.revoke_jti("j9", time.time() + LONG)  # noqa: TID251
        await redis_store.put_code("h1", {"a": 1}, LONG)
        await redis_store.mark_code_used("h1", "f1", LONG)

        groups = {"fam:": 3, "totp:": 3, "rev:": 2, "code:": 2}
        for kind, expected in groups.items():
            keys = [k async for k in raw.scan_iter(match=f"{p}{kind}*")]
            assert len(keys) == expected, (kind, keys)
            assert len({key_slot(k.encode()) for k in keys}) == 1, (kind, keys)

    async def test_prefixes_isolate_stores(self, redis_url: str, redis_store: RedisStore) -> None:
        """Two gateways with different key prefixes on one Redis do not see each other."""
        other = RedisStore.from_url(redis_url, clock=SystemClock(), key_prefix="iso-other:")
        try:
            await redis_store.put_code("h", {"mine": 1}, LONG)
            assert await other.take_code("h") is None
            assert await redis_store.take_code("h") == {"mine": 1}
        finally:
            await other.close()
            await delete_prefix(redis_url, "iso-other:")

    def test_prefix_with_braces_is_refused(self, redis_url: str) -> None:
        """A key prefix holding hash-tag braces is refused (it would break the key schema)."""
        with pytest.raises(ValueError, match="prefix"):
            RedisStore.from_url(redis_url, clock=SystemClock(), key_prefix="gw{x}:")


class TestUrls:
    def test_hiredis_parser_available(self) -> None:
        """hiredis is installed, so redis-py parses replies with it (DESIGN §8 budgets)."""
        assert HIREDIS_AVAILABLE is True

    async def test_unix_socket(self, redis_server: RedisServerProcess) -> None:
        """`unix://` URLs reach Redis over its socket."""
        assert redis_server.unix_path is not None
        store = RedisStore.from_url(
            f"unix://{redis_server.unix_path}?db=0", clock=SystemClock(), key_prefix="unix-t:"
        )
        try:
            await store.ping()
            await store.put_code("h", {"a": 1}, LONG)
            assert await store.take_code("h") == {"a": 1}
        finally:
            await store.close()

    async def test_sentinel(self, redis_server: RedisServerProcess, tmp_path: Path) -> None:
        """`redis+sentinel://` asks a real Sentinel for the master and uses it; by default a
        write needs a replica's acknowledgement, so on a primary without replicas every write
        fails closed (StoreUnavailable) and `replica_acks=0` is needed (DESIGN §7.8)."""
        sentinel = RedisServerProcess(tmp_path, sentinel_for=("gwmaster", redis_server.port))
        sentinel.start()
        hosts = f"127.0.0.1:{_free_port()},127.0.0.1:{sentinel.port}"
        store = RedisStore.from_url(
            f"redis+sentinel://{hosts}/gwmaster/0?replica_acks=0",
            clock=SystemClock(),
            key_prefix="sentinel-t:",
        )
        strict = RedisStore.from_url(
            f"redis+sentinel://{hosts}/gwmaster/0",
            clock=SystemClock(),
            key_prefix="sentinel-t:",
            timeout=0.5,
        )
        try:
            await store.ping()
            await store.put_code("h", {"via": "sentinel"}, LONG)
            assert strict.replica_acks == 1
            with pytest.raises(StoreUnavailable, match="acknowledged"):
                await strict.ping()
            with pytest.raises(StoreUnavailable, match="acknowledged"):
                await strict.put_code("h2", {"via": "sentinel"}, LONG)
            assert await strict.get_transaction("absent") is None  # reads are not waited on
            assert await store.take_code("h") == {"via": "sentinel"}
        finally:
            await store.close()
            await strict.close()
            sentinel.stop()
            await delete_prefix(redis_server.url, "sentinel-t:")

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            (
                "redis+sentinel://s1:26380,s2/mymaster",
                SentinelTarget((("s1", 26380), ("s2", 26379)), "mymaster", 0),
            ),
            (
                "redis+sentinel://:p%40ss@[::1]:5000,10.0.0.2:26379/svc/3",
                SentinelTarget((("::1", 5000), ("10.0.0.2", 26379)), "svc", 3, None, "p@ss"),
            ),
            (
                "redis+sentinel://gw:pw@h:1/svc",
                SentinelTarget((("h", 1),), "svc", 0, "gw", "pw"),
            ),
            (
                "redis+sentinel://h:1/svc/2?replica_acks=0",
                SentinelTarget((("h", 1),), "svc", 2, replica_acks=0),
            ),
            (
                "redis+sentinel://h:1/svc?replica_acks=3",
                SentinelTarget((("h", 1),), "svc", 0, replica_acks=3),
            ),
        ],
    )
    def test_sentinel_url_parsing(self, url: str, expected: SentinelTarget) -> None:
        """Sentinel URLs: several hosts, default port 26379, IPv6, credentials, db, and how
        many replicas must acknowledge each write (default 1)."""
        assert parse_sentinel_url(url) == expected

    @pytest.mark.parametrize(
        "url",
        [
            "redis+sentinel://h:1",
            "redis+sentinel://h:1/",
            "redis+sentinel://h:1/svc/notanumber",
            "redis+sentinel://h:1/svc/0/extra",
            "redis+sentinel://h:99999/svc",
            "redis+sentinel://h:1,/svc",
            "redis+sentinel://h:1/svc?password=x",
            "redis+sentinel://h:1/svc?replica_acks",
            "redis+sentinel://h:1/svc?replica_acks=-1",
            "redis+sentinel://h:1/svc?replica_acks=17",
            "redis+sentinel://h:1/svc?replica_acks=1&replica_acks=0",
            "redis+sentinel://h:1/svc?replica_acks=1&x=2",
            "redis+sentinel://h:1/svc#frag",
            "redis://h:1/0",
        ],
    )
    def test_bad_sentinel_urls(self, url: str) -> None:
        """Malformed Sentinel URLs are refused with ValueError."""
        with pytest.raises(ValueError):  # noqa: PT011 - messages vary by fault
            parse_sentinel_url(url)

    @pytest.mark.parametrize(
        "url",
        [
            "redis+sentinel://:hunter2secret@h:notaport/svc",
            "redis+sentinel://gw:hunter2secret/x@h:1/svc",  # unescaped '/': password as port
            "redis+sentinel://gw:x@[hunter2secret/svc",
            "redis+sentinel://:pw@h:1/hunter2secret/hunter2secret",
        ],
    )
    def test_sentinel_errors_hide_the_password(self, url: str) -> None:
        """A Sentinel URL error never repeats the password, even when a malformed URL puts it
        where a host, port or db should be (R35)."""
        with pytest.raises(ValueError) as caught:  # noqa: PT011 - messages vary by fault
            parse_sentinel_url(url)
        assert "hunter2" not in str(caught.value)


def test_missing_redis_server_fails_instead_of_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `redis-server` on PATH the suite fails with an install hint, never skips."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="apt-get install redis-server"):
        redis_server_binary()
