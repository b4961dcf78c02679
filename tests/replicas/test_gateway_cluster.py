"""The whole gateway on a real three-node Redis Cluster (issue 5, part 7).

The store-level suite (tests/stores/test_redis_cluster.py) proves each store operation on the
cluster; here the real gateway runs with `store.url = redis+cluster://...` of the session
cluster, in front of the real legacy provider and the SDK MCP server, under a key prefix of its
own. One user's whole flow (login, TOTP, token, MCP call, refresh, revocation enforced by the
proxy through the cluster's revocation feed) must work, the gateway's state must really be
spread over the nodes, and the three 50-way races of tests/security/test_races.py (one code,
one refresh token, one TOTP code) must each still have exactly one winner: every operation's
keys share one hash tag, so its script runs atomically on one node. The race bodies are the
security suite's own functions, called with this module's cluster-backed target.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.fixtures.peers import LegacyIdp, McpServer
from tests.fixtures.redis_server import (
    RedisClusterProcess,
    RedisServerProcess,
    delete_cluster_prefix,
)
from tests.replicas.gateway_checks import full_flow, unique_prefix
from tests.security import test_races as races
from tests.security.harness import RegisteredClient, Target, serve_target

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.redis]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(
    tmp_path_factory: pytest.TempPathFactory,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    redis_cluster: RedisClusterProcess,
) -> AsyncIterator[Target]:
    """The module's gateway on the session cluster under its own key prefix (deleted after);
    lockout out of the way so that the TOTP race's refusals come from the replay guard."""
    prefix = unique_prefix("gwcluster")
    try:
        async with serve_target(
            tmp_path_factory.mktemp("cluster-gw"),
            idp=legacy_idp,
            port=gateway_ports[0],
            resources=[{"path": "/mcp", "upstream": mcp_server.url}],
            store_url=redis_cluster.url,
            store={"key_prefix": prefix},
            policy={"stepup": {"max_failures_per_user": 1000, "max_failures_per_ip": 1000}},
        ) as t:
            assert t.gw.settings.store.url.startswith("redis+cluster://")
            yield t
    finally:
        await delete_cluster_prefix(redis_cluster.url, prefix)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(target: Target) -> RegisteredClient:
    """A public client registered for the races."""
    return await target.register(name="Cluster race client")


async def keys_on(node: RedisServerProcess, prefix: str) -> list[str]:
    """The keys under `prefix` that this node itself holds."""
    raw = aioredis.Redis(port=node.port, decode_responses=True)
    try:
        return [k async for k in raw.scan_iter(match=prefix + "*", count=500)]
    finally:
        await raw.aclose()


async def test_whole_flow_and_revocation_on_the_cluster(
    target: Target, mcp_server: McpServer, redis_cluster: RedisClusterProcess
) -> None:
    """R10, R17, R20, R22, R25, R34 on Redis Cluster: login, TOTP, redemption, an MCP call
    relayed, refresh rotation, and an access-token revocation that the proxy enforces (the jti
    reaches it only through the feed, subscribed on the node that owns `rev:{all}`); the
    gateway's state really lies on more than one node, each key in the slot of its hash tag."""
    await full_flow(target, mcp_server, tag="cluster")

    prefix = target.gw.settings.store.key_prefix
    held = {node.port: await keys_on(node, prefix) for node in redis_cluster.nodes}
    assert sum(1 for keys in held.values() if keys) >= 2, held
    for port, keys in held.items():
        for key in keys:
            assert "{" in key, key  # every key carries its hash tag
            assert redis_cluster.node_for(key).port == port, key
    revocations = [k for keys in held.values() for k in keys if k.startswith(prefix + "rev:")]
    assert revocations  # the revoked jti (and the feed's probes) are on the cluster
    assert {redis_cluster.node_for(k).port for k in revocations} == {
        redis_cluster.node_for(prefix + "rev:{all}").port
    }


async def test_one_code_fifty_times_at_once_on_the_cluster(
    target: Target, client: RegisteredClient
) -> None:
    """R17, invariant 4 on Redis Cluster: 50 concurrent redemptions of one code give exactly
    one 200 and 49 `invalid_grant`, and the winner's token is then revoked at the proxy
    (tests/security/test_races.py's race, run against this cluster-backed gateway)."""
    await races.test_one_code_redeemed_fifty_times_at_once_yields_one_token(target, client)


async def test_one_refresh_token_fifty_times_at_once_on_the_cluster(
    target: Target, client: RegisteredClient
) -> None:
    """R20, invariant 4 on Redis Cluster: 50 concurrent refreshes with one refresh token rotate
    it exactly once; the reuse kills the family, so the winner's new refresh token is dead."""
    await races.test_one_refresh_token_used_fifty_times_at_once_rotates_once(target, client)


async def test_one_totp_code_fifty_times_at_once_on_the_cluster(
    target: Target, client: RegisteredClient
) -> None:
    """R34, invariant 5 on Redis Cluster: one TOTP code posted 50 times across ten transactions
    of one user yields exactly one authorization code (the burned step is one key, one slot)."""
    await races.test_one_totp_code_posted_fifty_times_at_once_succeeds_once(target, client)
