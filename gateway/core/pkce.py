"""PKCE (RFC 7636) with S256 only: the challenge format check and the verifier check.

Pure: no I/O. `plain` is never accepted (OAuth 2.1 §4.1.1, RFC 9700 §2.1.1, R6); the verifier is
compared with `hmac.compare_digest` so the comparison time does not depend on how many leading
characters agree.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

# RFC 7636 §4.1/§4.2: 43-128 characters of [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~".
_UNRESERVED_43_128 = re.compile(r"[A-Za-z0-9\-._~]{43,128}")

SUPPORTED_METHODS: tuple[str, ...] = ("S256",)


def is_valid_challenge(challenge: str) -> bool:
    """True if `challenge` has the RFC 7636 shape (43-128 unreserved characters)."""
    return _UNRESERVED_43_128.fullmatch(challenge) is not None


def is_valid_verifier(verifier: str) -> bool:
    """True if `verifier` has the RFC 7636 §4.1 shape (43-128 unreserved characters)."""
    return _UNRESERVED_43_128.fullmatch(verifier) is not None


def s256(verifier: str) -> str:
    """BASE64URL(SHA256(ASCII(verifier))) without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify_s256(verifier: str, challenge: str) -> bool:
    """True if `verifier` is well formed and hashes to `challenge` (constant-time compare)."""
    if not is_valid_verifier(verifier) or not is_valid_challenge(challenge):
        return False
    return hmac.compare_digest(s256(verifier).encode("ascii"), challenge.encode("ascii"))
