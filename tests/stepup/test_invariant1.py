"""Invariant 1 through the whole app (`gateway.app.build_app`): until the TOTP step-up succeeded
in a transaction, no authorization code exists and `/oauth/token` yields nothing."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from gateway.app import build_app
from gateway.clock import FixedClock
from gateway.core import totp
from gateway.core.pkce import s256
from gateway.crypto import Sealer
from gateway.flows.enrollment import enroll_user
from gateway.ports import Store
from gateway.settings import Policy, PreRegisteredClient, RegistrationPolicy
from gateway.web.appkeys import COOKIES, SETTINGS
from tests.stepup.conftest import CLIENT_REDIRECT, RESOURCE, make_settings
from tests.stepup.fake_idp import FakeIdp

VERIFIER = "v" * 50


@pytest.fixture
async def app_client(
    idp: FakeIdp, store: Store, clock: FixedClock
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    settings = make_settings(idp.issuer)
    client = PreRegisteredClient(client_id="client-1", redirect_uris=(CLIENT_REDIRECT,))
    policy = Policy(registration=RegistrationPolicy(clients=(client,)))
    settings = dataclasses.replace(settings, policies={"default": policy})
    test_client = TestClient(TestServer(build_app(settings, clock=clock, store=store)))
    await test_client.start_server()
    yield test_client
    await test_client.close()


async def test_token_endpoint_gives_nothing_before_totp(
    app_client: TestClient[web.Request, web.Application],
    idp: FakeIdp,
    store: Store,
    clock: FixedClock,
) -> None:
    """Invariant 1: authorize → consent → upstream login → callback puts the transaction in
    stage totp with no code anywhere: no redirect carried one, `code_issued` was never logged,
    and every value the browser saw (txid, states, the upstream code) is refused by
    `/oauth/token` with `invalid_grant`. The same transaction completes once the TOTP is typed."""
    app = app_client.app
    assert app is not None
    settings = app[SETTINGS]
    sealer = Sealer(settings.store.encryption_key_bytes)
    enrolled = await enroll_user(
        store, sealer, settings.global_policy.stepup, "alice", secret=None, now=clock.now()
    )
    seen: list[str] = []
    with capture_logs() as logs:
        resp = await app_client.get(
            "/oauth/authorize",
            params={
                "response_type": "code",
                "client_id": "client-1",
                "redirect_uri": CLIENT_REDIRECT,
                "code_challenge": s256(VERIFIER),
                "code_challenge_method": "S256",
                "state": "client-state-1",
                "scope": "mcp",
                "resource": RESOURCE,
            },
            allow_redirects=False,
        )
        assert resp.status == 200  # the consent page
        html = await resp.text()
        form = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', html))
        resp = await app_client.post(
            "/oauth/consent", data={**form, "decision": "approve"}, allow_redirects=False
        )
        assert resp.status == 303
        upstream_url = resp.headers["Location"]
        seen.append(upstream_url)
        async with (
            aiohttp.ClientSession() as session,
            session.get(upstream_url, allow_redirects=False) as up,
        ):
            callback = up.headers["Location"]
        seen.append(callback)
        params = dict(parse_qsl(urlsplit(callback).query))
        resp = await app_client.get("/oauth/callback", params=params, allow_redirects=False)
        assert resp.status == 303
        totp_page = resp.headers["Location"]
        seen.append(totp_page)
        txid = dict(parse_qsl(urlsplit(totp_page).query))["tx"]
    assert not [e for e in logs if e["event"] == "code_issued"]
    tx = await store.get_transaction(txid)
    assert tx is not None
    assert tx["stage"] == "totp"
    # the only `code` the browser saw is the upstream's own, at our callback
    assert [u for u in seen if "code" in dict(parse_qsl(urlsplit(u).query))] == [callback]
    for guess in (txid, params["code"], params["state"], tx.get("browser", ""), "client-state-1"):
        resp = await app_client.post(
            "/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": guess,
                "client_id": "client-1",
                "redirect_uri": CLIENT_REDIRECT,
                "code_verifier": VERIFIER,
            },
        )
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_grant"
        assert "access_token" not in await resp.text()
    # and the step-up is what makes the code
    cookies = app[COOKIES]
    step = totp.time_step(clock.now(), 30)
    resp = await app_client.post(
        "/oauth/totp",
        data={
            "tx": txid,
            "csrf": cookies.csrf_token(f"totp:{txid}"),
            "code": totp.code_at_step(enrolled.secret, step),
        },
        allow_redirects=False,
    )
    assert resp.status == 303
    code = dict(parse_qsl(urlsplit(resp.headers["Location"]).query))["code"]
    resp = await app_client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": "client-1",
            "redirect_uri": CLIENT_REDIRECT,
            "code_verifier": VERIFIER,
            "resource": RESOURCE,
        },
    )
    assert resp.status == 200
    assert (await resp.json())["token_type"] == "Bearer"
