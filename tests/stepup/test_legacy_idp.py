"""The upstream hop against the REAL legacy provider (node `oidc-provider`, password login):
discovery, PKCE, both client authentication methods, the ID token, refresh (DESIGN §2.6-7)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from gateway.clock import FixedClock, SystemClock
from gateway.flows.upstream_tokens import (
    blob_key,
    move_upstream_tokens,
    refresh_upstream,
    upstream_access_token,
)
from gateway.web.stepup_handlers import UPSTREAM
from tests.e2e.useragent import UserAgent
from tests.fixtures.peers import LegacyIdp
from tests.stepup.conftest import Gateway, StoreFactory, make_settings
from tests.stepup.fake_idp import FakeIdp

pytestmark = pytest.mark.e2e


@pytest.fixture
async def legacy_gateway(
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    store_factory: StoreFactory,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Gateway]:
    """A step-up gateway whose upstream is the legacy provider, with the real clock."""
    method = getattr(request, "param", "client_secret_basic")
    client = (
        legacy_idp.basic_client if method == "client_secret_basic" else (legacy_idp.post_client)
    )
    settings = make_settings(
        legacy_idp.issuer,
        upstream={
            "client_id": client.client_id,
            "client_secret": client.client_secret,
            "token_endpoint_auth_method": method,
            "scopes": ("openid", "profile", "offline_access"),
            "extra_authorize_params": {"prompt": "consent"},
            "id_token_algs": ("RS256", "ES256", "PS256", "EdDSA"),
            "timeout": 5.0,
        },
    )
    public = f"http://127.0.0.1:{gateway_ports[0]}"
    settings = dataclasses.replace(
        settings, server=settings.server.model_copy(update={"public_url": public})
    )
    clock = FixedClock(SystemClock().now())
    gw = Gateway(settings, await store_factory(), clock, FakeIdp(clock))
    await gw.start()
    yield gw
    await gw.close()


async def _log_in(gw: Gateway, idp: LegacyIdp, user: str = "alice") -> str:
    """Consent-stage transaction → upstream login form → callback; the txid (stage totp)."""
    await gw.enroll(user)
    txid, _, url = await gw.new_transaction()
    callback = gw.settings.server.public_url + "/oauth/callback"
    async with UserAgent(redirect_uri=callback) as ua:
        response = await ua.authorize(
            url, answers={"username": user, "password": idp.accounts[user]}
        )
    assert set(response.params) == {"code", "state", "iss"}
    assert response.iss == idp.issuer
    resp = await gw.callback(dict(response.params), txid)
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == f"/oauth/totp?tx={txid}"
    return txid


@pytest.mark.parametrize(
    "legacy_gateway", ["client_secret_basic", "client_secret_post"], indirect=True
)
async def test_login_through_the_legacy_provider(
    legacy_gateway: Gateway, legacy_idp: LegacyIdp
) -> None:
    """A real upstream login reaches stage totp with the subject, upstream amr ["pwd"] (never
    mfa) and sealed upstream tokens, with either client authentication method."""
    txid = await _log_in(legacy_gateway, legacy_idp)
    tx = await legacy_gateway.store.get_transaction(txid)
    assert tx is not None
    assert tx["stage"] == "totp"
    assert tx["sub"] == "alice"
    assert tx["amr_upstream"] == ["pwd"]
    assert await legacy_gateway.store.get_blob(blob_key(txid)) is not None


async def test_upstream_refresh_with_the_legacy_provider(
    legacy_gateway: Gateway, legacy_idp: LegacyIdp
) -> None:
    """The grant's upstream tokens refresh at the real provider (offline_access), and the
    refreshed access token is what the proxy would forward."""
    gw = legacy_gateway
    txid = await _log_in(gw, legacy_idp)
    now = gw.clock.now()
    assert await move_upstream_tokens(gw.store, gw.sealer, txid, "g1", ttl=3600, now=now)
    before = await upstream_access_token(gw.store, gw.sealer, gw.app[UPSTREAM], "g1", now)
    await refresh_upstream(gw.store, gw.sealer, gw.app[UPSTREAM], "g1", now)
    after = await upstream_access_token(gw.store, gw.sealer, gw.app[UPSTREAM], "g1", now)
    assert after != before


async def test_replayed_upstream_code_is_refused_by_the_provider(
    legacy_gateway: Gateway, legacy_idp: LegacyIdp
) -> None:
    """A second callback with the same upstream code cannot succeed (state single use first)."""
    gw = legacy_gateway
    await gw.enroll()
    txid, _, url = await gw.new_transaction()
    callback = gw.settings.server.public_url + "/oauth/callback"
    async with UserAgent(redirect_uri=callback) as ua:
        response = await ua.authorize(
            url, answers={"username": "alice", "password": legacy_idp.accounts["alice"]}
        )
    assert (await gw.callback(dict(response.params), txid)).status == 303
    assert (await gw.callback(dict(response.params), txid)).status == 400
