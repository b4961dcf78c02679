"""THE end-to-end flow: the official MCP SDK client, through the gateway, to the SDK MCP server.

Real peers only: the legacy provider (node `oidc-provider`, password login), the gateway built by
`gateway.app.build_app` and served on loopback, the SDK MCP server behind it, and the SDK client
with its own OAuth support, whose "browser" is the scripted user agent. The client connects to
`<gateway>/mcp`, is refused with 401, discovers, registers, the user approves consent, logs in
upstream as alice, types the TOTP code, and only then does the client get a code and tokens and
call `tools/list` and `echo` (DESIGN §2, §4; invariants 1 and 7).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import jwt
import pytest

from tests.e2e.mcp_oauth import DEFAULT_REDIRECT_URI, oauth_mcp_client, totp_code
from tests.e2e.useragent import Page, UserAgent, at_form_with
from tests.fixtures.gateway import GatewayFactory, RunningGateway
from tests.fixtures.peers import LegacyIdp, McpServer, McpServerFactory

pytestmark = pytest.mark.e2e

# A fixed base32 seed (160 bits) so the test can compute the codes an authenticator app shows.
ALICE_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def _answers(idp: LegacyIdp, user: str = "alice", secret: str = ALICE_SECRET) -> dict[str, Any]:
    return {
        "username": user,
        "password": idp.accounts[user],
        "decision": "approve",
        "code": lambda: totp_code(secret),
    }


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    return header, claims


def _redirects_to(page: Page, target: str) -> bool:
    loc = page.location
    if loc is None:
        return False
    a, b = urlsplit(loc), urlsplit(target)
    return (a.scheme, a.netloc, a.path) == (b.scheme, b.netloc, b.path)


async def _gateway(
    gateway_factory: GatewayFactory, mcp: McpServer, **overrides: Any
) -> RunningGateway:
    gw = await gateway_factory(
        resources=[{"path": "/mcp", "upstream": mcp.url, "name": "Demo MCP server"}], **overrides
    )
    await gw.enroll("alice", ALICE_SECRET)
    return gw


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_sdk_client_gets_tokens_only_after_totp_and_calls_tools(
    gateway_factory: GatewayFactory,
    legacy_idp: LegacyIdp,
    mcp_server: McpServer,
    store: str,
) -> None:
    """401 → discovery → registration → consent → upstream password → TOTP → code → tokens →
    tools/list and echo reach the MCP server; no code or token reached the client before the
    TOTP step (invariant 1, R10, R11), the token says amr mfa (R31) and never reached the MCP
    server (invariant 7, R26)."""
    gw = await _gateway(gateway_factory, mcp_server, store=store)
    mark = mcp_server.mark()
    async with UserAgent(redirect_uri=DEFAULT_REDIRECT_URI, answers=_answers(legacy_idp)) as ua:
        async with oauth_mcp_client(gw.resource_url(), useragent=ua) as conn:
            tools = await conn.client.list_tools()
            result = await conn.client.call_tool("echo", {"text": "through the gateway"})
            tokens = conn.storage.tokens
            client_info = conn.storage.client_info
        pages = list(ua.pages)

    assert {t.name for t in tools.tools} >= {"echo", "whoami", "count"}
    assert result.is_error is False
    assert result.structured_content == {"result": "through the gateway"}

    # The browser saw: consent at the gateway, the upstream login, the TOTP page, then the client.
    consent = next(p for p in pages if p.url.startswith(gw.url + "/oauth/authorize"))
    assert consent.status == 200
    consent_form = consent.form()
    assert consent_form is not None
    assert set(consent_form.hidden) == {"csrf", "tx"}
    assert {b.value for b in consent_form.buttons if b.name == "decision"} == {"approve", "deny"}
    assert consent.headers["x-frame-options"] == "DENY"
    assert consent.headers["cache-control"] == "no-store"
    assert any(p.url.startswith(legacy_idp.issuer + "/interaction/") for p in pages)
    totp_pages = [
        p for p in pages if p.method == "GET" and p.url.startswith(gw.url + "/oauth/totp")
    ]
    assert totp_pages
    assert totp_pages[0].status == 200
    assert totp_pages[0].has_field("code")

    # Invariant 1: the only redirect to the client is the answer to the TOTP form.
    to_client = [p for p in pages if _redirects_to(p, DEFAULT_REDIRECT_URI)]
    assert len(to_client) == 1
    final = to_client[0]
    assert (final.method, final.status) == ("POST", 303)
    assert final.url == gw.url + "/oauth/totp"
    assert pages.index(final) > pages.index(totp_pages[0])
    assert final.location is not None
    params = dict(parse_qsl(urlsplit(final.location).query))
    assert set(params) == {"code", "state", "iss"}
    assert params["iss"] == gw.url
    assert not any(
        "code=" in (p.location or "")
        for p in pages[: pages.index(final)]
        if _redirects_to(p, DEFAULT_REDIRECT_URI)
    )

    # The tokens: a gateway JWT for this resource that proves MFA, and a refresh token.
    assert tokens is not None
    assert client_info is not None
    assert tokens.refresh_token
    header, claims = _unverified(tokens.access_token)
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "ES256"
    assert claims["iss"] == gw.url
    assert claims["aud"] == gw.resource_url()
    assert claims["sub"] == "alice"
    assert claims["client_id"] == client_info.client_id
    assert isinstance(claims["amr"], list)
    assert {"pwd", "otp", "mfa"} <= set(claims["amr"])

    # The MCP server ran exactly what was asked, and never saw the client's token.
    assert mcp_server.tool_runs(since=mark) == ["echo"]
    received = mcp_server.authorizations(since=mark)
    assert received
    assert all(a is None for a in received)


async def test_initialize_era_client_through_the_gateway_keeps_its_session(
    gateway_factory: GatewayFactory,
    legacy_idp: LegacyIdp,
    mcp_server_factory: McpServerFactory,
) -> None:
    """A 2025-11-25 client (initialize, Mcp-Session-Id) works through the gateway against a
    stateful MCP server, and progress notifications stream through (DESIGN §4.5, R32)."""
    server = mcp_server_factory(stateful=True)
    gw = await _gateway(gateway_factory, server)
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with (
        UserAgent(redirect_uri=DEFAULT_REDIRECT_URI, answers=_answers(legacy_idp)) as ua,
        oauth_mcp_client(gw.resource_url(), useragent=ua, mode="legacy") as conn,
    ):
        assert conn.client.protocol_version == "2025-11-25"
        result = await conn.client.call_tool(
            "count", {"n": 3, "delay": 0.1}, progress_callback=on_progress
        )
    assert result.structured_content == {"result": "counted to 3"}
    assert seen == [1.0, 2.0, 3.0]
    http = server.records("http")
    session_ids = {r["mcp_session_id"] for r in http if r["mcp_session_id"] is not None}
    assert len(session_ids) == 1
    assert server.tool_runs() == ["count"]
    assert all(r["authorization"] is None for r in http)


async def test_forward_token_upstream_sends_the_users_upstream_token_not_the_clients(
    gateway_factory: GatewayFactory,
    legacy_idp: LegacyIdp,
    mcp_server_factory: McpServerFactory,
) -> None:
    """With forward_token = "upstream" the MCP server (which introspects at the legacy provider)
    receives alice's upstream access token on every request, never the client's token
    (invariant 7, R26)."""
    server = mcp_server_factory(introspect=legacy_idp)
    gw = await gateway_factory(
        resources=[{"path": "/mcp", "upstream": server.url, "forward_token": "upstream"}]
    )
    await gw.enroll("alice", ALICE_SECRET)
    async with (
        UserAgent(redirect_uri=DEFAULT_REDIRECT_URI, answers=_answers(legacy_idp)) as ua,
        oauth_mcp_client(gw.resource_url(), useragent=ua) as conn,
    ):
        result = await conn.client.call_tool("whoami", {})
        tokens = conn.storage.tokens
    assert tokens is not None
    assert result.structured_content is not None
    assert result.structured_content["introspection"]["sub"] == "alice"
    assert result.structured_content["introspection"]["client_id"] == legacy_idp.client_id
    received = server.authorizations()
    assert received
    assert all(a is not None and a.startswith("Bearer ") for a in received)
    assert all(a != f"Bearer {tokens.access_token}" for a in received)
    assert server.tool_runs() == ["whoami"]


async def test_wrong_totp_code_gets_no_code_and_the_page_again(
    gateway_factory: GatewayFactory,
    legacy_idp: LegacyIdp,
    mcp_server: McpServer,
) -> None:
    """A wrong TOTP code re-renders the step-up page with 400 and never redirects to the client
    (invariant 1, DESIGN §2.8)."""
    gw = await _gateway(gateway_factory, mcp_server)
    async with httpx.AsyncClient(timeout=10) as http:
        registered = await http.post(
            gw.url + "/oauth/register",
            json={
                "redirect_uris": [DEFAULT_REDIRECT_URI],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "client_name": "wrong-code test",
            },
        )
    assert registered.status_code == 201, registered.text
    client_id = registered.json()["client_id"]
    query = httpx.QueryParams(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": DEFAULT_REDIRECT_URI,
            "state": "st-1",
            "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            "code_challenge_method": "S256",
            "scope": "mcp",
            "resource": gw.resource_url(),
        }
    )
    async with UserAgent(redirect_uri=DEFAULT_REDIRECT_URI, answers=_answers(legacy_idp)) as ua:
        at_totp = await ua.run(f"{gw.url}/oauth/authorize?{query}", stop=at_form_with("code"))
        assert at_totp.page is not None
        assert at_totp.page.url.startswith(gw.url + "/oauth/totp")
        wrong = "000000" if totp_code(ALICE_SECRET) != "000000" else "111111"
        refused = await ua.submit(at_totp.page, {"code": wrong})
        pages = list(ua.pages)
    assert refused.status == 400
    assert refused.has_field("code")
    assert refused.location is None
    assert not any(_redirects_to(p, DEFAULT_REDIRECT_URI) for p in pages)
