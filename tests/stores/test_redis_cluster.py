"""What only Redis Cluster adds to the Redis adapter: start-up-node URLs, state spread over every
primary while each operation's keys share one slot, scripts on the node that owns their keys,
the revocation feed across nodes, and failing closed when a node is down or silent
(DESIGN §7.8). The whole store contract also runs on the cluster (`store` fixture, "cluster").
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from gateway.adapters.redis_store import ClusterTarget, RedisStore, parse_cluster_url
from gateway.clock import SystemClock
from gateway.core.errors import StoreUnavailable
from gateway.ports import RotateOutcome, TotpRecord
from tests.fixtures.redis_server import (
    RedisClusterProcess,
    RedisServerProcess,
    _free_port,
    delete_cluster_prefix,
)
from tests.stores.test_redis_store import every_call, store_methods

pytestmark = pytest.mark.redis

LONG = 60.0


def wall() -> float:
    """Epoch seconds: Redis expires revocations by wall time."""
    return time.time()  # noqa: TID251


@pytest.fixture
async def own_store(redis_cluster: RedisClusterProcess) -> AsyncIterator[RedisStore]:
    """A cluster store with a short time-out and heartbeat, for fault tests."""
    prefix = f"fault-{secrets.token_hex(4)}:"
    store = RedisStore.from_url(
        redis_cluster.url, clock=SystemClock(), key_prefix=prefix, timeout=0.3, heartbeat=0.2
    )
    try:
        yield store
    finally:
        await store.close()
        await delete_cluster_prefix(redis_cluster.url, prefix)


async def keys_on(node: RedisServerProcess, pattern: str) -> list[str]:
    """Keys matching `pattern` that this node itself holds."""
    raw = aioredis.Redis(port=node.port, decode_responses=True)
    try:
        return [k async for k in raw.scan_iter(match=pattern)]
    finally:
        await raw.aclose()


def ids_on(cluster: RedisClusterProcess, node: RedisServerProcess, key: str, n: int) -> list[str]:
    """`n` ids whose key (`key` with ID replaced by the id) lives on `node`."""
    found = [f"id{i}" for i in range(300) if cluster.node_for(key.replace("ID", f"id{i}")) is node]
    assert len(found) >= n, "not enough ids hash to that node"
    return found[:n]


class TestTopology:
    async def test_state_spreads_but_each_operation_stays_in_one_slot(
        self, redis_cluster: RedisClusterProcess, redis_cluster_store: RedisStore
    ) -> None:
        """Codes land on every primary, while the keys of one family, one user and the
        revocation index each live on a single node, so their scripts run atomically there."""
        store, p = redis_cluster_store, redis_cluster_store.key_prefix
        for i in range(60):
            await store.put_code(f"h{i}", {"i": i}, LONG)
        await store.create_family("f1", "t1", {"a": 1}, LONG)
        await store.add_family_jti("f1", "j1", wall() + LONG)
        assert await store.rotate_refresh("f1", "t1", "t2", LONG) is RotateOutcome.ROTATED
        await store.put_totp(TotpRecord("alice", "s", 0.0))
        await store.set_recovery_codes("alice", ["r1"])
        assert await store.burn_step("alice", 7, LONG) is True
        await store.revoke_jti("j9", wall() + LONG)

        codes = [await keys_on(node, f"{p}code:*") for node in redis_cluster.nodes]
        assert all(codes)
        assert sum(map(len, codes)) == 60
        for group, expected in (("fam:{f1}", 3), ("totp:{alice}", 3), ("rev:{all}", 2)):
            holders = [await keys_on(n, p + group + "*") for n in redis_cluster.nodes]
            holders = [keys for keys in holders if keys]
            assert len(holders) == 1, group
            assert len(holders[0]) == expected, holders

    async def test_scripts_survive_a_flushed_script_cache(
        self, redis_cluster: RedisClusterProcess, redis_cluster_store: RedisStore
    ) -> None:
        """A node that lost its scripts (restart, SCRIPT FLUSH) is given them again, and the
        one-time checks still hold (R34 burned steps, R20 rotation)."""
        store = redis_cluster_store
        assert await store.burn_step("alice", 10, LONG) is True
        await store.create_family("f1", "t1", {"a": 1}, LONG)
        for node in redis_cluster.nodes:
            raw = aioredis.Redis(port=node.port)
            try:
                await raw.script_flush()
            finally:
                await raw.aclose()
        assert await store.burn_step("alice", 10, LONG) is False
        assert await store.burn_step("alice", 11, LONG) is True
        assert await store.rotate_refresh("f1", "t1", "t2", LONG) is RotateOutcome.ROTATED
        assert await store.rotate_refresh("f1", "t1", "t3", LONG) is RotateOutcome.REUSED


class TestFeed:
    async def test_feed_listens_on_the_owner_and_every_node_hears_revocations(
        self, redis_cluster: RedisClusterProcess, redis_cluster_store: RedisStore
    ) -> None:
        """The store subscribes on the primary that owns `rev:{all}` (where the revocation
        script publishes, so delivery does not depend on the cluster bus), and each revocation
        is broadcast to every node, so a replica subscribed anywhere hears it (R22)."""
        store, p = redis_cluster_store, redis_cluster_store.key_prefix
        channel = p + "rev:feed"
        owner = redis_cluster.node_for(p + "rev:{all}")
        exp = wall() + LONG
        await store.revoke_jti("marker", exp)
        feed = store.watch_revocations()
        ports = [node.port for node in redis_cluster.nodes]
        listeners = [aioredis.Redis(port=port, decode_responses=True) for port in ports]
        pubsubs = [client.pubsub() for client in listeners]
        try:
            assert await anext(feed) == ("marker", exp)
            for node, client in zip(redis_cluster.nodes, listeners, strict=True):
                subscribers = dict(await client.pubsub_numsub(channel))[channel]
                assert subscribers == (1 if node is owner else 0), node.port
            for pubsub in pubsubs:
                await pubsub.subscribe(channel)
                assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
            await store.revoke_jti("j1", exp)
            async with asyncio.timeout(5):
                assert await anext(feed) == ("j1", exp)
                for pubsub in pubsubs:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                    assert message is not None
                    assert orjson.loads(message["data"]) == ["j1", exp]
        finally:
            await feed.aclose()  # type: ignore[attr-defined]
            for pubsub in pubsubs:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            for client in listeners:
                await client.aclose()

    async def test_idle_feed_survives_heartbeats(self, own_store: RedisStore) -> None:
        """An idle feed answers many heartbeat PINGs without breaking, then still delivers
        (a false 'stopped answering' would make every replica resubscribe needlessly)."""
        exp = wall() + LONG
        await own_store.revoke_jti("marker", exp)
        feed = own_store.watch_revocations()
        try:
            assert await anext(feed) == ("marker", exp)
            waiting = asyncio.ensure_future(anext(feed))
            await asyncio.sleep(1.0)  # five heartbeats of 0.2 s
            assert not waiting.done()
            await own_store.revoke_jti("later", exp)
            assert await asyncio.wait_for(waiting, 5) == ("later", exp)
        finally:
            await feed.aclose()  # type: ignore[attr-defined]


class TestFailClosed:
    async def test_unreachable_cluster_fails_closed_everywhere(self) -> None:
        """Every call on a cluster whose start-up nodes do not answer raises StoreUnavailable,
        never a redis or cluster exception (DESIGN §7.8)."""
        store = RedisStore.from_url(
            f"redis+cluster://127.0.0.1:{_free_port()},127.0.0.1:{_free_port()}/",
            clock=SystemClock(),
            timeout=0.5,
        )
        calls = every_call(store)
        assert set(calls) == store_methods()
        try:
            for name, call in calls.items():
                with pytest.raises(StoreUnavailable) as caught:
                    await call()
                assert type(caught.value) is StoreUnavailable, name
                cause = caught.value.__cause__
                assert isinstance(cause, RedisError | RedisClusterException | OSError), name
        finally:
            await store.close()

    async def test_stopped_node_fails_closed_then_recovers(
        self, redis_cluster: RedisClusterProcess, own_store: RedisStore
    ) -> None:
        """When the primary holding a key (and the revocation feed) stops, calls on it and the
        feed raise StoreUnavailable; once it is back the same store works again (§7.8)."""
        p = own_store.key_prefix
        owner = redis_cluster.node_for(p + "rev:{all}")
        [code] = ids_on(redis_cluster, owner, p + "code:{ID}", 1)
        await own_store.put_code(code, {"a": 1}, LONG)
        feed = own_store.watch_revocations()
        waiting = asyncio.ensure_future(anext(feed))
        try:
            await asyncio.sleep(0.1)
            owner.stop()
            try:
                with pytest.raises(StoreUnavailable):
                    await asyncio.wait_for(waiting, 5)
                with pytest.raises(StoreUnavailable):
                    await own_store.take_code(code)
                with pytest.raises(StoreUnavailable):
                    await own_store.revoke_jti("j1", wall() + LONG)
            finally:
                owner.start()
                redis_cluster.wait_ok()

            async def works() -> bool:
                try:
                    await own_store.put_code(code, {"b": 2}, LONG)
                except StoreUnavailable:
                    return False
                return True

            deadline = time.monotonic() + 10
            while not await works():
                assert time.monotonic() < deadline, "the store did not recover"
                await asyncio.sleep(0.1)
            assert await own_store.take_code(code) == {"b": 2}
            assert await own_store.take_code(code) is None
        finally:
            await feed.aclose()  # type: ignore[attr-defined]

    async def test_silent_node_times_out_and_answers_stay_aligned(
        self, redis_cluster: RedisClusterProcess, own_store: RedisStore
    ) -> None:
        """A primary that stops answering makes calls on its keys fail within the store
        time-out; after it resumes, the same store gets the right answers (no reply of the
        abandoned call is read as the answer to a later one) and a code is still single use."""
        p = own_store.key_prefix
        node = redis_cluster.nodes[0]
        code, other = ids_on(redis_cluster, node, p + "code:{ID}", 2)
        await own_store.put_code(code, {"a": 1}, LONG)
        await own_store.put_code(other, {"b": 2}, LONG)
        node.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await own_store.take_code(code)
            assert time.monotonic() - started < 1.0
        finally:
            node.resume()
        assert await own_store.take_code(other) == {"b": 2}
        assert await own_store.take_code(code) in (None, {"a": 1})
        assert await own_store.take_code(code) is None
        redis_cluster.wait_ok()


class TestUrls:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("redis+cluster://n1:7000/", ClusterTarget((("n1", 7000),))),
            (
                "redis+cluster://n1:7000,n2,[::1]:7002",
                ClusterTarget((("n1", 7000), ("n2", 6379), ("::1", 7002))),
            ),
            (
                "redis+cluster://gw:p%40ss@n1:7000/",
                ClusterTarget((("n1", 7000),), "gw", "p@ss"),
            ),
            ("redis+cluster://:pw@n1:7000/", ClusterTarget((("n1", 7000),), None, "pw")),
        ],
    )
    def test_cluster_url_parsing(self, url: str, expected: ClusterTarget) -> None:
        """Cluster URLs: several start-up nodes, default port 6379, IPv6, credentials."""
        assert parse_cluster_url(url) == expected

    @pytest.mark.parametrize(
        "url",
        [
            "redis+cluster://n1:7000/0",
            "redis+cluster://n1:7000/?read_from_replicas=1",
            "redis+cluster://n1:7000,/",
            "redis+cluster://n1:0/",
            "redis+cluster://[::1/",
            "redis+cluster:///",
            "redis://n1:7000/",
        ],
    )
    def test_bad_cluster_urls(self, url: str) -> None:
        """Malformed cluster URLs are refused with ValueError (a cluster has only db 0)."""
        with pytest.raises(ValueError):  # noqa: PT011 - messages vary by fault
            parse_cluster_url(url)

    @pytest.mark.parametrize(
        "url",
        [
            "redis+cluster://gw:hunter2secret@n1:notaport/",
            "redis+cluster://gw:hunter2secret@n1:7000,[n2/",
            "redis+cluster://gw:hunter2secret",  # no '@': the password reads as a port
        ],
    )
    def test_cluster_errors_hide_the_password(self, url: str) -> None:
        """A cluster URL error never repeats the password, even when a malformed URL puts it
        where a host or port should be (R35)."""
        with pytest.raises(ValueError) as caught:  # noqa: PT011 - messages vary by fault
            parse_cluster_url(url)
        assert "hunter2" not in str(caught.value)

    def test_replica_acks_refused_on_a_cluster(self) -> None:
        """Waiting for replica acknowledgements is not offered on a cluster: refused, not
        silently ignored."""
        client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", 7000)])
        with pytest.raises(ValueError, match="replica_acks"):
            RedisStore(client, clock=SystemClock(), replica_acks=1)

    async def test_url_reaches_the_cluster(self, redis_cluster: RedisClusterProcess) -> None:
        """`redis+cluster://` with a dead start-up node first still finds the cluster."""
        url = redis_cluster.url.replace("//", f"//127.0.0.1:{_free_port()},", 1)
        store = RedisStore.from_url(url, clock=SystemClock(), key_prefix="url-t:")
        try:
            await store.ping()
            await store.put_code("h", {"via": "cluster"}, LONG)
            assert await store.take_code("h") == {"via": "cluster"}
        finally:
            await store.close()
            await delete_cluster_prefix(redis_cluster.url, "url-t:")
