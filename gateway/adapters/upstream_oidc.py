"""The gateway as a confidential client of the legacy OAuth 2.0 / OIDC provider (DESIGN §2.6-7).

Owns every call to the upstream: discovery (OIDC, falling back to RFC 8414; cached; the issuer
must match exactly), the authorization URL, the code exchange and refresh with
`client_secret_basic` or `client_secret_post`, ID-token verification against the upstream JWKS
(fetched here with aiohttp and cached, because pyjwt's `PyJWKClient` blocks), or userinfo for
plain OAuth 2.0 providers. Every call has a time-out, never follows redirects and caps the body.

Failure model: the caller sees `UpstreamUnavailable` (down, time-out, non-JSON, 5xx, a
document of the wrong shape) or its subclass `UpstreamRejected` (an OAuth error answer, or an
ID token / userinfo answer that failed a check). Exception messages are log reasons: they
never contain a token, code, secret or claim value.

`amr` decision: the upstream is trusted for the first factor only. Its `amr` is carried over
when it is a JSON array of short strings, but `mfa` and `otp` are removed, so that those two
values in a gateway token always mean that the gateway's own TOTP step-up happened; when
nothing usable is left, `["pwd"]` (R31: assume the weakest method).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import jwt
from jwt.exceptions import InvalidKeyError, PyJWKError, PyJWTError

from gateway.clock import Clock
from gateway.core.errors import UpstreamRejected, UpstreamUnavailable
from gateway.ports import UpstreamIdentity, UpstreamTokens
from gateway.settings import UpstreamSettings, is_loopback_host

#: amr values only the gateway's own step-up may claim.
GATEWAY_ONLY_AMR = frozenset({"mfa", "otp"})
DEFAULT_AMR: tuple[str, ...] = ("pwd",)

_KTY_FOR_ALG = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
    "ES256K": "EC",
    "EdDSA": "OKP",
}
_AMR_VALUE = re.compile(r"^[A-Za-z0-9_.:-]{1,32}$")
_ERROR_CODE = re.compile(r"^[a-z0-9_]{1,64}$")
_MAX_SUBJECT = 255
_BASIC = "client_secret_basic"  # the auth method name


def _safe_error_code(value: object) -> str:
    """An upstream `error` value fit for logs (anything odd becomes `invalid_response`)."""
    if isinstance(value, str) and _ERROR_CODE.match(value):
        return value
    return "invalid_response"


def _basic_auth(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: both parts form-urlencoded before base64."""
    user = quote(client_id, safe="")
    password = quote(client_secret, safe="")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def carried_amr(value: object) -> tuple[str, ...]:
    """The upstream `amr` the gateway keeps: a list of short strings without mfa/otp."""
    if not isinstance(value, list):
        return DEFAULT_AMR
    kept: list[str] = []
    for item in value[:16]:
        if (
            isinstance(item, str)
            and _AMR_VALUE.match(item)
            and item not in GATEWAY_ONLY_AMR
            and item not in kept
        ):
            kept.append(item)
    return tuple(kept) or DEFAULT_AMR


def subject_from(claims: Mapping[str, Any], claim: str) -> str:
    """The user name from the configured identity claim; raise `UpstreamRejected` if unusable."""
    value = claims.get(claim)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if (
        not isinstance(value, str)
        or not value
        or len(value) > _MAX_SUBJECT
        or not value.isprintable()
    ):
        raise UpstreamRejected("invalid_id_token", f"identity claim {claim!r} missing or unusable")
    return value


class UpstreamClient:
    """Talks to the legacy provider; one instance per app, sharing the app's `ClientSession`."""

    def __init__(
        self,
        settings: UpstreamSettings,
        http: aiohttp.ClientSession,
        clock: Clock,
        *,
        discovery_ttl: float = 3600.0,
        jwks_ttl: float = 3600.0,
        jwks_min_refresh: float = 60.0,
        leeway: float = 60.0,
        max_body: int = 1024 * 1024,
    ) -> None:
        self._settings = settings
        self._http = http
        self._clock = clock
        self._discovery_ttl = discovery_ttl
        self._jwks_ttl = jwks_ttl
        self._jwks_min_refresh = jwks_min_refresh
        self._leeway = leeway
        self._max_body = max_body
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._metadata_lock = asyncio.Lock()
        self._jwks: list[dict[str, Any]] = []
        self._jwks_at: float | None = None
        self._jwks_lock = asyncio.Lock()

    @property
    def issuer(self) -> str:
        return self._settings.issuer

    async def close(self) -> None:
        """Nothing to release: the HTTP session belongs to the app."""

    # ------------------------------------------------------------------ HTTP plumbing

    def _allowed_url(self, url: object) -> bool:
        if not isinstance(url, str):
            return False
        parts = urlsplit(url)
        if not parts.hostname or parts.fragment or parts.username or parts.password:
            return False
        if parts.scheme == "https":
            return True
        return (
            parts.scheme == "http"
            and self._settings.allow_insecure_http_loopback
            and is_loopback_host(parts.hostname)
        )

    async def _call(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        what: str,
    ) -> tuple[int, Any]:
        """One request: (status, parsed JSON or None when the body is not JSON)."""
        try:
            async with self._http.request(
                method,
                url,
                headers={"Accept": "application/json", **(headers or {})},
                data=data,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > self._max_body:
                        raise UpstreamUnavailable(f"{what}: response body too large")
                status = resp.status
        except UpstreamUnavailable:
            raise
        except TimeoutError:
            raise UpstreamUnavailable(f"{what}: time-out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"{what}: {type(exc).__name__}") from None
        try:
            parsed: Any = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError):
            parsed = None
        return status, parsed

    async def _get_json(self, url: str, *, what: str) -> dict[str, Any]:
        status, doc = await self._call("GET", url, what=what)
        if status != 200:
            raise UpstreamUnavailable(f"{what}: status {status}")
        if not isinstance(doc, dict):
            raise UpstreamUnavailable(f"{what}: not a JSON object")
        return doc

    # ------------------------------------------------------------------ discovery

    def _discovery_urls(self) -> list[str]:
        issuer = self._settings.issuer
        parts = urlsplit(issuer)
        path = parts.path.rstrip("/")
        origin = f"{parts.scheme}://{parts.netloc}"
        return [
            issuer.rstrip("/") + "/.well-known/openid-configuration",
            # RFC 8414 §3.1: the well-known string goes between host and path
            f"{origin}/.well-known/oauth-authorization-server{path}",
        ]

    def _check_metadata(self, doc: Mapping[str, Any]) -> None:
        if doc.get("issuer") != self._settings.issuer:
            raise UpstreamUnavailable("discovery: issuer does not match the configured issuer")
        needed = ["authorization_endpoint", "token_endpoint"]
        needed.append("userinfo_endpoint" if self._settings.use_userinfo else "jwks_uri")
        for key in needed:
            if not self._allowed_url(doc.get(key)):
                raise UpstreamUnavailable(f"discovery: {key} missing or not an allowed URL")
        for key in ("revocation_endpoint", "userinfo_endpoint", "jwks_uri"):
            if key in doc and not self._allowed_url(doc[key]):
                raise UpstreamUnavailable(f"discovery: {key} is not an allowed URL")

    async def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (cached for `discovery_ttl`)."""
        now = self._clock.now()
        if self._metadata is not None and now - self._metadata_at < self._discovery_ttl:
            return self._metadata
        async with self._metadata_lock:
            now = self._clock.now()
            if self._metadata is not None and now - self._metadata_at < self._discovery_ttl:
                return self._metadata
            last: UpstreamUnavailable | None = None
            for url in self._discovery_urls():
                try:
                    doc = await self._get_json(url, what="discovery")
                except UpstreamUnavailable as exc:
                    last = exc
                    continue
                self._check_metadata(doc)  # a wrong issuer is fatal, not a reason to fall back
                self._metadata, self._metadata_at = doc, now
                return doc
            assert last is not None
            raise last

    async def ping(self) -> None:
        """Raise `UpstreamUnavailable` unless discovery works (for `/readyz`)."""
        await self.metadata()

    # ------------------------------------------------------------------ front channel

    async def authorization_url(
        self, *, redirect_uri: str, state: str, nonce: str, code_challenge: str
    ) -> str:
        """The upstream authorize URL with our client_id, PKCE S256, state, nonce and scopes."""
        meta = await self.metadata()
        params: dict[str, str] = dict(self._settings.extra_authorize_params)
        params.update(
            {
                "response_type": "code",
                "client_id": self._settings.client_id,
                "redirect_uri": redirect_uri,
                "scope": " ".join(self._settings.scopes),
                "state": state,
                "nonce": nonce,
                "code_challenge": code_challenge,
                "code_challenge_method": "S256",
            }
        )
        endpoint: str = meta["authorization_endpoint"]
        sep = "&" if "?" in endpoint else "?"
        return endpoint + sep + urlencode(params, quote_via=quote)

    async def accepts_response_issuer(self, iss: str | None) -> bool:
        """RFC 9207: `iss` must equal the issuer when sent, and must be sent when advertised."""
        meta = await self.metadata()
        if iss is None:
            return meta.get("authorization_response_iss_parameter_supported") is not True
        return hmac.compare_digest(iss.encode(), self._settings.issuer.encode())

    # ------------------------------------------------------------------ token endpoint

    async def _token_request(self, form: dict[str, str], *, what: str) -> dict[str, Any]:
        meta = await self.metadata()
        secret = self._settings.client_secret.get_secret_value()
        headers: dict[str, str] = {}
        if self._settings.token_endpoint_auth_method == _BASIC:
            headers["Authorization"] = _basic_auth(self._settings.client_id, secret)
        else:
            form = {**form, "client_id": self._settings.client_id, "client_secret": secret}
        status, doc = await self._call(
            "POST", meta["token_endpoint"], headers=headers, data=form, what=what
        )
        if status in (400, 401) and isinstance(doc, dict) and "error" in doc:
            raise UpstreamRejected(_safe_error_code(doc["error"]), f"{what}: error response")
        if status != 200:
            raise UpstreamUnavailable(f"{what}: status {status}")
        if not isinstance(doc, dict):
            raise UpstreamUnavailable(f"{what}: not a JSON object")
        return doc

    def _tokens_from(
        self, doc: Mapping[str, Any], *, previous_refresh: str | None, what: str
    ) -> UpstreamTokens:
        access = doc.get("access_token")
        ttype = doc.get("token_type", "Bearer")
        if not isinstance(access, str) or not access:
            raise UpstreamUnavailable(f"{what}: no access_token")
        if not isinstance(ttype, str) or ttype.lower() != "bearer":
            raise UpstreamUnavailable(f"{what}: unsupported token_type")
        refresh = doc.get("refresh_token", previous_refresh)
        if refresh is not None and not isinstance(refresh, str):
            raise UpstreamUnavailable(f"{what}: refresh_token is not a string")
        expires_in = doc.get("expires_in")
        expires_at: float | None = None
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            expires_at = self._clock.now() + max(0.0, float(expires_in))
        scope = doc.get("scope")
        return UpstreamTokens(
            access_token=access,
            refresh_token=refresh or None,
            expires_at=expires_at,
            token_type="Bearer",  # noqa: S106 - the token type, not a secret
            scope=scope if isinstance(scope, str) else None,
        )

    async def login(
        self, code: str, *, redirect_uri: str, code_verifier: str, nonce: str
    ) -> tuple[UpstreamIdentity, UpstreamTokens]:
        """Exchange `code` (with our PKCE verifier) and establish who logged in."""
        doc = await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": code_verifier,
            },
            what="code exchange",
        )
        tokens = self._tokens_from(doc, previous_refresh=None, what="code exchange")
        if self._settings.use_userinfo:
            claims = await self._userinfo(tokens.access_token)
            identity = UpstreamIdentity(
                subject=subject_from(claims, self._settings.identity_claim),
                amr=DEFAULT_AMR,
                auth_time=self._clock.now(),
            )
            return identity, tokens
        id_token = doc.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise UpstreamRejected("invalid_id_token", "code exchange: no id_token")
        claims = await self.verify_id_token(id_token, nonce=nonce)
        return self._identity_from(claims), tokens

    async def refresh(self, refresh_token: str) -> UpstreamTokens:
        """A new token set (the old refresh token is kept when none is returned)."""
        doc = await self._token_request(
            {"grant_type": "refresh_token", "refresh_token": refresh_token},
            what="refresh",
        )
        return self._tokens_from(doc, previous_refresh=refresh_token, what="refresh")

    async def revoke(self, token: str, *, hint: str = "refresh_token") -> bool:
        """Best-effort RFC 7009 revocation; False when the provider has no endpoint or fails."""
        meta = await self.metadata()
        endpoint = meta.get("revocation_endpoint")
        if not isinstance(endpoint, str):
            return False
        secret = self._settings.client_secret.get_secret_value()
        form = {"token": token, "token_type_hint": hint}
        headers: dict[str, str] = {}
        if self._settings.token_endpoint_auth_method == _BASIC:
            headers["Authorization"] = _basic_auth(self._settings.client_id, secret)
        else:
            form.update(client_id=self._settings.client_id, client_secret=secret)
        try:
            status, _ = await self._call(
                "POST", endpoint, headers=headers, data=form, what="revocation"
            )
        except UpstreamUnavailable:
            return False
        return status == 200

    async def _userinfo(self, access_token: str) -> dict[str, Any]:
        meta = await self.metadata()
        status, doc = await self._call(
            "GET",
            meta["userinfo_endpoint"],
            headers={"Authorization": f"Bearer {access_token}"},
            what="userinfo",
        )
        if status in (401, 403):
            raise UpstreamRejected("invalid_token", "userinfo: token refused")
        if status != 200 or not isinstance(doc, dict):
            raise UpstreamUnavailable(f"userinfo: status {status} or not a JSON object")
        return doc

    # ------------------------------------------------------------------ ID token

    def _identity_from(self, claims: Mapping[str, Any]) -> UpstreamIdentity:
        now = self._clock.now()
        auth_time = claims.get("auth_time")
        when = now
        if (
            isinstance(auth_time, int | float)
            and not isinstance(auth_time, bool)
            and 0 < auth_time <= now + self._leeway
        ):
            when = float(min(auth_time, now))
        return UpstreamIdentity(
            subject=subject_from(claims, self._settings.identity_claim),
            amr=carried_amr(claims.get("amr")),
            auth_time=when,
        )

    async def _fetch_jwks(self) -> None:
        meta = await self.metadata()
        doc = await self._get_json(meta["jwks_uri"], what="jwks")
        keys = doc.get("keys")
        if not isinstance(keys, list):
            raise UpstreamUnavailable("jwks: no keys array")
        self._jwks = [k for k in keys if isinstance(k, dict)]
        self._jwks_at = self._clock.now()

    def _candidates(self, kid: str | None, alg: str) -> list[dict[str, Any]]:
        kty = _KTY_FOR_ALG.get(alg)
        out = []
        for jwk in self._jwks:
            if jwk.get("kty") != kty:
                continue
            if jwk.get("use") not in (None, "sig"):
                continue
            if jwk.get("alg") not in (None, alg):  # one algorithm per key (RFC 8725 §3.1)
                continue
            if kid is not None and jwk.get("kid") != kid:
                continue
            out.append(jwk)
        return out

    async def _keys_for(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        now = self._clock.now()
        async with self._jwks_lock:
            stale = self._jwks_at is None or now - self._jwks_at >= self._jwks_ttl
            if stale:
                await self._fetch_jwks()
            found = self._candidates(kid, alg)
            # an unknown kid may mean the provider rotated: refetch, at most once per interval
            assert self._jwks_at is not None
            if not found and not stale and now - self._jwks_at >= self._jwks_min_refresh:
                await self._fetch_jwks()
                found = self._candidates(kid, alg)
        keys = []
        for jwk in found:
            try:
                keys.append(jwt.PyJWK(jwk, algorithm=alg))
            except (PyJWKError, InvalidKeyError, ValueError, TypeError):
                continue
        if not keys:
            raise UpstreamRejected("invalid_id_token", "id_token: no matching signing key")
        return keys

    async def verify_id_token(self, id_token: str, *, nonce: str) -> dict[str, Any]:
        """Signature (upstream JWKS, allow-listed alg), `iss`, `aud`, `azp`, `exp`, `iat`,
        `nbf`, `nonce`; return the claims or raise `UpstreamRejected`."""

        def bad(reason: str) -> UpstreamRejected:
            return UpstreamRejected("invalid_id_token", f"id_token: {reason}")

        try:
            header = jwt.get_unverified_header(id_token)
        except PyJWTError:
            raise bad("malformed") from None
        alg = header.get("alg")
        allowed = {
            a for a in self._settings.id_token_algs if a != "none" and not a.startswith("HS")
        }
        if not isinstance(alg, str) or alg not in allowed or alg not in _KTY_FOR_ALG:
            raise bad("algorithm not allowed")
        if "crit" in header:
            raise bad("unsupported crit header")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise bad("malformed kid")
        claims: dict[str, Any] | None = None
        for key in await self._keys_for(kid, alg):
            try:
                claims = jwt.decode(
                    id_token,
                    key=key.key,
                    algorithms=[alg],
                    audience=self._settings.client_id,
                    issuer=self._settings.issuer,
                    options={
                        "verify_exp": False,  # checked below against the injected clock
                        "verify_iat": False,
                        "verify_nbf": False,
                        "require": ["iss", "aud", "exp", "iat", "sub"],
                    },
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAudienceError:
                raise bad("wrong audience") from None
            except jwt.InvalidIssuerError:
                raise bad("wrong issuer") from None
            except PyJWTError as exc:
                raise bad(type(exc).__name__) from None
        if claims is None:
            raise bad("bad signature")
        now = self._clock.now()
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self._settings.client_id:
            raise bad("azp missing or not our client_id")
        if "azp" in claims and claims["azp"] != self._settings.client_id:
            raise bad("azp is not our client_id")
        for name in ("exp", "iat"):
            if isinstance(claims[name], bool) or not isinstance(claims[name], int | float):
                raise bad(f"{name} is not a number")
        if claims["exp"] <= now - self._leeway:
            raise bad("expired")
        if claims["iat"] > now + self._leeway:
            raise bad("issued in the future")
        nbf = claims.get("nbf")
        if nbf is not None and (
            isinstance(nbf, bool) or not isinstance(nbf, int | float) or nbf > now + self._leeway
        ):
            raise bad("not yet valid")
        got = claims.get("nonce")
        if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
            raise bad("nonce mismatch")
        return claims
