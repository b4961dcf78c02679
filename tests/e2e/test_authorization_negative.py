"""What the authorization flow refuses, end to end against the real legacy provider.

Real peers only (node `oidc-provider` with its password login, the gateway app on loopback, the
SDK MCP server behind it); the "browser" is the scripted user agent and the client's side of
OAuth is done by hand with httpx so every status and error code can be asserted. One gateway
serves the whole module; each test signs in its own user, so TOTP steps burned by one test
never collide with another's. Tests that change what the gateway remembers for everyone (a
lockout, which also counts per IP) or need another policy (`mfa_max_age`) start their own
gateway on the second registered port.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pyotp
import pytest
import pytest_asyncio

from gateway.flows.stepup import GENERIC_FAILURE
from tests.e2e.mcp_oauth import DEFAULT_REDIRECT_URI, totp_code
from tests.e2e.support import (
    HANDSHAKE,
    Pkce,
    answers,
    authorization_url,
    challenge_params,
    eventually,
    mcp_post,
    metric,
    new_pkce,
    new_secret,
    redeem,
    refresh,
    register_public_client,
    rpc,
    sleep_until,
    unverified,
)
from tests.e2e.useragent import AuthorizationResponse, Page, UserAgent, at_form_with
from tests.fixtures.gateway import RunningGateway, running_gateway
from tests.fixtures.peers import LegacyIdp, McpServer

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

REFUSED_TITLE = "Sign-in could not be completed"
# Words that would tell an attacker which check failed; the TOTP page never says them.
REVEALING = ("expired", "locked", "replay", "already used", "too many", "wrong code")


# --------------------------------------------------------------------------- fixtures


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RunningGateway]:
    """The module's gateway (default policy) in front of the legacy provider."""
    async with running_gateway(
        tmp_path_factory.mktemp("negative-gateway"),
        idp=legacy_idp,
        port=gateway_ports[0],
        resources=[{"path": "/mcp", "upstream": mcp_server.url}],
    ) as gateway:
        yield gateway


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client_id(gw: RunningGateway) -> str:
    """One dynamically registered public client used by every flow of the module."""
    return await register_public_client(gw.url, name="negative-tests client")


# --------------------------------------------------------------------------- helpers


def _url(gw: RunningGateway, client_id: str, pkce: Pkce, state: str = "client-state") -> str:
    return authorization_url(
        gw.url, client_id=client_id, resource=gw.resource_url(), pkce=pkce, state=state
    )


def _to_client(page: Page) -> bool:
    """The page redirects to the client's redirect URI."""
    loc = page.location
    if loc is None:
        return False
    a, b = urlsplit(loc), urlsplit(DEFAULT_REDIRECT_URI)
    return (a.scheme, a.netloc, a.path) == (b.scheme, b.netloc, b.path)


def _assert_no_redirect_to_client(pages: list[Page]) -> None:
    assert not [p.url for p in pages if _to_client(p)]


def _assert_refusal_page(page: Page, status: int) -> None:
    """An HTML error page (never a redirect) with the interactive-page security headers."""
    assert page.status == status
    assert page.headers["content-type"].startswith("text/html")
    assert "location" not in page.headers
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert REFUSED_TITLE in page.html
    assert page.form() is None


def _assert_generic_totp_failure(page: Page) -> None:
    """The step-up page again: 400, the form, the one generic message, nothing else said."""
    assert page.status == 400
    assert page.location is None
    assert page.has_field("code")
    assert GENERIC_FAILURE in page.html
    lowered = page.html.lower()
    assert not [w for w in REVEALING if w in lowered]


async def _enrolled(gw: RunningGateway, user: str) -> str:
    secret = new_secret()
    await gw.enroll(user, secret)
    return secret


async def _at_totp(ua: UserAgent, url: str, gw: RunningGateway) -> Page:
    """Run consent and the upstream login; stop at the step-up form."""
    outcome = await ua.run(url, stop=at_form_with("code"))
    assert outcome.page is not None, outcome
    assert outcome.page.url.startswith(gw.url + "/oauth/totp?")
    assert outcome.page.status == 200
    return outcome.page


async def _to_callback(ua: UserAgent, url: str, gw: RunningGateway) -> str:
    """Run consent and the upstream login; return the upstream's redirect to the gateway's
    callback without following it."""

    def at_callback(page: Page) -> bool:
        return (page.location or "").startswith(gw.url + "/oauth/callback?")

    outcome = await ua.run(url, stop=at_callback)
    assert outcome.page is not None, outcome
    assert outcome.page.location is not None, outcome.page
    return outcome.page.location


def _with_query(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


async def _authorized(
    gw: RunningGateway, idp: LegacyIdp, client_id: str, user: str
) -> tuple[AuthorizationResponse, Pkce]:
    """A whole successful flow for `user` (enrolled here): the client's code and PKCE pair."""
    secret = await _enrolled(gw, user)
    pkce = new_pkce()
    async with UserAgent(
        redirect_uri=DEFAULT_REDIRECT_URI, answers=answers(idp, user, secret)
    ) as ua:
        response = await ua.authorize(_url(gw, client_id, pkce))
    assert response.code is not None
    return response, pkce


async def _tokens(
    gw: RunningGateway, idp: LegacyIdp, client_id: str, user: str
) -> tuple[dict[str, str], AuthorizationResponse, Pkce]:
    response, pkce = await _authorized(gw, idp, client_id, user)
    assert response.code is not None
    resp = await redeem(
        gw.url, code=response.code, pkce=pkce, client_id=client_id, resource=gw.resource_url()
    )
    assert resp.status_code == 200, resp.text
    body: dict[str, str] = resp.json()
    return body, response, pkce


async def _proxy_status(gw: RunningGateway, access_token: str) -> httpx.Response:
    return await mcp_post(
        gw.resource_url(),
        rpc(
            "initialize",
            protocolVersion=HANDSHAKE,
            capabilities={},
            clientInfo={"name": "e2e", "version": "1"},
        ),
        token=access_token,
        protocol=HANDSHAKE,
    )


async def _refused_by_proxy(gw: RunningGateway, access_token: str) -> bool:
    resp = await _proxy_status(gw, access_token)
    return resp.status_code == 401


def _assert_invalid_grant(resp: httpx.Response) -> None:
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "invalid_grant"
    assert resp.headers["cache-control"] == "no-store"
    assert "access_token" not in resp.json()


# --------------------------------------------------------------------------- upstream login


async def test_wrong_upstream_password_gets_no_code_and_never_reaches_the_gateway_again(
    gw: RunningGateway, legacy_idp: LegacyIdp, client_id: str
) -> None:
    """A wrong password at the legacy provider: its login page again (401), the browser never
    comes back to the gateway's callback, so no TOTP page and no code (invariant 1, R10)."""
    user = "carol"
    secret = await _enrolled(gw, user)
    started = await metric(gw.url, "mfagw_stepups_total", outcome="started")
    async with UserAgent(
        redirect_uri=DEFAULT_REDIRECT_URI,
        answers=answers(legacy_idp, user, secret, password="not the password"),
    ) as ua:
        outcome = await ua.run(_url(gw, client_id, new_pkce()))
        pages = list(ua.pages)
    assert outcome.response is None
    assert outcome.page is not None
    assert outcome.page.url.startswith(legacy_idp.issuer + "/interaction/")
    assert outcome.page.status == 401
    assert "Invalid username or password" in outcome.page.html
    assert outcome.page.has_field("password")
    assert not [p.url for p in pages if p.url.startswith(gw.url + "/oauth/callback")]
    assert not [p.url for p in pages if p.url.startswith(gw.url + "/oauth/totp")]
    _assert_no_redirect_to_client(pages)
    assert await metric(gw.url, "mfagw_stepups_total", outcome="started") == started


# --------------------------------------------------------------------------- TOTP


async def test_wrong_totp_code_shows_the_page_again_without_a_redirect(
    gw: RunningGateway, legacy_idp: LegacyIdp, client_id: str
) -> None:
    """A wrong code: the step-up page again (400) with the one generic message and no redirect
    to the client; the right code afterwards still completes the flow (DESIGN §2.8, invariant 1,
    R34)."""
    user = "dave"
    secret = await _enrolled(gw, user)
    async with UserAgent(
        redirect_uri=DEFAULT_REDIRECT_URI, answers=answers(legacy_idp, user, secret)
    ) as ua:
        page = await _at_totp(ua, _url(gw, client_id, new_pkce()), gw)
        now = totp_code(secret)
        wrong = f"{(int(now) + 500_000) % 1_000_000:06d}"
        refused = await ua.submit(page, {"code": wrong})
        _assert_generic_totp_failure(refused)
        _assert_no_redirect_to_client(ua.pages)
        accepted = await ua.submit(refused, {"code": totp_code(secret)})
    assert accepted.status == 303
    assert _to_client(accepted)
    assert accepted.location is not None
    assert set(dict(parse_qsl(urlsplit(accepted.location).query))) == {"code", "state", "iss"}


async def test_totp_code_accepted_once_is_refused_in_a_second_flow_of_the_same_user(
    gw: RunningGateway, legacy_idp: LegacyIdp, client_id: str
) -> None:
    """A code accepted in one flow is refused when replayed in a second flow of the same user
    while it is still inside the verification window: its time step is burned (R34,
    invariant 5); the refusal is the generic one and counted as a replay."""
    user = "erin"
    secret = await _enrolled(gw, user)
    code = totp_code(secret)
    async with UserAgent(
        redirect_uri=DEFAULT_REDIRECT_URI, answers=answers(legacy_idp, user, secret, code=code)
    ) as first:
        response = await first.authorize(_url(gw, client_id, new_pkce()))
    assert response.code is not None
    replays = await metric(gw.url, "mfagw_stepups_total", outcome="replayed")

    async with UserAgent(
        redirect_uri=DEFAULT_REDIRECT_URI, answers=answers(legacy_idp, user, secret)
    ) as second:
        page = await _at_totp(second, _url(gw, client_id, new_pkce()), gw)
        # Still a valid code for the clock right now: only the burned step refuses it.
        assert pyotp.TOTP(secret).verify(code, valid_window=1)
        refused = await second.submit(page, {"code": code})
        pages = list(second.pages)
    _assert_generic_totp_failure(refused)
    _assert_no_redirect_to_client(pages)
    assert await metric(gw.url, "mfagw_stepups_total", outcome="replayed") == replays + 1


async def test_five_failures_lock_the_user_and_then_the_right_code_is_refused_too(
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    tmp_path: Path,
) -> None:
    """After `max_failures_per_user` (5) wrong codes the user is locked out: the right code is
    refused with the same generic page, in this flow and in a new one (R34, invariant 5)."""
    user = "frank"
    async with running_gateway(
        tmp_path / "lockout-gateway",
        idp=legacy_idp,
        port=gateway_ports[1],
        resources=[{"path": "/mcp", "upstream": mcp_server.url}],
    ) as own:
        secret = await _enrolled(own, user)
        own_client = await register_public_client(own.url)
        right = totp_code(secret)
        wrong = f"{(int(right) + 500_000) % 1_000_000:06d}"
        async with UserAgent(
            redirect_uri=DEFAULT_REDIRECT_URI, answers=answers(legacy_idp, user, secret)
        ) as ua:
            page = await _at_totp(ua, _url(own, own_client, new_pkce()), own)
            for _ in range(5):
                page = await ua.submit(page, {"code": wrong})
                _assert_generic_totp_failure(page)
            assert await metric(own.url, "mfagw_lockouts_total", scope="user") == 1
            locked = await ua.submit(page, {"code": totp_code(secret)})
            _assert_generic_totp_failure(locked)
            assert locked.html.count(GENERIC_FAILURE) == page.html.count(GENERIC_FAILURE)
            _assert_no_redirect_to_client(ua.pages)

        async with UserAgent(
            redirect_uri=DEFAULT_REDIRECT_URI, answers=answers(legacy_idp, user, secret)
        ) as again:
            page = await _at_totp(again, _url(own, own_client, new_pkce()), own)
            refused = await again.submit(page, {"code": totp_code(secret)})
            _assert_generic_totp_failure(refused)
            _assert_no_redirect_to_client(again.pages)


# --------------------------------------------------------------------------- callback


@pytest.mark.parametrize(
    ("user", "tamper", "status"),
    [
        ("grace", "no_state", 400),
        ("heidi", "wrong_state", 400),
        ("ivan", "reused_state", 400),
        ("judy", "other_browser", 403),
    ],
)
async def test_callback_that_fails_its_checks_is_an_error_page_never_a_redirect(
    gw: RunningGateway,
    legacy_idp: LegacyIdp,
    client_id: str,
    user: str,
    tamper: str,
    status: int,
) -> None:
    """`/oauth/callback` without `state`, with a wrong one, with one already used, or in a
    browser without the transaction cookie: an HTML error page, no redirect to the client, no
    step-up (R16, R8, invariant 1). The untampered callback right next to it works, so each
    refusal is the check's doing."""
    secret = await _enrolled(gw, user)
    async with UserAgent(
        redirect_uri=DEFAULT_REDIRECT_URI, answers=answers(legacy_idp, user, secret)
    ) as ua:
        callback = await _to_callback(ua, _url(gw, client_id, new_pkce()), gw)
        if tamper == "no_state":
            refused = await ua.get(_with_query(callback, state=None))
            genuine = await ua.get(callback)
        elif tamper == "wrong_state":
            refused = await ua.get(_with_query(callback, state=secrets.token_urlsafe(32)))
            genuine = await ua.get(callback)
        elif tamper == "reused_state":
            genuine = await ua.get(callback)
            refused = await ua.get(callback)
        else:
            async with UserAgent(redirect_uri=DEFAULT_REDIRECT_URI) as other:
                refused = await other.get(callback)
                _assert_no_redirect_to_client(other.pages)
            genuine = None
        pages = list(ua.pages)
    _assert_refusal_page(refused, status)
    _assert_no_redirect_to_client(pages)
    if genuine is not None:
        assert genuine.status == 303
        assert genuine.location is not None
        assert genuine.location.startswith(gw.url + "/oauth/totp?")


# --------------------------------------------------------------------------- token endpoint


async def test_replayed_code_is_invalid_grant_and_revokes_the_tokens_it_issued(
    gw: RunningGateway, legacy_idp: LegacyIdp, client_id: str
) -> None:
    """A code redeemed twice: the second redemption is `invalid_grant`, and the access and
    refresh tokens of the first are revoked — the proxy then refuses the access token with 401
    `invalid_token` (R17, invariant 4, DESIGN §2.10)."""
    body, response, pkce = await _tokens(gw, legacy_idp, client_id, "mallory")
    assert response.code is not None
    access = body["access_token"]
    assert (await _proxy_status(gw, access)).status_code == 200

    replay = await redeem(
        gw.url, code=response.code, pkce=pkce, client_id=client_id, resource=gw.resource_url()
    )
    _assert_invalid_grant(replay)

    assert await eventually(lambda: _refused_by_proxy(gw, access))
    refused = await _proxy_status(gw, access)
    assert refused.status_code == 401
    params = challenge_params(refused.headers["www-authenticate"])
    assert params["error"] == "invalid_token"
    _assert_invalid_grant(
        await refresh(gw.url, refresh_token=body["refresh_token"], client_id=client_id)
    )


async def test_code_with_a_wrong_pkce_verifier_is_invalid_grant(
    gw: RunningGateway, legacy_idp: LegacyIdp, client_id: str
) -> None:
    """A code redeemed with a `code_verifier` that does not match its challenge:
    `invalid_grant`, no tokens (R18, RFC 7636 §4.6)."""
    response, _pkce = await _authorized(gw, legacy_idp, client_id, "niaj")
    assert response.code is not None
    resp = await redeem(
        gw.url,
        code=response.code,
        pkce=new_pkce(),
        client_id=client_id,
        resource=gw.resource_url(),
    )
    _assert_invalid_grant(resp)


async def test_reused_refresh_token_is_invalid_grant_and_kills_the_whole_family(
    gw: RunningGateway, legacy_idp: LegacyIdp, client_id: str
) -> None:
    """Refresh rotates; presenting the rotated-out token again is `invalid_grant` and revokes
    the family: the newest refresh token is dead too and its access token is refused by the
    proxy (R20, invariant 4, DESIGN §2.11)."""
    body, _, _ = await _tokens(gw, legacy_idp, client_id, "olivia")
    first_refresh = body["refresh_token"]
    rotated = await refresh(gw.url, refresh_token=first_refresh, client_id=client_id)
    assert rotated.status_code == 200, rotated.text
    newest = rotated.json()
    assert newest["refresh_token"] != first_refresh
    assert (await _proxy_status(gw, newest["access_token"])).status_code == 200

    _assert_invalid_grant(await refresh(gw.url, refresh_token=first_refresh, client_id=client_id))
    _assert_invalid_grant(
        await refresh(gw.url, refresh_token=newest["refresh_token"], client_id=client_id)
    )
    assert await eventually(lambda: _refused_by_proxy(gw, newest["access_token"]))


async def test_refresh_past_mfa_max_age_is_invalid_grant(
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    tmp_path: Path,
) -> None:
    """A refresh never extends MFA: within `mfa_max_age` (2 s here) a refresh keeps the step-up's
    `auth_time` and `amr`; after it, the refresh is `invalid_grant` (DESIGN §2.11, R31)."""
    async with running_gateway(
        tmp_path / "short-mfa-gateway",
        idp=legacy_idp,
        port=gateway_ports[1],
        resources=[{"path": "/mcp", "upstream": mcp_server.url}],
        policy={"tokens": {"mfa_max_age": "2s"}},
    ) as own:
        own_client = await register_public_client(own.url)
        body, _, _ = await _tokens(own, legacy_idp, own_client, "peggy")
        _, first = unverified(body["access_token"])

        fresh = await refresh(own.url, refresh_token=body["refresh_token"], client_id=own_client)
        assert fresh.status_code == 200, fresh.text
        _, second = unverified(fresh.json()["access_token"])
        assert second["auth_time"] == first["auth_time"]
        assert second["amr"] == first["amr"]

        await sleep_until(first["auth_time"] + 2.1)
        late = await refresh(
            own.url, refresh_token=fresh.json()["refresh_token"], client_id=own_client
        )
        _assert_invalid_grant(late)
