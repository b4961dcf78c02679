"""What reaches the MCP server: headers, credentials, paths, origins (R26, R32, R33, §4.5)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web

from gateway.adapters.upstream_oidc import UpstreamClient
from gateway.flows.upstream_tokens import store_tokens
from gateway.ports import UpstreamTokens
from gateway.web.appkeys import CLOCK, HTTP, SEALER, SETTINGS
from gateway.web.proxy import upstream_url
from gateway.web.stepup_handlers import UPSTREAM
from tests.proxy.conftest import MakeGateway, Peer, challenge, rpc, tool_call


async def raw_request(
    client: Any,
    target: str,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    body: bytes = b"{}",
) -> int:
    """Send a request line exactly as written (no client-side normalisation); the status."""
    return (await raw_exchange(client, target, headers, method, body))[0]


async def raw_exchange(
    client: Any,
    target: str,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    body: bytes = b"{}",
) -> tuple[int, bytes]:
    """Like `raw_request`, returning the status and the whole raw response."""
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {host}:{port}",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return int(data.split(b" ", 2)[1]), data


class TestRequestHeaders:
    async def test_client_token_and_identity_headers_stripped(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """No Authorization, Cookie, Origin, forwarding or identity header of the client's
        reaches the MCP server; X-Forwarded-* are the gateway's own (R26, R33)."""
        gw = await make_gateway()
        headers = gw.auth(
            Cookie="mfagw_tx=secret",
            Origin="http://127.0.0.1:8080",
            Forwarded="for=6.6.6.6",
            **{
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Host": "evil.example",
                "X-Forwarded-Proto": "https",
                "X-Real-IP": "6.6.6.6",
                "X-Remote-User": "admin",
                "X-Auth-Request-User": "admin",
                "X-User": "admin",
                "Remote-User": "admin",
                "Proxy-Authorization": "Basic eDp5",
                "Keep-Alive": "timeout=5",
                "X-Custom-Thing": "kept",
            },
        )
        resp = await gw.client.post("/mcp", json=rpc("tools/list"), headers=headers)
        assert resp.status == 200
        seen = upstream_peer.last().headers
        for name in (
            "Authorization",
            "Cookie",
            "Origin",
            "Forwarded",
            "X-Real-IP",
            "X-Remote-User",
            "X-Auth-Request-User",
            "X-User",
            "Remote-User",
            "Proxy-Authorization",
            "Keep-Alive",
        ):
            assert name not in seen, name
        assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
        assert seen.getall("X-Forwarded-Host") == ["127.0.0.1:8080"]
        assert seen.getall("X-Forwarded-Proto") == ["http"]
        assert seen["X-Custom-Thing"] == "kept"

    async def test_fields_named_in_connection_stripped(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Every field the client nominated in `Connection` is hop-by-hop (RFC 9110 §7.6.1)."""
        gw = await make_gateway()
        headers = gw.auth(Connection="keep-alive, X-Secret-Hop", **{"X-Secret-Hop": "1"})
        assert (await gw.client.post("/mcp", json=rpc("ping"), headers=headers)).status == 200
        assert "X-Secret-Hop" not in upstream_peer.last().headers

    async def test_mcp_headers_pass(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """MCP-Protocol-Version, Mcp-Method, Mcp-Name, Mcp-Param-* and Last-Event-ID pass."""
        gw = await make_gateway()
        headers = gw.auth(
            **{
                "MCP-Protocol-Version": "2026-07-28",
                "Mcp-Method": "tools/call",
                "Mcp-Name": "search",
                "Mcp-Param-Region": "eu",
                "Last-Event-ID": "ev-7",
            }
        )
        resp = await gw.client.post("/mcp", json=tool_call("search"), headers=headers)
        assert resp.status == 200
        seen = upstream_peer.last().headers
        assert seen["MCP-Protocol-Version"] == "2026-07-28"
        assert (seen["Mcp-Method"], seen["Mcp-Name"]) == ("tools/call", "search")
        assert seen["Mcp-Param-Region"] == "eu"
        assert seen["Last-Event-ID"] == "ev-7"

    async def test_body_forwarded_unchanged(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """The bytes policy evaluated are the bytes the MCP server gets (arguments included)."""
        gw = await make_gateway()
        raw = json.dumps(tool_call("search", q="ünïcode")).encode()
        resp = await gw.client.post("/mcp", data=raw, headers=gw.auth())
        assert resp.status == 200
        assert upstream_peer.last().body == raw


class TestForwardToken:
    async def test_identity_token(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """forward_token = identity: a short-lived gateway JWT naming subject, client and amr."""
        gw = await make_gateway(
            resources=[
                {"path": "/mcp", "upstream": upstream_peer.mcp_url, "forward_token": "identity"}
            ]
        )
        client_token = gw.token(sub="alice", client_id="client-9")
        resp = await gw.client.post("/mcp", json=rpc("tools/list"), headers=gw.auth(client_token))
        assert resp.status == 200
        auth = upstream_peer.last().headers["Authorization"]
        assert auth.startswith("Bearer ")
        identity = auth.removeprefix("Bearer ")
        assert identity != client_token
        public = gw.keys.active.private_key.public_key()
        claims = jwt.decode(
            identity,
            public,
            algorithms=["ES256"],
            audience=upstream_peer.mcp_url,
            issuer="http://127.0.0.1:8080",
        )
        assert jwt.get_unverified_header(identity)["typ"] == "identity+jwt"
        assert (claims["sub"], claims["client_id"]) == ("alice", "client-9")
        assert claims["amr"] == ["pwd", "otp", "mfa"]
        assert claims["exp"] - claims["iat"] == 60

    async def test_none_sends_no_credential(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """forward_token = none (default): the MCP server gets no Authorization at all."""
        gw = await make_gateway()
        assert (await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth())).status == 200
        assert "Authorization" not in upstream_peer.last().headers

    async def _upstream_gateway(self, make_gateway: MakeGateway, peer: Peer) -> Any:
        async def upstream_client(app: web.Application) -> AsyncIterator[None]:
            app[UPSTREAM] = UpstreamClient(app[SETTINGS].upstream, app[HTTP], app[CLOCK])
            yield

        return await make_gateway(
            resources=[{"path": "/mcp", "upstream": peer.mcp_url, "forward_token": "upstream"}],
            setup=lambda app: app.cleanup_ctx.append(upstream_client),
        )

    async def test_upstream_token(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """forward_token = upstream: the grant's upstream access token, never the client's."""
        gw = await self._upstream_gateway(make_gateway, upstream_peer)
        tokens = UpstreamTokens(access_token="upstream-at-123", expires_at=gw.clock.now() + 600)
        await store_tokens(
            gw.store, gw.app[SEALER], "grant-7", tokens, now=gw.clock.now(), ttl=3600
        )
        resp = await gw.client.post(
            "/mcp", json=rpc("ping"), headers=gw.auth(gw.token(gid="grant-7"))
        )
        assert resp.status == 200
        assert upstream_peer.last().headers["Authorization"] == "Bearer upstream-at-123"

    async def test_upstream_mode_needs_a_grant(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A token without a grant id (e.g. a trusted issuer's) cannot use upstream mode."""
        gw = await self._upstream_gateway(make_gateway, upstream_peer)
        resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(gw.token(gid=None)))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge(
            "invalid_token", "The access token is invalid"
        )
        assert upstream_peer.seen == []

    async def test_upstream_token_unavailable(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """No usable upstream token for the grant: 401 invalid_token, nothing forwarded."""
        gw = await self._upstream_gateway(make_gateway, upstream_peer)
        resp = await gw.client.post(
            "/mcp", json=rpc("ping"), headers=gw.auth(gw.token(gid="grant-gone"))
        )
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge(
            "invalid_token", "the upstream authorization is no longer valid"
        )
        assert upstream_peer.seen == []


class TestCookiesNeverShared:
    async def test_upstream_cookies_not_kept(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A cookie the MCP server sets for one user is never sent back for another."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})
            resp.set_cookie("srv_session", "alice-secret")
            return resp

        upstream_peer.handler = handler
        gw = await make_gateway()
        await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(gw.token(sub="alice")))
        await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(gw.token(sub="bob")))
        assert "Cookie" not in upstream_peer.last().headers


class TestOrigin:
    async def test_foreign_origin_refused(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """An Origin not on the allow-list gets 403 before anything else (R32)."""
        gw = await make_gateway()
        for origin in ("http://evil.example", "null", "http://127.0.0.1:8081"):
            resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(Origin=origin))
            assert resp.status == 403, origin
            assert (await resp.json())["error"]["message"] == "Origin not allowed"
        assert upstream_peer.seen == []

    async def test_repeated_origin_refused(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Two Origin headers (one allowed) are refused: no guessing which one counts."""
        gw = await make_gateway()
        headers = [
            *gw.auth().items(),
            ("Origin", "http://127.0.0.1:8080"),
            ("Origin", "http://evil.example"),
        ]
        resp = await gw.client.post("/mcp", data=json.dumps(rpc("ping")), headers=headers)
        assert resp.status == 403
        assert upstream_peer.seen == []

    async def test_allowed_origins(self, make_gateway: MakeGateway) -> None:
        """public_url's origin and configured allowed_origins pass; no Origin passes."""
        gw = await make_gateway(server={"allowed_origins": ["https://app.example"]})
        for extra in ({"Origin": "http://127.0.0.1:8080"}, {"Origin": "https://APP.example"}, {}):
            resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(**extra))
            assert resp.status == 200, extra


class TestPaths:
    async def test_sub_path_and_query_forwarded(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Below the prefix, path and query reach the upstream unchanged."""
        gw = await make_gateway()
        status = await raw_request(
            gw.client, "/mcp/sub/a%20b?x=1&y=%2F", gw.auth(), body=json.dumps(rpc("ping")).encode()
        )
        assert status == 200
        assert upstream_peer.last().path_qs == "/mcp/sub/a%20b?x=1&y=%2F"

    @pytest.mark.parametrize(
        "target",
        [
            "/mcp/../oauth/token",
            "/mcp/%2e%2e/x",
            "/mcp/%2E%2E",
            "/mcp/./x",
            "/mcp//x",
            "/mcp/a%2fb",
            "/mcp/a%5cb",
            "/mcp/a\\b",
            "/mcp/%00",
            "/mcp/.%2e/x",
        ],
    )
    async def test_escapes_refused(
        self, make_gateway: MakeGateway, upstream_peer: Peer, target: str
    ) -> None:
        """Dot segments, empty segments and encoded separators never reach the upstream."""
        gw = await make_gateway()
        status, raw = await raw_exchange(gw.client, target, gw.auth())
        assert status == 400
        assert raw.endswith(b'"error": {"code": -32600, "message": "Invalid request path"}}')
        assert upstream_peer.seen == []

    @pytest.mark.parametrize("query", ["q=\u00e9", "q=a b", "q=\x7f", "q=\n"])
    def test_query_must_be_visible_ascii(self, query: str) -> None:
        """The proxy never builds an upstream URL from a query with raw non-visible bytes
        (aiohttp's parser refuses most of them first; this is the second line)."""
        assert upstream_url("http://127.0.0.1:9/mcp", "", query) is None
        assert str(upstream_url("http://127.0.0.1:9/mcp", "/a", "q=%C3%A9")) == (
            "http://127.0.0.1:9/mcp/a?q=%C3%A9"
        )

    async def test_prefix_is_a_segment(self, make_gateway: MakeGateway) -> None:
        """`/mcpx` is not below `/mcp`."""
        gw = await make_gateway()
        assert await raw_request(gw.client, "/mcpx", gw.auth()) == 404


class TestResponseHeaders:
    async def test_upstream_headers_filtered(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Set-Cookie, hop-by-hop and Connection-named fields of the server are dropped;
        MCP headers come back."""

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(
                {"jsonrpc": "2.0", "id": 1, "result": {}},
                headers={
                    "Set-Cookie": "mfagw_tx=x; Path=/",
                    "Connection": "X-Hop",
                    "X-Hop": "1",
                    "MCP-Protocol-Version": "2025-11-25",
                    "X-Kept": "yes",
                },
            )

        upstream_peer.handler = handler
        gw = await make_gateway()
        resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth())
        assert resp.status == 200
        assert "Set-Cookie" not in resp.headers
        assert "X-Hop" not in resp.headers
        assert resp.headers["MCP-Protocol-Version"] == "2025-11-25"
        assert resp.headers["X-Kept"] == "yes"
        assert await resp.json() == {"jsonrpc": "2.0", "id": 1, "result": {}}
