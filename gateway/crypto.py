"""Secrets at rest and one-way hashes of one-time values.

`Sealer` encrypts TOTP seeds and upstream tokens with AES-256-GCM (the `cryptography` library)
under the key from `[store] encryption_key`; the associated data binds each ciphertext to its
purpose and owner, so a blob copied to another key in Redis does not open. `token_hash` is what
stores use as the key of codes and refresh tokens, so a Redis dump never holds a usable value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = "v1"


class SealError(Exception):
    """A sealed value is malformed, or was sealed under another key or binding."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sealer:
    """AES-256-GCM with a random 96-bit nonce per message."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the encryption key must be exactly 32 bytes")
        self._aead = AESGCM(key)
        self._kdf_root = hmac.new(b"mfa-gateway subkeys", key, hashlib.sha256).digest()

    def derive_key(self, purpose: str) -> bytes:
        """A 32-byte subkey for `purpose` (e.g. keyed hashes of recovery codes), independent
        of the sealing key itself (HMAC-SHA256 based derivation)."""
        return hmac.new(self._kdf_root, purpose.encode("utf-8"), hashlib.sha256).digest()

    def seal(self, plaintext: bytes, binding: str) -> str:
        """Encrypt `plaintext`; `binding` (e.g. 'totp:alice') must be given again to open."""
        nonce = secrets.token_bytes(12)
        ct = self._aead.encrypt(nonce, plaintext, binding.encode("utf-8"))
        return f"{_VERSION}.{_b64e(nonce)}.{_b64e(ct)}"

    def open(self, sealed: str, binding: str) -> bytes:
        try:
            version, nonce, ct = sealed.split(".")
            if version != _VERSION:
                raise SealError("unknown sealed-value version")
            return self._aead.decrypt(_b64d(nonce), _b64d(ct), binding.encode("utf-8"))
        except (ValueError, InvalidTag) as exc:
            raise SealError("sealed value does not open under this key and binding") from exc


def token_hash(value: str) -> str:
    """SHA-256 of a high-entropy one-time value (codes, refresh tokens), base64url."""
    return _b64e(hashlib.sha256(value.encode("utf-8")).digest())


def keyed_hash(key: bytes, value: str) -> str:
    """HMAC-SHA256, for low-entropy values such as recovery codes."""
    return _b64e(hmac.new(key, value.encode("utf-8"), hashlib.sha256).digest())


def new_token(nbytes: int = 32) -> str:
    """A CSPRNG value, base64url; 32 bytes = 256 bits (≥128 bits required for codes, R10)."""
    return secrets.token_urlsafe(nbytes)


def generate_encryption_key() -> str:
    """A fresh `[store] encryption_key` value."""
    return _b64e(secrets.token_bytes(32))
