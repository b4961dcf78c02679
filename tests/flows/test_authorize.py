"""`/oauth/authorize` and `/oauth/consent`: validation order, no open redirect, consent first.

Invariants of DESIGN §7.2-7.3: only `response_type=code`, PKCE S256, `state`, no CORS, no
repeated parameters, exact redirect URIs (loopback port rule), never an open redirect, consent
per client before the upstream hop.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import aiohttp
import pytest

from gateway.core.pkce import s256
from gateway.crypto import token_hash
from gateway.ports import Store
from tests.flows.conftest import REDIRECT, Harness, HarnessFactory, new_verifier, query_of

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
TX = re.compile(r'name="tx" value="([^"]+)"')


async def assert_html_refusal(resp: aiohttp.ClientResponse, status: int = 400) -> str:
    """An HTML error page, never a redirect, with the interactive-page headers (R8, R13)."""
    assert resp.status == status
    assert "Location" not in resp.headers
    assert resp.content_type == "text/html"
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["Cache-Control"] == "no-store"
    return await resp.text()


def assert_error_redirect(
    resp: aiohttp.ClientResponse,
    gw: Harness,
    error: str,
    state: str | None = "client-state-1",
    *,
    base: str = REDIRECT,
) -> dict[str, str]:
    """303 to the registered redirect URI with `error`, `state`, `iss` (R8, R11, R14)."""
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location.startswith(base + "?")
    params = query_of(location)
    assert params["error"] == error
    assert params["iss"] == gw.issuer
    assert params.get("state") == state
    assert "code" not in params
    return params


async def consent_form(resp: aiohttp.ClientResponse) -> tuple[str, str]:
    """(csrf, tx) from a consent page."""
    html = await resp.text()
    csrf, tx = CSRF.search(html), TX.search(html)
    assert csrf is not None
    assert tx is not None
    return csrf.group(1), tx.group(1)


# --------------------------------------------------------------------------- client, redirect


async def test_unknown_client_gets_a_page_not_a_redirect(
    make_harness: HarnessFactory, store: Store
) -> None:
    """An unknown client_id is shown to the user; nothing is redirected (R8)."""
    gw = await make_harness(store)
    html = await assert_html_refusal(await gw.authorize("no-such-client"))
    assert "not known" in html


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://evil.example/callback",  # unregistered
        "http://127.0.0.1:5555/callback/extra",
        "http://127.0.0.1:5555/callback?x=1",
        "http://127.0.0.1:5555@evil.example/callback",  # userinfo trick
        "http://127.0.0.1:5555.evil.example/callback",
        "http://127.0.0.%31:5555/callback",  # encoded host
        "http://localhost:5555/callback",  # another loopback name
        "https://127.0.0.1:5555/callback",  # another scheme
        "javascript://127.0.0.1:5555/callback",
        "",
    ],
)
async def test_unregistered_redirect_uri_is_never_redirected_to(
    make_harness: HarnessFactory, store: Store, redirect_uri: str
) -> None:
    """No open redirect: a redirect URI that is not registered gets the HTML page (R7, R8)."""
    gw = await make_harness(store)
    client = await gw.register()
    resp = await gw.authorize(client["client_id"], redirect_uri=redirect_uri, response_type="token")
    await assert_html_refusal(resp)


async def test_repeated_client_id_or_redirect_uri_is_a_page(
    make_harness: HarnessFactory, store: Store
) -> None:
    """Repeated client_id/redirect_uri cannot be trusted: HTML page, no redirect (R8, R14)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    for name, value in [("client_id", client_id), ("redirect_uri", REDIRECT)]:
        query = (
            f"response_type=code&client_id={client_id}&redirect_uri={REDIRECT}"
            f"&state=s&{name}={value}"
        )
        resp = await gw.client.get(f"/oauth/authorize?{query}", allow_redirects=False)
        await assert_html_refusal(resp)


async def test_loopback_redirect_with_another_port_is_accepted(
    make_harness: HarnessFactory, store: Store
) -> None:
    """RFC 8252 §7.3: the port of a loopback redirect URI may differ (R7)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    resp = await gw.authorize(
        client_id, redirect_uri="http://127.0.0.1:61234/callback", response_type="token"
    )
    assert_error_redirect(
        resp, gw, "unsupported_response_type", base="http://127.0.0.1:61234/callback"
    )


async def test_single_registered_uri_may_be_omitted(
    make_harness: HarnessFactory, store: Store
) -> None:
    """With exactly one registered redirect URI, `redirect_uri` may be left out."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    resp = await gw.authorize(client_id, redirect_uri=None, response_type="token")
    assert_error_redirect(resp, gw, "unsupported_response_type")


async def test_omitted_uri_with_several_registered_is_a_page(
    make_harness: HarnessFactory, store: Store
) -> None:
    """With several registered URIs an omitted `redirect_uri` cannot be guessed (R8)."""
    gw = await make_harness(store)
    client_id = (await gw.register(redirect_uris=[REDIRECT, "https://app.example.com/cb"]))[
        "client_id"
    ]
    await assert_html_refusal(await gw.authorize(client_id, redirect_uri=None))


# --------------------------------------------------------------------------- redirected errors


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"response_type": "code id_token"}, "unsupported_response_type"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"resource": "https://evil.example/mcp"}, "invalid_target"),
        ({"response_mode": "fragment"}, "invalid_request"),
    ],
)
async def test_errors_after_verification_are_redirected(
    make_harness: HarnessFactory, store: Store, overrides: dict[str, str], error: str
) -> None:
    """Implicit/hybrid, PKCE plain and unknown resources: 303 with error, state, iss (R6-R12)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    resp = await gw.authorize(client_id, **overrides)
    assert_error_redirect(resp, gw, error)
    assert gw.tx_cookie() is None


async def test_missing_pkce_is_invalid_request(make_harness: HarnessFactory, store: Store) -> None:
    """A request without code_challenge is refused (R6)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    resp = await gw.client.get(
        "/oauth/authorize",
        allow_redirects=False,
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "state": "client-state-1",
        },
    )
    params = assert_error_redirect(resp, gw, "invalid_request")
    assert params["error_description"] == "code_challenge is required (PKCE)"


async def test_missing_state_is_invalid_request(make_harness: HarnessFactory, store: Store) -> None:
    """`state` is required; the redirect then carries no state (DESIGN §7.2)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    resp = await gw.client.get(
        "/oauth/authorize",
        allow_redirects=False,
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "code_challenge": s256(new_verifier()),
            "code_challenge_method": "S256",
        },
    )
    assert_error_redirect(resp, gw, "invalid_request", state=None)


async def test_repeated_parameter_is_invalid_request(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A repeated parameter (here `scope`) is refused (R14)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    query = (
        f"response_type=code&client_id={client_id}&redirect_uri={REDIRECT}&state=s1"
        f"&code_challenge={s256(new_verifier())}&code_challenge_method=S256"
        "&scope=mcp&scope=offline_access"
    )
    resp = await gw.client.get(f"/oauth/authorize?{query}", allow_redirects=False)
    params = assert_error_redirect(resp, gw, "invalid_request", state="s1")
    assert params["error_description"] == "parameter scope is repeated"


# --------------------------------------------------------------------------- CORS


async def test_no_cors_on_the_authorization_endpoint(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A cross-origin GET gets no CORS headers and a preflight is refused (R14)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    get = await gw.client.get(
        "/oauth/authorize",
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "state": "s",
            "code_challenge": s256(new_verifier()),
            "code_challenge_method": "S256",
        },
    )
    assert get.status == 200
    assert not any(h.lower().startswith("access-control-") for h in get.headers)
    pre = await gw.client.options(
        "/oauth/authorize",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert pre.status == 405
    assert pre.headers["Allow"] == "GET, POST"
    head = await gw.client.head("/oauth/authorize")
    assert head.status == 405
    assert not any(h.lower().startswith("access-control-") for h in pre.headers)


# --------------------------------------------------------------------------- consent


async def test_valid_request_shows_consent_before_any_upstream_hop(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A valid request stores a transaction in stage `consent`, binds it to the browser and
    shows the consent page; no upstream state exists yet (R15, DESIGN §2.5)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    resp = await gw.authorize(client_id, scope="mcp offline_access")
    assert resp.status == 200
    assert resp.headers["X-Frame-Options"] == "DENY"
    html = await resp.text()
    assert "Test MCP client" in html
    assert client_id in html
    assert '<strong class="mono">127.0.0.1</strong>' in html  # the redirect host (R24)
    assert "localhost" in html  # the localhost-only warning (R24)
    assert gw.resource in html
    assert "<code>mcp</code>" in html
    assert "<code>offline_access</code>" in html
    _csrf, txid = await consent_form(resp)
    assert gw.tx_cookie() is not None
    tx = await store.get_transaction(txid)
    assert tx is not None
    assert tx["stage"] == "consent"
    assert "upstream_state" not in tx
    assert tx["client_id"] == client_id
    assert tx["scope"] == "mcp offline_access"
    assert gw.upstream.authorize_hits == 0
    form_action = resp.headers["Content-Security-Policy"]
    assert f"form-action 'self' {gw.upstream.url} http://127.0.0.1:5555;" in form_action


async def test_post_form_authorization_request(make_harness: HarnessFactory, store: Store) -> None:
    """The authorization endpoint also takes a POSTed form (OAuth 2.1 §4.1.1)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    resp = await gw.client.post(
        "/oauth/authorize",
        allow_redirects=False,
        data={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "state": "s",
            "code_challenge": s256(new_verifier()),
            "code_challenge_method": "S256",
        },
    )
    assert resp.status == 200
    await consent_form(resp)


async def approve(gw: Harness, client_id: str) -> aiohttp.ClientResponse:
    resp = await gw.authorize(client_id)
    csrf, txid = await consent_form(resp)
    return await gw.client.post(
        "/oauth/consent",
        allow_redirects=False,
        data={"csrf": csrf, "tx": txid, "decision": "approve"},
    )


async def test_approve_goes_upstream_and_remembers(
    make_harness: HarnessFactory, store: Store
) -> None:
    """Approval: 303 to the upstream with the gateway's own client, PKCE and state; the
    consent cookie then skips the page for this client next time (R15, R16)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    resp = await approve(gw, client_id)
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location.startswith(gw.upstream.url + "/authorize?")
    up = query_of(location)
    assert up["client_id"] == "mfa-gateway"
    assert up["redirect_uri"] == gw.issuer + "/oauth/callback"
    assert up["code_challenge_method"] == "S256"
    assert len(up["state"]) >= 43
    assert "client-state-1" not in location
    txid = gw.tx_cookie()
    assert txid is not None
    cookie_names = {c.key for c in gw.client.session.cookie_jar}
    assert "mfagw_c_" + token_hash(client_id)[:16] in cookie_names

    again = await gw.authorize(client_id)
    assert again.status == 303
    assert again.headers["Location"].startswith(gw.upstream.url + "/authorize?")


async def test_consent_cookie_is_bound_to_its_client(
    make_harness: HarnessFactory, store: Store
) -> None:
    """Approving client A does not approve client B (R15)."""
    gw = await make_harness(store)
    a = (await gw.register())["client_id"]
    b = (await gw.register(client_name="Other"))["client_id"]
    assert (await approve(gw, a)).status == 303
    # Copy A's consent cookie value under B's name: the signature binds it to A.
    jar = gw.client.session.cookie_jar
    value = next(c.value for c in jar if c.key == "mfagw_c_" + token_hash(a)[:16])
    jar.update_cookies({"mfagw_c_" + token_hash(b)[:16]: value})
    resp = await gw.authorize(b)
    assert resp.status == 200
    assert "Other" in await resp.text()


async def test_consent_remember_zero_always_asks(
    make_harness: HarnessFactory, store: Store
) -> None:
    """With `consent.remember = 0` every authorization shows the page."""
    gw = await make_harness(store, policy={"consent": {"remember": 0}})
    client_id = (await gw.register())["client_id"]
    assert (await approve(gw, client_id)).status == 303
    assert (await gw.authorize(client_id)).status == 200


async def test_deny_sends_access_denied(make_harness: HarnessFactory, store: Store) -> None:
    """Deny → `access_denied` with state and iss to the client; the transaction is gone."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    csrf, txid = await consent_form(await gw.authorize(client_id))
    resp = await gw.client.post(
        "/oauth/consent", allow_redirects=False, data={"csrf": csrf, "tx": txid, "decision": "deny"}
    )
    assert_error_redirect(resp, gw, "access_denied")
    assert await store.get_transaction(txid) is None
    assert gw.upstream.authorize_hits == 0


@pytest.mark.parametrize("field", ["csrf", "tx_cookie", "decision"])
async def test_consent_post_needs_csrf_cookie_and_decision(
    make_harness: HarnessFactory, store: Store, field: str
) -> None:
    """Without the CSRF token, from another browser, or with no valid decision, consent is
    refused and the transaction stays waiting (R13, R15)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    csrf, txid = await consent_form(await gw.authorize(client_id))
    data = {"csrf": csrf, "tx": txid, "decision": "approve"}
    if field == "csrf":
        data["csrf"] = "forged"
    elif field == "decision":
        data["decision"] = "maybe"
    else:
        gw.client.session.cookie_jar.clear()
    resp = await gw.client.post("/oauth/consent", allow_redirects=False, data=data)
    await assert_html_refusal(resp, 400 if field == "decision" else 403)
    tx = await store.get_transaction(txid)
    assert tx is not None
    assert tx["stage"] == "consent"


async def test_csrf_token_of_another_transaction_is_refused(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A CSRF token is bound to its own transaction."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    csrf_a, _ = await consent_form(await gw.authorize(client_id))
    _, txid_b = await consent_form(await gw.authorize(client_id))
    resp = await gw.client.post(
        "/oauth/consent",
        allow_redirects=False,
        data={"csrf": csrf_a, "tx": txid_b, "decision": "approve"},
    )
    await assert_html_refusal(resp, 403)


async def test_consent_decision_is_single_use(make_harness: HarnessFactory, store: Store) -> None:
    """The same consent POST a second time is refused (one decision per transaction)."""
    gw = await make_harness(store, policy={"consent": {"remember": 0}})
    client_id = (await gw.register())["client_id"]
    csrf, txid = await consent_form(await gw.authorize(client_id))
    data = {"csrf": csrf, "tx": txid, "decision": "approve"}
    first = await gw.client.post("/oauth/consent", allow_redirects=False, data=data)
    assert first.status == 303
    second = await gw.client.post("/oauth/consent", allow_redirects=False, data=data)
    await assert_html_refusal(second)
    deny = await gw.client.post(
        "/oauth/consent", allow_redirects=False, data={**data, "decision": "deny"}
    )
    await assert_html_refusal(deny)


# --------------------------------------------------------------------------- pre-registered


async def test_pre_registered_client_from_policy(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A client listed in `registration.clients` is known without registration."""
    gw = await make_harness(
        store,
        policy={
            "registration": {
                "clients": [
                    {
                        "client_id": "ide",
                        "client_name": "The IDE",
                        "redirect_uris": ["https://ide.example.com/cb"],
                    }
                ]
            }
        },
    )
    resp = await gw.authorize("ide", redirect_uri="https://ide.example.com/cb")
    assert resp.status == 200
    html = await resp.text()
    assert "The IDE" in html
    assert "ide.example.com" in html
    assert "only to this computer" not in html  # no localhost warning for an https client
    assert urlsplit(gw.issuer).hostname == "127.0.0.1"
