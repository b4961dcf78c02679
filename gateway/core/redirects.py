"""Redirect URIs: which ones may be registered, exact matching, and building the response URL.

Pure: no I/O. Registration accepts https, plain http on a loopback host (`127.0.0.1`, `[::1]`,
`localhost`) and custom schemes that the policy lists; never fragments, userinfo, or hosts that
need decoding (R23, R36, DESIGN §2.3). Matching is simple string comparison, except that a
loopback redirect URI may differ in its port and nothing else (OAuth 2.1 §4.1.1, RFC 8252 §7.3,
R7). `authorization_response` appends `code`/`error`, `state` and `iss` to a *verified* URI,
keeping the client's own query parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import urlencode, urlsplit

from gateway.core.errors import InvalidRedirectUri

MAX_REDIRECT_URI_LENGTH = 2000
LOOPBACK_HOSTS: tuple[str, ...] = ("127.0.0.1", "[::1]", "localhost")

# Schemes that are never redirect targets, whatever a policy lists.
_NEVER_SCHEMES = frozenset(
    {
        "javascript",
        "data",
        "vbscript",
        "file",
        "about",
        "blob",
        "filesystem",
        "ftp",
        "ws",
        "wss",
        "http",
        "https",
        "mailto",
        "tel",
        "sms",
        "intent",
        "chrome",
        "view-source",
    }
)
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
# Printable ASCII without space, quote, angle brackets, backslash, caret, backtick, braces, pipe.
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]+")
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)(?:[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?"
)
# host[:port] of an https URI: a lower-case name, IPv4 or bracketed IPv6 literal.
_AUTHORITY = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(?P<port>[1-9][0-9]{0,4}))?")
# A loopback redirect URI, split into host, optional port and the rest (path and query).
_LOOPBACK = re.compile(
    r"http://(?P<host>127\.0\.0\.1|\[::1\]|localhost)"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?"
    r"(?P<rest>[/?][^#]*)?"
)


def _refuse(uri: str, why: str) -> InvalidRedirectUri:
    del uri  # never echoed: a redirect URI may carry a client's secrets in its query
    return InvalidRedirectUri(f"redirect URI {why}", log_reason=f"redirect_uri {why}")


def validate_redirect_uri(uri: object, *, allowed_custom_schemes: Iterable[str] = ()) -> str:
    """Return `uri` if it may be registered; raise `InvalidRedirectUri` otherwise (R23, R24)."""
    if not isinstance(uri, str) or not uri:
        raise InvalidRedirectUri("redirect URIs must be non-empty strings")
    if len(uri) > MAX_REDIRECT_URI_LENGTH:
        raise _refuse(uri, "is too long")
    if _URI_CHARS.fullmatch(uri) is None:
        raise _refuse(uri, "contains characters that are not allowed")
    if "#" in uri:
        raise _refuse(uri, "must not contain a fragment")
    scheme, colon, rest = uri.partition(":")
    if not colon or _SCHEME.fullmatch(scheme) is None:
        raise _refuse(uri, "must be an absolute URI with a lower-case scheme")
    parts = urlsplit(uri)
    if scheme in ("https", "http"):
        if not rest.startswith("//"):
            raise _refuse(uri, "must have an authority")
        if "@" in parts.netloc:
            raise _refuse(uri, "must not contain userinfo")
        if scheme == "http":
            loopback = _LOOPBACK.fullmatch(uri)
            if loopback is None:
                raise _refuse(uri, "must use https unless it is a loopback URI")
            if loopback.group("port") and int(loopback.group("port")) > 65535:
                raise _refuse(uri, "has an invalid port")
            return uri
        authority = _AUTHORITY.fullmatch(parts.netloc)
        if authority is None:
            raise _refuse(uri, "has an invalid or non-canonical host")
        port = authority.group("port")
        if port is not None and int(port) > 65535:
            raise _refuse(uri, "has an invalid port")
        host = authority.group("host")
        if not host.startswith("[") and _HOSTNAME.fullmatch(host) is None:
            raise _refuse(uri, "has an invalid or non-canonical host")
        return uri
    allowed = {s.lower() for s in allowed_custom_schemes}
    if scheme in _NEVER_SCHEMES or scheme not in allowed:
        raise _refuse(uri, "uses a scheme that is not allowed")
    if "@" in parts.netloc:
        raise _refuse(uri, "must not contain userinfo")
    return uri


def is_loopback_redirect(uri: str) -> bool:
    """True for http redirect URIs on `127.0.0.1`, `[::1]` or `localhost`."""
    return _LOOPBACK.fullmatch(uri) is not None


def redirect_host(uri: str) -> str:
    """The host a redirect URI points at, for display on the consent page (R24)."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return parts.hostname or ""
    return parts.scheme + ":"


def match_redirect_uri(requested: str, registered: Sequence[str]) -> str | None:
    """The redirect URI to use, or None (R7).

    Simple string comparison with every registered URI; the only exception is a loopback URI
    (`http://127.0.0.1`, `http://[::1]`, `http://localhost`), where the port may differ and
    nothing else may.
    """
    for candidate in registered:
        if requested == candidate:
            return requested
    asked = _LOOPBACK.fullmatch(requested)
    if asked is None or (asked.group("port") and int(asked.group("port")) > 65535):
        return None
    for candidate in registered:
        known = _LOOPBACK.fullmatch(candidate)
        if (
            known is not None
            and known.group("host") == asked.group("host")
            and (known.group("rest") or "") == (asked.group("rest") or "")
        ):
            return requested
    return None


def authorization_response(redirect_uri: str, **params: str | None) -> str:
    """`redirect_uri` with `params` (None values left out) appended to its query.

    The client's own query parameters are kept verbatim (RFC 6749 §3.1.2); the URI is one that
    was already verified, and it never has a fragment.
    """
    base = redirect_uri.split("#", 1)[0]
    extra = urlencode([(k, v) for k, v in params.items() if v is not None])
    if not extra:
        return base
    if "?" not in base:
        return f"{base}?{extra}"
    if base.endswith(("?", "&")):
        return base + extra
    return f"{base}&{extra}"
