"""Tokens of configured trusted issuers, verified with their JWKS (DESIGN §4.2, R28)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.adapters.jwks import JwksCache
from gateway.core.errors import UpstreamUnavailable
from gateway.core.tokens import (
    ALLOWED_ALGS,
    SigningKey,
    build_access_claims,
    mint_access_token,
)
from gateway.keys import generate_private_key_pem, load_private_key_pem
from gateway.settings import TrustedIssuerSettings
from tests.proxy.conftest import Gateway, MakeGateway, Peer, challenge, rpc


def _key(kid: str) -> SigningKey:
    return SigningKey(
        kid, "ES256", load_private_key_pem(generate_private_key_pem("ES256"), "ES256")
    )


@dataclass
class Idp:
    """A trusted issuer's JWKS endpoint."""

    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    fetches: int = 0
    status: int = 200
    stall: bool = False

    def jwks(self) -> dict[str, Any]:
        keys = []
        for k in self.keys:
            jwk = json.loads(ALLOWED_ALGS[k.alg].to_jwk(k.private_key.public_key()))
            keys.append({**jwk, "kid": k.kid, "alg": k.alg, "use": "sig"})
        return {"keys": keys}


@pytest.fixture
async def idp(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Idp:
    """A JWKS server counting its fetches."""
    state = Idp(keys=[_key("t1")])

    async def jwks(request: web.Request) -> web.Response:
        state.fetches += 1
        if state.stall:
            await asyncio.sleep(30)
        if state.status != 200:
            return web.Response(status=state.status)
        return web.json_response(state.jwks())

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("")).rstrip("/")
    return state


def _token(gw: Gateway, idp: Idp, key: SigningKey, **changes: Any) -> str:
    now = gw.clock.now()
    claims = build_access_claims(
        issuer=idp.url,
        sub="carol",
        audience="http://127.0.0.1:8080/mcp",
        client_id="ext",
        scope="mcp",
        auth_time=now - 10,
        amr=["pwd", "otp", "mfa"],
        acr=None,
        gid="g",
        now=now,
        ttl=600,
    )
    claims.update(changes)
    return mint_access_token(claims, key)


async def _gateway(make_gateway: MakeGateway, idp: Idp) -> Gateway:
    return await make_gateway(
        keys={
            "trusted_issuers": [
                {
                    "issuer": idp.url,
                    "jwks_uri": idp.url + "/jwks",
                    "algs": ["ES256"],
                    "cache_ttl": "5m",
                    "min_refresh_interval": "30s",
                }
            ]
        }
    )


class TestTrustedIssuer:
    async def test_trusted_token_accepted(
        self, make_gateway: MakeGateway, upstream_peer: Peer, idp: Idp
    ) -> None:
        """A token signed with a key from the issuer's JWKS passes; the JWKS is cached."""
        gw = await _gateway(make_gateway, idp)
        token = _token(gw, idp, idp.keys[0])
        for _ in range(2):
            resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(token))
            assert resp.status == 200
        other = _token(gw, idp, idp.keys[0], sub="dave")
        assert (
            await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(other))
        ).status == 200
        assert idp.fetches == 1

    async def test_unknown_kid_refresh_is_throttled(
        self, make_gateway: MakeGateway, idp: Idp
    ) -> None:
        """Unknown kids trigger at most one JWKS refresh per min_refresh_interval."""
        gw = await _gateway(make_gateway, idp)
        assert (
            await gw.client.post(
                "/mcp", json=rpc("ping"), headers=gw.auth(_token(gw, idp, idp.keys[0]))
            )
        ).status == 200
        for kid in ("x1", "x2", "x3"):
            resp = await gw.client.post(
                "/mcp", json=rpc("ping"), headers=gw.auth(_token(gw, idp, _key(kid)))
            )
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == challenge(
                "invalid_token", "The access token is invalid"
            )
        assert idp.fetches == 1  # loaded just now: no refresh within the interval
        gw.clock.advance(31)
        for kid in ("x4", "x5"):
            await gw.client.post(
                "/mcp", json=rpc("ping"), headers=gw.auth(_token(gw, idp, _key(kid)))
            )
        assert idp.fetches == 2  # one refresh for x4, none for x5

    async def test_rotated_key_picked_up(self, make_gateway: MakeGateway, idp: Idp) -> None:
        """A new key in the JWKS is found by the refresh an unknown kid triggers."""
        gw = await _gateway(make_gateway, idp)
        await gw.client.post(
            "/mcp", json=rpc("ping"), headers=gw.auth(_token(gw, idp, idp.keys[0]))
        )
        new = _key("t2")
        idp.keys.append(new)
        gw.clock.advance(31)
        resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(_token(gw, idp, new)))
        assert resp.status == 200

    async def test_jwks_down_fails_closed(self, make_gateway: MakeGateway, idp: Idp) -> None:
        """No keys can be had: 503, never a pass."""
        idp.status = 500
        gw = await _gateway(make_gateway, idp)
        resp = await gw.client.post(
            "/mcp", json=rpc("ping", 2), headers=gw.auth(_token(gw, idp, idp.keys[0]))
        )
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == -32603

    async def test_trusted_key_cannot_speak_for_gateway(
        self, make_gateway: MakeGateway, idp: Idp
    ) -> None:
        """A trusted issuer's key never verifies a token claiming the gateway as issuer,
        and such a token does not even make the gateway fetch a JWKS."""
        gw = await _gateway(make_gateway, idp)
        forged = _token(gw, idp, idp.keys[0], iss="http://127.0.0.1:8080")
        resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(forged))
        assert resp.status == 401
        assert idp.fetches == 0

    async def test_trusted_token_needs_mfa(self, make_gateway: MakeGateway, idp: Idp) -> None:
        """Trusted issuers' tokens must prove MFA like the gateway's own."""
        gw = await _gateway(make_gateway, idp)
        token = _token(gw, idp, idp.keys[0], amr=["pwd"])
        resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth(token))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge(
            "insufficient_user_authentication",
            "Multi-factor authentication is required",
            scope=None,
        )


class TestJwksCache:
    def _config(self, idp: Idp, **kw: Any) -> TrustedIssuerSettings:
        return TrustedIssuerSettings(issuer=idp.url, jwks_uri=idp.url + "/jwks", **kw)

    async def test_fetch_time_out(self, idp: Idp) -> None:
        """A stalled JWKS endpoint is given up on after the time-out (fail closed)."""
        idp.stall = True
        async with aiohttp.ClientSession() as http:
            cache = JwksCache([self._config(idp)], http, timeout=0.2)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(UpstreamUnavailable):
                await cache.ensure(idp.url, "t1", 1000.0)
            assert loop.time() - start < 2

    async def test_stale_cache_fails_closed(self, idp: Idp) -> None:
        """Past cache_ttl, keys that cannot be re-confirmed are not used."""
        async with aiohttp.ClientSession() as http:
            cache = JwksCache([self._config(idp, cache_ttl=60, min_refresh_interval=1)], http)
            await cache.ensure(idp.url, "t1", 1000.0)
            assert cache.get(idp.url, "t1", 1000.0) is not None
            idp.status = 503
            with pytest.raises(UpstreamUnavailable):
                await cache.ensure(idp.url, "t1", 1061.0)
            assert cache.get(idp.url, "t1", 1061.0) is None

    async def test_oversized_jwks_refused(self, idp: Idp) -> None:
        """A JWKS beyond the size cap is not parsed."""
        async with aiohttp.ClientSession() as http:
            cache = JwksCache([self._config(idp)], http, max_bytes=64)
            with pytest.raises(UpstreamUnavailable):
                await cache.ensure(idp.url, "t1", 1000.0)

    async def test_duplicate_kid_unusable(self, idp: Idp) -> None:
        """Two keys under one kid in a JWKS: neither is used (no guessing)."""
        idp.keys = [_key("dup"), _key("dup"), _key("ok")]
        async with aiohttp.ClientSession() as http:
            cache = JwksCache([self._config(idp)], http)
            await cache.ensure(idp.url, "dup", 1000.0)
            assert cache.get(idp.url, "dup", 1000.0) is None
            assert cache.get(idp.url, "ok", 1000.0) is not None

    def test_plain_http_only_on_loopback(self) -> None:
        """A jwks_uri must be https (plain http only on loopback)."""
        cfg = TrustedIssuerSettings(issuer="https://idp", jwks_uri="http://idp.example/jwks")
        with pytest.raises(ValueError, match="must be https"):
            JwksCache([cfg], None)  # type: ignore[arg-type]
