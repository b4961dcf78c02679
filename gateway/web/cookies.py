"""Signed cookies and CSRF tokens for the browser steps (consent, transaction, TOTP).

Cookie names carry the gateway's own prefix (`mfagw_`) so they never collide with the upstream
provider's cookies on a shared host; with an https `public_url` they are `__Host-` and `Secure`,
and only on plain-http loopback (development) neither (DESIGN §2.5, ECOSYSTEM "Cookies").
Signing is HMAC-SHA256 from the standard library over `purpose|expiry|value`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from aiohttp import web

_PREFIX = "mfagw_"


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CookieCodec:
    """Names, signs and verifies the gateway's cookies and CSRF tokens."""

    def __init__(self, secret: bytes, *, secure: bool) -> None:
        self._secret = hashlib.sha256(b"mfa-gateway cookies\x00" + secret).digest()
        self.secure = secure

    def name(self, base: str) -> str:
        return ("__Host-" if self.secure else "") + _PREFIX + base

    def _mac(self, message: str) -> str:
        return _b64e(hmac.new(self._secret, message.encode("utf-8"), hashlib.sha256).digest())

    def sign(self, value: str, *, purpose: str, expires_at: float) -> str:
        payload = _b64e(value.encode("utf-8"))
        exp = str(int(expires_at))
        mac = self._mac(f"{purpose}|{exp}|{payload}")
        return f"{payload}.{exp}.{mac}"

    def verify(self, signed: str | None, *, purpose: str, now: float) -> str | None:
        """The signed value, or None if absent, forged, for another purpose or expired."""
        if not signed:
            return None
        try:
            payload, exp, mac = signed.split(".")
            if not hmac.compare_digest(mac, self._mac(f"{purpose}|{exp}|{payload}")):
                return None
            if int(exp) < now:
                return None
            return _b64d(payload).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None

    def csrf_token(self, binding: str) -> str:
        """A CSRF token bound to one transaction/browser binding (not stored anywhere)."""
        return self._mac(f"csrf|{binding}")

    def check_csrf(self, binding: str, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.csrf_token(binding))

    def set(
        self,
        response: web.StreamResponse,
        base: str,
        value: str,
        *,
        purpose: str,
        now: float,
        max_age: float,
    ) -> None:
        """Set a signed, HttpOnly, SameSite=Lax cookie on path `/`."""
        response.set_cookie(
            self.name(base),
            self.sign(value, purpose=purpose, expires_at=now + max_age),
            max_age=int(max_age),
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="Lax",
        )

    def get(self, request: web.Request, base: str, *, purpose: str, now: float) -> str | None:
        return self.verify(request.cookies.get(self.name(base)), purpose=purpose, now=now)

    def clear(self, response: web.StreamResponse, base: str) -> None:
        response.del_cookie(
            self.name(base), path="/", secure=self.secure, httponly=True, samesite="Lax"
        )
