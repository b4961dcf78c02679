"""The proxy on a real Redis shared by replicas: revocations, sessions, outages (DESIGN §7.8)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from gateway.adapters.redis_store import RedisStore
from gateway.clock import FixedClock, SystemClock
from tests.fixtures.redis_server import RedisServerProcess, delete_prefix
from tests.proxy.conftest import Gateway, MakeGateway, Peer, eventually, rpc

pytestmark = pytest.mark.redis

StoreFactory = Callable[..., RedisStore]


@pytest.fixture
async def shared_stores(redis_url: str) -> AsyncIterator[StoreFactory]:
    """RedisStores on the session's server under one fresh prefix (two gateways, one state)."""
    prefix = f"proxy-{secrets.token_hex(6)}:"
    made: list[RedisStore] = []
    clock = FixedClock(SystemClock().now())

    def factory(url: str = redis_url) -> RedisStore:
        store = RedisStore.from_url(url, clock=clock, key_prefix=prefix, timeout=1.0, heartbeat=1.0)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()
    await delete_prefix(redis_url, prefix)


def _jti_exp(token: str) -> tuple[str, float]:
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return claims["jti"], claims["exp"]


async def test_revocation_reaches_every_gateway(
    make_gateway: MakeGateway, shared_stores: StoreFactory, upstream_peer: Peer
) -> None:
    """A token revoked through one replica is refused by another (pub/sub, no per-request
    round trip)."""
    a = await make_gateway(store=shared_stores())
    b = await make_gateway(store=shared_stores())
    token = b.token()
    assert (await b.client.post("/mcp", json=rpc("ping"), headers=b.auth(token))).status == 200
    await a.store.revoke_jti(*_jti_exp(token))
    await eventually(lambda: b.state.revocations.is_revoked(_jti_exp(token)[0]))
    resp = await b.client.post("/mcp", json=rpc("ping"), headers=b.auth(token))
    assert resp.status == 401


async def test_revoked_before_start_is_known(
    make_gateway: MakeGateway, shared_stores: StoreFactory
) -> None:
    """A replica starting later learns earlier revocations from the snapshot."""
    a = await make_gateway(store=shared_stores())
    token = a.token()
    await a.store.revoke_jti(*_jti_exp(token))
    b = await make_gateway(store=shared_stores())
    resp = await b.client.post("/mcp", json=rpc("ping"), headers=b.auth(token))
    assert resp.status == 401


async def test_session_bound_across_replicas(
    make_gateway: MakeGateway, shared_stores: StoreFactory, upstream_peer: Peer
) -> None:
    """A session opened through one replica cannot be used by another subject on another."""

    async def handler(request: web.Request) -> web.StreamResponse:
        msg = json.loads(await request.read())
        headers = {"Mcp-Session-Id": "s-42"} if msg.get("method") == "initialize" else {}
        return web.json_response(
            {"jsonrpc": "2.0", "id": msg.get("id"), "result": {}}, headers=headers
        )

    upstream_peer.handler = handler
    a = await make_gateway(store=shared_stores())
    b = await make_gateway(store=shared_stores())
    init = await a.client.post("/mcp", json=rpc("initialize", 0), headers=a.auth())
    sid = init.headers["Mcp-Session-Id"]
    bob = b.auth(b.token(sub="bob"), **{"Mcp-Session-Id": sid})
    assert (await b.client.post("/mcp", json=rpc("ping"), headers=bob)).status == 404
    alice = b.auth(b.token(sub="alice"), **{"Mcp-Session-Id": sid})
    assert (await b.client.post("/mcp", json=rpc("ping"), headers=alice)).status == 200


async def test_redis_outage_fails_closed_then_recovers(
    make_gateway: MakeGateway, tmp_path: Path, upstream_peer: Peer
) -> None:
    """Redis gone: valid tokens get 503 (never a pass); Redis back: service resumes."""
    server = RedisServerProcess(tmp_path)
    server.start()
    prefix = f"outage-{secrets.token_hex(4)}:"
    store = RedisStore.from_url(
        server.url, clock=SystemClock(), key_prefix=prefix, timeout=0.5, heartbeat=0.5
    )
    try:
        gw: Gateway = await make_gateway(store=store)
        token = gw.token()
        assert (
            await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(token))
        ).status == 200
        server.stop()
        await eventually(lambda: not gw.state.revocations.current, within=5)
        resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(token))
        assert resp.status == 503
        server.start()
        async with asyncio.timeout(10):
            await gw.state.revocations.wait_current()
        resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(token))
        assert resp.status == 200
    finally:
        await store.close()
        server.stop()
