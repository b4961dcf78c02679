"""Bearer checks on MCP paths: challenges, forged tokens, MFA, revocation, caching (R3, R25-R31)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.adapters.memory_store import MemoryStore
from gateway.clock import FixedClock, SystemClock
from gateway.core.errors import InvalidToken, StoreUnavailable
from gateway.core.tokens import ALLOWED_ALGS
from gateway.web.bearer import BearerAuth, extract_bearer
from tests.proxy.conftest import (
    PRM,
    MakeGateway,
    Peer,
    challenge,
    eventually,
    rpc,
    tool_call,
)

INVALID = ("invalid_token", "The access token is invalid")
MFA = ("insufficient_user_authentication", "Multi-factor authentication is required")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _resign(
    token: str,
    key: Any,
    *,
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
) -> str:
    """Re-sign `token` with changed header/claims (a forger holding `key`)."""
    h, p, _ = token.split(".")
    head = json.loads(base64.urlsafe_b64decode(h + "=="))
    body = json.loads(base64.urlsafe_b64decode(p + "=="))
    head.update(header or {})
    body.update(claims or {})
    signing_input = _b64(json.dumps(head).encode()) + "." + _b64(json.dumps(body).encode())
    alg = head.get("alg")
    sig = ALLOWED_ALGS[alg].sign(signing_input.encode(), key) if alg in ALLOWED_ALGS else b""
    return signing_input + "." + _b64(sig)


async def _post(gw: Any, headers: dict[str, str], body: Any = None) -> Any:
    return await gw.client.post("/mcp", json=body or rpc("tools/list"), headers=headers)


class TestChallenges:
    async def test_no_token(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """No credentials: 401 with resource_metadata and scope, no `error` (R3, R29)."""
        gw = await make_gateway()
        resp = await gw.client.post("/mcp", json=rpc("tools/list"))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge()
        body = await resp.json()
        assert body["jsonrpc"] == "2.0"
        assert body["error"]["code"] == -32001
        assert upstream_peer.seen == []

    async def test_get_and_delete_challenged_too(self, make_gateway: MakeGateway) -> None:
        """GET streams and DELETE need a token as well."""
        gw = await make_gateway()
        for method in ("GET", "DELETE"):
            resp = await gw.client.request(method, "/mcp")
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == challenge()

    async def test_other_scheme_is_no_token(self, make_gateway: MakeGateway) -> None:
        """A Basic credential is no bearer token: the same error-less challenge."""
        gw = await make_gateway()
        resp = await _post(gw, {"Authorization": "Basic YTpi"})
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge()

    async def test_token_in_query_refused(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A token in the query string is refused, never forwarded (R25)."""
        gw = await make_gateway()
        token = gw.token()
        resp = await gw.client.post(
            f"/mcp?access_token={token}", json=rpc("tools/list"), headers=gw.auth(token)
        )
        assert resp.status == 400
        assert resp.headers["WWW-Authenticate"] == challenge(
            "invalid_request",
            "Access tokens are accepted in the Authorization header only",
            scope=None,
        )
        assert upstream_peer.seen == []

    async def test_two_authorization_headers_refused(self, make_gateway: MakeGateway) -> None:
        """Repeated credentials are an invalid request (RFC 6750 §3.1)."""
        gw = await make_gateway()
        headers = [
            ("Authorization", "Bearer " + gw.token()),
            ("Authorization", "Bearer " + gw.token(sub="bob")),
            ("Content-Type", "application/json"),
        ]
        resp = await gw.client.post("/mcp", data=json.dumps(rpc("ping")), headers=headers)
        assert resp.status == 400
        assert resp.headers["WWW-Authenticate"] == challenge(
            "invalid_request", "Only one Authorization header is allowed", scope=None
        )

    async def test_valid_token_passes(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """A verified token with mfa reaches the MCP server."""
        gw = await make_gateway()
        resp = await _post(gw, gw.auth())
        assert resp.status == 200
        assert await resp.json() == {"jsonrpc": "2.0", "id": 1, "result": {"method": "tools/list"}}
        assert len(upstream_peer.seen) == 1


class TestForgedTokens:
    async def _refused(self, gw: Any, peer: Peer, token: str) -> None:
        resp = await _post(gw, gw.auth(token))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge(*INVALID)
        assert peer.seen == []

    async def test_alg_none(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """An unsigned token is refused (R27)."""
        gw = await make_gateway()
        forged = _resign(gw.token(), None, header={"alg": "none"})
        await self._refused(gw, upstream_peer, forged)

    async def test_wrong_audience(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """A token for another resource is refused (R25)."""
        gw = await make_gateway()
        await self._refused(gw, upstream_peer, gw.token(audience="http://127.0.0.1:8080/other"))

    async def test_expired(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """An expired token is refused."""
        gw = await make_gateway()
        token = gw.token(ttl=60)
        gw.clock.advance(60 + 31)
        await self._refused(gw, upstream_peer, token)

    async def test_typ_jwt(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """A `typ: JWT` token signed with the real key is refused (R27)."""
        gw = await make_gateway()
        forged = _resign(gw.token(), gw.keys.active.private_key, header={"typ": "JWT"})
        await self._refused(gw, upstream_peer, forged)

    async def test_jku_not_fetched(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """A `jku` pointing at an attacker's JWKS is refused and never fetched (R28)."""
        gw = await make_gateway()
        forged = _resign(
            gw.token(),
            gw.keys.active.private_key,
            header={"jku": upstream_peer.url + "/jwks.json", "kid": "attacker"},
        )
        await self._refused(gw, upstream_peer, forged)

    async def test_tampered(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """A claim changed after signing is refused."""
        gw = await make_gateway()
        h, _, s = gw.token(sub="bob").split(".")
        _, p, _ = gw.token(sub="alice").split(".")
        await self._refused(gw, upstream_peer, f"{h}.{p}.{s}")


class TestMfa:
    async def _mfa_refused(self, gw: Any, peer: Peer, token: str) -> None:
        resp = await _post(gw, gw.auth(token))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge(*MFA, scope=None)
        assert peer.seen == []

    async def test_amr_missing(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """No amr: step-up challenge (RFC 9470, R31)."""
        gw = await make_gateway()
        token = _resign(gw.token(), gw.keys.active.private_key)
        h, p, _ = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(p + "=="))
        del claims["amr"]
        forged = _resign(f"{h}.{_b64(json.dumps(claims).encode())}.x", gw.keys.active.private_key)
        await self._mfa_refused(gw, upstream_peer, forged)

    async def test_amr_string(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """`amr: "mfa"` (a string, not an array) is no proof of MFA (R31)."""
        gw = await make_gateway()
        await self._mfa_refused(gw, upstream_peer, gw.token(amr="mfa"))

    async def test_amr_without_mfa(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """A password-only token is challenged for a step-up."""
        gw = await make_gateway()
        await self._mfa_refused(gw, upstream_peer, gw.token(amr=("pwd",)))

    async def test_policy_required_amr(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Every value of the policy's required_amr must be present."""
        gw = await make_gateway(policy={"mcp": {"required_amr": ["mfa", "hwk"]}})
        await self._mfa_refused(gw, upstream_peer, gw.token())
        resp = await _post(gw, gw.auth(gw.token(amr=("pwd", "hwk", "mfa"))))
        assert resp.status == 200

    async def test_challenge_only_after_full_validation(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A password-only token that is also invalid gets invalid_token, not a step-up hint."""
        gw = await make_gateway()
        token = gw.token(amr=("pwd",), audience="http://127.0.0.1:8080/other")
        resp = await _post(gw, gw.auth(token))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge(*INVALID)


class TestRevocation:
    async def test_revoked_jti_refused(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A token revoked anywhere is refused here without a store round trip (DESIGN §4.2)."""
        gw = await make_gateway()
        token = gw.token()
        assert (await _post(gw, gw.auth(token))).status == 200
        payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        await gw.store.revoke_jti(payload["jti"], payload["exp"])
        await eventually(lambda: gw.state.revocations.is_revoked(payload["jti"]))
        resp = await _post(gw, gw.auth(token))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge(*INVALID)
        assert len(upstream_peer.seen) == 1

    async def test_feed_down_fails_closed(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """While revocations cannot be kept current, valid tokens get 503 (fail closed)."""
        gw = await make_gateway()
        token = gw.token()
        assert (await _post(gw, gw.auth(token))).status == 200
        await gw.store.close()  # breaks the feed; every store call fails from now on
        await eventually(lambda: not gw.state.revocations.current)
        resp = await _post(gw, gw.auth(token))
        assert resp.status == 503
        assert (await resp.json())["error"] == {
            "code": -32603,
            "message": "The service is temporarily unavailable",
        }
        assert len(upstream_peer.seen) == 1

    async def test_not_ready_before_first_snapshot(self, make_gateway: MakeGateway) -> None:
        """Until the revocation feed delivered once, nothing is let through (503)."""

        class NoFeed(MemoryStore):
            async def revoked_snapshot(self) -> dict[str, float]:
                raise StoreUnavailable("redis: ConnectionError")

        clock = FixedClock(SystemClock().now())
        gw = await make_gateway(store=NoFeed(clock), clock=clock, wait_ready=False)
        await asyncio.sleep(0.1)
        assert not gw.state.revocations.current
        resp = await _post(gw, gw.auth())
        assert resp.status == 503


class TestTokenCache:
    async def test_cache_never_past_exp(self, make_gateway: MakeGateway) -> None:
        """A cached token stops working at exp (+ leeway), like an uncached one."""
        gw = await make_gateway()
        token = gw.token(ttl=60)
        assert (await _post(gw, gw.auth(token))).status == 200
        assert gw.state.bearer is not None
        assert gw.state.bearer.cached() == 1
        gw.clock.advance(59)
        assert (await _post(gw, gw.auth(token))).status == 200
        gw.clock.advance(32)
        resp = await _post(gw, gw.auth(token))
        assert resp.status == 401
        assert gw.state.bearer.cached() == 0

    async def test_cache_is_bounded(self, make_gateway: MakeGateway) -> None:
        """The verified-token cache holds at most its size."""
        gw = await make_gateway()
        auth = BearerAuth(gw.keys, gw.state.revocations, gw.clock, cache_size=2)
        for sub in ("a", "b", "c"):
            await auth.authenticate(
                gw.token(sub=sub), audience="http://127.0.0.1:8080/mcp", required_amr=("mfa",)
            )
        assert auth.cached() == 2

    async def test_cache_keyed_by_audience(self, make_gateway: MakeGateway) -> None:
        """A token cached for one resource is not thereby valid for another."""
        gw = await make_gateway(
            resources=[
                {"path": "/mcp", "upstream": "http://127.0.0.1:9/mcp"},
                {"path": "/other", "upstream": "http://127.0.0.1:9/mcp"},
            ]
        )
        token = gw.token()
        await gw.client.post("/mcp", json=tool_call("x"), headers=gw.auth(token))
        resp = await gw.client.post("/other", json=tool_call("x"), headers=gw.auth(token))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge(
            *INVALID, prm=PRM.removesuffix("/mcp") + "/other"
        )


class TestExtractBearer:
    @pytest.mark.parametrize(
        "value", ["Bearer a b", "Bearer ", "Bearer \u00e9t\u00e9", "Bearer a\tb", "Bearer =abc"]
    )
    def test_malformed_values(self, value: str) -> None:
        """A Bearer credential that is not a b64token is invalid_token (RFC 6750 §2.1)."""
        headers = CIMultiDictProxy(CIMultiDict({"Authorization": value}))
        with pytest.raises(InvalidToken) as info:
            extract_bearer(headers, {})
        assert info.value.log_reason == "malformed bearer value"

    def test_scheme_case_insensitive(self) -> None:
        """`bearer` and `BEARER` name the same scheme."""
        for scheme in ("bearer", "BEARER"):
            headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"{scheme} abc.def-_~+/"}))
            assert extract_bearer(headers, {}) == "abc.def-_~+/"
