"""Small helpers shared by the end-to-end suites: a client's side of OAuth done by hand.

The SDK client hides statuses and error codes; these helpers speak the protocol directly with
httpx so tests can assert them: dynamic registration of a public client, an authorization URL
with PKCE S256, the token endpoint, a raw JSON-RPC POST to an MCP path (with the headers of the
2026-07-28 wire or of the 2025-11-25 handshake era), reading one sample of the gateway's
Prometheus metrics, polling for an eventual condition and sleeping until a wall-clock instant.
Nothing here knows the gateway's internals: only its public HTTP interface.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pyotp
from prometheus_client.parser import text_string_to_metric_families

from gateway.clock import SystemClock
from tests.e2e.mcp_oauth import DEFAULT_REDIRECT_URI, totp_code
from tests.e2e.useragent import Answer
from tests.fixtures.peers import LegacyIdp

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
HTTP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Pkce:
    """An RFC 7636 S256 pair."""

    verifier: str
    challenge: str


def new_pkce() -> Pkce:
    """A fresh verifier (64 characters) and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return Pkce(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


def new_secret() -> str:
    """A fresh TOTP seed (base32, 160 bits), as `totp enroll` would make."""
    return pyotp.random_base32(32)


def answers(idp: LegacyIdp, user: str, secret: str, **more: Answer) -> dict[str, Answer]:
    """What the user types: upstream username/password, consent approval, the current TOTP."""
    out: dict[str, Answer] = {
        "username": user,
        "password": idp.accounts[user],
        "decision": "approve",
        "code": lambda: totp_code(secret),
    }
    out.update(more)
    return out


async def register_public_client(
    base_url: str, *, redirect_uri: str = DEFAULT_REDIRECT_URI, name: str = "e2e client"
) -> str:
    """RFC 7591 registration of a native public client; returns its client_id."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        resp = await http.post(
            base_url + "/oauth/register",
            json={
                "redirect_uris": [redirect_uri],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "client_name": name,
            },
        )
    assert resp.status_code == 201, resp.text
    client_id = resp.json()["client_id"]
    assert isinstance(client_id, str)
    return client_id


def authorization_url(
    base_url: str,
    *,
    client_id: str,
    resource: str,
    pkce: Pkce,
    state: str | None = None,
    redirect_uri: str = DEFAULT_REDIRECT_URI,
    scope: str = "mcp",
) -> str:
    """`/oauth/authorize?...` as an OAuth 2.1 client builds it."""
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "state": state or secrets.token_urlsafe(16),
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "scope": scope,
        "resource": resource,
    }
    return f"{base_url}/oauth/authorize?{urlencode(params)}"


async def token_request(
    base_url: str, form: Mapping[str, str], *, auth: tuple[str, str] | None = None
) -> httpx.Response:
    """POST the form to `/oauth/token` (optionally with HTTP Basic client credentials)."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        if auth is None:
            return await http.post(base_url + "/oauth/token", data=dict(form))
        return await http.post(base_url + "/oauth/token", data=dict(form), auth=auth)


async def redeem(
    base_url: str,
    *,
    code: str,
    pkce: Pkce,
    client_id: str,
    resource: str,
    redirect_uri: str = DEFAULT_REDIRECT_URI,
) -> httpx.Response:
    """The authorization_code grant."""
    return await token_request(
        base_url,
        {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": pkce.verifier,
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "resource": resource,
        },
    )


async def refresh(base_url: str, *, refresh_token: str, client_id: str) -> httpx.Response:
    """The refresh_token grant."""
    return await token_request(
        base_url,
        {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id},
    )


def rpc(method: str, id: int = 1, **params: Any) -> dict[str, Any]:
    """A JSON-RPC request object."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params:
        msg["params"] = params
    return msg


def tool_call(name: str, id: int = 1, **arguments: Any) -> dict[str, Any]:
    """A `tools/call` request."""
    return rpc("tools/call", id, name=name, arguments=arguments)


async def mcp_post(
    url: str,
    message: Mapping[str, Any],
    *,
    token: str | None,
    protocol: str = MODERN,
    session_id: str | None = None,
) -> httpx.Response:
    """One JSON-RPC POST to an MCP endpoint with the headers an SDK client of `protocol` sends
    (2026-07-28: `Mcp-Method`/`Mcp-Name`; handshake era: `Mcp-Session-Id` when given)."""
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": protocol,
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if protocol == MODERN:
        headers["Mcp-Method"] = str(message["method"])
        params = message.get("params") or {}
        if message["method"] == "tools/call":
            headers["Mcp-Name"] = str(params["name"])
    if session_id is not None:
        headers["Mcp-Session-Id"] = session_id
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        return await http.post(url, json=dict(message), headers=headers)


def challenge_params(header: str) -> dict[str, str]:
    """The auth-params of a `WWW-Authenticate: Bearer k="v", ...` value (quoted strings)."""
    scheme, _, rest = header.partition(" ")
    assert scheme == "Bearer", header
    out: dict[str, str] = {}
    for part in rest.split('", '):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip().strip('"')
    return out


async def metric(base_url: str, name: str, **labels: str) -> float:
    """One sample of the gateway's `/metrics` (0.0 if the labelled series does not exist yet)."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        resp = await http.get(base_url + "/metrics")
    assert resp.status_code == 200
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 3.0, every: float = 0.05
) -> bool:
    """Poll `check` until it is true or `within` seconds passed; the last verdict."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if await check():
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(every)


async def sleep_until(instant: float) -> None:
    """Sleep until the wall clock passes `instant` (epoch seconds)."""
    delay = instant - SystemClock().now()
    if delay > 0:
        await asyncio.sleep(delay)


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, without checking it (to read what was issued)."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    return header, claims
