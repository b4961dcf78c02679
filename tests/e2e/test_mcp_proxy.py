"""The MCP proxy end to end (issue 4): the official SDK client, OAuth through the real legacy
provider and the TOTP step-up, the gateway, and SDK MCP servers behind it.

Both client eras are exercised: the 2026-07-28 wire (``server/discover``, `Mcp-Method`/`Mcp-Name`
headers, no sessions) against a stateless server and the ``initialize`` handshake with
`Mcp-Session-Id` against a stateful one. The SDK hides HTTP statuses (and would answer a
challenge by signing in again), so refusals are also checked with plain httpx and the tokens
the SDK obtained. The servers' record files prove what reached them and which tools ran.

One gateway serves the module with four resources: ``/mcp`` (stateless server, nothing
forwarded), ``/stateful`` (stateful server), ``/upstream`` (a server that accepts only upstream
tokens active by RFC 7662 introspection at the legacy provider; ``forward_token = "upstream"``)
and ``/identity`` (``forward_token = "identity"``). Its policy denies ``delete_everything`` and
wants a step-up younger than 2 s for ``transfer_funds``. Each test signs in its own users.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from mcp.shared.exceptions import MCPError

from gateway.logs import configure_logging, reset_logging
from tests.e2e.mcp_oauth import DEFAULT_REDIRECT_URI, OAuthMcpConnection, oauth_mcp_client
from tests.e2e.support import (
    HANDSHAKE,
    MODERN,
    answers,
    challenge_params,
    mcp_post,
    new_secret,
    rpc,
    sleep_until,
    tool_call,
    unverified,
)
from tests.e2e.useragent import UserAgent
from tests.fixtures.gateway import RunningGateway, running_gateway
from tests.fixtures.peers import LegacyIdp, McpServer, start_mcp_server

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MAX_AUTH_AGE = 2  # seconds: the policy's max_auth_age for transfer_funds
POLICY = {
    "mcp": {
        "rules": [
            {"method": "tools/call", "tool": "delete_everything", "effect": "deny"},
            {"method": "tools/call", "tool": "transfer_funds", "max_auth_age": f"{MAX_AUTH_AGE}s"},
        ]
    }
}
POLICY_DENIED = -32003  # the gateway's JSON-RPC error code for a policy refusal
MODES = [
    pytest.param("auto", "/mcp", MODERN, id="2026-07-28"),
    pytest.param("legacy", "/stateful", HANDSHAKE, id="initialize-sessions"),
]


@dataclass
class Stack:
    """The module's gateway and the servers behind its resources."""

    gw: RunningGateway
    idp: LegacyIdp
    stateless: McpServer
    stateful: McpServer
    introspecting: McpServer

    def server(self, path: str) -> McpServer:
        return {
            "/mcp": self.stateless,
            "/identity": self.stateless,
            "/stateful": self.stateful,
            "/upstream": self.introspecting,
        }[path]

    def prm(self, path: str) -> str:
        return f"{self.gw.url}/.well-known/oauth-protected-resource{path}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """Two more SDK servers (stateful; introspecting) and the gateway in front of all three."""
    directory = tmp_path_factory.mktemp("mcp-proxy")
    stateful = start_mcp_server(directory, "mcp-stateful", stateful=True)
    introspecting: McpServer | None = None
    try:
        introspecting = start_mcp_server(directory, "mcp-introspecting", introspect=legacy_idp)
        async with running_gateway(
            directory / "gateway",
            idp=legacy_idp,
            port=gateway_ports[0],
            resources=[
                {"path": "/mcp", "upstream": mcp_server.url, "name": "Demo MCP server"},
                {"path": "/stateful", "upstream": stateful.url},
                {"path": "/upstream", "upstream": introspecting.url, "forward_token": "upstream"},
                {"path": "/identity", "upstream": mcp_server.url, "forward_token": "identity"},
            ],
            policy=POLICY,
        ) as gw:
            yield Stack(gw, legacy_idp, mcp_server, stateful, introspecting)
    finally:
        stateful.process.stop()
        if introspecting is not None:
            introspecting.process.stop()


@asynccontextmanager
async def connect(
    stack: Stack, path: str, user: str, *, mode: str = "auto"
) -> AsyncIterator[OAuthMcpConnection]:
    """Enrol `user`, then connect the SDK client to `path` signing in through the browser."""
    secret = new_secret()
    await stack.gw.enroll(user, secret)
    async with (
        UserAgent(
            redirect_uri=DEFAULT_REDIRECT_URI, answers=answers(stack.idp, user, secret)
        ) as ua,
        oauth_mcp_client(stack.gw.resource_url(path), useragent=ua, mode=mode) as conn,
    ):
        yield conn


def _access_token(conn: OAuthMcpConnection) -> str:
    tokens = conn.storage.tokens
    assert tokens is not None
    return tokens.access_token


async def _session_id(conn: OAuthMcpConnection, server: McpServer, since: int) -> str | None:
    """The session id the client uses (handshake era), as the server saw it on a request."""
    await conn.client.list_tools()
    ids = [r["mcp_session_id"] for r in server.records("http", since=since)]
    found = [i for i in ids if i is not None]
    return found[0] if found else None


def _jsonrpc_error(resp: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = resp.json()
    assert body["jsonrpc"] == "2.0"
    error: dict[str, Any] = body["error"]
    return error


# --------------------------------------------------------------------------- the happy paths


@pytest.mark.parametrize(("mode", "path", "version"), MODES)
async def test_tools_list_and_call_with_progress_streamed_while_the_call_runs(
    stack: Stack, mode: str, path: str, version: str
) -> None:
    """`tools/list` and `tools/call` through the gateway in both eras; progress notifications
    reach the client while the tool still runs (streamed, not buffered); the MCP server saw the
    routing headers (2026-07-28) or one session id (handshake era) and never a client token
    (DESIGN §4.5, R26, R32)."""
    server = stack.server(path)
    mark = server.mark()
    user = {"/mcp": "carol", "/stateful": "dave"}[path]
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, float]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, loop.time()))

    async with connect(stack, path, user, mode=mode) as conn:
        assert conn.client.protocol_version == version
        tools = await conn.client.list_tools()
        echoed = await conn.client.call_tool("echo", {"text": f"hello over {version}"})
        counted = await conn.client.call_tool(
            "count", {"n": 3, "delay": 0.4}, progress_callback=on_progress
        )
        finished = loop.time()

    assert {t.name for t in tools.tools} == {
        "echo",
        "whoami",
        "count",
        "delete_everything",
        "transfer_funds",
    }
    assert echoed.is_error is False
    assert echoed.structured_content == {"result": f"hello over {version}"}
    assert counted.structured_content == {"result": "counted to 3"}
    assert [p for p, _ in seen] == [1.0, 2.0, 3.0]
    # The first notification arrived two delays (0.8 s) before the result: it was streamed.
    assert finished - seen[0][1] >= 0.6

    assert server.tool_runs(since=mark) == ["echo", "count"]
    http = server.records("http", since=mark)
    assert http
    assert all(r["authorization"] is None for r in http)
    calls = [r for r in http if r["mcp_method"] == "tools/call"]
    if version == MODERN:
        assert [r["mcp_name"] for r in calls] == ["echo", "count"]
        assert all(r["mcp_session_id"] is None for r in http)
        assert {r["mcp_protocol_version"] for r in http if r["method"] == "POST"} == {MODERN}
    else:
        assert calls == []  # the handshake era sends no routing headers
        session_ids = {r["mcp_session_id"] for r in http if r["mcp_session_id"] is not None}
        assert len(session_ids) == 1
        posts = [r for r in http if r["method"] == "POST"]
        assert all(r["mcp_session_id"] in session_ids for r in posts[1:])


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize(("mode", "path", "version"), MODES)
async def test_denied_tool_is_refused_and_never_reaches_the_server(
    stack: Stack, mode: str, path: str, version: str
) -> None:
    """`delete_everything` is denied by a `[[mcp.rules]]` deny rule: the SDK call fails, a raw
    call gets 403 with the gateway's JSON-RPC policy error, and the MCP server never received
    the request nor ran the tool (DESIGN §4.4, R25: every request is checked, invariant 7)."""
    server = stack.server(path)
    user = {"/mcp": "erin", "/stateful": "frank"}[path]
    since = server.mark()
    async with connect(stack, path, user, mode=mode) as conn:
        session = await _session_id(conn, server, since)
        assert (session is not None) == (version == HANDSHAKE)
        mark = server.mark()
        with pytest.raises(MCPError) as refused:
            await conn.client.call_tool("delete_everything", {})
        assert refused.value.error.code == POLICY_DENIED
        raw = await mcp_post(
            stack.gw.resource_url(path),
            tool_call("delete_everything", id=7),
            token=_access_token(conn),
            protocol=version,
            session_id=session,
        )
        after_denials = server.mark()
        allowed = await conn.client.call_tool("echo", {"text": "still connected"})

    assert raw.status_code == 403
    assert raw.headers["content-type"].startswith("application/json")
    assert _jsonrpc_error(raw)["code"] == POLICY_DENIED
    assert raw.json()["id"] == 7
    assert allowed.structured_content == {"result": "still connected"}
    assert "delete_everything" not in server.tool_runs(since=since)
    seen = server.records("http", since=mark)[: after_denials - mark]
    assert [r for r in seen if r["method"] == "POST"] == []


async def test_tool_needing_a_recent_step_up_gets_the_rfc9470_challenge_once_it_is_stale(
    stack: Stack,
) -> None:
    """`transfer_funds` (max_auth_age 2 s) runs right after the step-up; once the token's
    `auth_time` is older, the gateway answers 401 `insufficient_user_authentication` with
    `max_age` and the resource metadata URL, in both eras, and the tool does not run again
    (DESIGN §4.4, R30)."""
    marks = {p: stack.server(p).mark() for p in ("/mcp", "/stateful")}
    async with (
        connect(stack, "/mcp", "grace", mode="auto") as modern,
        connect(stack, "/stateful", "heidi", mode="legacy") as legacy,
    ):
        conns = {"/mcp": (modern, MODERN), "/stateful": (legacy, HANDSHAKE)}
        sessions = {
            path: await _session_id(conn, stack.server(path), marks[path])
            for path, (conn, _) in conns.items()
        }
        assert sessions["/mcp"] is None
        assert sessions["/stateful"] is not None
        auth_times = []
        for conn, _ in conns.values():
            fresh = await conn.client.call_tool("transfer_funds", {"amount": 12.5})
            assert fresh.structured_content is not None
            assert fresh.structured_content["result"].startswith("transferred 12.50")
            auth_times.append(unverified(_access_token(conn))[1]["auth_time"])

        await sleep_until(max(auth_times) + MAX_AUTH_AGE + 0.1)
        stale = {}
        for path, (conn, version) in conns.items():
            stale[path] = await mcp_post(
                stack.gw.resource_url(path),
                tool_call("transfer_funds", amount=99),
                token=_access_token(conn),
                protocol=version,
                session_id=sessions[path],
            )

    for path, resp in stale.items():
        assert resp.status_code == 401
        params = challenge_params(resp.headers["www-authenticate"])
        assert params["error"] == "insufficient_user_authentication"
        assert params["max_age"] == str(MAX_AUTH_AGE)
        assert params["resource_metadata"] == stack.prm(path)
        assert params["error_description"]
        assert stack.server(path).tool_runs(since=marks[path]) == ["transfer_funds"]


# --------------------------------------------------------------------------- sessions


async def test_session_id_of_one_user_is_refused_for_another(stack: Stack) -> None:
    """Bob, signed in on his own, presents Alice's `Mcp-Session-Id`: 404, and nothing of his
    request reaches the MCP server; Alice's own token still works on it (DESIGN §4.6, R32,
    invariant 7)."""
    server = stack.stateful
    since = server.mark()
    async with connect(stack, "/stateful", "ivan", mode="legacy") as alice:
        alice_session = await _session_id(alice, server, since)
        assert alice_session is not None
        bob_mark = server.mark()
        async with connect(stack, "/stateful", "judy", mode="legacy") as bob:
            bob_session = await _session_id(bob, server, bob_mark)
            assert bob_session is not None
            assert bob_session != alice_session
            before = server.mark()
            hijack = await mcp_post(
                stack.gw.resource_url("/stateful"),
                tool_call("echo", id=3, text="bob was here"),
                token=_access_token(bob),
                protocol=HANDSHAKE,
                session_id=alice_session,
            )
            after = server.mark()
            own = await mcp_post(
                stack.gw.resource_url("/stateful"),
                tool_call("echo", id=4, text="alice"),
                token=_access_token(alice),
                protocol=HANDSHAKE,
                session_id=alice_session,
            )

    assert hijack.status_code == 404
    assert _jsonrpc_error(hijack)["message"] == "Session not found"
    assert after == before  # the MCP server never heard of Bob's attempt
    assert own.status_code == 200
    assert "alice" in own.text
    assert server.tool_runs(since=since).count("echo") == 1


# --------------------------------------------------------------------------- forwarded identity


async def test_forward_token_upstream_sends_an_upstream_token_the_server_introspects(
    stack: Stack,
) -> None:
    """`forward_token = "upstream"`: the MCP server accepts only tokens the legacy provider
    says are active (RFC 7662) and receives the user's upstream access token, never the
    client's; the client's token presented to it directly is refused, and the upstream token
    presented to the gateway is refused too (R26, invariant 7)."""
    server = stack.introspecting
    mark = server.mark()
    async with connect(stack, "/upstream", "mallory") as conn:
        result = await conn.client.call_tool("whoami", {})
        client_token = _access_token(conn)
        client_id = conn.storage.client_info.client_id if conn.storage.client_info else None

    assert result.structured_content is not None
    introspection = result.structured_content["introspection"]
    assert introspection["sub"] == "mallory"
    assert introspection["client_id"] == stack.idp.client_id
    assert introspection["iss"] == stack.idp.issuer
    received = {a for a in server.authorizations(since=mark)}
    assert len(received) == 1
    forwarded = received.pop()
    assert forwarded is not None
    assert forwarded.startswith("Bearer ")
    upstream_token = forwarded.removeprefix("Bearer ")
    assert upstream_token != client_token
    assert client_id is not None

    direct = await mcp_post(server.url, rpc("tools/list"), token=client_token)
    assert direct.status_code == 401
    smuggled = await mcp_post(
        stack.gw.resource_url("/upstream"), rpc("tools/list"), token=upstream_token
    )
    assert smuggled.status_code == 401
    assert challenge_params(smuggled.headers["www-authenticate"])["error"] == "invalid_token"


async def test_forward_token_identity_sends_a_gateway_signed_identity_jwt(stack: Stack) -> None:
    """`forward_token = "identity"`: the MCP server receives a JWT of `typ` identity+jwt, signed
    by a key published at `/oauth/jwks.json`, for its own URL, naming the user, the client and
    the `amr` of the step-up; it is not the client's token and the gateway refuses it as an
    access token (R26, R28)."""
    server = stack.stateless
    mark = server.mark()
    async with connect(stack, "/identity", "niaj") as conn:
        result = await conn.client.call_tool("whoami", {})
        client_token = _access_token(conn)
        info = conn.storage.client_info
    assert info is not None
    assert result.structured_content is not None
    authorization = result.structured_content["authorization"]
    assert isinstance(authorization, str)
    assert authorization.startswith("Bearer ")
    identity = authorization.removeprefix("Bearer ")
    assert identity != client_token
    assert {a for a in server.authorizations(since=mark)} <= {authorization}

    async with httpx.AsyncClient(timeout=10) as http:
        jwks = (await http.get(stack.gw.url + "/oauth/jwks.json")).json()
    header = jwt.get_unverified_header(identity)
    assert header["typ"] == "identity+jwt"
    assert header["alg"] == "ES256"
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    claims = jwt.decode(
        identity,
        jwt.PyJWK.from_json(json.dumps(key)),
        algorithms=["ES256"],
        audience=server.url,
        issuer=stack.gw.url,
        options={"require": ["exp", "iat", "sub", "aud", "iss"]},
    )
    assert claims["sub"] == "niaj"
    assert claims["client_id"] == info.client_id
    assert {"pwd", "otp", "mfa"} <= set(claims["amr"])
    assert claims["exp"] - claims["iat"] == 60

    smuggled = await mcp_post(stack.gw.resource_url("/identity"), rpc("tools/list"), token=identity)
    assert smuggled.status_code == 401
    assert challenge_params(smuggled.headers["www-authenticate"])["error"] == "invalid_token"


# --------------------------------------------------------------------------- streams


async def test_client_hanging_up_after_its_answer_is_not_logged_as_an_error(stack: Stack) -> None:
    """An SDK client reads the JSON-RPC answer from the SSE stream and closes the connection
    without waiting for the end of the chunked body (the SDK does this on every call). That is
    a client going away, not a gateway failure: no `unhandled_error`, nothing at level error
    (DESIGN §4.5, §6; R32 streams, R35 generic errors). Repeated, because which side finishes
    first is a race."""
    buf = io.StringIO()
    since = stack.stateful.mark()  # this test's session, not an earlier (ended) one
    async with connect(stack, "/stateful", "olivia", mode="legacy") as conn:
        session = await _session_id(conn, stack.stateful, since)
        assert session is not None
        headers = {
            "Authorization": f"Bearer {_access_token(conn)}",
            "Mcp-Session-Id": session,
            "MCP-Protocol-Version": HANDSHAKE,
            "Accept": "application/json, text/event-stream",
        }
        configure_logging("info", "json", buf)
        try:
            for i in range(30):
                async with (
                    httpx.AsyncClient(timeout=10) as http,
                    http.stream(
                        "POST",
                        stack.gw.resource_url("/stateful"),
                        json=tool_call("echo", id=100 + i, text="hang up"),
                        headers=headers,
                    ) as resp,
                ):
                    assert resp.status_code == 200
                    assert resp.headers["content-type"].startswith("text/event-stream")
                    async for line in resp.aiter_lines():
                        if line.startswith("data:"):
                            assert json.loads(line[5:])["id"] == 100 + i
                            break  # hang up as soon as the answer is in
            await asyncio.sleep(0.2)  # let the gateway finish the last relays
        finally:
            reset_logging()
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    finished = [e for e in events if e["event"] == "request_finished"]
    assert len([e for e in events if e["event"] == "mcp_allowed"]) == 30
    errors = [
        (e["event"], [x.get("exc_type") for x in e.get("exception", [])])
        for e in events
        if e["level"] in ("error", "critical") or e["event"] == "unhandled_error"
    ]
    assert errors == []
    assert finished
