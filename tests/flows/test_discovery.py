"""Discovery documents and the JWKS served by the running gateway (R4, R5, R11)."""

from __future__ import annotations

from gateway.ports import Store
from tests.flows.conftest import HarnessFactory


async def test_authorization_server_metadata(make_harness: HarnessFactory, store: Store) -> None:
    """RFC 8414 document at its well-known path; `issuer` is exactly public_url (R4)."""
    gw = await make_harness(store)
    resp = await gw.client.get("/.well-known/oauth-authorization-server")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    doc = await resp.json()
    assert doc["issuer"] == gw.issuer == "http://127.0.0.1:8080"
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["response_types_supported"] == ["code"]
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert doc["registration_endpoint"] == gw.issuer + "/oauth/register"


async def test_openid_configuration_is_the_same_document(
    make_harness: HarnessFactory, store: Store
) -> None:
    """Clients that only try OpenID discovery get the same metadata."""
    gw = await make_harness(store)
    a = await (await gw.client.get("/.well-known/oauth-authorization-server")).json()
    b = await (await gw.client.get("/.well-known/openid-configuration")).json()
    assert a == b


async def test_jwks_publishes_public_keys_only(make_harness: HarnessFactory, store: Store) -> None:
    """`/oauth/jwks.json` lists the signing key by kid, without private members (DESIGN §3)."""
    gw = await make_harness(store)
    resp = await gw.client.get("/oauth/jwks.json")
    assert resp.status == 200
    jwks = await resp.json()
    assert [k["kid"] for k in jwks["keys"]] == ["es256-1"]
    key = jwks["keys"][0]
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    assert "d" not in key
