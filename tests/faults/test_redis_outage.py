"""Redis dies, falls silent or comes back under a real gateway process (DESIGN §7.8, invariant 1).

Each test runs `python -m gateway run` against a `redis-server` of its own (`RedisServerProcess`,
persistence off, `[store] timeout = 0.5s`). While the store is gone every request that needs it
fails closed with a clean 503: RFC 6749 JSON `temporarily_unavailable` on the back channel, an
HTML page for browser navigations, a JSON-RPC error on MCP paths; no traceback, nothing passed
on to the MCP server, no code issued. When Redis is back the same process recovers on its own.
A step cut off half-way (the store applied a one-time consumption but the gateway never saw the
reply) is never resumed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.mcp_oauth import DEFAULT_REDIRECT_URI
from tests.e2e.useragent import Outcome, Page, UserAgent, at_form_with
from tests.faults.flow import (
    ALICE_SECRET,
    HTTP_TIMEOUT,
    TotpDevice,
    answers,
    browser,
    legacy_upstream,
    mcp_post,
    register_client,
    rpc,
    tokens_for,
)
from tests.faults.junk_peers import PeerLoop, TinyIdp, peer_loop
from tests.faults.procs import (
    GatewayLauncher,
    GatewayProcess,
    config_for,
    enroll,
    mint_token,
    wait_ready,
)
from tests.fixtures.peers import LegacyIdp, McpServer, free_port
from tests.fixtures.redis_server import RedisServerProcess

__all__ = ["peer_loop"]

pytestmark = pytest.mark.redis

STORE_TIMEOUT = 0.5
# A request during an outage must be answered within the store time-out and some slack.
ANSWER_WITHIN = STORE_TIMEOUT + 1.5
# The Redis revocation feed's PING heartbeat (`RedisStore.from_url(heartbeat=15.0)`; `[store]`
# offers no setting for it): how long a silent Redis can go unnoticed by the feed.
FEED_HEARTBEAT = 15.0

UNAVAILABLE_JSON = {
    "error": "temporarily_unavailable",
    "error_description": "the service is temporarily unavailable",
}
UNAVAILABLE_RPC = {
    "jsonrpc": "2.0",
    "id": None,
    "error": {"code": -32603, "message": "The service is temporarily unavailable"},
}


@pytest.fixture
def redis_process(tmp_path: Path) -> Any:
    """A `redis-server` of this test's own, stopped afterwards."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServerProcess(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _clean(text: str, redis: RedisServerProcess) -> None:
    """An error body names no internals: no traceback, no exception, no store address."""
    assert "Traceback" not in text
    assert "Error" not in text
    assert "redis" not in text.lower()
    assert str(redis.port) not in text


def _assert_json_503(resp: httpx.Response, redis: RedisServerProcess) -> None:
    assert resp.status_code == 503
    assert resp.json() == UNAVAILABLE_JSON
    assert resp.headers["cache-control"] == "no-store"
    _clean(resp.text, redis)


def _assert_rpc_503(resp: httpx.Response, redis: RedisServerProcess) -> None:
    assert resp.status_code == 503
    assert resp.json() == UNAVAILABLE_RPC
    assert resp.headers["cache-control"] == "no-store"
    _clean(resp.text, redis)


def _assert_html_503(page: Page, redis: RedisServerProcess) -> None:
    assert page.status == 503
    assert page.location is None
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "<h1>Temporarily unavailable</h1>" in page.html
    _clean(page.html, redis)


async def _timed(coro: Any) -> Any:
    """Await `coro` and fail if it took longer than `ANSWER_WITHIN` (fail fast, never hang)."""
    start = time.monotonic()
    result = await coro
    elapsed = time.monotonic() - start
    assert elapsed < ANSWER_WITHIN, f"answered only after {elapsed:.2f}s"
    return result


def _new_ua() -> UserAgent:
    return browser(UserAgent(redirect_uri=DEFAULT_REDIRECT_URI))


async def test_redis_killed_mid_flow_fails_closed_then_recovers(
    tmp_path: Path,
    gateway_processes: GatewayLauncher,
    redis_process: RedisServerProcess,
    legacy_idp: LegacyIdp,
    mcp_server: McpServer,
    gateway_ports: tuple[int, int],
) -> None:
    """Redis is killed while a user sits on the TOTP page and a client holds valid tokens:
    every endpoint answers 503 at once (JSON, HTML page or JSON-RPC error), the valid token is
    refused and nothing reaches the MCP server, the TOTP submission yields no code, /readyz says
    why. Redis restarts (empty): the same process serves again, the half-done flow is dead, and
    a new flow completes end to end (DESIGN §7.8, invariant 1, R25)."""
    redis = redis_process
    path = config_for(
        tmp_path / "gw",
        port=gateway_ports[0],
        store_url=redis.url,
        store={"timeout": f"{STORE_TIMEOUT}s"},
        upstream=legacy_upstream(legacy_idp),
        resources=[{"path": "/mcp", "upstream": mcp_server.url}],
    )
    gw = gateway_processes.start(path)
    pid = gw.pid
    await enroll(path, "alice", ALICE_SECRET)
    device = TotpDevice(ALICE_SECRET)
    client = await register_client(gw.url)

    # A client that finished its flow, and a user half-way through another one.
    auth = client.authorization(gw.url)
    async with _new_ua() as ua:
        response = await ua.authorize(auth.url, answers=answers(legacy_idp, device))
    tokens = await tokens_for(gw.url, client, auth, response)
    access = tokens["access_token"]
    assert (await mcp_post(gw.url + "/mcp", access, rpc("tools/list"))).status_code == 200
    pending_ua = _new_ua()
    pending = client.authorization(gw.url)
    outcome: Outcome = await pending_ua.run(
        pending.url, answers=answers(legacy_idp, device), stop=at_form_with("code")
    )
    assert outcome.page is not None
    totp_page = outcome.page
    assert totp_page.status == 200
    mark = mcp_server.mark()

    redis.stop()
    killed = time.monotonic()
    await gw.wait_event("store_unavailable", reason="revocation feed broken", within=3.0)
    assert time.monotonic() - killed < 2.0

    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        bearer = {"Authorization": "Bearer " + access}
        _assert_rpc_503(await _timed(mcp_post(gw.url + "/mcp", access, rpc("tools/list"))), redis)
        get_stream = await _timed(
            http.get(gw.url + "/mcp", headers={**bearer, "Accept": "text/event-stream"})
        )
        _assert_rpc_503(get_stream, redis)
        assert mcp_server.records("http", since=mark) == []

        refresh = {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": client.client_id,
        }
        _assert_json_503(await _timed(http.post(gw.url + "/oauth/token", data=refresh)), redis)
        revoke = {"token": access, "client_id": client.client_id}
        _assert_json_503(await _timed(http.post(gw.url + "/oauth/revoke", data=revoke)), redis)
        registration = {
            "redirect_uris": [DEFAULT_REDIRECT_URI],
            "token_endpoint_auth_method": "none",
        }
        _assert_json_503(
            await _timed(http.post(gw.url + "/oauth/register", json=registration)), redis
        )
        ready = await _timed(http.get(gw.url + "/readyz"))
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "unavailable",
            "checks": {"store": "unavailable", "upstream": "ok"},
        }
        assert (await http.get(gw.url + "/healthz")).status_code == 200

    # The user types a correct code: no code for the client, just the outage page.
    _assert_html_503(await _timed(pending_ua.submit(totp_page, {"code": device.peek()})), redis)
    async with _new_ua() as ua:
        _assert_html_503(await _timed(ua.get(client.authorization(gw.url).url)), redis)
        callback = gw.url + "/oauth/callback?state=s0me-state&code=s0me-code"
        _assert_html_503(await _timed(ua.get(callback)), redis)

    # Redis is back (empty: persistence is off). The same process recovers by itself.
    redis.start()
    assert (await wait_ready(gw.url, within=10.0))["status"] == "ok"
    await gw.wait_event("revocation_feed_current", count=2)
    assert gw.alive
    assert gw.pid == pid
    resp = await mcp_post(gw.url + "/mcp", access, rpc("tools/list"))
    assert resp.status_code == 200
    # The flow that was half-way through is gone with the store: no code, ever.
    after = await pending_ua.submit(totp_page, {"code": device.peek()})
    await pending_ua.aclose()
    assert after.status == 400
    assert after.location is None
    assert "start signing in again" in after.html
    # So is the dynamically registered client: its refresh token is refused, not honoured.
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        refreshed = await http.post(gw.url + "/oauth/token", data=refresh)
    assert refreshed.status_code == 401
    assert refreshed.json()["error"] == "invalid_client"

    # What an operator does after losing Redis's data: enrol again; clients register again.
    await enroll(path, "alice", ALICE_SECRET)
    again = await register_client(gw.url)
    fresh = again.authorization(gw.url)
    async with _new_ua() as ua:
        response = await ua.authorize(fresh.url, answers=answers(legacy_idp, device))
    new_tokens = await tokens_for(gw.url, again, fresh, response)
    resp = await mcp_post(gw.url + "/mcp", new_tokens["access_token"], rpc("tools/list"))
    assert resp.status_code == 200
    assert gw.events("unhandled_error") == []
    assert "Traceback" not in gw.log_text()


async def test_a_callback_cut_off_by_a_silent_store_is_never_resumed(
    tmp_path: Path,
    gateway_processes: GatewayLauncher,
    redis_process: RedisServerProcess,
    peer_loop: PeerLoop,
) -> None:
    """Redis falls silent (SIGSTOP) after the callback consumed the upstream `state` but before
    the login was recorded: the user gets the 503 page within the store time-out, and once
    Redis answers again the same callback is refused (single-use state) instead of continuing
    from the half-written transaction; the provider's code was redeemed once only. A new flow
    then completes (R16, DESIGN §7.8)."""
    redis = redis_process
    idp = TinyIdp().start(peer_loop)
    try:
        path = config_for(
            tmp_path / "gw",
            port=free_port(),
            store_url=redis.url,
            store={"timeout": f"{STORE_TIMEOUT}s"},
            upstream={"issuer": idp.url, "client_id": idp.client_id, "timeout": "5s"},
        )
        gw: GatewayProcess = gateway_processes.start(path)
        await enroll(path, "alice", ALICE_SECRET)
        client = await register_client(gw.url)
        device = TotpDevice(ALICE_SECRET)
        idp.hold_tokens()
        ua = _new_ua()
        auth = client.authorization(gw.url)
        async with asyncio.TaskGroup() as group:
            run = group.create_task(ua.run(auth.url, answers={"decision": "approve"}))
            assert await asyncio.to_thread(idp.token_requested.wait, 10.0)
            redis.pause()  # the callback has taken the state; the rest will find Redis silent
            idp.release_tokens()
        outcome = run.result()
        assert outcome.page is not None
        assert outcome.page.url.startswith(gw.url + "/oauth/callback?")
        _assert_html_503(outcome.page, redis)

        redis.resume()
        await wait_ready(gw.url, within=10.0)
        again = await ua.get(outcome.page.url)  # the user reloads the callback
        await ua.aclose()
        assert again.status == 400
        assert again.location is None
        assert "was already used" in again.html
        assert idp.token_requests == 1

        idp.reset()
        fresh = client.authorization(gw.url)
        async with _new_ua() as ua2:
            response = await ua2.authorize(
                fresh.url, answers={"decision": "approve", "code": device.code}
            )
        new_tokens = await tokens_for(gw.url, client, fresh, response)
        assert new_tokens["token_type"] == "Bearer"
        assert gw.events("unhandled_error") == []
    finally:
        idp.stop()


async def test_a_silent_store_refuses_valid_tokens_within_the_feed_heartbeat(
    tmp_path: Path,
    gateway_processes: GatewayLauncher,
    redis_process: RedisServerProcess,
    mcp_server: McpServer,
) -> None:
    """Redis stops answering without closing its connections (SIGSTOP: a silent network). The
    revocation feed notices within its heartbeat (15 s) plus the store time-out; from then on
    valid tokens are refused with 503 and no request reaches the MCP server; no request hangs
    meanwhile. Redis answers again: tokens are accepted again (DESIGN §7.8).

    Until the heartbeat fires, the proxy still accepts tokens on its local deny-list (which no
    one can change while Redis is silent to everyone): that bounded window is what this test
    pins down."""
    redis = redis_process
    path = config_for(
        tmp_path / "gw",
        port=free_port(),
        store_url=redis.url,
        store={"timeout": f"{STORE_TIMEOUT}s"},
        resources=[{"path": "/mcp", "upstream": mcp_server.url}],
    )
    gw = gateway_processes.start(path)
    token = mint_token(path)
    assert (await mcp_post(gw.url + "/mcp", token, rpc("ping"))).status_code == 200

    redis.pause()
    paused = time.monotonic()
    try:
        while True:
            resp = await _timed(mcp_post(gw.url + "/mcp", token, rpc("ping")))
            if resp.status_code == 503:
                break
            assert resp.status_code == 200
            waited = time.monotonic() - paused
            assert waited < FEED_HEARTBEAT + STORE_TIMEOUT + 3.0, (
                f"valid tokens still accepted {waited:.1f}s after the store fell silent: the "
                "revocation feed waits a whole heartbeat for the PONG of its heartbeat PING"
            )
            await asyncio.sleep(0.25)
        noticed = time.monotonic() - paused
        _assert_rpc_503(resp, redis)
        mark = mcp_server.mark()
        _assert_rpc_503(await _timed(mcp_post(gw.url + "/mcp", token, rpc("ping"))), redis)
        assert mcp_server.records("http", since=mark) == []
    finally:
        redis.resume()
    assert noticed <= FEED_HEARTBEAT + STORE_TIMEOUT + 3.0
    await gw.wait_event("revocation_feed_current", count=2, within=10.0)
    assert (await mcp_post(gw.url + "/mcp", token, rpc("ping"))).status_code == 200
    assert gw.events("unhandled_error") == []
