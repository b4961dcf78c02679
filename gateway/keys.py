"""Token signing keys: loaded from PEM files named in config, published as a JWKS.

`KeyRing` holds the gateway's own keys (one active `kid` signs, all of them verify and are
published at `/oauth/jwks.json`, so keys can rotate). Every key is bound to exactly one
algorithm, checked against the key's type when it is loaded (ES256 = P-256, EdDSA = Ed25519),
so no key can be used with another algorithm (RFC 8725 §3.1). `verification_key_from_jwk` applies
the same rules to the keys of trusted issuers fetched by `gateway.adapters.jwks`.
The key types themselves live in `gateway.core.tokens` (pure) and are re-exported here.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import AllowedPrivateKeys

from gateway.core.tokens import ALLOWED_ALGS, SigningKey, VerificationKey
from gateway.settings import ConfigError, Settings, key_path

__all__ = [
    "KeyRing",
    "SigningKey",
    "VerificationKey",
    "generate_private_key_pem",
    "load_private_key_pem",
    "verification_key_from_jwk",
]

log = structlog.get_logger(__name__)

SIGNING_ALGS = ("ES256", "EdDSA")
_KID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_MIN_RSA_BITS = 2048


def generate_private_key_pem(alg: str) -> bytes:
    """A fresh private key for `alg` (ES256 or EdDSA) as unencrypted PKCS#8 PEM."""
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unsupported signing algorithm {alg!r}; use ES256 or EdDSA")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_private(key: object, alg: str) -> AllowedPrivateKeys:
    if alg == "ES256" and isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return key
        raise ValueError(f"ES256 needs a P-256 key, got curve {key.curve.name}")
    if alg == "EdDSA" and isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ValueError(f"the key is not a {alg} key")


def load_private_key_pem(data: bytes, alg: str) -> AllowedPrivateKeys:
    """Parse a PEM private key and check that it fits `alg`; ValueError otherwise."""
    if alg not in SIGNING_ALGS:
        raise ValueError(f"unsupported signing algorithm {alg!r}; use ES256 or EdDSA")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError("not an unencrypted PEM private key") from None
    return _check_private(key, alg)


def _public_jwk(key: SigningKey) -> dict[str, Any]:
    public = key.private_key.public_key()
    jwk: dict[str, Any] = json.loads(ALLOWED_ALGS[key.alg].to_jwk(public))
    leaked = _PRIVATE_JWK_MEMBERS & jwk.keys()
    if leaked:  # pragma: no cover - pyjwt exports public members only
        raise RuntimeError("refusing to publish private key material")
    jwk.update({"kid": key.kid, "alg": key.alg, "use": "sig"})
    return jwk


class KeyRing:
    """The gateway's signing keys (one active `kid`) and the public JWKS of all of them."""

    def __init__(self, issuer: str, keys: Sequence[SigningKey], active_kid: str) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        by_kid = {k.kid: k for k in keys}
        if len(by_kid) != len(keys):
            raise ValueError("kid values must be unique")
        if active_kid not in by_kid:
            raise ValueError(f"active kid {active_kid!r} is not in the key ring")
        for k in keys:
            if k.alg not in SIGNING_ALGS:
                raise ValueError(f"key {k.kid!r}: unsupported algorithm {k.alg!r}")
            _check_private(k.private_key, k.alg)
        self.issuer = issuer
        self._keys = by_kid
        self._active = by_kid[active_kid]
        self._verification = {
            k.kid: VerificationKey(
                kid=k.kid, alg=k.alg, issuer=issuer, public_key=k.private_key.public_key()
            )
            for k in keys
        }
        self._jwks = {"keys": [_public_jwk(k) for k in keys]}

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Load every `[[keys.signing]]` PEM file; with `dev_generate` and no keys, make one.

        Raises `ConfigError` naming the key whose file is unreadable or of the wrong type.
        """
        problems: list[str] = []
        keys: list[SigningKey] = []
        where = str(settings.config_path)
        for i, ks in enumerate(settings.keys.signing):
            path = key_path(settings, ks.file)
            try:
                private = load_private_key_pem(path.read_bytes(), ks.alg)
            except OSError as exc:
                problems.append(f"{where}: keys.signing[{i}].file: cannot read: {exc.strerror}")
                continue
            except ValueError as exc:
                problems.append(f"{where}: keys.signing[{i}].file: {exc}")
                continue
            keys.append(SigningKey(kid=ks.kid, alg=ks.alg, private_key=private))
        if problems:
            raise ConfigError(problems)
        if not keys:
            if not settings.keys.dev_generate:
                raise ConfigError([f"{where}: keys.signing: at least one key is required"])
            kid = "dev-" + secrets.token_hex(4)
            private = load_private_key_pem(generate_private_key_pem("ES256"), "ES256")
            keys.append(SigningKey(kid=kid, alg="ES256", private_key=private))
            log.warning("dev_signing_key_generated", kid=kid, reason="keys.dev_generate")
        active = settings.keys.active or keys[0].kid
        return cls(settings.issuer, keys, active)

    @property
    def active(self) -> SigningKey:
        """The key new tokens are signed with."""
        return self._active

    def jwks(self) -> dict[str, Any]:
        """`{"keys": [...]}`: the public half of every key (never private members)."""
        return {"keys": [dict(k) for k in self._jwks["keys"]]}

    def verification_key(self, kid: str) -> VerificationKey | None:
        """The public key for `kid` bound to this gateway's issuer, or None."""
        return self._verification.get(kid)


# --------------------------------------------------------------------------- trusted issuers


def _alg_for(jwk: Mapping[str, Any], allowed: Collection[str]) -> str | None:
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    if kty == "EC":
        natural: tuple[str, ...] = ("ES256",) if jwk.get("crv") == "P-256" else ()
    elif kty == "OKP":
        natural = ("EdDSA",) if jwk.get("crv") == "Ed25519" else ()
    elif kty == "RSA":
        natural = ("RS256", "PS256")
    else:
        natural = ()
    candidates = [a for a in natural if a in allowed and a in ALLOWED_ALGS]
    if alg is not None:
        return alg if isinstance(alg, str) and alg in candidates else None
    # One algorithm per key: without an explicit `alg`, only an unambiguous choice is taken.
    return candidates[0] if len(candidates) == 1 else None


def verification_key_from_jwk(
    jwk: Mapping[str, Any], *, issuer: str, allowed_algs: Collection[str]
) -> VerificationKey | None:
    """A `VerificationKey` from one public JWK of a trusted issuer, or None if it is unusable:
    no or malformed `kid`, not for signatures, private material present, an algorithm outside
    the issuer's allow-list or inconsistent with the key type, or an RSA key under 2048 bits."""
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        return None
    if _PRIVATE_JWK_MEMBERS & jwk.keys():
        return None
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    alg = _alg_for(jwk, allowed_algs)
    if alg is None:
        return None
    try:
        public = ALLOWED_ALGS[alg].from_jwk(dict(jwk))
    except (ValueError, TypeError, KeyError):
        return None
    if not _public_fits(public, alg):
        return None
    return VerificationKey(kid=kid, alg=alg, issuer=issuer, public_key=public)


def _public_fits(key: object, alg: str) -> bool:
    if alg == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey)
    if alg in ("RS256", "PS256"):
        return isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS
    return False
