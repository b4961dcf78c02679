"""`/oauth/token`: client authentication, code redemption, refresh rotation (R17-R21, R31).

Codes are seeded as the step-up leaves them (`issue_code` on a transaction in stage `done`).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.core.tokens import VerifiedToken
from gateway.flows.revoke import verify_own_access_token
from gateway.flows.upstream_tokens import blob_key, store_tokens
from gateway.ports import Store, UpstreamTokens
from tests.flows.conftest import REDIRECT, Harness, HarnessFactory, basic, new_verifier

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def assert_error(resp: aiohttp.ClientResponse, status: int, error: str) -> None:
    """A JSON error with the exact code and the no-store headers (R19)."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    assert (await resp.json())["error"] == error


def verify(gw: Harness, token: str) -> VerifiedToken:
    verified = verify_own_access_token(gw.settings, gw.keys, token, gw.clock.now())
    assert verified is not None
    return verified


async def refresh(
    gw: Harness, client_id: str, refresh_token: str, **extra: str
) -> aiohttp.ClientResponse:
    return await gw.token(
        {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": client_id,
            **extra,
        }
    )


# --------------------------------------------------------------------------- code redemption


async def test_code_for_tokens(make_harness: HarnessFactory, store: Store) -> None:
    """A valid redemption returns a Bearer JWT, an opaque refresh token and no-store (R10, R19)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier, amr_upstream=["pwd"])
    resp = await gw.redeem(client_id, code, verifier)
    assert resp.status == 200
    for name, value in NO_STORE.items():
        assert resp.headers[name] == value
    body = await resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600
    assert body["scope"] == "mcp offline_access"
    gid, _, secret = body["refresh_token"].partition(".")
    assert len(gid) >= 22
    assert len(secret) >= 43
    at = verify(gw, body["access_token"])
    assert at.subject == "alice"
    assert at.client_id == client_id
    assert at.audience == gw.resource
    assert at.amr == ("pwd", "otp", "mfa")
    assert at.auth_time == int(gw.clock.now())
    assert at.acr == "urn:mfa-gateway:totp"
    assert at.gid == gid
    assert at.expires_at == int(gw.clock.now()) + 600
    assert gw.metric("mfagw_tokens_total", event="issued") == 1
    assert gw.metric("mfagw_codes_issued_total") == 1


async def test_code_is_single_use_and_replay_revokes(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A second valid redemption fails and revokes what the first produced: refresh family
    and access token (R17, invariant 4)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    first = await (await gw.redeem(client_id, code, verifier)).json()
    await assert_error(await gw.redeem(client_id, code, verifier), 400, "invalid_grant")
    assert await store.is_revoked(verify(gw, first["access_token"]).jti) is True
    await assert_error(await refresh(gw, client_id, first["refresh_token"]), 400, "invalid_grant")
    assert gw.metric("mfagw_tokens_total", event="reuse_detected") == 1


@pytest.mark.parametrize("bad", ["verifier", "client", "redirect_uri"])
async def test_replay_with_invalid_parameters_revokes_nothing(
    make_harness: HarnessFactory, store: Store, bad: str
) -> None:
    """A replay with a wrong verifier, another client or another redirect URI fails but does
    not revoke the legitimate grant (R17)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    other = (await gw.register())["client_id"]
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    first = await (await gw.redeem(client_id, code, verifier)).json()
    if bad == "verifier":
        replay = await gw.redeem(client_id, code, new_verifier())
    elif bad == "client":
        replay = await gw.redeem(other, code, verifier)
    else:
        replay = await gw.redeem(
            client_id, code, verifier, redirect_uri="http://127.0.0.1:5555/other"
        )
    await assert_error(replay, 400, "invalid_grant")
    assert await store.is_revoked(verify(gw, first["access_token"]).jti) is False
    assert (await refresh(gw, client_id, first["refresh_token"])).status == 200


async def test_code_of_client_a_redeemed_by_b(make_harness: HarnessFactory, store: Store) -> None:
    """A code is bound to its client: another client gets `invalid_grant` (R18)."""
    gw = await make_harness(store)
    a = (await gw.register())["client_id"]
    b = (await gw.register())["client_id"]
    verifier = new_verifier()
    code, _ = await gw.seed_code(a, verifier)
    await assert_error(await gw.redeem(b, code, verifier), 400, "invalid_grant")


async def test_wrong_verifier(make_harness: HarnessFactory, store: Store) -> None:
    """PKCE: a verifier that does not match the challenge is `invalid_grant` (R18)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    code, _ = await gw.seed_code(client_id, new_verifier())
    await assert_error(await gw.redeem(client_id, code, new_verifier()), 400, "invalid_grant")


async def test_missing_verifier(make_harness: HarnessFactory, store: Store) -> None:
    """No code_verifier: `invalid_request`, and the code is not consumed."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    resp = await gw.token(
        {"grant_type": "authorization_code", "code": code, "client_id": client_id}
    )
    await assert_error(resp, 400, "invalid_request")
    assert (await gw.redeem(client_id, code, verifier)).status == 200


async def test_redirect_uri_enforced_when_sent(make_harness: HarnessFactory, store: Store) -> None:
    """A redirect_uri sent at the token endpoint must match; omitting it is fine (R21)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    await assert_error(
        await gw.redeem(client_id, code, verifier, redirect_uri="http://127.0.0.1:5556/callback"),
        400,
        "invalid_grant",
    )
    code2, _ = await gw.seed_code(client_id, verifier)
    resp = await gw.token(
        {
            "grant_type": "authorization_code",
            "code": code2,
            "code_verifier": verifier,
            "client_id": client_id,
        }
    )
    assert resp.status == 200


async def test_resource_must_match(make_harness: HarnessFactory, store: Store) -> None:
    """A `resource` at the token endpoint must equal the code's (R12)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    await assert_error(
        await gw.redeem(client_id, code, verifier, resource="http://127.0.0.1:8080/other"),
        400,
        "invalid_target",
    )
    code2, _ = await gw.seed_code(client_id, verifier)
    assert (await gw.redeem(client_id, code2, verifier, resource=gw.resource)).status == 200


async def test_expired_code(make_harness: HarnessFactory, memory_store: Store) -> None:
    """A code lives `tokens.code_ttl` (60 s) and no longer (R10)."""
    gw = await make_harness(memory_store)
    client_id = (await gw.register())["client_id"]
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    gw.clock.advance(61)
    await assert_error(await gw.redeem(client_id, code, verifier), 400, "invalid_grant")


async def test_no_refresh_token_without_the_grant(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A client registered without `refresh_token` gets only an access token."""
    gw = await make_harness(store)
    client_id = (await gw.register(grant_types=["authorization_code"]))["client_id"]
    body = await gw.tokens_for(client_id)
    assert "refresh_token" not in body


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        (
            {"grant_type": "password", "username": "a", "password": "b"},
            400,
            "unsupported_grant_type",
        ),
        ({"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
        ({}, 400, "invalid_request"),
    ],
)
async def test_unsupported_grants(
    make_harness: HarnessFactory, store: Store, form: dict[str, str], status: int, error: str
) -> None:
    """Only authorization_code and refresh_token exist (R19)."""
    gw = await make_harness(store)
    await assert_error(await gw.token(form), status, error)


async def test_parameters_in_query_refused(make_harness: HarnessFactory, store: Store) -> None:
    """Token requests carry their parameters in the body only."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    resp = await gw.client.post(
        f"/oauth/token?code={code}",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "client_id": client_id,
        },
    )
    await assert_error(resp, 400, "invalid_request")


# --------------------------------------------------------------------------- client auth


async def confidential(gw: Harness, method: str = "client_secret_basic") -> tuple[str, str]:
    body = await gw.register(token_endpoint_auth_method=method)
    return body["client_id"], body["client_secret"]


async def test_confidential_basic(make_harness: HarnessFactory, store: Store) -> None:
    """client_secret_basic with the right secret works (R6)."""
    gw = await make_harness(store)
    client_id, secret = await confidential(gw)
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    resp = await gw.token(
        {"grant_type": "authorization_code", "code": code, "code_verifier": verifier},
        auth=basic(client_id, secret),
    )
    assert resp.status == 200


async def test_wrong_secret_basic_gets_challenge(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A failed Basic authentication is 401 `invalid_client` with `WWW-Authenticate: Basic`
    (R19), and the code stays unused."""
    gw = await make_harness(store)
    client_id, secret = await confidential(gw)
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    resp = await gw.token(
        {"grant_type": "authorization_code", "code": code, "code_verifier": verifier},
        auth=basic(client_id, secret + "x"),
    )
    await assert_error(resp, 401, "invalid_client")
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="mfa-gateway"'
    ok = await gw.token(
        {"grant_type": "authorization_code", "code": code, "code_verifier": verifier},
        auth=basic(client_id, secret),
    )
    assert ok.status == 200


async def test_confidential_without_secret(make_harness: HarnessFactory, store: Store) -> None:
    """A confidential client that sends no secret is 401 without a Basic challenge."""
    gw = await make_harness(store)
    client_id, _ = await confidential(gw)
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    resp = await gw.redeem(client_id, code, verifier)
    await assert_error(resp, 401, "invalid_client")
    assert "WWW-Authenticate" not in resp.headers


async def test_registered_method_is_enforced(make_harness: HarnessFactory, store: Store) -> None:
    """A client registered for client_secret_basic cannot switch to client_secret_post."""
    gw = await make_harness(store)
    client_id, secret = await confidential(gw)
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    resp = await gw.redeem(client_id, code, verifier, client_secret=secret)
    await assert_error(resp, 401, "invalid_client")


async def test_client_secret_post(make_harness: HarnessFactory, store: Store) -> None:
    """client_secret_post works for a client registered with it."""
    gw = await make_harness(store)
    client_id, secret = await confidential(gw, "client_secret_post")
    verifier = new_verifier()
    code, _ = await gw.seed_code(client_id, verifier)
    assert (await gw.redeem(client_id, code, verifier, client_secret=secret)).status == 200


async def test_two_auth_methods_refused(make_harness: HarnessFactory, store: Store) -> None:
    """Basic and a form secret together: `invalid_request`."""
    gw = await make_harness(store)
    client_id, secret = await confidential(gw)
    resp = await gw.token(
        {"grant_type": "refresh_token", "refresh_token": "a.b", "client_secret": secret},
        auth=basic(client_id, secret),
    )
    await assert_error(resp, 400, "invalid_request")


@pytest.mark.parametrize("case", ["unknown", "public_with_secret", "none"])
async def test_client_authentication_failures(
    make_harness: HarnessFactory, store: Store, case: str
) -> None:
    """Unknown clients, public clients presenting a secret, and no client at all: 401."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    form = {"grant_type": "refresh_token", "refresh_token": "a.b"}
    if case == "unknown":
        form["client_id"] = "nobody"
    elif case == "public_with_secret":
        form.update(client_id=client_id, client_secret="guess")
    await assert_error(await gw.token(form), 401, "invalid_client")


async def test_static_confidential_client(make_harness: HarnessFactory, store: Store) -> None:
    """A pre-registered client with a secret from policy authenticates with it."""
    gw = await make_harness(
        store,
        policy={
            "registration": {
                "clients": [
                    {"client_id": "svc", "client_secret": "s" * 40, "redirect_uris": [REDIRECT]}
                ]
            }
        },
    )
    verifier = new_verifier()
    code, _ = await gw.seed_code("svc", verifier)
    bad = await gw.token(
        {"grant_type": "authorization_code", "code": code, "code_verifier": verifier},
        auth=basic("svc", "t" * 40),
    )
    await assert_error(bad, 401, "invalid_client")
    ok = await gw.token(
        {"grant_type": "authorization_code", "code": code, "code_verifier": verifier},
        auth=basic("svc", "s" * 40),
    )
    assert ok.status == 200


# --------------------------------------------------------------------------- refresh


async def test_refresh_rotates(make_harness: HarnessFactory, store: Store) -> None:
    """Each refresh returns a new refresh token of the same family; MFA facts are kept (R20,
    R31)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    first = await gw.tokens_for(client_id)
    gw.clock.advance(300)
    resp = await refresh(gw, client_id, first["refresh_token"])
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    second = await resp.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["refresh_token"].split(".")[0] == first["refresh_token"].split(".")[0]
    old, new = verify(gw, first["access_token"]), verify(gw, second["access_token"])
    assert (new.auth_time, new.amr, new.acr, new.gid) == (old.auth_time, old.amr, old.acr, old.gid)
    assert new.issued_at == old.issued_at + 300
    assert new.jti != old.jti
    assert gw.metric("mfagw_tokens_total", event="refreshed") == 1


async def test_reuse_of_rotated_token_revokes_family(
    make_harness: HarnessFactory, store: Store
) -> None:
    """Presenting a rotated-out refresh token revokes the whole family and its access tokens
    (R20, invariant 4)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    first = await gw.tokens_for(client_id)
    second = await (await refresh(gw, client_id, first["refresh_token"])).json()
    await assert_error(await refresh(gw, client_id, first["refresh_token"]), 400, "invalid_grant")
    await assert_error(await refresh(gw, client_id, second["refresh_token"]), 400, "invalid_grant")
    for body in (first, second):
        assert await store.is_revoked(verify(gw, body["access_token"]).jti) is True
    assert gw.metric("mfagw_tokens_total", event="reuse_detected") == 1


@pytest.mark.parametrize(
    "token_of",
    ["garbage", "no-dot", "unknown-family", "wrong-secret"],
)
async def test_invalid_refresh_tokens(
    make_harness: HarnessFactory, store: Store, token_of: str
) -> None:
    """Tokens that were never issued are `invalid_grant` and revoke nothing."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    body = await gw.tokens_for(client_id)
    gid = body["refresh_token"].split(".")[0]
    presented = {
        "garbage": "x",
        "no-dot": gid,
        "unknown-family": "nofamily.secret",
        "wrong-secret": gid + ".guess",
    }[token_of]
    await assert_error(await refresh(gw, client_id, presented), 400, "invalid_grant")
    assert (await refresh(gw, client_id, body["refresh_token"])).status == 200


async def test_refresh_by_another_client(make_harness: HarnessFactory, store: Store) -> None:
    """A refresh token is bound to its client (R20)."""
    gw = await make_harness(store)
    a = (await gw.register())["client_id"]
    b = (await gw.register())["client_id"]
    body = await gw.tokens_for(a)
    await assert_error(await refresh(gw, b, body["refresh_token"]), 400, "invalid_grant")
    assert (await refresh(gw, a, body["refresh_token"])).status == 200


async def test_refresh_scope_only_narrows(make_harness: HarnessFactory, store: Store) -> None:
    """Scope ⊆ original: widening is `invalid_scope`, narrowing works (R20)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    body = await gw.tokens_for(client_id, scope="mcp")
    await assert_error(
        await refresh(gw, client_id, body["refresh_token"], scope="mcp offline_access"),
        400,
        "invalid_scope",
    )
    body = await gw.tokens_for(client_id, scope="mcp offline_access")
    narrowed = await refresh(gw, client_id, body["refresh_token"], scope="mcp")
    assert narrowed.status == 200
    got = await narrowed.json()
    assert got["scope"] == "mcp"
    assert verify(gw, got["access_token"]).scope == "mcp"


async def test_refresh_resource_must_match(make_harness: HarnessFactory, store: Store) -> None:
    """The refresh's `resource` must be the grant's (R12, R20)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    body = await gw.tokens_for(client_id)
    await assert_error(
        await refresh(gw, client_id, body["refresh_token"], resource="http://127.0.0.1:8080/other"),
        400,
        "invalid_target",
    )
    ok = await refresh(gw, client_id, body["refresh_token"], resource=gw.resource)
    assert ok.status == 200


async def test_refresh_never_extends_mfa(make_harness: HarnessFactory, store: Store) -> None:
    """Past `tokens.mfa_max_age` after the step-up a refresh is `invalid_grant` (DESIGN §2.11)."""
    gw = await make_harness(store, policy={"tokens": {"mfa_max_age": "1h"}})
    client_id = (await gw.register())["client_id"]
    body = await gw.tokens_for(client_id)
    gw.clock.advance(3000)
    ok = await refresh(gw, client_id, body["refresh_token"])
    assert ok.status == 200
    rotated = await ok.json()
    gw.clock.advance(601)
    await assert_error(await refresh(gw, client_id, rotated["refresh_token"]), 400, "invalid_grant")


# --------------------------------------------------------------------------- upstream tokens


UPSTREAM_RESOURCE = [
    {"path": "/mcp", "upstream": "http://127.0.0.1:9/mcp", "forward_token": "upstream"}
]


async def seed_upstream_tokens(gw: Harness, txid: str) -> None:
    tokens = UpstreamTokens(
        access_token="up-at-0", refresh_token="up-rt-0", expires_at=gw.clock.now() + 3600
    )
    await store_tokens(gw.store, gw.sealer, txid, tokens, ttl=600, now=gw.clock.now())


async def upstream_grant(gw: Harness, client_id: str) -> tuple[dict[str, Any], str]:
    verifier = new_verifier()
    code, txid = await gw.seed_code(client_id, verifier)
    await seed_upstream_tokens(gw, txid)
    resp = await gw.redeem(client_id, code, verifier)
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body, txid


async def test_upstream_tokens_move_to_the_grant(
    make_harness: HarnessFactory, store: Store
) -> None:
    """At redemption the sealed upstream tokens move from `upstream:<txid>` to `upstream:<gid>`."""
    gw = await make_harness(store, resources=UPSTREAM_RESOURCE)
    client_id = (await gw.register())["client_id"]
    body, txid = await upstream_grant(gw, client_id)
    gid = body["refresh_token"].split(".")[0]
    assert await store.get_blob(blob_key(txid)) is None
    sealed = await store.get_blob(blob_key(gid))
    assert sealed is not None
    assert "up-at-0" not in sealed


async def test_upstream_tokens_dropped_when_not_forwarded(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A resource that does not forward upstream tokens keeps none of them."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    body, txid = await upstream_grant(gw, client_id)
    gid = body["refresh_token"].split(".")[0]
    assert await store.get_blob(blob_key(txid)) is None
    assert await store.get_blob(blob_key(gid)) is None


async def test_upstream_refresh_failure_fails_the_refresh(
    make_harness: HarnessFactory, store: Store
) -> None:
    """Where upstream tokens are forwarded, the upstream refresh happens first and its refusal
    fails the gateway refresh; the client's refresh token is not rotated (DESIGN §2.11)."""
    gw = await make_harness(store, resources=UPSTREAM_RESOURCE)
    client_id = (await gw.register())["client_id"]
    body, _ = await upstream_grant(gw, client_id)
    gw.upstream.refresh_answer = "down"
    down = await refresh(gw, client_id, body["refresh_token"])
    assert down.status == 503
    assert (await down.json())["error"] == "temporarily_unavailable"
    gw.upstream.refresh_answer = "ok"
    ok = await refresh(gw, client_id, body["refresh_token"])
    assert ok.status == 200
    assert gw.upstream.refreshes == 2
    gw.upstream.refresh_answer = "invalid_grant"
    await assert_error(
        await refresh(gw, client_id, (await ok.json())["refresh_token"]), 400, "invalid_grant"
    )
