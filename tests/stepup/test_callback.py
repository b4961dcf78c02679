"""`/oauth/callback`: state, browser binding, upstream failures, first-login enrolment (R16)."""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qsl, urlsplit

import pytest
from structlog.testing import capture_logs

from gateway.core import totp
from gateway.crypto import SealError
from gateway.flows.upstream_login import begin_upstream_login
from gateway.flows.upstream_tokens import blob_key
from gateway.web.stepup_handlers import UPSTREAM
from tests.stepup.conftest import CLIENT_REDIRECT, PUBLIC_URL, Gateway, GatewayFactory
from tests.stepup.fake_idp import SigningKey


def _client_error(location: str) -> dict[str, str]:
    """The error redirect's query, after checking it goes to the verified client URI only."""
    parts = urlsplit(location)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == CLIENT_REDIRECT
    query = dict(parse_qsl(parts.query))
    assert "code" not in query
    assert query["state"] == "client-state-1"
    assert query["iss"] == PUBLIC_URL
    return query


async def test_callback_moves_the_transaction_to_totp(gateway: Gateway) -> None:
    """DESIGN §2.7: state + cookie verified, code exchanged with PKCE, ID token verified; the
    transaction holds the subject, upstream amr and auth_time, stage `totp`; the upstream
    tokens are stored sealed under `upstream:<txid>`; 303 to the step-up page, no code."""
    await gateway.enroll()
    txid, _, url = await gateway.new_transaction()
    params = await gateway.upstream_redirect(url)
    with capture_logs() as logs:
        resp = await gateway.callback(params, txid)
    assert resp.status == 303
    assert resp.headers["Location"] == f"/oauth/totp?tx={txid}"
    assert resp.headers["Cache-Control"] == "no-store"
    tx = await gateway.store.get_transaction(txid)
    assert tx is not None
    assert tx["stage"] == "totp"
    assert tx["sub"] == "alice"
    assert tx["amr_upstream"] == ["pwd"]
    assert tx["auth_time_upstream"] == gateway.clock.now() - 5
    assert "upstream_verifier" not in tx
    assert "upstream_state" not in tx
    sealed = await gateway.store.get_blob(blob_key(txid))
    assert sealed is not None
    access = next(iter(gateway.idp.access_tokens))
    assert access not in sealed  # encrypted at rest (invariant 10)
    assert access.encode() in gateway.sealer.open(sealed, f"upstream:{txid}")
    with pytest.raises(SealError):
        gateway.sealer.open(sealed, "upstream:another-grant")
    assert [e["sub"] for e in logs if e["event"] == "upstream_login_completed"] == ["alice"]
    assert (
        gateway.metrics.registry.get_sample_value("mfagw_stepups_total", {"outcome": "started"})
        == 1
    )


async def test_authorization_url_carries_pkce_state_and_nonce(gateway: Gateway) -> None:
    """DESIGN §2.6: our client_id, PKCE S256, CSPRNG state and nonce, configured scopes and
    the callback URI; state and nonce are stored in the transaction, state bound to it."""
    txid, tx, url = await gateway.new_transaction()
    query = dict(parse_qsl(urlsplit(url).query))
    assert url.startswith(gateway.idp.issuer + "/authorize?")
    assert query["client_id"] == "gw"
    assert query["response_type"] == "code"
    assert query["redirect_uri"] == PUBLIC_URL + "/oauth/callback"
    assert query["scope"] == "openid profile"
    assert query["code_challenge_method"] == "S256"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", query["code_challenge"])
    assert query["state"] == tx["upstream_state"]
    assert len(query["state"]) >= 43
    assert query["nonce"] == tx["upstream_nonce"]
    assert "upstream_verifier" not in query
    stored = await gateway.store.get_transaction(txid)
    assert stored is not None
    assert stored["stage"] == "upstream"


async def test_callback_without_state_is_refused(gateway: Gateway) -> None:
    """R16: a missing state ends on an HTML page (400), never a redirect."""
    txid, _, url = await gateway.new_transaction()
    params = await gateway.upstream_redirect(url)
    del params["state"]
    resp = await gateway.callback(params, txid)
    assert resp.status == 400
    assert "Location" not in resp.headers
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Content-Type"].startswith("text/html")


async def test_callback_with_unknown_state_is_refused(gateway: Gateway) -> None:
    """R16: a state the gateway did not issue is refused (400 page)."""
    txid, _, url = await gateway.new_transaction()
    params = await gateway.upstream_redirect(url)
    params["state"] = params["state"][:-2] + "xx"
    resp = await gateway.callback(params, txid)
    assert resp.status == 400
    assert "Location" not in resp.headers
    assert gateway.idp.hits.get("token") is None


async def test_callback_state_is_single_use(gateway: Gateway) -> None:
    """R16: a state is accepted once; the same callback again is refused."""
    await gateway.enroll()
    txid, _, url = await gateway.new_transaction()
    params = await gateway.upstream_redirect(url)
    assert (await gateway.callback(params, txid)).status == 303
    resp = await gateway.callback(params, txid)
    assert resp.status == 400
    assert gateway.idp.hits["token"] == 1


async def test_callback_in_another_browser_is_refused(gateway: Gateway) -> None:
    """DESIGN §2.6-7: no transaction cookie (or another transaction's) → 403 page; the
    transaction is ended, the code never exchanged."""
    await gateway.enroll()
    txid, _, url = await gateway.new_transaction()
    with capture_logs() as logs:
        resp = await gateway.callback(await gateway.upstream_redirect(url), None)
    assert resp.status == 403
    assert "Location" not in resp.headers
    assert [e["reason"] for e in logs if e["event"] == "upstream_login_failed"] == [
        "browser_mismatch"
    ]
    assert await gateway.store.get_transaction(txid) is None
    other_txid, _, _ = await gateway.new_transaction()
    txid, _, url = await gateway.new_transaction()
    resp = await gateway.callback(await gateway.upstream_redirect(url), other_txid)
    assert resp.status == 403
    assert gateway.idp.hits.get("token") is None


async def test_callback_with_repeated_state_is_refused(gateway: Gateway) -> None:
    """R14: parameters must not repeat."""
    txid, _, url = await gateway.new_transaction()
    params = await gateway.upstream_redirect(url)
    query = "&".join(
        [f"state={params['state']}", f"state={params['state']}", f"code={params['code']}"]
    )
    resp = await gateway.client.get(
        f"/oauth/callback?{query}", headers=gateway.cookie(txid), allow_redirects=False
    )
    assert resp.status == 400


async def test_upstream_access_denied_is_reported_to_the_client(gateway: Gateway) -> None:
    """DESIGN §2.7: an upstream `error` becomes `access_denied` at the verified redirect URI,
    with the client's state and our `iss`."""
    txid, _, url = await gateway.new_transaction()
    params = await gateway.upstream_redirect(url)
    params = {"error": "access_denied", "state": params["state"], "iss": params["iss"]}
    resp = await gateway.callback(params, txid)
    assert resp.status == 303
    query = _client_error(resp.headers["Location"])
    assert query["error"] == "access_denied"
    assert await gateway.store.get_transaction(txid) is None


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("error", "access_denied"),
        ("garbage", "temporarily_unavailable"),
        ("500", "temporarily_unavailable"),
        ("stall", "temporarily_unavailable"),
        ("no_id_token", "access_denied"),
    ],
)
async def test_code_exchange_failures_become_client_errors(
    gateway: Gateway, mode: str, error: str
) -> None:
    """Invariant 8: the token endpoint failing (error answer, garbage, 5xx, time-out, no ID
    token) ends in an error redirect to the client, never a 500 or a code."""
    await gateway.enroll()
    txid, _, url = await gateway.new_transaction()
    params = await gateway.upstream_redirect(url)
    gateway.idp.token = mode
    resp = await gateway.callback(params, txid)
    assert resp.status == 303
    assert _client_error(resp.headers["Location"])["error"] == error
    assert await gateway.store.get_blob(blob_key(txid)) is None


@pytest.mark.parametrize(
    "tamper",
    ["bad_signature", "wrong_nonce", "wrong_aud", "wrong_iss", "expired", "hs256", "none"],
)
async def test_bad_id_token_is_access_denied(gateway: Gateway, tamper: str) -> None:
    """DESIGN §2.7: an ID token failing any check gives `access_denied`, no step-up page."""
    await gateway.enroll()
    txid, _, url = await gateway.new_transaction()
    params = await gateway.upstream_redirect(url)
    idp = gateway.idp
    if tamper == "bad_signature":
        idp.sign_with = SigningKey(idp.key.kid)
    elif tamper == "wrong_nonce":
        idp.id_token_claims["nonce"] = "n" * 43
    elif tamper == "wrong_aud":
        idp.id_token_claims["aud"] = "someone-else"
    elif tamper == "wrong_iss":
        idp.id_token_claims["iss"] = idp.issuer + "/evil"
    elif tamper == "expired":
        idp.id_token_claims["exp"] = int(gateway.clock.now()) - 120
    elif tamper == "hs256":
        idp.hs256_secret = "s3cret" * 8  # the client secret as an HMAC key (key confusion)
    else:
        idp.unsigned = True
    with capture_logs() as logs:
        resp = await gateway.callback(params, txid)
    assert resp.status == 303
    assert _client_error(resp.headers["Location"])["error"] == "access_denied"
    reasons = [str(e["reason"]) for e in logs if e["event"] == "upstream_login_failed"]
    assert len(reasons) == 1
    assert reasons[0].startswith("upstream_rejected:invalid_id_token")


async def test_wrong_iss_in_the_authorization_response_is_refused(gateway: Gateway) -> None:
    """RFC 9207 mix-up defence: a response `iss` other than the upstream's is access_denied,
    and a provider that advertises `iss` must send it."""
    txid, _, url = await gateway.new_transaction()
    params = await gateway.upstream_redirect(url)
    params["iss"] = "https://evil.example"
    resp = await gateway.callback(params, txid)
    assert _client_error(resp.headers["Location"])["error"] == "access_denied"
    txid, _, url = await gateway.new_transaction()
    params = await gateway.upstream_redirect(url)
    del params["iss"]
    resp = await gateway.callback(params, txid)
    assert _client_error(resp.headers["Location"])["error"] == "access_denied"
    assert gateway.idp.hits.get("token") is None


async def test_upstream_mfa_claim_is_not_trusted(gateway: Gateway) -> None:
    """DESIGN §3: `otp`/`mfa` come only from the gateway's step-up, never from upstream amr."""
    await gateway.enroll()
    gateway.idp.amr = ["pwd", "mfa", "otp", "hwk"]
    txid = await gateway.login()
    tx = await gateway.store.get_transaction(txid)
    assert tx is not None
    assert tx["amr_upstream"] == ["pwd", "hwk"]


# --------------------------------------------------------------------------- first login


async def test_first_login_enrolment(make_gateway: GatewayFactory) -> None:
    """Enrolment mode `first_login`: the page shows a QR code (data: URI) and the secret; the
    same form confirms it with a valid code; the seed is then stored sealed and a code issued."""
    gateway = await make_gateway(stepup={"enrollment": "first_login", "recovery_codes": 2})
    txid = await gateway.login()
    tx = await gateway.store.get_transaction(txid)
    assert tx is not None
    assert tx["stage"] == "enroll"
    resp = await gateway.page(txid)
    assert resp.status == 200
    html = await resp.text()
    qr = re.search(r'<img class="qr" src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', html)
    assert qr is not None
    assert base64.b64decode(qr.group(1)).startswith(b"<svg")
    secret = re.search(r'<dd class="mono">([A-Z2-7]+)</dd>', html)
    assert secret is not None
    seed = secret.group(1)
    assert seed not in str(tx)  # sealed in the transaction, shown only on the page
    assert html.count('<form method="post"') == 1
    assert f'value="{gateway.csrf(txid, "enroll")}"' in html
    wrong = f"{(int(gateway.code(seed)) + 1) % 1_000_000:06d}"
    assert (await gateway.submit(txid, wrong, form="enroll")).status == 400
    assert await gateway.store.get_totp("alice") is None
    with capture_logs() as logs:
        resp = await gateway.submit(txid, gateway.code(seed), form="enroll")
    assert resp.status == 303
    assert "code=" in resp.headers["Location"]
    record = await gateway.store.get_totp("alice")
    assert record is not None
    assert seed not in record.sealed_seed
    assert await gateway.store.count_recovery_codes("alice") == 2
    assert [e["sub"] for e in logs if e["event"] == "totp_enrolled"] == ["alice"]
    # the next login is a normal step-up with the enrolled seed
    gateway.clock.advance(30)
    txid = await gateway.login()
    assert (await gateway.store.get_transaction(txid) or {})["stage"] == "totp"
    assert (await gateway.submit(txid, gateway.code(seed))).status == 303


async def test_enrolled_user_cannot_reenrol_from_the_browser(
    make_gateway: GatewayFactory,
) -> None:
    """R34 (ASVS 7.5.1): with `first_login`, an already enrolled user gets the normal step-up
    and never a new seed; a pending enrolment that lost the race is refused."""
    gateway = await make_gateway(stepup={"enrollment": "first_login"})
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    assert (await gateway.store.get_transaction(txid) or {})["stage"] == "totp"
    await gateway.store.delete_totp("alice")
    pending = await gateway.login()
    assert (await gateway.store.get_transaction(pending) or {})["stage"] == "enroll"
    html = await (await gateway.page(pending)).text()
    secret = re.search(r'<dd class="mono">([A-Z2-7]+)</dd>', html)
    assert secret is not None
    await gateway.enroll()  # an administrator enrols alice meanwhile
    resp = await gateway.submit(pending, gateway.code(secret.group(1)), form="enroll")
    assert resp.status == 400
    assert "Location" not in resp.headers
    record = await gateway.store.get_totp("alice")
    assert record is not None
    assert enrolled.secret != secret.group(1)
    assert totp.normalize_seed(secret.group(1)) == secret.group(1)


async def test_superseded_state_is_refused(gateway: Gateway) -> None:
    """R16: when the login is restarted for the same transaction, the earlier state no longer
    matches the transaction and is refused; the current one still works."""
    await gateway.enroll()
    txid, tx, old_url = await gateway.new_transaction()
    old = await gateway.upstream_redirect(old_url)
    new_url = await begin_upstream_login(
        gateway.store, gateway.app[UPSTREAM], gateway.settings, txid, tx, gateway.clock.now()
    )
    resp = await gateway.callback(old, txid)
    assert resp.status == 400
    assert gateway.idp.hits.get("token") is None
    resp = await gateway.callback(await gateway.upstream_redirect(new_url), txid)
    assert resp.status == 303
