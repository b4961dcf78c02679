"""`/oauth/revoke` (RFC 7009): refresh families and access tokens of the requesting client (R22)."""

from __future__ import annotations

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.flows.revoke import verify_own_access_token
from gateway.ports import Store
from tests.flows.conftest import Harness, HarnessFactory


async def revoke(gw: Harness, client_id: str, token: str, **extra: str) -> int:
    resp = await gw.client.post(
        "/oauth/revoke", data={"token": token, "client_id": client_id, **extra}
    )
    assert resp.headers["Cache-Control"] == "no-store"
    return resp.status


async def test_revoking_a_refresh_token_revokes_the_grant(
    make_harness: HarnessFactory, store: Store
) -> None:
    """The family, its refresh token and its access tokens are revoked (R22)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    body = await gw.tokens_for(client_id)
    assert await revoke(gw, client_id, body["refresh_token"]) == 200
    verified = verify_own_access_token(gw.settings, gw.keys, body["access_token"], gw.clock.now())
    assert verified is not None
    assert await store.is_revoked(verified.jti) is True
    resp = await gw.token(
        {
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "client_id": client_id,
        }
    )
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_grant"
    assert gw.metric("mfagw_tokens_total", event="revoked") == 1


async def test_revoking_an_access_token(make_harness: HarnessFactory, store: Store) -> None:
    """An access token's `jti` is denied until it expires; the refresh token still works."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    body = await gw.tokens_for(client_id)
    assert await revoke(gw, client_id, body["access_token"], token_type_hint="access_token") == 200
    verified = verify_own_access_token(gw.settings, gw.keys, body["access_token"], gw.clock.now())
    assert verified is not None
    assert await store.is_revoked(verified.jti) is True


async def test_tokens_of_another_client_are_not_revoked(
    make_harness: HarnessFactory, store: Store
) -> None:
    """Client B's request answers 200 but revokes nothing of client A's (R22)."""
    gw = await make_harness(store)
    a = (await gw.register())["client_id"]
    b = (await gw.register())["client_id"]
    body = await gw.tokens_for(a)
    assert await revoke(gw, b, body["refresh_token"]) == 200
    assert await revoke(gw, b, body["access_token"]) == 200
    verified = verify_own_access_token(gw.settings, gw.keys, body["access_token"], gw.clock.now())
    assert verified is not None
    assert await store.is_revoked(verified.jti) is False
    resp = await gw.token(
        {"grant_type": "refresh_token", "refresh_token": body["refresh_token"], "client_id": a}
    )
    assert resp.status == 200


async def test_unknown_and_forged_tokens_get_200(
    make_harness: HarnessFactory, store: Store
) -> None:
    """Invalid tokens answer 200 (RFC 7009 §2.2); a JWT signed by another key is never parsed
    into a revocation (R22)."""
    gw = await make_harness(store)
    client_id = (await gw.register())["client_id"]
    forged = jwt.encode(
        {
            "iss": gw.issuer,
            "aud": gw.resource,
            "sub": "alice",
            "client_id": client_id,
            "jti": "victim-jti",
            "iat": int(gw.clock.now()),
            "exp": int(gw.clock.now()) + 600,
        },
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": "es256-1", "typ": "at+jwt"},
    )
    for token in ["garbage", "a.b", "a.b.c", forged, "x" * 3000]:
        assert await revoke(gw, client_id, token) == 200
    assert await store.is_revoked("victim-jti") is False


async def test_client_authentication_required(make_harness: HarnessFactory, store: Store) -> None:
    """Revocation needs an identified client: 401 `invalid_client` otherwise."""
    gw = await make_harness(store)
    resp = await gw.client.post("/oauth/revoke", data={"token": "a.b"})
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_client"
    missing = await gw.client.post("/oauth/revoke", data={"client_id": "x"})
    assert missing.status == 400
    assert (await missing.json())["error"] == "invalid_request"
