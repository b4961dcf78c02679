"""The real peers on their own, before the gateway stands between them.

The legacy provider (npm ``oidc-provider`` with its own password login) must behave like the
legacy upstream DESIGN §1 describes: a confidential-client code flow with PKCE that yields an ID
token with ``amr: ["pwd"]`` and never ``mfa``, introspection, refresh with ``offline_access``.
The SDK MCP server must speak both protocol eras to the SDK client, stream progress, check
Host/Origin, and record what it ran and which credentials it received.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest

from tests.e2e.mcp_oauth import plain_mcp_client
from tests.e2e.useragent import AuthorizationResponse, UserAgent
from tests.fixtures.peers import ClientCredentials, LegacyIdp, McpServer, McpServerFactory

pytestmark = pytest.mark.e2e

# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Authorization:
    """One authorization request and what came back to the redirect URI."""

    response: AuthorizationResponse
    state: str
    nonce: str
    verifier: str
    redirect_uri: str


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def _discovery(idp: LegacyIdp) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.get(idp.discovery_url)
    assert resp.status_code == 200
    doc: dict[str, Any] = resp.json()
    return doc


def _authorization_url(
    idp: LegacyIdp,
    *,
    client_id: str,
    redirect_uri: str,
    state: str,
    nonce: str,
    verifier: str | None,
    scope: str = "openid profile email",
    prompt: str | None = None,
) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "nonce": nonce,
    }
    if verifier is not None:
        params |= {"code_challenge": _challenge(verifier), "code_challenge_method": "S256"}
    if prompt is not None:
        params["prompt"] = prompt
    return f"{idp.issuer}/auth?{urlencode(params)}"


async def _authorize(
    idp: LegacyIdp,
    *,
    user: str = "alice",
    password: str | None = None,
    client_id: str | None = None,
    scope: str = "openid profile email",
    prompt: str | None = None,
) -> Authorization:
    """Log in at the legacy provider with the scripted browser; return the code response."""
    redirect_uri = idp.redirect_uris[0]
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    verifier = secrets.token_urlsafe(48)
    url = _authorization_url(
        idp,
        client_id=client_id or idp.client_id,
        redirect_uri=redirect_uri,
        state=state,
        nonce=nonce,
        verifier=verifier,
        scope=scope,
        prompt=prompt,
    )
    answers = {"username": user, "password": password or idp.accounts[user]}
    async with UserAgent(redirect_uri=redirect_uri, answers=answers) as ua:
        response = await ua.authorize(url)
    return Authorization(response, state, nonce, verifier, redirect_uri)


async def _token(
    idp: LegacyIdp, data: dict[str, str], client: ClientCredentials, *, method: str = "basic"
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        if method == "basic":
            return await http.post(
                f"{idp.issuer}/token", data=data, auth=(client.client_id, client.client_secret)
            )
        body = data | {"client_id": client.client_id, "client_secret": client.client_secret}
        return await http.post(f"{idp.issuer}/token", data=body)


async def _redeem(
    idp: LegacyIdp, auth: Authorization, client: ClientCredentials, *, method: str = "basic"
) -> httpx.Response:
    assert auth.response.code is not None
    data = {
        "grant_type": "authorization_code",
        "code": auth.response.code,
        "redirect_uri": auth.redirect_uri,
        "code_verifier": auth.verifier,
    }
    return await _token(idp, data, client, method=method)


async def _introspect(idp: LegacyIdp, token: str, creds: ClientCredentials) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(
            f"{idp.issuer}/token/introspection",
            data={"token": token},
            auth=(creds.client_id, creds.client_secret),
        )


async def _verified_id_token(idp: LegacyIdp, id_token: str, nonce: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        jwks = (await http.get(f"{idp.issuer}/jwks")).json()
    kid = jwt.get_unverified_header(id_token)["kid"]
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
    claims: dict[str, Any] = jwt.decode(
        id_token, key, algorithms=["RS256"], audience=idp.client_id, issuer=idp.issuer
    )
    assert claims["nonce"] == nonce
    return claims


# --------------------------------------------------------------------------- legacy provider


async def test_discovery_describes_a_legacy_provider(legacy_idp: LegacyIdp) -> None:
    """Discovery names the issuer, S256 only, RFC 9207 `iss`, introspection and revocation
    (R4, R11)."""
    doc = await _discovery(legacy_idp)
    assert doc["issuer"] == legacy_idp.issuer
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["response_types_supported"] == ["code"]
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert doc["introspection_endpoint"] == legacy_idp.issuer + "/token/introspection"
    assert doc["revocation_endpoint"] == legacy_idp.issuer + "/token/revocation"
    assert doc["userinfo_endpoint"] == legacy_idp.issuer + "/me"
    assert sorted(doc["token_endpoint_auth_methods_supported"]) == [
        "client_secret_basic",
        "client_secret_post",
    ]
    assert "offline_access" in doc["scopes_supported"]
    assert "mfa" not in str(doc.get("acr_values_supported"))


async def test_wrong_password_is_refused_with_the_login_page_again(legacy_idp: LegacyIdp) -> None:
    """A wrong password re-renders the provider's own login page with 401, and no code is issued."""
    redirect_uri = legacy_idp.redirect_uris[0]
    url = _authorization_url(
        legacy_idp,
        client_id=legacy_idp.client_id,
        redirect_uri=redirect_uri,
        state="s1",
        nonce="n1",
        verifier=secrets.token_urlsafe(32),
    )
    answers = {"username": "alice", "password": "not the password"}
    async with UserAgent(redirect_uri=redirect_uri, answers=answers) as ua:
        outcome = await ua.run(url)
        pages = list(ua.pages)
    assert outcome.response is None
    assert outcome.page is not None
    assert outcome.page.status == 401
    assert outcome.page.method == "POST"
    assert "Invalid username or password." in outcome.page.html
    form = outcome.page.form()
    assert form is not None
    assert form.field("username") is not None
    assert form.field("username").value == "alice"  # type: ignore[union-attr]
    assert form.field("password") is not None
    assert form.field("password").value == ""  # type: ignore[union-attr]
    assert outcome.page.headers["x-frame-options"] == "DENY"
    assert outcome.page.headers["cache-control"] == "no-store"
    assert not any(p.location and p.location.startswith(redirect_uri) for p in pages)


async def test_unknown_user_is_refused_like_a_wrong_password(legacy_idp: LegacyIdp) -> None:
    """An unknown user gets the same 401 page as a wrong password (no account enumeration)."""
    redirect_uri = legacy_idp.redirect_uris[0]
    url = _authorization_url(
        legacy_idp,
        client_id=legacy_idp.client_id,
        redirect_uri=redirect_uri,
        state="s2",
        nonce="n2",
        verifier=secrets.token_urlsafe(32),
    )
    async with UserAgent(
        redirect_uri=redirect_uri, answers={"username": "mallory", "password": "x"}
    ) as ua:
        outcome = await ua.run(url)
    assert outcome.response is None
    assert outcome.page is not None
    assert outcome.page.status == 401
    assert "Invalid username or password." in outcome.page.html


async def test_login_form_is_bound_to_the_browser_and_takes_only_forms(
    legacy_idp: LegacyIdp,
) -> None:
    """The login POST from another browser (no interaction cookie) is refused with 400; a
    non-form body is 415 and an oversized form 413, and none of them logs anyone in."""
    redirect_uri = legacy_idp.redirect_uris[0]
    url = _authorization_url(
        legacy_idp,
        client_id=legacy_idp.client_id,
        redirect_uri=redirect_uri,
        state="s3",
        nonce="n3",
        verifier=secrets.token_urlsafe(32),
    )
    async with UserAgent(redirect_uri=redirect_uri) as ua:
        outcome = await ua.run(url, stop=lambda page: page.has_field("password"))
        assert outcome.page is not None
        form = outcome.page.form()
        assert form is not None
        good = {"username": "alice", "password": legacy_idp.accounts["alice"]}
        async with UserAgent(redirect_uri=redirect_uri) as other:
            stolen = await other.request("POST", form.action, data=good)
        assert stolen.status == 400
        assert stolen.location is None
        as_json = await ua.client.post(form.action, json=good)
        assert as_json.status_code == 415
        huge = await ua.request("POST", form.action, data=good | {"pad": "x" * 20_000})
        assert huge.status == 413
        # The browser's own, well-formed post still works afterwards.
        response = await ua.authorize(outcome.page.url, answers=good)
    assert response.code is not None
    assert response.state == "s3"


async def test_code_flow_with_pkce_yields_an_id_token_with_amr_pwd_only(
    legacy_idp: LegacyIdp,
) -> None:
    """The code flow returns code/state/iss; the ID token says `amr: ["pwd"]`, never `mfa` (R31)."""
    auth = await _authorize(legacy_idp)
    assert auth.response.error is None
    assert auth.response.state == auth.state
    assert auth.response.iss == legacy_idp.issuer
    resp = await _redeem(legacy_idp, auth, legacy_idp.basic_client)
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert "refresh_token" not in body  # no offline_access asked for
    claims = await _verified_id_token(legacy_idp, body["id_token"], auth.nonce)
    assert claims["sub"] == "alice"
    assert claims["amr"] == ["pwd"]
    assert "mfa" not in claims["amr"]
    assert claims["acr"] == "urn:legacy:pwd"
    assert isinstance(claims["auth_time"], int)
    assert abs(claims["auth_time"] - time.time()) < 120  # noqa: TID251 - compares with the peer's clock


async def test_code_is_single_use(legacy_idp: LegacyIdp) -> None:
    """A second redemption of the same code fails with invalid_grant."""
    auth = await _authorize(legacy_idp)
    first = await _redeem(legacy_idp, auth, legacy_idp.basic_client)
    assert first.status_code == 200
    second = await _redeem(legacy_idp, auth, legacy_idp.basic_client)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"


async def test_pkce_is_required_and_checked(legacy_idp: LegacyIdp) -> None:
    """No code_challenge → invalid_request at the redirect URI; a wrong verifier → invalid_grant."""
    redirect_uri = legacy_idp.redirect_uris[0]
    url = _authorization_url(
        legacy_idp,
        client_id=legacy_idp.client_id,
        redirect_uri=redirect_uri,
        state="no-pkce",
        nonce="n",
        verifier=None,
    )
    async with UserAgent(redirect_uri=redirect_uri) as ua:
        response = await ua.authorize(url)
    assert response.error == "invalid_request"
    assert response.state == "no-pkce"
    assert response.code is None

    auth = await _authorize(legacy_idp)
    wrong = Authorization(
        auth.response, auth.state, auth.nonce, secrets.token_urlsafe(32), auth.redirect_uri
    )
    resp = await _redeem(legacy_idp, wrong, legacy_idp.basic_client)
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_grant"


async def test_client_authentication_methods(legacy_idp: LegacyIdp) -> None:
    """The post client authenticates in the body, the basic client with Basic; a wrong secret
    is invalid_client (401) either way (like many legacy providers, oidc-provider accepts
    either secret method from a client registered for one)."""
    auth = await _authorize(legacy_idp, client_id=legacy_idp.post_client_id)
    resp = await _redeem(legacy_idp, auth, legacy_idp.post_client, method="post")
    assert resp.status_code == 200, resp.text
    assert "access_token" in resp.json()

    auth = await _authorize(legacy_idp)
    bad = ClientCredentials(legacy_idp.client_id, "wrong-secret")
    resp = await _redeem(legacy_idp, auth, bad)
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_client"
    assert resp.headers["www-authenticate"].startswith("Basic")

    auth = await _authorize(legacy_idp, client_id=legacy_idp.post_client_id)
    bad = ClientCredentials(legacy_idp.post_client_id, "wrong-secret")
    resp = await _redeem(legacy_idp, auth, bad, method="post")
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_client"


async def test_introspection_userinfo_and_revocation(legacy_idp: LegacyIdp) -> None:
    """The resource-server client introspects the access token (RFC 7662); userinfo names alice;
    after revocation (RFC 7009) the token is inactive."""
    auth = await _authorize(legacy_idp)
    tokens = (await _redeem(legacy_idp, auth, legacy_idp.basic_client)).json()
    access = tokens["access_token"]

    resp = await _introspect(legacy_idp, access, legacy_idp.introspection)
    assert resp.status_code == 200
    info = resp.json()
    assert info["active"] is True
    assert info["sub"] == "alice"
    assert info["client_id"] == legacy_idp.client_id
    assert set(info["scope"].split()) == {"openid", "profile", "email"}

    resp = await _introspect(legacy_idp, "not-a-token", legacy_idp.introspection)
    assert resp.status_code == 200
    assert resp.json() == {"active": False}

    resp = await _introspect(
        legacy_idp, access, ClientCredentials(legacy_idp.introspection.client_id, "wrong")
    )
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_client"

    async with httpx.AsyncClient(timeout=10) as http:
        me = await http.get(
            f"{legacy_idp.issuer}/me", headers={"Authorization": f"Bearer {access}"}
        )
        assert me.status_code == 200
        assert me.json()["sub"] == "alice"
        revoked = await http.post(
            f"{legacy_idp.issuer}/token/revocation",
            data={"token": access},
            auth=(legacy_idp.client_id, legacy_idp.client_secret),
        )
        assert revoked.status_code == 200
    resp = await _introspect(legacy_idp, access, legacy_idp.introspection)
    assert resp.json() == {"active": False}


async def test_refresh_with_offline_access_rotates(legacy_idp: LegacyIdp) -> None:
    """offline_access + prompt=consent yields a refresh token; refreshing returns a new access
    token and a rotated refresh token, and the old one no longer works."""
    auth = await _authorize(legacy_idp, scope="openid offline_access", prompt="consent")
    tokens = (await _redeem(legacy_idp, auth, legacy_idp.basic_client)).json()
    refresh = tokens["refresh_token"]

    resp = await _token(
        legacy_idp,
        {"grant_type": "refresh_token", "refresh_token": refresh},
        legacy_idp.basic_client,
    )
    assert resp.status_code == 200, resp.text
    again = resp.json()
    assert again["access_token"] != tokens["access_token"]
    assert again["refresh_token"] != refresh
    claims = jwt.decode(again["id_token"], options={"verify_signature": False})
    assert claims["amr"] == ["pwd"]

    info = (await _introspect(legacy_idp, again["access_token"], legacy_idp.introspection)).json()
    assert info["active"] is True
    assert info["sub"] == "alice"

    reused = await _token(
        legacy_idp,
        {"grant_type": "refresh_token", "refresh_token": refresh},
        legacy_idp.basic_client,
    )
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"


async def test_offline_access_without_prompt_consent_gives_no_refresh_token(
    legacy_idp: LegacyIdp,
) -> None:
    """Without prompt=consent the provider drops offline_access: no refresh token."""
    auth = await _authorize(legacy_idp, scope="openid offline_access")
    tokens = (await _redeem(legacy_idp, auth, legacy_idp.basic_client)).json()
    assert "access_token" in tokens
    assert "refresh_token" not in tokens


async def test_unregistered_redirect_uri_is_not_redirected_to(legacy_idp: LegacyIdp) -> None:
    """An unregistered redirect_uri gets an error page at the provider, never a redirect."""
    evil = "http://127.0.0.1:1/evil"
    url = _authorization_url(
        legacy_idp,
        client_id=legacy_idp.client_id,
        redirect_uri=evil,
        state="s",
        nonce="n",
        verifier=secrets.token_urlsafe(32),
    )
    async with UserAgent(redirect_uri=evil) as ua:
        outcome = await ua.run(url)
    assert outcome.response is None
    assert outcome.page is not None
    assert outcome.page.status == 400
    assert "redirect_uri" in outcome.page.html


# --------------------------------------------------------------------------- MCP server


async def test_sdk_client_and_server_in_the_2026_era(mcp_server: McpServer) -> None:
    """The SDK client probes server/discover and talks 2026-07-28 statelessly; the record file
    logs each HTTP request (no Authorization) and each tool that ran."""
    mark = mcp_server.mark()
    async with plain_mcp_client(mcp_server.url) as client:
        assert client.protocol_version == "2026-07-28"
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} == {
            "echo",
            "whoami",
            "count",
            "delete_everything",
            "transfer_funds",
        }
        result = await client.call_tool("echo", {"text": "hello"})
        assert result.is_error is False
        assert result.structured_content == {"result": "hello"}
    http = mcp_server.records("http", since=mark)
    assert [r["mcp_method"] for r in http] == ["server/discover", "tools/list", "tools/call"]
    assert all(r["mcp_session_id"] is None for r in http)
    assert mcp_server.authorizations(since=mark) == [None, None, None]
    assert mcp_server.tool_runs(since=mark) == ["echo"]
    assert mcp_server.records("tool", since=mark)[0]["arguments"] == {"text": "hello"}


async def test_sdk_client_and_server_in_the_initialize_era_with_sessions(
    mcp_server_factory: McpServerFactory,
) -> None:
    """With --stateful and the client's legacy mode, initialize opens a session that every later
    request carries, and closing the client ends it with DELETE."""
    server = mcp_server_factory(stateful=True)
    async with plain_mcp_client(server.url, mode="legacy") as client:
        assert client.protocol_version == "2025-11-25"
        result = await client.call_tool("echo", {"text": "stateful"})
        assert result.structured_content == {"result": "stateful"}
    http = server.records("http")
    assert http[0]["method"] == "POST"
    assert http[0]["mcp_session_id"] is None
    session_ids = {r["mcp_session_id"] for r in http[1:]}
    assert len(session_ids) == 1
    assert None not in session_ids
    assert http[-1]["method"] == "DELETE"
    assert server.tool_runs() == ["echo"]


async def test_stateless_server_serves_the_initialize_era_without_sessions(
    mcp_server: McpServer,
) -> None:
    """Without --stateful, an initialize-era client gets no session id."""
    mark = mcp_server.mark()
    async with plain_mcp_client(mcp_server.url, mode="legacy") as client:
        assert client.protocol_version == "2025-11-25"
        await client.call_tool("echo", {"text": "x"})
    assert all(r["mcp_session_id"] is None for r in mcp_server.records("http", since=mark))
    assert mcp_server.tool_runs(since=mark) == ["echo"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_progress_notifications_arrive_while_count_runs(
    mcp_server: McpServer, mode: str
) -> None:
    """`count` streams one progress notification per step while it runs, not all at the end."""
    arrivals: list[tuple[float, float, float | None]] = []
    start = time.monotonic()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append((time.monotonic() - start, progress, total))

    async with plain_mcp_client(mcp_server.url, mode=mode) as client:
        start = time.monotonic()
        result = await client.call_tool(
            "count", {"n": 3, "delay": 0.25}, progress_callback=on_progress
        )
        finished = time.monotonic() - start
    assert result.structured_content == {"result": "counted to 3"}
    assert [(p, t) for _, p, t in arrivals] == [(1.0, 3.0), (2.0, 3.0), (3.0, 3.0)]
    assert finished >= 0.5
    assert arrivals[0][0] < finished - 0.4  # the first one came long before the result


async def test_whoami_reports_forwarded_headers(mcp_server: McpServer) -> None:
    """whoami returns the Authorization and X-* headers the server received."""
    async with plain_mcp_client(
        mcp_server.url, headers={"X-Forwarded-User": "alice", "Authorization": "Bearer abc"}
    ) as client:
        result = await client.call_tool("whoami", {})
    assert result.structured_content is not None
    assert result.structured_content["authorization"] == "Bearer abc"
    assert result.structured_content["forwarded_headers"] == {"x-forwarded-user": "alice"}
    assert result.structured_content["introspection"] is None


async def test_server_checks_host_and_origin(mcp_server: McpServer) -> None:
    """DNS-rebinding protection stays on: a foreign Host gets 421, a foreign Origin 403, while a
    loopback Origin is served."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=10) as http:
        foreign_host = await http.post(
            mcp_server.url, json=body, headers=headers | {"Host": "evil.example:80"}
        )
        foreign_origin = await http.post(
            mcp_server.url, json=body, headers=headers | {"Origin": "http://evil.example"}
        )
        loopback_origin = await http.post(
            mcp_server.url, json=body, headers=headers | {"Origin": "http://127.0.0.1:8080"}
        )
    assert foreign_host.status_code == 421
    assert foreign_origin.status_code == 403
    assert loopback_origin.status_code == 200


async def test_introspecting_server_requires_an_active_upstream_token(
    legacy_idp: LegacyIdp, mcp_server_factory: McpServerFactory
) -> None:
    """With --introspect, no token or an unknown token → 401 and no tool runs; an active upstream
    access token is accepted and whoami shows the introspected subject."""
    server = mcp_server_factory(introspect=legacy_idp)
    async with httpx.AsyncClient(timeout=10) as http:
        missing = await http.post(server.url, json={})
        unknown = await http.post(server.url, json={}, headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="mcp-server"'
    assert unknown.status_code == 401
    assert unknown.headers["www-authenticate"] == 'Bearer realm="mcp-server", error="invalid_token"'

    auth = await _authorize(legacy_idp)
    access = (await _redeem(legacy_idp, auth, legacy_idp.basic_client)).json()["access_token"]
    async with plain_mcp_client(
        server.url, headers={"Authorization": f"Bearer {access}"}
    ) as client:
        result = await client.call_tool("whoami", {})
    assert result.structured_content is not None
    assert result.structured_content["introspection"]["sub"] == "alice"
    assert result.structured_content["introspection"]["client_id"] == legacy_idp.client_id
    assert server.tool_runs() == ["whoami"]
    assert server.authorizations()[:2] == [None, "Bearer nope"]


async def test_introspection_header_cannot_be_forged(
    legacy_idp: LegacyIdp, mcp_server_factory: McpServerFactory
) -> None:
    """A client-sent X-Demo-Introspection header is replaced by the server's own result."""
    server = mcp_server_factory(introspect=legacy_idp)
    auth = await _authorize(legacy_idp, user="bob")
    access = (await _redeem(legacy_idp, auth, legacy_idp.basic_client)).json()["access_token"]
    forged = '{"sub": "alice"}'
    async with plain_mcp_client(
        server.url,
        headers={"Authorization": f"Bearer {access}", "X-Demo-Introspection": forged},
    ) as client:
        result = await client.call_tool("whoami", {})
    assert result.structured_content is not None
    assert result.structured_content["introspection"]["sub"] == "bob"
