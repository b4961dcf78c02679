"""Attacks on bearer authentication at the MCP proxy: every forged-token variant, key
confusion, audience confusion, tokens in the wrong place, and the exact challenges.

A forged token that is wrongly *signed* proves only the signature check; so most variants here
are signed with the gateway's real key (the administrator's key file) and wrong in exactly one
other respect, which proves that the one check exists. Variants an outsider can make without
the key (alg none, HMAC with the public JWKS key, the attacker's own key, a tampered payload,
embedded or referenced keys) are made exactly that way. A token minted the same way with
nothing wrong passes (the positive control), and the MCP server's record proves that no
refused call ever reached it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.fixtures.peers import LegacyIdp, McpServer, free_port
from tests.security.harness import (
    HANDSHAKE,
    Target,
    b64json,
    b64url,
    challenge_params,
    http_client,
    rpc,
    serve_target,
    tool_call,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

INVALID = "The access token is invalid"
MFA = "Multi-factor authentication is required"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(
    tmp_path_factory: pytest.TempPathFactory,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
) -> AsyncIterator[Target]:
    """The module's gateway, with policy rules to trigger each challenge."""
    async with serve_target(
        tmp_path_factory.mktemp("bearer"),
        idp=legacy_idp,
        port=gateway_ports[0],
        resources=[
            {"path": "/mcp", "upstream": mcp_server.url, "name": "Demo MCP"},
            {"path": "/mcp-b", "upstream": mcp_server.url},
        ],
        policy={
            "mcp": {
                "scopes_supported": ["mcp", "payments"],
                "default_scopes": ["mcp"],
                "rules": [
                    {"method": "tools/call", "tool": "delete_everything", "effect": "deny"},
                    {
                        "method": "tools/call",
                        "tool": "transfer_funds",
                        "require_scopes": ["payments"],
                    },
                    {"method": "tools/call", "tool": "count", "max_auth_age": "5m"},
                ],
            }
        },
    ) as t:
        yield t


# --------------------------------------------------------------------------- helpers


def attacker_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key the gateway has never seen."""
    return ec.generate_private_key(ec.SECP256R1())


def sign_es256(
    header: dict[str, Any], claims: dict[str, Any], key: ec.EllipticCurvePrivateKey
) -> str:
    """An ES256 JWS with exactly `header`'s extra members."""
    return jwt.encode(claims, key, algorithm="ES256", headers=header)


async def jwks_public_pem(target: Target) -> bytes:
    """The gateway's public key as anyone can read it from `/oauth/jwks.json`, as PEM."""
    async with http_client() as http:
        jwks = (await http.get(target.url + "/oauth/jwks.json")).json()
    key = ECAlgorithm.from_jwk(json.dumps(jwks["keys"][0]))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """A token HMAC-signed by hand (pyjwt refuses to use a public key as an HMAC secret)."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An `alg: none` style token: header and payload, empty signature."""
    return f"{b64json(header)}.{b64json(claims)}."


def assert_invalid_token(resp: httpx.Response, target: Target, path: str = "/mcp") -> None:
    """RFC 6750 §3.1 `invalid_token` (401) with the resource metadata and scope (R29, R3)."""
    assert resp.status_code == 401, (resp.status_code, resp.text[:300])
    assert resp.headers["www-authenticate"] == (
        f'Bearer error="invalid_token", error_description="{INVALID}", scope="mcp", '
        f'resource_metadata="{target.prm(path)}"'
    )
    body = resp.json()
    assert body["error"] == {"code": -32001, "message": INVALID}
    assert resp.headers["cache-control"] == "no-store"


def assert_mfa_challenge(resp: httpx.Response, target: Target) -> None:
    """RFC 9470 §3 `insufficient_user_authentication` (401) (R30)."""
    assert resp.status_code == 401, (resp.status_code, resp.text[:300])
    assert resp.headers["www-authenticate"] == (
        f'Bearer error="insufficient_user_authentication", error_description="{MFA}", '
        f'resource_metadata="{target.prm()}"'
    )


async def call(target: Target, token: str | None, **kw: Any) -> httpx.Response:
    """A `tools/call` of `echo` with this bearer token."""
    return await target.mcp(tool_call("echo", text="hi"), token=token, **kw)


# --------------------------------------------------------------------------- tests


class TestPositiveControl:
    async def test_a_correctly_minted_token_is_accepted(
        self, target: Target, mcp_server: McpServer
    ) -> None:
        """The forged variants below differ from this token in one respect only."""
        mark = mcp_server.mark()
        resp = await call(target, target.sign(target.mint()))
        assert resp.status_code == 200, resp.text
        assert mcp_server.tool_runs(since=mark) == ["echo"]


class TestMissingOrMisplacedToken:
    async def test_no_token_gets_a_challenge_without_error(self, target: Target) -> None:
        """R3, R29, DESIGN §2.1: no credentials → 401 with `resource_metadata` and `scope`,
        and no `error` parameter."""
        resp = await call(target, None)
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == (
            f'Bearer scope="mcp", resource_metadata="{target.prm()}"'
        )

    @pytest.mark.parametrize("value", ["Basic YWxpY2U6cHc=", "Token abc", "bearer", "Bearer"])
    async def test_other_schemes_or_an_empty_bearer_get_a_challenge(
        self, target: Target, value: str
    ) -> None:
        """R29: a non-Bearer credential counts as none; an empty Bearer is an invalid token."""
        resp = await target.mcp(
            tool_call("echo", text="x"), token=None, headers={"Authorization": value}
        )
        assert resp.status_code == 401
        params = challenge_params(resp.headers["www-authenticate"])
        assert params["resource_metadata"] == target.prm()
        assert params.get("error") in (None, "invalid_token")

    async def test_token_in_the_query_string_is_refused(self, target: Target) -> None:
        """R25: access tokens are taken from the Authorization header only; one in the query
        string (which ends up in logs) is `invalid_request` (400), with or without a header."""
        token = target.sign(target.mint())
        only_query = await call(target, None, url=f"{target.url}/mcp?access_token={token}")
        both = await call(target, token, url=f"{target.url}/mcp?access_token={token}")
        for resp in (only_query, both):
            assert resp.status_code == 400
            assert challenge_params(resp.headers["www-authenticate"])["error"] == (
                "invalid_request"
            )

    async def test_token_in_a_form_body_is_not_a_credential(self, target: Target) -> None:
        """R25: RFC 6750 form-body tokens are not accepted either."""
        token = target.sign(target.mint())
        async with http_client() as http:
            resp = await http.post(
                target.url + "/mcp",
                content=f"access_token={token}".encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        assert resp.status_code == 401
        assert "error=" not in resp.headers["www-authenticate"]

    async def test_two_authorization_headers_are_refused(self, target: Target) -> None:
        """R28-style ambiguity: two Authorization headers → `invalid_request` (400)."""
        token = target.sign(target.mint())
        async with http_client() as http:
            resp = await http.post(
                target.url + "/mcp",
                content=json.dumps(rpc("tools/list")).encode(),
                headers=[
                    ("Authorization", f"Bearer {token}"),
                    ("Authorization", f"Bearer {token}"),
                    ("Content-Type", "application/json"),
                    ("Accept", "application/json, text/event-stream"),
                    ("MCP-Protocol-Version", HANDSHAKE),
                ],
            )
        assert resp.status_code == 400
        assert challenge_params(resp.headers["www-authenticate"])["error"] == "invalid_request"

    @pytest.mark.parametrize("value", ["a b", "abc%def", "x" * 8100, "é"])
    async def test_malformed_bearer_values_are_invalid_tokens(
        self, target: Target, value: str
    ) -> None:
        """RFC 6750 §2.1: a value that is not a b64token is an invalid token."""
        headers = [
            (b"Authorization", ("Bearer " + value).encode("utf-8")),
            (b"Content-Type", b"application/json"),
        ]
        async with http_client() as http:
            resp = await http.post(
                target.url + "/mcp", content=json.dumps(rpc("tools/list")).encode(), headers=headers
            )
        assert_invalid_token(resp, target)


class TestForgedWithoutTheKey:
    @pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
    async def test_alg_none_is_refused(
        self, target: Target, mcp_server: McpServer, alg: str
    ) -> None:
        """R27, R28, invariant 6: an unsigned token (`alg: none`, any spelling) is refused."""
        mark = mcp_server.mark()
        header = {"alg": alg, "typ": "at+jwt", "kid": target.signing_key.kid}
        assert_invalid_token(await call(target, unsigned(header, target.mint())), target)
        assert mcp_server.records("http", since=mark) == []

    @pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
    async def test_hmac_signed_with_the_public_key_is_refused(
        self, target: Target, alg: str
    ) -> None:
        """R28, invariant 6 (key confusion): a token HMAC-signed with the gateway's public key
        (PEM or JWK text, both public) is refused; the key is bound to ES256."""
        pem = await jwks_public_pem(target)
        header = {"alg": alg, "typ": "at+jwt", "kid": target.signing_key.kid}
        claims = target.mint()
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        signing_input = f"{b64json(header)}.{b64json(claims)}"
        for secret in (pem, pem.strip(), pem.decode().replace("\n", "").encode()):
            mac = hmac.new(secret, signing_input.encode(), digest).digest()
            assert_invalid_token(await call(target, f"{signing_input}.{b64url(mac)}"), target)
        assert_invalid_token(await call(target, hs256(header, claims, pem)), target)

    async def test_attackers_own_key_is_refused_under_any_kid(self, target: Target) -> None:
        """R28: a token signed with a key the gateway was not configured with is refused,
        whether its `kid` is unknown or the gateway's own."""
        key = attacker_key()
        claims = target.mint()
        for kid in ("attacker-1", target.signing_key.kid, "../../keys/es256-1", ""):
            token = sign_es256({"kid": kid, "typ": "at+jwt"}, claims, key)
            assert_invalid_token(await call(target, token), target)
        no_kid = sign_es256({"typ": "at+jwt"}, claims, key)
        assert_invalid_token(await call(target, no_kid), target)

    @pytest.mark.parametrize("member", ["jwk", "jku", "x5u", "x5c"])
    async def test_embedded_or_referenced_keys_are_never_used_or_fetched(
        self, target: Target, member: str
    ) -> None:
        """R28, invariant 6: `jwk`/`x5c` (an embedded key) and `jku`/`x5u` (a key URL) are
        refused; the URL is never fetched, even when the token is otherwise genuine."""
        key = attacker_key()
        hits: list[str] = []

        async def record(request: web.Request) -> web.Response:
            hits.append(request.path)
            return web.json_response({"keys": [json.loads(ECAlgorithm.to_jwk(key.public_key()))]})

        app = web.Application()
        app.router.add_get("/{tail:.*}", record)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            public_jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
            value: Any = {
                "jwk": public_jwk,
                "jku": f"http://127.0.0.1:{port}/jwks.json",
                "x5u": f"http://127.0.0.1:{port}/cert.pem",
                "x5c": ["MIIBszCCAVmgAwIBAgIUB"],
            }[member]
            forged = sign_es256(
                {"kid": "attacker", "typ": "at+jwt", member: value}, target.mint(), key
            )
            genuine = target.sign(target.mint(), **{member: value})
            assert_invalid_token(await call(target, forged), target)
            assert_invalid_token(await call(target, genuine), target)
        finally:
            await runner.cleanup()
        assert hits == []

    async def test_tampered_payload_or_stripped_signature_is_refused(self, target: Target) -> None:
        """R27: changing any claim of a genuine token breaks it, and so does dropping or
        swapping its signature."""
        genuine = target.sign(target.mint(scope="mcp"))
        head, payload, sig = genuine.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        for change in (
            {"sub": "admin"},
            {"scope": "mcp payments"},
            {"exp": claims["exp"] + 9999},
            {"amr": ["pwd", "otp", "mfa", "hwk"]},
        ):
            tampered = f"{head}.{b64json({**claims, **change})}.{sig}"
            assert_invalid_token(await call(target, tampered), target)
        other_sig = target.sign(target.mint()).split(".")[2]
        for token in (
            f"{head}.{payload}.",
            f"{head}.{payload}",
            f"{head}.{payload}.{other_sig}",
            f"{head}.{payload}.{sig}.{sig}",
        ):
            assert_invalid_token(await call(target, token), target)


class TestGenuineKeyWrongClaims:
    @pytest.mark.parametrize(
        ("what", "claims"),
        [
            ("wrong audience", {"aud": "https://evil.example/mcp"}),
            ("audience of another resource", {"aud": "{url}/mcp-b"}),
            ("audience list without this resource", {"aud": ["{url}/mcp-b", "x"]}),
            ("audience with a trailing slash", {"aud": "{url}/mcp/"}),
            ("no audience", {"aud": None}),
            ("another issuer", {"iss": "https://evil.example"}),
            ("the upstream as issuer", {"iss": "{idp}"}),
            ("expired", {"exp": "{now-120}"}),
            ("not yet valid", {"nbf": "{now+300}", "exp": "{now+900}"}),
            ("issued in the future", {"iat": "{now+300}", "exp": "{now+900}"}),
            ("no exp", {"exp": None}),
            ("no iat", {"iat": None}),
            ("no jti", {"jti": None}),
            ("no sub", {"sub": None}),
            ("empty sub", {"sub": ""}),
            ("no client_id", {"client_id": None}),
            ("exp as a string", {"exp": "9999999999"}),
            ("scope as a list", {"scope": ["mcp"]}),
        ],
    )
    async def test_claim_checks(
        self, target: Target, legacy_idp: LegacyIdp, what: str, claims: dict[str, Any]
    ) -> None:
        """R25, R27, invariant 6: signed with the gateway's own key, yet refused because of
        one claim (audience, issuer, time, required claims and their types)."""
        now = int(target.clock.now())
        values: dict[str, Any] = {}
        for name, value in claims.items():
            if isinstance(value, str) and value.startswith("{now"):
                value = now + int(value[4:-1])
            elif isinstance(value, str):
                value = value.format(url=target.url, idp=legacy_idp.issuer)
            elif isinstance(value, list):
                value = [v.format(url=target.url) for v in value]
            values[name] = value
        token = target.sign(target.mint(**values))
        assert_invalid_token(await call(target, token), target)

    @pytest.mark.parametrize("typ", ["JWT", "jwt", "identity+jwt", "application/jwt", None, ""])
    async def test_wrong_or_missing_typ_is_refused(self, target: Target, typ: str | None) -> None:
        """R27, R28 (explicit typing): only `at+jwt` is an access token; a plain JWT or the
        gateway's own identity token type is not, even with a genuine signature."""
        token = target.sign(target.mint(), typ=typ)
        assert_invalid_token(await call(target, token), target)

    async def test_crit_header_is_refused(self, target: Target) -> None:
        """R28 (RFC 7515 §4.1.11): a `crit` extension the gateway does not understand makes
        the token invalid, even when genuinely signed."""
        for crit in (["exp"], ["urn:example:ext"], []):
            token = target.sign(target.mint(), crit=crit, **{"urn:example:ext": True})
            assert_invalid_token(await call(target, token), target)
        # An extension the JWT library itself understands (RFC 7797 `b64`, here `true`) is
        # still one the gateway does not, so the token is refused all the same.
        header = {
            "alg": "ES256",
            "kid": target.signing_key.kid,
            "typ": "at+jwt",
            "crit": ["b64"],
            "b64": True,
        }
        assert_invalid_token(await call(target, target.sign_raw(header, target.mint())), target)
        plain = {k: v for k, v in header.items() if k not in ("crit", "b64")}
        assert (await call(target, target.sign_raw(plain, target.mint()))).status_code == 200

    async def test_algorithm_must_be_the_keys_one(self, target: Target) -> None:
        """R28: the header's `alg` must be the key's one algorithm; an ES256 key claiming
        ES384 or EdDSA is refused."""
        key = target.signing_key
        claims = target.mint()
        for alg in ("ES384", "ES512", "EdDSA", "PS256", "RS256"):
            header = {"alg": alg, "typ": "at+jwt", "kid": key.kid}
            genuine_sig = target.sign(claims).split(".")[2]
            token = f"{b64json(header)}.{b64json(claims)}.{genuine_sig}"
            assert_invalid_token(await call(target, token), target)


class TestMfaClaims:
    @pytest.mark.parametrize(
        "amr",
        [
            None,
            "mfa",
            "pwd otp mfa",
            ["pwd"],
            ["pwd", "otp"],
            ["MFA"],
            ["mfa "],
            [["mfa"]],
            {"mfa": True},
            [],
            1,
        ],
    )
    async def test_amr_must_be_an_array_holding_mfa(
        self, target: Target, mcp_server: McpServer, amr: Any
    ) -> None:
        """R30, R31, DESIGN §4.3: a fully valid token whose `amr` is missing, a string, or an
        array without exactly `mfa` gets the RFC 9470 step-up challenge; nothing is
        forwarded."""
        mark = mcp_server.mark()
        claims = target.mint()
        if amr is None:
            del claims["amr"]
        else:
            claims["amr"] = amr
        assert_mfa_challenge(await call(target, target.sign(claims)), target)
        assert mcp_server.records("http", since=mark) == []

    async def test_mfa_challenge_only_after_full_validation(self, target: Target) -> None:
        """R30 (RFC 9470 §9): a token that fails validation gets `invalid_token`, never the
        step-up challenge, even when its `amr` also lacks `mfa`."""
        claims = target.mint(amr=["pwd"], aud="https://evil.example/mcp")
        assert_invalid_token(await call(target, target.sign(claims)), target)
        forged = sign_es256(
            {"kid": target.signing_key.kid, "typ": "at+jwt"},
            target.mint(amr=["pwd"]),
            attacker_key(),
        )
        assert_invalid_token(await call(target, forged), target)


class TestPolicyChallenges:
    async def test_missing_scope_is_403_insufficient_scope(
        self, target: Target, mcp_server: McpServer
    ) -> None:
        """R29: a tool that needs a scope the token lacks → 403 `insufficient_scope` naming the
        scope and the resource metadata; the tool does not run."""
        mark = mcp_server.mark()
        resp = await target.mcp(
            tool_call("transfer_funds", amount=1.0), token=target.sign(target.mint(scope="mcp"))
        )
        assert resp.status_code == 403
        assert resp.headers["www-authenticate"] == (
            'Bearer error="insufficient_scope", '
            'error_description="The access token lacks a required scope", '
            f'scope="payments", resource_metadata="{target.prm()}"'
        )
        assert mcp_server.tool_runs(since=mark) == []
        allowed = await target.mcp(
            tool_call("transfer_funds", amount=1.0),
            token=target.sign(target.mint(scope="mcp payments")),
        )
        assert allowed.status_code == 200
        assert mcp_server.tool_runs(since=mark) == ["transfer_funds"]

    async def test_old_step_up_gets_max_age_challenge(
        self, target: Target, mcp_server: McpServer
    ) -> None:
        """R30: a rule with `max_auth_age` challenges a token whose step-up is older, with
        `max_age` (RFC 9470); a fresh step-up passes."""
        mark = mcp_server.mark()
        now = target.clock.now()
        old = target.sign(target.mint(auth_time=int(now - 600)))
        resp = await target.mcp(tool_call("count", n=1, delay=0), token=old)
        assert resp.status_code == 401
        params = challenge_params(resp.headers["www-authenticate"])
        assert params["error"] == "insufficient_user_authentication"
        assert params["max_age"] == "300"
        assert params["resource_metadata"] == target.prm()
        no_auth_time = target.sign(target.mint(auth_time=None))
        assert (
            await target.mcp(tool_call("count", n=1, delay=0), token=no_auth_time)
        ).status_code == 401
        assert mcp_server.tool_runs(since=mark) == []
        fresh = target.sign(target.mint(auth_time=int(now - 10)))
        assert (await target.mcp(tool_call("count", n=1, delay=0), token=fresh)).status_code == 200

    async def test_denied_tool_never_runs(self, target: Target, mcp_server: McpServer) -> None:
        """DESIGN §4.4: a denied tool gets 403 with JSON-RPC error -32003, alone or hidden in
        a batch, and never reaches the MCP server."""
        mark = mcp_server.mark()
        token = target.sign(target.mint())
        alone = await target.mcp(tool_call("delete_everything", id=7), token=token)
        assert alone.status_code == 403
        assert alone.json() == {
            "jsonrpc": "2.0",
            "id": 7,
            "error": {"code": -32003, "message": "Forbidden by the gateway's policy"},
        }
        batch = [tool_call("echo", id=1, text="x"), tool_call("delete_everything", id=2)]
        hidden = await target.mcp(token=token, protocol=HANDSHAKE, body=json.dumps(batch).encode())
        assert hidden.status_code == 403
        assert mcp_server.records("http", since=mark) == []

    async def test_routing_headers_must_agree_with_the_body(
        self, target: Target, mcp_server: McpServer
    ) -> None:
        """DESIGN §4.4 (2026-07-28): an `Mcp-Name` naming an allowed tool while the body calls a
        denied one is 400, never forwarded (a header-routed policy cannot be fooled)."""
        mark = mcp_server.mark()
        resp = await target.mcp(
            tool_call("delete_everything"),
            token=target.sign(target.mint()),
            headers={"Mcp-Name": "echo"},
        )
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == -32020
        method = await target.mcp(
            tool_call("delete_everything"),
            token=target.sign(target.mint()),
            headers={"Mcp-Method": "tools/list"},
        )
        assert method.status_code == 400
        assert mcp_server.records("http", since=mark) == []


async def test_token_for_one_resource_is_refused_by_the_other(target: Target) -> None:
    """R12, R25, R27 (audience confusion): a genuine token for `/mcp-b` is refused on `/mcp`
    and vice versa; each works on its own resource."""
    for own, other in (("/mcp", "/mcp-b"), ("/mcp-b", "/mcp")):
        token = target.sign(target.mint(aud=target.resource(own)))
        assert (await call(target, token, path=own)).status_code == 200
        assert_invalid_token(await call(target, token, path=other), target, other)
