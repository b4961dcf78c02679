"""Gateway-level checks shared by the Redis Cluster and Sentinel suites (issue 5, part 7).

Both suites run the real gateway (`tests.security.harness.serve_target`) in front of the real
legacy provider and the SDK MCP server, on a store URL the plain Redis suites do not cover
(`redis+cluster://`, `redis+sentinel://`). What they check is the same whole-flow behaviour the
security suite checks on one Redis; the helpers it already has (`refused_within`,
`assert_oauth_error`, `assert_unavailable_json`) are imported, not copied.

`full_flow` is one legitimate user's life: registration, upstream login, TOTP, redemption, an
MCP tool call through the proxy, a refresh, and the revocation of an access token, which the
proxy must then refuse (the revocation reaches it only through the store's feed).
`unavailable_mcp` / `unavailable_token` recognise the only acceptable failure while the store is
switching: a clean 503 in the protocol's shape.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import httpx
from structlog.typing import EventDict

from tests.fixtures.peers import McpServer
from tests.security.harness import (
    RegisteredClient,
    Target,
    Tokens,
    User,
    http_client,
    tool_call,
    tool_result,
)
from tests.security.test_outages import assert_unavailable_json
from tests.security.test_tokens import assert_oauth_error, refused_within

# How soon the proxy must refuse an access token after its revocation answered 200.
REVOCATION_BOUND = 3.0
# The JSON-RPC code and message of the proxy's 503 (web/mcp_routes.py, ARCHITECTURE "MCP proxy").
GATEWAY_ERROR = -32603
UNAVAILABLE_MESSAGE = "The service is temporarily unavailable"


def unique_prefix(tag: str) -> str:
    """A key prefix nobody else uses (one per test module or test)."""
    return f"{tag}-{secrets.token_hex(4)}:"


def marker(tag: str) -> str:
    """A unique `echo` argument, to find exactly this call among the MCP server's records."""
    return f"{tag}-{secrets.token_hex(6)}"


async def echo(target: Target, token: str, text: str, id: int = 1) -> httpx.Response:
    """`tools/call echo(text)` through the proxy with `token`."""
    return await target.mcp(tool_call("echo", id, text=text), token=token)


def echoed(server: McpServer, text: str) -> bool:
    """True if the MCP server ran `echo` with exactly `text`."""
    return any(
        r.get("tool") == "echo" and r.get("arguments") == {"text": text}
        for r in server.records("tool")
    )


def assert_echo(resp: httpx.Response, text: str) -> None:
    """A 200 whose tool result carries `text` back (the call really ran behind the proxy)."""
    result = tool_result(resp)
    assert text in str(result.get("content")), result


async def revoke(
    target: Target, token: str, client: RegisteredClient, **extra: str
) -> httpx.Response:
    """RFC 7009 revocation of `token` by its public `client`."""
    async with http_client() as http:
        return await http.post(
            target.url + "/oauth/revoke",
            data={"token": token, "client_id": client.client_id, **extra},
        )


def unavailable_mcp(resp: httpx.Response) -> bool:
    """True if `resp` is the proxy's clean 503: a JSON-RPC error, no detail, never cached.
    Its `id` is null: a store outage stops the request at the bearer check (the revocation
    set is not current), before the body, and so the request's id, is read."""
    if resp.status_code != 503:
        return False
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    assert resp.headers["cache-control"] == "no-store"
    assert resp.json() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": GATEWAY_ERROR, "message": UNAVAILABLE_MESSAGE},
    }, resp.text[:300]
    return True


def unavailable_token(resp: httpx.Response) -> bool:
    """True if `resp` is the token endpoint's clean 503 `temporarily_unavailable`."""
    if resp.status_code != 503:
        return False
    assert_unavailable_json(resp)
    return True


def faults(logs: list[EventDict]) -> list[EventDict]:
    """Captured log events that betray a fault rather than a handled outage: an unhandled
    error (the generic 500 path, logged with its traceback), any event carrying an exception,
    or a revocation feed that died of something other than `StoreUnavailable`."""
    return [
        e
        for e in logs
        if e.get("event") == "unhandled_error"
        or "exc_info" in e
        or "exception" in e
        or e.get("reason") == "revocation feed failed"
    ]


@dataclass(frozen=True)
class FlowResult:
    """What `full_flow` leaves behind: the client, the user and the refreshed token pair
    (whose access token has been revoked)."""

    client: RegisteredClient
    user: User
    first: Tokens
    refreshed: dict[str, Any]


async def full_flow(target: Target, server: McpServer, *, tag: str = "flow") -> FlowResult:
    """One user's whole life on this gateway, asserted step by step (R10, R17, R20, R22, R25,
    R34): register → upstream login → TOTP → code → tokens → MCP tool call relayed → refresh
    (rotated: the old refresh token is dead) → the new access token relayed → revoke it →
    refused by the proxy with `invalid_token` within `REVOCATION_BOUND`."""
    client = await target.register(name=f"{tag} client")
    user = await target.new_user()
    first = await target.tokens(user, client)
    assert first.refresh_token is not None
    assert first.body["token_type"] == "Bearer"

    text = marker(tag)
    assert_echo(await echo(target, first.access_token, text), text)
    assert echoed(server, text)

    resp = await target.refresh(first.refresh_token, client)
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    refreshed = resp.json()
    assert refreshed["refresh_token"] != first.refresh_token
    assert refreshed["access_token"] != first.access_token
    text = marker(tag)
    assert_echo(await echo(target, refreshed["access_token"], text), text)

    revoked = await revoke(
        target, refreshed["access_token"], client, token_type_hint="access_token"
    )
    assert revoked.status_code == 200
    assert revoked.content == b""
    assert await refused_within(target, refreshed["access_token"], REVOCATION_BOUND)
    text = marker(tag)
    refused = await echo(target, refreshed["access_token"], text)
    assert refused.status_code == 401
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    assert not echoed(server, text)
    # The rotated-out refresh token is dead (and its reuse kills the family: R20).
    assert_oauth_error(await target.refresh(first.refresh_token, client), 400, "invalid_grant")
    return FlowResult(client, user, first, refreshed)
