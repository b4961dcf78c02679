"""Bearer authentication on MCP paths: `Authorization` header → verified token → MFA check.

`BearerAuth.authenticate` runs the checks of DESIGN §4.1-§4.3 in order and raises the typed
error the challenge is rendered from: no credentials → `MissingToken` (401 without `error`,
R29); malformed or repeated credentials, or a token in the query string → `invalid_request`
(400, R25); anything wrong with the token → `InvalidToken` (401); a revoked `jti` → `InvalidToken`;
the revocation feed down → `TemporarilyUnavailable` (503, fail closed); an `amr` that is not a
JSON array holding every required value → `InsufficientUserAuthentication` (401, RFC 9470),
raised only after the token was fully verified (R30).

Speed (DESIGN §8): verified tokens are cached, keyed by a SHA-256 of the token and the
audience, bounded, and never used past `exp`; revocations come from the process-local
`RevocationSet`, so a cached token costs no crypto and no store round trip.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import ClassVar, Protocol

from multidict import CIMultiDictProxy

from gateway.clock import Clock
from gateway.core.errors import (
    BearerError,
    InsufficientUserAuthentication,
    InvalidToken,
    MissingToken,
)
from gateway.core.policy import missing_amr
from gateway.core.tokens import (
    DEFAULT_LEEWAY,
    MAX_TOKEN_LENGTH,
    TokenVerifier,
    VerificationKey,
    VerifiedToken,
    peek,
)
from gateway.keys import KeyRing
from gateway.revocations import RevocationSet

# RFC 6750 §2.1 b64token.
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
DEFAULT_CACHE_SIZE = 10_000


class BearerInvalidRequest(BearerError):
    """RFC 6750 §3.1 `invalid_request`: repeated or malformed credentials (400)."""

    error = "invalid_request"
    status = 400


class TrustedKeys(Protocol):
    """Keys of trusted issuers (`gateway.adapters.jwks.JwksCache`)."""

    def is_trusted(self, issuer: str) -> bool: ...

    def get(self, issuer: str, kid: str, now: float) -> VerificationKey | None: ...

    async def ensure(self, issuer: str, kid: str, now: float) -> None: ...


def extract_bearer(headers: CIMultiDictProxy[str], query: Mapping[str, str]) -> str:
    """The bearer token from the one `Authorization` header; raise a `BearerError` otherwise."""
    if "access_token" in query:
        raise BearerInvalidRequest(
            "Access tokens are accepted in the Authorization header only",
            log_reason="token in query string",
        )
    values = headers.getall("Authorization", [])
    if not values:
        raise MissingToken(log_reason="no Authorization header")
    if len(values) > 1:
        raise BearerInvalidRequest(
            "Only one Authorization header is allowed", log_reason="repeated Authorization"
        )
    scheme, _, credentials = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise MissingToken(log_reason="not a Bearer credential")
    token = credentials.strip()
    if not token or len(token) > MAX_TOKEN_LENGTH or not _B64TOKEN.fullmatch(token):
        raise InvalidToken("The access token is invalid", log_reason="malformed bearer value")
    return token


class BearerAuth:
    """Verifies bearer tokens for every resource of one app (shared caches)."""

    MFA_DESCRIPTION: ClassVar[str] = "Multi-factor authentication is required"

    def __init__(
        self,
        keys: KeyRing,
        revocations: RevocationSet,
        clock: Clock,
        *,
        trusted: TrustedKeys | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        leeway: float = DEFAULT_LEEWAY,
    ) -> None:
        self._keys = keys
        self._trusted = trusted
        self._revocations = revocations
        self._clock = clock
        self._cache: dict[tuple[bytes, str], VerifiedToken] = {}
        self._cache_size = cache_size
        self._verifier = TokenVerifier(self._resolve, leeway=leeway)

    def _resolve(self, issuer: str, kid: str) -> VerificationKey | None:
        if issuer == self._keys.issuer:
            return self._keys.verification_key(kid)
        if self._trusted is not None and self._trusted.is_trusted(issuer):
            return self._trusted.get(issuer, kid, self._clock.now())
        return None

    def cached(self) -> int:
        """How many verified tokens are cached (tests, metrics)."""
        return len(self._cache)

    async def verify(self, token: str, *, audience: str) -> VerifiedToken:
        """Signature and claims (cached), then revocation. No MFA decision here."""
        now = self._clock.now()
        key = (hashlib.sha256(token.encode("utf-8")).digest(), audience)
        verified = self._cache.get(key)
        if verified is None or now >= verified.expires_at:
            if verified is not None:
                del self._cache[key]
            verified = await self._verify_uncached(token, audience=audience, now=now)
            if now < verified.expires_at:
                if len(self._cache) >= self._cache_size:
                    del self._cache[next(iter(self._cache))]  # oldest first
                self._cache[key] = verified
        if self._revocations.check(verified.jti):
            raise InvalidToken("The access token is invalid", log_reason="jti revoked")
        return verified

    async def _verify_uncached(self, token: str, *, audience: str, now: float) -> VerifiedToken:
        if self._trusted is not None:
            hint = peek(token)
            if (
                hint.issuer is not None
                and hint.kid is not None
                and hint.issuer != self._keys.issuer
                and self._trusted.is_trusted(hint.issuer)
            ):
                await self._trusted.ensure(hint.issuer, hint.kid, now)
        return self._verifier.verify(token, audience=audience, now=now)

    async def authenticate(
        self, token: str, *, audience: str, required_amr: Sequence[str]
    ) -> VerifiedToken:
        """Fully verify `token` for `audience`, then require every `required_amr` value."""
        verified = await self.verify(token, audience=audience)
        missing = missing_amr(verified.amr, required_amr)
        if missing:
            reason = (
                "amr not an array" if verified.amr is None else "amr lacks " + ",".join(missing)
            )
            raise InsufficientUserAuthentication(self.MFA_DESCRIPTION, log_reason=reason)
        return verified
