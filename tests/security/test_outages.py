"""Fail closed: store, upstream provider, MCP server and key failures never turn into a pass,
and every outbound call has a time-out (invariant 8).

Each test runs its own gateway (real port, real legacy provider) with the failing piece made
to fail for real: a private `redis-server` stopped or frozen (SIGSTOP), an upstream issuer or
MCP server on a port where nothing answers or where a listener accepts and stays silent, a
signing key file that is not a key, a trusted issuer whose JWKS cannot be fetched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.settings import ConfigError
from tests.fixtures.peers import LegacyIdp, McpServer, free_port
from tests.fixtures.redis_server import RedisServerProcess
from tests.security.harness import (
    Target,
    assert_page_headers,
    http_client,
    serve_target,
    tool_call,
)

pytestmark = pytest.mark.redis


@asynccontextmanager
async def silent_listener() -> AsyncIterator[int]:
    """A port that accepts connections and never answers (a stalled peer)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()


async def elapsed(call: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    """The response and how many seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await call
    return resp, loop.time() - started


def assert_unavailable_json(resp: httpx.Response) -> None:
    """503 `temporarily_unavailable`, no detail (R35, STYLE §4.2)."""
    assert resp.status_code == 503, resp.text[:300]
    assert resp.json() == {
        "error": "temporarily_unavailable",
        "error_description": "the service is temporarily unavailable",
    }
    assert resp.headers["cache-control"] == "no-store"


async def mcp_status_within(target: Target, token: str, status: int, seconds: float) -> int:
    """Poll the proxy until it answers `status` (or time runs out); the last status."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    seen = 0
    while loop.time() < deadline:
        seen = (await target.mcp(token=token)).status_code
        if seen == status:
            break
        await asyncio.sleep(0.05)
    return seen


async def test_store_outage_fails_closed_everywhere(
    tmp_path: Path, legacy_idp: LegacyIdp, gateway_ports: tuple[int, int], mcp_server: McpServer
) -> None:
    """Invariant 8: with Redis gone, nothing is granted: authorization, token and MCP requests
    (even with a valid, already verified token) get 503 `temporarily_unavailable` (an HTML page
    for a browser), readiness says so, liveness stays up."""
    redis = RedisServerProcess(tmp_path)
    redis.start()
    try:
        async with serve_target(
            tmp_path / "gw",
            idp=legacy_idp,
            port=gateway_ports[0],
            resources=[{"path": "/mcp", "upstream": mcp_server.url}],
            store_url=redis.url,
            store={"timeout": "500ms"},
        ) as target:
            client = await target.register()
            user = await target.new_user()
            tokens = await target.tokens(user, client)
            assert tokens.refresh_token is not None
            assert (await target.mcp(token=tokens.access_token)).status_code == 200
            redis.stop()

            mcp = await mcp_status_within(target, tokens.access_token, 503, 5.0)
            async with http_client() as http:
                authorize = await http.get(
                    target.authorize_url(client), headers={"Accept": "application/json"}
                )
                page = await http.get(
                    target.authorize_url(client),
                    headers={"Accept": "text/html,application/xhtml+xml"},
                )
                ready = await http.get(target.url + "/readyz")
                live = await http.get(target.url + "/healthz")
            refresh = await target.refresh(tokens.refresh_token, client)
            redeem = await target.token(
                {
                    "grant_type": "authorization_code",
                    "code": "x" * 43,
                    "code_verifier": "v" * 43,
                    "client_id": client.client_id,
                }
            )
    finally:
        redis.stop()
    assert mcp == 503
    assert_unavailable_json(authorize)
    assert page.status_code == 503
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert_page_headers(page)
    assert_unavailable_json(refresh)
    assert_unavailable_json(redeem)
    assert ready.status_code == 503
    assert ready.json()["checks"]["store"] == "unavailable"
    assert live.status_code == 200


async def test_frozen_store_times_out_instead_of_hanging(
    tmp_path: Path, legacy_idp: LegacyIdp, gateway_ports: tuple[int, int], mcp_server: McpServer
) -> None:
    """Invariant 8 (a time-out on every outbound call): a Redis that accepts but never answers
    (SIGSTOP) makes a token request fail with 503 after `store.timeout`, not hang."""
    redis = RedisServerProcess(tmp_path)
    redis.start()
    try:
        async with serve_target(
            tmp_path / "gw",
            idp=legacy_idp,
            port=gateway_ports[0],
            resources=[{"path": "/mcp", "upstream": mcp_server.url}],
            store_url=redis.url,
            store={"timeout": "500ms"},
        ) as target:
            client = await target.register()
            redis.pause()
            try:
                resp, took = await elapsed(
                    target.token(
                        {
                            "grant_type": "authorization_code",
                            "code": "x" * 43,
                            "code_verifier": "v" * 43,
                            "client_id": client.client_id,
                        }
                    )
                )
            finally:
                redis.resume()
    finally:
        redis.stop()
    assert_unavailable_json(resp)
    assert took < 3.0


async def test_upstream_provider_down_or_silent_fails_closed_in_time(
    tmp_path: Path, legacy_idp: LegacyIdp, gateway_ports: tuple[int, int], mcp_server: McpServer
) -> None:
    """Invariant 8: with the upstream provider unreachable (nothing listening) or silent (a
    listener that never answers), the authorization request answers 503 within the upstream
    time-out; nobody is sent anywhere and readiness reports the upstream."""
    outcomes: list[tuple[httpx.Response, float, httpx.Response]] = []
    async with silent_listener() as silent:
        for index, issuer in enumerate(
            (f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{silent}")
        ):
            async with serve_target(
                tmp_path / f"gw{index}",
                idp=legacy_idp,
                port=gateway_ports[index],
                resources=[{"path": "/mcp", "upstream": mcp_server.url}],
                upstream={"issuer": issuer, "timeout": "500ms"},
            ) as target:
                client = await target.register()
                async with http_client() as http:
                    resp, took = await elapsed(
                        http.get(target.authorize_url(client), headers={"Accept": "text/html"})
                    )
                    ready = await http.get(target.url + "/readyz")
                outcomes.append((resp, took, ready))
    for resp, took, ready in outcomes:
        assert resp.status_code == 503
        assert "location" not in resp.headers
        assert_page_headers(resp)
        assert took < 2.5
        assert ready.status_code == 503
        assert ready.json()["checks"]["upstream"] == "unavailable"


async def test_mcp_server_down_or_silent_gives_502_or_504(
    tmp_path: Path, legacy_idp: LegacyIdp, gateway_ports: tuple[int, int]
) -> None:
    """DESIGN §4.5: an unreachable MCP server is 502 and a silent one 504 after the request
    time-out, both as JSON-RPC errors without detail; never a hang."""
    async with (
        silent_listener() as silent,
        serve_target(
            tmp_path / "gw",
            idp=legacy_idp,
            port=gateway_ports[0],
            resources=[
                {"path": "/down", "upstream": f"http://127.0.0.1:{free_port()}/mcp"},
                {"path": "/silent", "upstream": f"http://127.0.0.1:{silent}/mcp"},
            ],
            server={"request_timeout": "1s"},
        ) as target,
    ):
        down = await target.mcp(
            tool_call("echo", text="x"),
            token=target.sign(target.mint(aud=target.resource("/down"))),
            path="/down",
        )
        stalled, took = await elapsed(
            target.mcp(
                tool_call("echo", text="x"),
                token=target.sign(target.mint(aud=target.resource("/silent"))),
                path="/silent",
            )
        )
    assert down.status_code == 502
    assert down.json()["error"] == {"code": -32603, "message": "The MCP server is unreachable"}
    assert stalled.status_code == 504
    assert stalled.json()["error"] == {
        "code": -32603,
        "message": "The MCP server did not answer in time",
    }
    assert took < 4.0


@pytest.mark.parametrize("content", [b"not a key", b"", b"RSA"])
async def test_unusable_signing_key_refuses_to_start(
    tmp_path: Path,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    content: bytes,
) -> None:
    """Invariant 8 (key failure): a signing key file that is not a usable ES256 key stops the
    gateway at start-up with a config error naming the key; it never serves."""
    (tmp_path / "keys").mkdir()
    if content == b"RSA":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        content = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    (tmp_path / "keys" / "es256-1.pem").write_bytes(content)
    with pytest.raises(ConfigError) as refused:
        async with serve_target(
            tmp_path,
            idp=legacy_idp,
            port=gateway_ports[0],
            resources=[{"path": "/mcp", "upstream": mcp_server.url}],
        ):
            pytest.fail("the gateway served with an unusable key")
    assert any("keys.signing[0].file" in p for p in refused.value.problems)
    async with http_client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{gateway_ports[0]}/healthz")


async def test_trusted_issuer_whose_keys_cannot_be_fetched_is_not_trusted(
    tmp_path: Path, legacy_idp: LegacyIdp, gateway_ports: tuple[int, int], mcp_server: McpServer
) -> None:
    """Invariant 8: a token naming a configured trusted issuer whose JWKS cannot be fetched is
    not accepted on faith: 503, and nothing reaches the MCP server."""
    issuer = "https://trusted.example"
    async with (
        serve_target(
            tmp_path / "gw",
            idp=legacy_idp,
            port=gateway_ports[0],
            resources=[{"path": "/mcp", "upstream": mcp_server.url}],
            keys={
                "trusted_issuers": [
                    {
                        "issuer": issuer,
                        "algs": ["ES256"],
                        "jwks_uri": f"http://127.0.0.1:{free_port()}/jwks.json",
                    }
                ]
            },
        ) as target,
    ):
        mark = mcp_server.mark()
        claims = target.mint(iss=issuer)
        token = jwt.encode(
            claims,
            ec.generate_private_key(ec.SECP256R1()),
            algorithm="ES256",
            headers={"kid": "k1", "typ": "at+jwt"},
        )
        resp = await target.mcp(tool_call("echo", text="x"), token=token)
    assert resp.status_code == 503
    assert resp.json()["error"] == {
        "code": -32603,
        "message": "The service is temporarily unavailable",
    }
    assert mcp_server.records("http", since=mark) == []
