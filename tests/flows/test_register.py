"""RFC 7591 dynamic client registration at `POST /oauth/register` (R23)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.crypto import token_hash
from gateway.ports import Store
from tests.flows.conftest import REDIRECT, SDK_METADATA, HarnessFactory


async def test_mcp_sdk_public_client(make_harness: HarnessFactory, store: Store) -> None:
    """The SDK's registration (native, public, loopback) gets 201 and no secret (R23)."""
    gw = await make_harness(store)
    resp = await gw.client.post("/oauth/register", json=SDK_METADATA)
    assert resp.status == 201
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Pragma"] == "no-cache"
    body = await resp.json()
    assert body["redirect_uris"] == [REDIRECT]
    assert body["token_endpoint_auth_method"] == "none"
    assert body["grant_types"] == ["authorization_code", "refresh_token"]
    assert body["response_types"] == ["code"]
    assert body["client_name"] == "Test MCP client"
    assert body["scope"] == "mcp offline_access"
    assert body["client_id_issued_at"] == int(gw.clock.now())
    assert "client_secret" not in body
    record = await store.get_client(body["client_id"])
    assert record is not None
    assert record["kind"] == "dynamic"
    assert record["secret_hash"] is None
    assert gw.metric("mfagw_client_registrations_total", kind="dynamic") == 1


async def test_confidential_client_secret_returned_once_stored_hashed(
    make_harness: HarnessFactory, store: Store
) -> None:
    """Without an auth method the RFC 7591 default (client_secret_basic) applies; the secret is
    returned once and the store keeps only its hash (R23, DESIGN §7.10)."""
    gw = await make_harness(store)
    meta = {"redirect_uris": ["https://app.example.com/cb"], "client_name": "Web app"}
    resp = await gw.client.post("/oauth/register", json=meta)
    assert resp.status == 201
    body = await resp.json()
    secret = body["client_secret"]
    assert len(secret) >= 43
    assert body["client_secret_expires_at"] == 0
    assert body["token_endpoint_auth_method"] == "client_secret_basic"
    record = await store.get_client(body["client_id"])
    assert record is not None
    assert record["secret_hash"] == token_hash(secret)
    assert secret not in json.dumps(record)


@pytest.mark.parametrize(
    ("meta", "error"),
    [
        ({"redirect_uris": ["http://app.example.com/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["https://app.example.com/cb#x"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["https://user@app.example.com/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["myapp:/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": []}, "invalid_redirect_uri"),
        ({"client_name": "no uris"}, "invalid_redirect_uri"),
        ({"redirect_uris": [REDIRECT], "grant_types": ["implicit"]}, "invalid_client_metadata"),
        (
            {"redirect_uris": [REDIRECT], "grant_types": ["client_credentials"]},
            "invalid_client_metadata",
        ),
        ({"redirect_uris": [REDIRECT], "response_types": ["token"]}, "invalid_client_metadata"),
        (
            {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "private_key_jwt"},
            "invalid_client_metadata",
        ),
        ({"redirect_uris": [REDIRECT], "client_name": "a\u202eb"}, "invalid_client_metadata"),
        (
            {"redirect_uris": [REDIRECT], "client_uri": "javascript:alert(1)"},
            "invalid_client_metadata",
        ),
    ],
)
async def test_invalid_metadata_refused(
    make_harness: HarnessFactory, store: Store, meta: dict[str, Any], error: str
) -> None:
    """Bad redirect URIs and unsupported metadata get the RFC 7591 §3.2.2 errors (R23)."""
    gw = await make_harness(store)
    resp = await gw.client.post("/oauth/register", json=meta)
    assert resp.status == 400
    assert resp.headers["Cache-Control"] == "no-store"
    assert (await resp.json())["error"] == error


async def test_not_json_is_invalid_client_metadata(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A body that is not a JSON object is `invalid_client_metadata`."""
    gw = await make_harness(store)
    for body, ctype in [
        (b"{not json", "application/json"),
        (b"[]", "application/json"),
        (b"redirect_uris=x", "application/x-www-form-urlencoded"),
    ]:
        resp = await gw.client.post("/oauth/register", data=body, headers={"Content-Type": ctype})
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_client_metadata"


async def test_custom_scheme_only_when_listed(make_harness: HarnessFactory, store: Store) -> None:
    """A private-use scheme is accepted when the policy lists it (DESIGN §2.3)."""
    gw = await make_harness(
        store, policy={"registration": {"allowed_custom_schemes": ["com.example.app"]}}
    )
    body = await gw.register(redirect_uris=["com.example.app:/oauth2redirect"])
    assert body["redirect_uris"] == ["com.example.app:/oauth2redirect"]


async def test_disabled_registration_is_404(make_harness: HarnessFactory, store: Store) -> None:
    """Policy switch off: the endpoint answers 404 `invalid_request` and stores nothing."""
    gw = await make_harness(store, policy={"registration": {"dynamic": False}})
    resp = await gw.client.post("/oauth/register", json=SDK_METADATA)
    assert resp.status == 404
    assert (await resp.json())["error"] == "invalid_request"
    assert await store.get_counter("register:127.0.0.1") == 0


async def test_rate_limited_per_ip(make_harness: HarnessFactory, store: Store) -> None:
    """Past `registrations_per_ip_per_hour` a client IP gets 429 `slow_down`, invalid requests
    counting too; X-Forwarded-For is ignored unless trusted."""
    gw = await make_harness(store, policy={"registration": {"registrations_per_ip_per_hour": 2}})
    await gw.register()
    bad = await gw.client.post("/oauth/register", json={"redirect_uris": ["http://x.example/"]})
    assert bad.status == 400
    resp = await gw.client.post(
        "/oauth/register", json=SDK_METADATA, headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "3600"
    assert (await resp.json())["error"] == "slow_down"


async def test_forwarded_ip_counts_when_trusted(make_harness: HarnessFactory, store: Store) -> None:
    """Behind a trusted proxy the limit is per forwarded client address."""
    gw = await make_harness(
        store,
        server={"trust_forwarded_headers": True},
        policy={"registration": {"registrations_per_ip_per_hour": 1}},
    )
    one = await gw.client.post(
        "/oauth/register", json=SDK_METADATA, headers={"X-Forwarded-For": "203.0.113.9"}
    )
    two = await gw.client.post(
        "/oauth/register", json=SDK_METADATA, headers={"X-Forwarded-For": "203.0.113.10"}
    )
    three = await gw.client.post(
        "/oauth/register", json=SDK_METADATA, headers={"X-Forwarded-For": "203.0.113.10"}
    )
    assert (one.status, two.status, three.status) == (201, 201, 429)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_body_in_many_chunks_is_read_whole(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A chunked JSON body arriving in small pieces is read completely."""
    gw = await make_harness(store)
    raw = json.dumps(SDK_METADATA).encode()
    resp = await gw.client.post(
        "/oauth/register", data=_chunks(raw, 7), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 201


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversize_registration_refused(
    make_harness: HarnessFactory, store: Store, chunked: bool
) -> None:
    """Bodies over 16 KiB are refused, with or without Content-Length."""
    gw = await make_harness(store)
    raw = json.dumps({**SDK_METADATA, "client_name": "x" * 20000}).encode()
    data: Any = _chunks(raw, 4096) if chunked else raw
    resp = await gw.client.post(
        "/oauth/register", data=data, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_client_metadata"
