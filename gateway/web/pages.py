"""HTML pages: escaped `string.Template` rendering and the interactive-page security headers.

Templates live in `gateway/web/templates/<name>.html`. Every value is HTML-escaped unless it
is wrapped in `safe()` (used only for markup this module or another template produced). Every
page the gateway shows a browser goes through `html_page`, which sets the headers of DESIGN §7.5
and R13/R14: no framing, no caching, no referrer, a CSP that allows no script and no third-party
resource at all, and `form-action` limited to this origin plus the origins a form's POST is
expected to redirect to (browsers enforce `form-action` on those redirects).
"""

from __future__ import annotations

import html
import re
import string
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from urllib.parse import urlsplit

from aiohttp import web

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# A CSP source expression we are willing to emit: an http(s) origin or a bare scheme.
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.\-]*:$")
# Schemes that must never become a form target, whatever a redirect URI says.
_NEVER_SCHEMES = frozenset({"javascript", "data", "blob", "filesystem", "vbscript", "about"})


class Safe(str):
    """A string that is already HTML and must not be escaped again."""

    __slots__ = ()


def safe(markup: str) -> Safe:
    """Mark `markup` as trusted HTML (only for output of `render` or fixed markup)."""
    return Safe(markup)


def escape(value: str) -> str:
    """HTML-escape a value for element content and quoted attributes."""
    return value if isinstance(value, Safe) else html.escape(value, quote=True)


@lru_cache(maxsize=32)
def _template(name: str) -> string.Template:
    if not _NAME.match(name):
        raise ValueError(f"invalid template name {name!r}")
    text = resources.files("gateway.web").joinpath("templates", f"{name}.html").read_text("utf-8")
    return string.Template(text)


def render(template: str, **values: str) -> str:
    """Fill `templates/<template>.html`; every value is escaped unless passed through `safe()`.

    A placeholder without a value raises `KeyError` (a template bug, never silently empty).
    """
    return _template(template).substitute({k: escape(v) for k, v in values.items()})


def render_page(template: str, *, title: str, **values: str) -> str:
    """`render(template, ...)` wrapped in `base.html` with `title`: a whole HTML document."""
    return render("base", title=title, content=safe(render(template, title=title, **values)))


def csp_source(url: str) -> str | None:
    """The CSP source for where a form may redirect: an http(s) origin or a custom scheme."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname or "@" in parts.netloc:
            return None
        origin = f"{scheme}://{parts.netloc.lower()}"
        return origin if _ORIGIN.match(origin) else None
    source = f"{scheme}:"
    if not scheme or scheme in _NEVER_SCHEMES or not _SCHEME.match(source):
        return None
    return source


def content_security_policy(form_action: Iterable[str] = ()) -> str:
    """The CSP of every interactive page; `form_action` adds redirect targets of form posts."""
    extra = []
    for url in form_action:
        source = csp_source(url)
        if source is not None and source not in extra:
            extra.append(source)
    sources = " ".join(["'self'", *extra])
    return (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        f"form-action {sources}; frame-ancestors 'none'; base-uri 'none'"
    )


def security_headers(form_action: Iterable[str] = ()) -> dict[str, str]:
    """Headers every interactive page carries (DESIGN §7.5, R13, R14)."""
    return {
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": content_security_policy(form_action),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


def html_page(body: str, status: int = 200, *, form_action: Iterable[str] = ()) -> web.Response:
    """An HTML response with the interactive-page security headers.

    `form_action`: URLs whose origin (or custom scheme) a form POST on this page may redirect to,
    e.g. the upstream authorization endpoint after consent, the client's redirect URI after TOTP.
    """
    resp = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    resp.headers.update(security_headers(form_action))
    return resp
