"""A tiny OIDC provider on loopback (aiohttp) for the faults the real legacy provider cannot
produce: garbage JSON, error answers, stalls, ID tokens with a bad signature or wrong claims.

It implements just enough of the real protocol to be a faithful peer: discovery, JWKS, an
authorization endpoint that "logs in" a configured user and redirects with `code`, `state` and
`iss`, a token endpoint that checks client authentication, the redirect URI and PKCE S256,
refresh, and userinfo. Behaviour switches are plain attributes set by each test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.clock import Clock


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def jwk(self) -> dict[str, Any]:
        numbers = self.private.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "kid": self.kid,
            "use": "sig",
            "alg": "ES256",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
        }


@dataclass
class Grant:
    user: str
    nonce: str
    code_challenge: str
    redirect_uri: str


class FakeIdp:
    """State and switches of the fake provider; `app` is its aiohttp application."""

    def __init__(
        self, clock: Clock, *, client_id: str = "gw", client_secret: str = "s3cret"
    ) -> None:
        self.clock = clock
        self.client_id = client_id
        self.client_secret = client_secret
        self.issuer = ""  # set once the server listens
        self.key = SigningKey("k1")
        self.published: list[SigningKey] = [self.key]
        self.user = "alice"
        self.amr: Any = ["pwd"]
        # switches
        self.discovery: str = "ok"  # ok | garbage | 500 | wrong_issuer | stall | oidc_404 | huge
        self.token: str = "ok"  # ok | error | garbage | 500 | stall | no_id_token
        self.refresh: str = "ok"  # ok | error | stall
        self.id_token_claims: dict[str, Any] = {}  # overrides of ID token claims
        self.id_token_header: dict[str, Any] = {}
        self.jwk_extra: dict[str, Any] = {}  # overrides of every published JWK
        self.sign_with: SigningKey | None = None  # sign with another key (bad signature)
        self.hs256_secret: str | None = None  # sign with HMAC (key confusion attempt)
        self.unsigned = False  # alg none
        self.iss_param: str | None = "__issuer__"  # None: omit `iss` in the redirect
        self.advertise_iss = True
        self.access_token_ttl = 3600
        self.issue_refresh_tokens = True
        self.use_userinfo_status = 200
        # observations
        self.hits: dict[str, int] = {}
        self.token_requests: list[tuple[dict[str, str], dict[str, str]]] = []
        self.grants: dict[str, Grant] = {}
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user
        self.access_tokens: dict[str, str] = {}  # access token -> user
        self.app = web.Application()
        r = self.app.router
        r.add_get("/.well-known/openid-configuration", self._oidc_config)
        r.add_get("/.well-known/oauth-authorization-server", self._oauth_config)
        r.add_get("/jwks", self._jwks)
        r.add_get("/authorize", self._authorize)
        r.add_post("/token", self._token)
        r.add_get("/userinfo", self._userinfo)

    def _hit(self, name: str) -> None:
        self.hits[name] = self.hits.get(name, 0) + 1

    # ------------------------------------------------------------------ documents

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/authorize",
            "token_endpoint": self.issuer + "/token",
            "jwks_uri": self.issuer + "/jwks",
            "userinfo_endpoint": self.issuer + "/userinfo",
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": self.advertise_iss,
        }

    async def _stall(self) -> None:
        await asyncio.sleep(30)

    async def _config(self, request: web.Request, which: str) -> web.StreamResponse:
        self._hit(which)
        mode = self.discovery
        if mode == "oidc_404" and which == "oidc":
            raise web.HTTPNotFound()
        if mode == "stall":
            await self._stall()
        if mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="application/json")
        if mode == "500":
            return web.json_response({"error": "boom"}, status=500)
        if mode == "huge":
            return web.json_response({**self.metadata(), "padding": "x" * (2 * 1024 * 1024)})
        doc = self.metadata()
        if mode == "wrong_issuer":
            doc["issuer"] = self.issuer + "/other"
        return web.json_response(doc)

    async def _oidc_config(self, request: web.Request) -> web.StreamResponse:
        return await self._config(request, "oidc")

    async def _oauth_config(self, request: web.Request) -> web.StreamResponse:
        return await self._config(request, "oauth")

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self._hit("jwks")
        return web.json_response({"keys": [{**k.jwk(), **self.jwk_extra} for k in self.published]})

    # ------------------------------------------------------------------ front channel

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        self._hit("authorize")
        q = request.query
        assert q["client_id"] == self.client_id
        assert q["response_type"] == "code"
        assert q["code_challenge_method"] == "S256"
        code = secrets.token_urlsafe(16)
        self.grants[code] = Grant(self.user, q["nonce"], q["code_challenge"], q["redirect_uri"])
        params = {"code": code, "state": q["state"]}
        if self.iss_param is not None:
            params["iss"] = self.issuer if self.iss_param == "__issuer__" else self.iss_param
        raise web.HTTPSeeOther(q["redirect_uri"] + "?" + urlencode(params))

    def login_redirect(self, authorize_url: str) -> dict[str, str]:
        """What the browser would bring back to the callback, without HTTP (same checks)."""
        q = dict(parse_qsl(urlsplit(authorize_url).query))
        code = secrets.token_urlsafe(16)
        self.grants[code] = Grant(self.user, q["nonce"], q["code_challenge"], q["redirect_uri"])
        params = {"code": code, "state": q["state"]}
        if self.iss_param is not None:
            params["iss"] = self.issuer if self.iss_param == "__issuer__" else self.iss_param
        return params

    # ------------------------------------------------------------------ back channel

    def _client_ok(self, request: web.Request, form: dict[str, str]) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            raw = base64.b64decode(auth[6:]).decode()
            cid, _, secret = raw.partition(":")
            return cid == quote(self.client_id, safe="") and secret == quote(
                self.client_secret, safe=""
            )
        return (
            form.get("client_id") == self.client_id
            and form.get("client_secret") == self.client_secret
        )

    def mint_id_token(self, user: str, nonce: str) -> str:
        now = int(self.clock.now())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.client_id,
            "exp": now + 300,
            "iat": now,
            "auth_time": now - 5,
            "nonce": nonce,
            "email": f"{user}@example.test",
        }
        if self.amr is not None:
            claims["amr"] = self.amr
        claims.update(self.id_token_claims)
        claims = {k: v for k, v in claims.items() if v is not None}
        if self.unsigned:
            header = _b64(json.dumps({"alg": "none", "kid": self.key.kid}).encode())
            payload = _b64(json.dumps(claims).encode())
            return f"{header}.{payload}."
        if self.hs256_secret is not None:
            return jwt.encode(
                claims, self.hs256_secret, algorithm="HS256", headers={"kid": self.key.kid}
            )
        key = self.sign_with or self.key
        headers = {"kid": key.kid, **self.id_token_header}
        return jwt.encode(claims, key.private, algorithm="ES256", headers=headers)

    def _tokens_for(self, user: str, nonce: str | None) -> dict[str, Any]:
        access = secrets.token_urlsafe(24)
        self.access_tokens[access] = user
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_token_ttl,
            "scope": "openid profile",
        }
        if self.issue_refresh_tokens:
            refresh = secrets.token_urlsafe(24)
            self.refresh_tokens[refresh] = user
            body["refresh_token"] = refresh
        if nonce is not None and self.token != "no_id_token":
            body["id_token"] = self.mint_id_token(user, nonce)
        return body

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self._hit("token")
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.token_requests.append((form, dict(request.headers)))
        if not self._client_ok(request, form):
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") == "refresh_token":
            if self.refresh == "stall":
                await self._stall()
            user = self.refresh_tokens.pop(form.get("refresh_token", ""), None)
            if self.refresh == "error" or user is None:
                return web.json_response({"error": "invalid_grant"}, status=400)
            return web.json_response(self._tokens_for(user, None))
        mode = self.token
        if mode == "stall":
            await self._stall()
        if mode == "garbage":
            return web.Response(text="{not json", content_type="application/json")
        if mode == "500":
            return web.Response(text="oops", status=500)
        if mode == "error":
            return web.json_response(
                {"error": "invalid_grant", "error_description": "nope"}, status=400
            )
        grant = self.grants.pop(form.get("code", ""), None)
        if grant is None or grant.redirect_uri != form.get("redirect_uri"):
            return web.json_response({"error": "invalid_grant"}, status=400)
        verifier = form.get("code_verifier", "")
        challenge = _b64(hashlib.sha256(verifier.encode()).digest())
        if challenge != grant.code_challenge:
            return web.json_response(
                {"error": "invalid_grant", "error_description": "pkce"}, status=400
            )
        return web.json_response(self._tokens_for(grant.user, grant.nonce))

    async def _userinfo(self, request: web.Request) -> web.StreamResponse:
        self._hit("userinfo")
        auth = request.headers.get("Authorization", "")
        user = self.access_tokens.get(auth.removeprefix("Bearer "))
        if self.use_userinfo_status != 200 or user is None:
            return web.json_response(
                {"error": "invalid_token"}, status=self.use_userinfo_status if user else 401
            )
        return web.json_response({"sub": f"id-{user}", "preferred_username": user})
