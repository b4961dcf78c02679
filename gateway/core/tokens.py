"""Mint and verify the gateway's JWTs: RFC 9068 access tokens and identity tokens.

Pure: keys and `now` are passed in, nothing here does I/O or reads a clock. Parsing and the
signature check are pyjwt's (`PyJWS`); the claim checks are explicit and run in the order of
DESIGN §4.2 so that a token is fully validated before anything is decided from its content:

1. structure, header sanity: `alg` on the allow-list (never `none`, never HMAC), `kid` present
   and well-formed (R28);
2. key lookup by (unverified `iss`, `kid`) among configured keys only; `alg` must be the key's
   one algorithm (no key confusion); signature;
3. `typ` is `at+jwt` (explicit typing, R27/R28);
4. `iss` equals the issuer the key belongs to;
5. `aud` is (or contains) this resource (R25/R27);
6. `exp`/`nbf`/`iat` with a small leeway;
7. `crit` refused (no extension is understood), `jku`/`x5u`/`jwk`/`x5c` refused and never
   fetched (RFC 8725 §3.10, RFC 7515 §4.1.11);
8. required claims and their types (RFC 9068 §2.2).

Revocation (`jti`) and the MFA/`amr` decision are made by the caller on the returned
`VerifiedToken` (the deny-list is live state; `amr` failures are a different challenge).
"""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt
from jwt.algorithms import (
    Algorithm,
    AllowedPrivateKeys,
    AllowedPublicKeys,
    ECAlgorithm,
    OKPAlgorithm,
    RSAAlgorithm,
    RSAPSSAlgorithm,
)

from gateway.core.errors import InvalidToken

ACCESS_TOKEN_TYP: Final = "at+jwt"  # noqa: S105 - a media type, not a secret
IDENTITY_TOKEN_TYP: Final = "identity+jwt"  # noqa: S105 - a media type
DEFAULT_LEEWAY: Final = 30.0
MAX_TOKEN_LENGTH: Final = 8192

# The only algorithms any key may ever carry; each key is bound to exactly one of them.
ALLOWED_ALGS: Final[Mapping[str, Algorithm]] = {
    "ES256": ECAlgorithm(ECAlgorithm.SHA256),
    "EdDSA": OKPAlgorithm(),
    "RS256": RSAAlgorithm(RSAAlgorithm.SHA256),
    "PS256": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256),
}
_KID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Header parameters that would point at, or embed, a key: refused, never fetched (R28).
_KEY_REFERENCE_HEADERS: Final = ("jku", "x5u", "jwk", "x5c")
_ACCESS_TYPS: Final = frozenset({"at+jwt", "application/at+jwt"})
_REQUIRED_CLAIMS: Final = ("iss", "exp", "aud", "sub", "client_id", "iat", "jti")
_JWS = jwt.PyJWS(options={"verify_signature": True})


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key the gateway signs with; bound to one `alg`."""

    kid: str
    alg: str
    private_key: AllowedPrivateKeys


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key that may verify tokens of exactly one issuer, with exactly one `alg`."""

    kid: str
    alg: str
    issuer: str
    public_key: AllowedPublicKeys


KeyResolver = Callable[[str, str], "VerificationKey | None"]
"""(issuer, kid) -> the configured key, or None. Never fetches anything."""


@dataclass(frozen=True, slots=True)
class UnverifiedToken:
    """What may be read from a token before verification: only enough to pick its key."""

    issuer: str | None
    kid: str | None


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The facts of a fully verified access token."""

    issuer: str
    subject: str
    audience: str
    client_id: str
    jti: str
    scopes: frozenset[str]
    issued_at: float
    expires_at: float
    auth_time: float | None
    # None unless the claim is a JSON array of strings (R31): a string is not an amr list.
    amr: tuple[str, ...] | None
    acr: str | None
    gid: str | None
    kid: str

    @property
    def scope(self) -> str:
        return " ".join(sorted(self.scopes))


# --------------------------------------------------------------------------- minting


def new_jti() -> str:
    """A fresh 128-bit token id."""
    return secrets.token_urlsafe(16)


def _scope_str(scope: str | Iterable[str]) -> str:
    if isinstance(scope, str):
        return " ".join(scope.split())
    return " ".join(scope)


def build_access_claims(
    *,
    issuer: str,
    sub: str,
    audience: str,
    client_id: str,
    scope: str | Iterable[str],
    auth_time: float,
    amr: Sequence[str],
    acr: str | None,
    gid: str,
    now: float,
    ttl: float,
) -> dict[str, Any]:
    """RFC 9068 claims with a fresh `jti`; `iat`/`nbf` = now, `exp` = now + ttl."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": sub,
        "aud": audience,
        "client_id": client_id,
        "scope": _scope_str(scope),
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + ttl),
        "jti": new_jti(),
        "auth_time": int(auth_time),
        "amr": list(amr),
        "gid": gid,
    }
    if acr is not None:
        claims["acr"] = acr
    return claims


def _sign(claims: Mapping[str, Any], key: SigningKey, typ: str) -> str:
    if key.alg not in ALLOWED_ALGS:
        raise ValueError(f"signing algorithm {key.alg!r} is not allowed")
    return jwt.encode(
        dict(claims), key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": typ}
    )


def mint_access_token(claims: Mapping[str, Any], key: SigningKey) -> str:
    """Sign `claims` as an access token (header `typ: at+jwt`, `kid`)."""
    return _sign(claims, key, ACCESS_TOKEN_TYP)


def mint_identity_token(
    *,
    key: SigningKey,
    issuer: str,
    audience: str,
    sub: str,
    client_id: str,
    amr: Sequence[str],
    auth_time: float | None,
    acr: str | None,
    scope: str | Iterable[str],
    now: float,
    ttl: float,
) -> str:
    """A short-lived JWT telling an MCP server who is calling (`forward_token = "identity"`).

    `typ: identity+jwt` and `aud` = the MCP server's URL, so it can never pass as an access
    token at the gateway (mutually exclusive validation rules per JWT kind, R28).
    """
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": sub,
        "aud": audience,
        "client_id": client_id,
        "amr": list(amr),
        "scope": _scope_str(scope),
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + ttl),
        "jti": new_jti(),
    }
    if auth_time is not None:
        claims["auth_time"] = int(auth_time)
    if acr is not None:
        claims["acr"] = acr
    return _sign(claims, key, IDENTITY_TOKEN_TYP)


# --------------------------------------------------------------------------- verification


def _reject(log_reason: str) -> InvalidToken:
    # One description for every failure: the client learns nothing about which check failed.
    return InvalidToken("The access token is invalid", log_reason=log_reason)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate member")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def _decode_object(data: bytes) -> dict[str, Any]:
    try:
        value = _DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _reject("claims are not valid JSON") from None
    if not isinstance(value, dict):
        raise _reject("claims are not a JSON object")
    return value


def _b64_segment(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _parse_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if len(token) > MAX_TOKEN_LENGTH:
        raise _reject("token too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise _reject("not a compact JWS")
    try:
        header = _JWS.get_unverified_header(token)
        claims = _decode_object(_b64_segment(parts[1]))
    except jwt.PyJWTError:
        raise _reject("malformed token") from None
    except ValueError:
        raise _reject("malformed token") from None
    return header, claims


def peek(token: str) -> UnverifiedToken:
    """Read `iss` and `kid` without verifying, only to choose which key source to consult."""
    header, claims = _parse_unverified(token)
    kid = header.get("kid")
    iss = claims.get("iss")
    return UnverifiedToken(
        issuer=iss if isinstance(iss, str) else None,
        kid=kid if isinstance(kid, str) else None,
    )


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _reject(f"{name} is not a number")
    return float(value)


def _string(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise _reject(f"{name} is not a non-empty string")
    return value


def _amr(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


class TokenVerifier:
    """Verifies access tokens against configured keys only (DESIGN §4.2, R25-R28)."""

    def __init__(self, keys: KeyResolver, *, leeway: float = DEFAULT_LEEWAY) -> None:
        self._keys = keys
        self._leeway = leeway

    def verify(self, token: str, *, audience: str, now: float) -> VerifiedToken:
        """Return the verified facts or raise `InvalidToken` (with a `log_reason`)."""
        # 1. structure and header sanity
        header, unverified = _parse_unverified(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
            raise _reject("alg not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise _reject("kid missing or malformed")
        issuer = unverified.get("iss")
        if not isinstance(issuer, str):
            raise _reject("iss missing")
        # 2. key and signature
        key = self._keys(issuer, kid)
        if key is None:
            raise _reject("unknown kid")
        if alg != key.alg:
            raise _reject("alg does not match the key")
        try:
            decoded = _JWS.decode_complete(token, key.public_key, algorithms=[key.alg])
        except jwt.InvalidSignatureError:
            raise _reject("bad signature") from None
        except jwt.PyJWTError:
            raise _reject("malformed token") from None
        claims = _decode_object(decoded["payload"])
        # 3. explicit type
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _ACCESS_TYPS:
            raise _reject("typ is not at+jwt")
        # 4. issuer bound to the key that verified the signature
        if claims.get("iss") != key.issuer:
            raise _reject("iss does not match the key's issuer")
        # 5. audience = this resource
        aud = claims.get("aud")
        if isinstance(aud, str):
            aud_ok = aud == audience
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            aud_ok = audience in aud
        else:
            aud_ok = False
        if not aud_ok:
            raise _reject("aud is not this resource")
        # 6. time
        exp = _number(claims, "exp")
        iat = _number(claims, "iat")
        nbf = _number(claims, "nbf")
        auth_time = _number(claims, "auth_time")
        if exp is None:
            raise _reject("exp missing")
        if now >= exp + self._leeway:
            raise _reject("expired")
        if nbf is not None and now + self._leeway < nbf:
            raise _reject("not yet valid")
        if iat is None:
            raise _reject("iat missing")
        if now + self._leeway < iat:
            raise _reject("issued in the future")
        if auth_time is not None and now + self._leeway < auth_time:
            raise _reject("auth_time in the future")
        # 7. extensions and key references
        if "crit" in header:
            raise _reject("unknown crit extension")
        for name in _KEY_REFERENCE_HEADERS:
            if name in header:
                raise _reject(f"{name} header refused")
        # 8. required claims
        for name in _REQUIRED_CLAIMS:
            if name not in claims:
                raise _reject(f"{name} missing")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise _reject("scope is not a string")
        acr = claims.get("acr")
        gid = claims.get("gid")
        return VerifiedToken(
            issuer=key.issuer,
            subject=_string(claims, "sub"),
            audience=audience,
            client_id=_string(claims, "client_id"),
            jti=_string(claims, "jti"),
            scopes=frozenset(scope.split()),
            issued_at=iat,
            expires_at=exp,
            auth_time=auth_time,
            amr=_amr(claims.get("amr")),
            acr=acr if isinstance(acr, str) else None,
            gid=gid if isinstance(gid, str) else None,
            kid=key.kid,
        )
