"""Attacks through the MCP proxy: token passthrough, header spoofing, path traversal, oversized
bodies, foreign origins (DNS rebinding), session hijacking.

The MCP servers behind the gateway are the SDK demo servers; their record files (every HTTP
request with the `Authorization`, `Cookie`, `Origin`, `X-Forwarded-For` it carried) and the
`whoami` tool (every `X-*`/`Forwarded*` header it received) are the proof of what got through.
Tokens come from the real flow (legacy provider + TOTP) where the test is about a user's token;
elsewhere from the gateway's key, which changes nothing for the proxy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from jwt import PyJWK

from tests.fixtures.peers import LegacyIdp, McpServer, start_mcp_server
from tests.security.harness import (
    HANDSHAKE,
    RegisteredClient,
    Target,
    http_client,
    rpc,
    serve_target,
    tool_call,
    tool_result,
    unverified,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_BODY = 64 * 1024
APP_ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def stateful_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpServer]:
    """An SDK MCP server that opens sessions (`Mcp-Session-Id`) for handshake-era clients."""
    server = start_mcp_server(tmp_path_factory.mktemp("stateful"), "mcp-stateful", stateful=True)
    try:
        yield server
    finally:
        server.process.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(
    tmp_path_factory: pytest.TempPathFactory,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    stateful_server: McpServer,
) -> AsyncIterator[Target]:
    """The module's gateway: a stateless, a stateful and an identity-mode resource."""
    async with serve_target(
        tmp_path_factory.mktemp("proxy"),
        idp=legacy_idp,
        port=gateway_ports[0],
        resources=[
            {"path": "/mcp", "upstream": mcp_server.url, "name": "Demo MCP"},
            {"path": "/mcp-s", "upstream": stateful_server.url},
            {"path": "/mcp-id", "upstream": mcp_server.url, "forward_token": "identity"},
        ],
        server={"allowed_origins": [APP_ORIGIN]},
        policy={"mcp": {"max_body": "64KiB"}},
    ) as t:
        yield t


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(target: Target) -> RegisteredClient:
    """A public client registered for the module."""
    return await target.register(name="Proxy-suite client")


async def raw(
    target: Target,
    request_target: str,
    *,
    method: str = "POST",
    body: bytes = b"{}",
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """Send a request line exactly as written (no client-side path normalisation)."""
    parts = target.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(parts[0], int(parts[1]))
    given = dict(headers or {})
    lines = [
        f"{method} {request_target} HTTP/1.1",
        f"Host: {given.pop('Host', parts[0] + ':' + parts[1])}",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in given.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def whoami(resp: httpx.Response) -> dict[str, Any]:
    """What the demo server's `whoami` tool says it received."""
    result = tool_result(resp)
    content = result["structuredContent"]
    assert isinstance(content, dict)
    return content


class TestTokenPassthrough:
    async def test_mcp_server_never_sees_the_clients_token(
        self, target: Target, client: RegisteredClient, mcp_server: McpServer
    ) -> None:
        """R26, invariant 7, MCP-SBP "Token Passthrough": the client's access token (a real
        one, from the whole flow) authorises the calls but never reaches the MCP server: no
        `Authorization`, no cookie, and the token appears nowhere in what the server saw."""
        user = await target.new_user()
        tokens = await target.tokens(user, client)
        mark = mcp_server.mark()
        echo = await target.mcp(tool_call("echo", text="hello"), token=tokens.access_token)
        who = await target.mcp(
            tool_call("whoami"), token=tokens.access_token, headers={"Cookie": "mfagw_tx=stolen"}
        )
        assert tool_result(echo)["structuredContent"] == {"result": "hello"}
        assert whoami(who)["authorization"] is None
        records = mcp_server.records("http", since=mark)
        assert len(records) == 2
        assert [r["authorization"] for r in records] == [None, None]
        assert [r["cookie"] for r in records] == [None, None]
        assert tokens.access_token not in mcp_server.record_path.read_text("utf-8")
        assert mcp_server.tool_runs(since=mark) == ["echo", "whoami"]

    async def test_identity_mode_sends_a_gateway_token_the_gateway_itself_refuses(
        self, target: Target, client: RegisteredClient, mcp_server: McpServer
    ) -> None:
        """R26, R28: with `forward_token = "identity"` the MCP server receives a short-lived
        `identity+jwt` for its own URL (signed by the gateway, verifiable with its JWKS), never
        the client's token; that identity token is not an access token anywhere."""
        user = await target.new_user()
        tokens = await target.tokens(user, client, resource=target.resource("/mcp-id"))
        who = whoami(
            await target.mcp(tool_call("whoami"), token=tokens.access_token, path="/mcp-id")
        )
        scheme, _, forwarded = str(who["authorization"]).partition(" ")
        assert scheme == "Bearer"
        assert forwarded != tokens.access_token
        header, claims = unverified(forwarded)
        assert header["typ"] == "identity+jwt"
        assert claims["aud"] == mcp_server.url
        assert claims["sub"] == user.name
        assert claims["iss"] == target.url
        assert claims["exp"] - claims["iat"] <= 60
        async with http_client() as http:
            jwks = (await http.get(target.url + "/oauth/jwks.json")).json()
        [jwk] = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
        jwt.decode(
            forwarded,
            PyJWK(jwk).key,
            algorithms=["ES256"],
            audience=mcp_server.url,
            issuer=target.url,
        )
        for path in ("/mcp", "/mcp-id"):
            resp = await target.mcp(tool_call("echo", text="x"), token=forwarded, path=path)
            assert resp.status_code == 401
            assert 'error="invalid_token"' in resp.headers["www-authenticate"]


class TestHeaderSpoofing:
    async def test_forwarding_and_identity_headers_are_the_gateways_own(
        self, target: Target, mcp_server: McpServer
    ) -> None:
        """R33, RFC 9700 §4.13: client-sent forwarding and identity headers (X-Forwarded-*,
        Forwarded, X-Real-IP, X-User, X-Remote-User, X-Auth-*, ...) never reach the MCP
        server; the only X-Forwarded-* it sees are the gateway's own."""
        mark = mcp_server.mark()
        spoof = {
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Port": "443",
            "X-Forwarded-User": "admin",
            "Forwarded": "for=6.6.6.6;host=evil.example;proto=https",
            "X-Real-IP": "6.6.6.6",
            "X-Client-IP": "6.6.6.6",
            "True-Client-IP": "6.6.6.6",
            "X-User": "admin",
            "X-User-Id": "0",
            "X-Email": "admin@example.com",
            "X-Remote-User": "admin",
            "X-Auth-Request-User": "admin",
            "X-Authenticated-User": "admin",
            "X-Original-URL": "/admin",
            "X-Mfa-Verified": "true",
            "X-Access-Token": "stolen",
            "X-Id-Token": "stolen",
            "X-Api-Key": "stolen",
            "X-Request-Id": "forged-id",
            "X-Kept-Header": "kept",
        }
        resp = await target.mcp(
            tool_call("whoami"), token=target.sign(target.mint()), headers=spoof
        )
        host = target.url.removeprefix("http://")
        assert whoami(resp)["forwarded_headers"] == {
            "x-forwarded-for": "127.0.0.1",
            "x-forwarded-host": host,
            "x-forwarded-proto": "http",
            "x-kept-header": "kept",
        }
        assert resp.headers["x-request-id"] != "forged-id"
        [record] = mcp_server.records("http", since=mark)
        assert record["x_forwarded_for"] == "127.0.0.1"
        assert record["origin"] is None

    async def test_fields_named_in_connection_are_not_forwarded(
        self, target: Target, mcp_server: McpServer
    ) -> None:
        """R33 (RFC 9110 §7.6.1): every field the client names in `Connection` is hop-by-hop
        and removed, as is `Connection` itself."""
        token = target.sign(target.mint())
        message = tool_call("whoami")
        message["params"]["_meta"] = {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        }
        body = json.dumps(message).encode()
        status, answer = await raw(
            target,
            "/mcp",
            body=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                "MCP-Protocol-Version": "2026-07-28",
                "Mcp-Method": "tools/call",
                "Mcp-Name": "whoami",
                "Connection": "close, X-Hop-Secret, x-other-hop",
                "X-Hop-Secret": "1",
                "X-Other-Hop": "2",
                "X-Not-Named": "3",
            },
        )
        assert status == 200, answer[:300]
        text = answer.decode()
        forwarded = json.loads(text[text.index("{") : text.rindex("}") + 1])["result"][
            "structuredContent"
        ]["forwarded_headers"]
        assert "x-hop-secret" not in forwarded
        assert "x-other-hop" not in forwarded
        assert forwarded["x-not-named"] == "3"


class TestPaths:
    @pytest.mark.parametrize(
        "path",
        [
            "/mcp/../oauth/token",
            "/mcp/%2e%2e/oauth/token",
            "/mcp/%2E%2E/oauth/token",
            "/mcp/..%2foauth%2ftoken",
            "/mcp/%2e%2e%2f%2e%2e%2fadmin",
            "/mcp/x/../../oauth/token",
            "/mcp/..",
            "/mcp/./x",
            "/mcp//x",
            "/mcp/x%2fy",
            "/mcp/x%5c..%5cy",
            "/mcp/x\\..\\y",
            "/mcp/%00",
            "/mcp/x%09y",
            "/mcp/x%7fy",
        ],
    )
    async def test_traversal_out_of_the_resource_prefix_is_refused(
        self, target: Target, mcp_server: McpServer, path: str
    ) -> None:
        """DESIGN §4.5: a request path must stay below the resource path as plain segments;
        dot segments and encoded `/`, `\\`, `.` or control characters are refused with 400
        before anything is forwarded."""
        mark = mcp_server.mark()
        token = target.sign(target.mint())
        status, body = await raw(
            target,
            path,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert status == 400, body[:300]
        assert json.loads(body) == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": -32600, "message": "Invalid request path"},
        }
        assert mcp_server.records("http", since=mark) == []

    @pytest.mark.parametrize(
        "path",
        ["/mcp%2f..%2foauth/token", "//mcp/x", "/mcpx", "/MCP", "/mcp/x%0d%0aX-Injected:%201"],
    )
    async def test_lookalike_prefixes_are_not_routed(
        self, target: Target, mcp_server: McpServer, path: str
    ) -> None:
        """A path that only looks like the resource prefix matches no route (404) and nothing
        is forwarded."""
        mark = mcp_server.mark()
        status, _ = await raw(
            target, path, headers={"Authorization": f"Bearer {target.sign(target.mint())}"}
        )
        assert status == 404
        assert mcp_server.records("http", since=mark) == []


class TestBodies:
    async def test_oversized_bodies_are_refused_with_413(
        self, target: Target, mcp_server: McpServer
    ) -> None:
        """DESIGN §4.4-4.5: a JSON-RPC body over the policy's `max_body` is refused (413),
        whether its size is declared or it arrives chunked; a body just under the cap passes."""
        mark = mcp_server.mark()
        token = target.sign(target.mint())
        big = json.dumps(tool_call("echo", text="x" * MAX_BODY)).encode()
        declared = await target.mcp(token=token, body=big, protocol=HANDSHAKE)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 8192):
                yield big[i : i + 8192]

        async with http_client() as http:
            streamed = await http.post(
                target.url + "/mcp",
                content=chunks(),
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/json",
                    "Accept": "application/json, text/event-stream",
                },
            )
        for resp in (declared, streamed):
            assert resp.status_code == 413
            assert resp.json()["error"] == {"code": -32600, "message": "Request body too large"}
        assert mcp_server.records("http", since=mark) == []
        text = "y" * (MAX_BODY - 200)
        fits = await target.mcp(tool_call("echo", text=text), token=token, protocol=HANDSHAKE)
        assert tool_result(fits)["structuredContent"] == {"result": text}

    async def test_oversized_requests_at_the_oauth_endpoints_are_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """Body caps on the authorization server too: a 2 MiB token request is 413 and a
        64 KiB registration request is `invalid_client_metadata`."""
        async with http_client() as http:
            token = await http.post(
                target.url + "/oauth/token",
                content=b"grant_type=authorization_code&code=" + b"a" * (2 * 1024 * 1024),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            register = await http.post(
                target.url + "/oauth/register",
                json={"redirect_uris": ["http://127.0.0.1/cb"], "client_name": "n" * 65536},
            )
        assert token.status_code == 413
        assert register.status_code == 400
        assert register.json()["error"] == "invalid_client_metadata"

    @pytest.mark.parametrize(
        ("content_type", "body", "status", "code"),
        [
            ("text/plain", b"{}", 415, -32600),
            ("application/x-www-form-urlencoded", b"a=b", 415, -32600),
            ("application/json", b"{not json", 400, -32700),
            (
                "application/json",
                b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}',
                400,
                -32700,
            ),
            ("application/json", b"\xff\xfe{}", 400, -32700),
        ],
    )
    async def test_bodies_policy_cannot_read_are_refused(
        self,
        target: Target,
        mcp_server: McpServer,
        content_type: str,
        body: bytes,
        status: int,
        code: int,
    ) -> None:
        """DESIGN §4.4: a body the policy cannot read unambiguously (not JSON, duplicate
        members, not UTF-8) is refused, never forwarded for the server to read differently."""
        mark = mcp_server.mark()
        resp = await target.mcp(
            token=target.sign(target.mint()),
            body=body,
            protocol=HANDSHAKE,
            headers={"Content-Type": content_type},
        )
        assert resp.status_code == status
        assert resp.json()["error"]["code"] == code
        assert mcp_server.records("http", since=mark) == []


class TestOrigin:
    @pytest.mark.parametrize(
        "origin",
        [
            "https://evil.example",
            "null",
            "http://127.0.0.1:1",
            "http://localhost:{port}",
            "https://127.0.0.1:{port}",
            "https://app.example.evil.com",
            "https://app.example:444",
            "http://app.example",
            "file://",
        ],
    )
    async def test_foreign_origins_are_refused_before_anything_else(
        self, target: Target, mcp_server: McpServer, origin: str
    ) -> None:
        """R32 (MCP-TR "Security Warning", DNS rebinding): a request carrying an `Origin` that
        is not the gateway's or an allowed one is refused with 403 — even with a valid token —
        and nothing is forwarded."""
        mark = mcp_server.mark()
        port = target.url.rsplit(":", 1)[1]
        resp = await target.mcp(
            token=target.sign(target.mint()), headers={"Origin": origin.format(port=port)}
        )
        assert resp.status_code == 403
        assert resp.json() == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": -32600, "message": "Origin not allowed"},
        }
        assert mcp_server.records("http", since=mark) == []

    async def test_rebound_host_with_its_own_origin_is_refused(
        self, target: Target, mcp_server: McpServer
    ) -> None:
        """R32: a page on a rebound DNS name reaches the gateway with `Host` and `Origin` of
        that name: refused; two Origin headers are refused too; and without any token a
        same-origin request of such a page gets nothing (401)."""
        mark = mcp_server.mark()
        token = target.sign(target.mint())
        rebound, _ = await raw(
            target,
            "/mcp",
            headers={
                "Host": "evil.example:80",
                "Origin": "http://evil.example",
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
            },
        )
        double, _ = await raw(
            target,
            "/mcp",
            headers={
                "Origin": target.url,
                "origin": "https://evil.example",
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
            },
        )
        anonymous, _ = await raw(
            target, "/mcp", headers={"Host": "evil.example", "Content-Type": "application/json"}
        )
        assert (rebound, double, anonymous) == (403, 403, 401)
        assert mcp_server.records("http", since=mark) == []

    @pytest.mark.parametrize("origin", ["{url}", APP_ORIGIN, "HTTPS://APP.EXAMPLE"])
    async def test_allowed_origins_pass(self, target: Target, origin: str) -> None:
        """R32 (positive control): the gateway's own origin and configured ones are served."""
        resp = await target.mcp(
            token=target.sign(target.mint()), headers={"Origin": origin.format(url=target.url)}
        )
        assert resp.status_code == 200


class TestSessions:
    async def initialize(self, target: Target, token: str) -> str:
        """Open a session on `/mcp-s` (handshake era); its id."""
        resp = await target.mcp(
            rpc(
                "initialize",
                protocolVersion=HANDSHAKE,
                capabilities={},
                clientInfo={"name": "attack-suite", "version": "1"},
            ),
            token=token,
            path="/mcp-s",
            protocol=HANDSHAKE,
            headers={"MCP-Protocol-Version": ""},
        )
        assert resp.status_code == 200, resp.text
        session_id = resp.headers["mcp-session-id"]
        assert session_id
        return session_id

    async def use(
        self, target: Target, token: str | None, session_id: str, method: str = "POST"
    ) -> httpx.Response:
        """A `tools/list` in session `session_id` with `method`."""
        return await target.mcp(
            rpc("tools/list", id=2),
            token=token,
            path="/mcp-s",
            protocol=HANDSHAKE,
            method=method,
            headers={"Mcp-Session-Id": session_id},
        )

    async def test_a_session_cannot_cross_subjects(
        self, target: Target, client: RegisteredClient, stateful_server: McpServer
    ) -> None:
        """R32, invariant 7 (MCP-SBP "Session Hijacking"): a session id is bound to the user
        who opened it; another user presenting it gets 404 and the MCP server never sees the
        request; the owner keeps using it."""
        alice_user, mallory_user = await target.new_user(), await target.new_user()
        alice = await target.tokens(alice_user, client, resource=target.resource("/mcp-s"))
        mallory = await target.tokens(mallory_user, client, resource=target.resource("/mcp-s"))
        session_id = await self.initialize(target, alice.access_token)
        assert (await self.use(target, alice.access_token, session_id)).status_code == 200
        mark = stateful_server.mark()
        for method in ("POST", "GET", "DELETE"):
            hijack = await self.use(target, mallory.access_token, session_id, method)
            assert hijack.status_code == 404
            assert hijack.json()["error"] == {"code": -32600, "message": "Session not found"}
        assert stateful_server.records("http", since=mark) == []
        assert (await self.use(target, alice.access_token, session_id)).status_code == 200

    async def test_a_session_id_is_no_credential(
        self, target: Target, stateful_server: McpServer
    ) -> None:
        """R32 (MUST NOT use sessions for authentication): a valid session id without a token
        gets the 401 challenge."""
        token = target.sign(target.mint(sub="s-owner", aud=target.resource("/mcp-s")))
        session_id = await self.initialize(target, token)
        mark = stateful_server.mark()
        resp = await self.use(target, None, session_id)
        assert resp.status_code == 401
        assert stateful_server.records("http", since=mark) == []

    async def test_unknown_ended_or_malformed_sessions_are_refused(
        self, target: Target, stateful_server: McpServer
    ) -> None:
        """R32 (MCP-TR "Session Management"): an unknown session id → 404, one ended by its
        owner's DELETE → 404, a malformed one (not visible ASCII, too long) → 400."""
        token = target.sign(target.mint(sub="s-ender", aud=target.resource("/mcp-s")))
        unknown = await self.use(target, token, "no-such-session")
        assert unknown.status_code == 404
        session_id = await self.initialize(target, token)
        ended = await target.mcp(
            token=token,
            path="/mcp-s",
            method="DELETE",
            protocol=HANDSHAKE,
            headers={"Mcp-Session-Id": session_id},
        )
        assert ended.status_code in (200, 204)
        assert (await self.use(target, token, session_id)).status_code == 404
        for bad in ("a b", "x" * 300):
            assert (await self.use(target, token, bad)).status_code == 400
