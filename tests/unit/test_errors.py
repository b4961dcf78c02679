"""The one error renderer (`gateway.web.errors`) and the HTML page helpers (`gateway.web.pages`)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.core.errors import (
    AccessDenied,
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidToken,
    MissingToken,
    OAuthError,
    StoreUnavailable,
    UpstreamUnavailable,
)
from gateway.logs import configure_logging, reset_logging
from gateway.settings import load_settings
from gateway.web.appkeys import SETTINGS
from gateway.web.context import context_middleware
from gateway.web.errors import (
    bearer_challenge,
    error_middleware,
    html_error,
    jsonrpc_error,
    oauth_json_error,
    redirect_error,
)
from gateway.web.pages import (
    content_security_policy,
    csp_source,
    html_page,
    render,
    render_page,
    safe,
)
from tests.fixtures.config import make_config

AioClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
PRM = "https://gw.example/.well-known/oauth-protected-resource/mcp"
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
CANARY = "CANARY-internal-detail-7781"


def _json(resp: web.Response) -> Any:
    assert resp.body is not None
    assert isinstance(resp.body, bytes)
    return json.loads(resp.body)


def _assert_page_headers(headers: Any, csp: str = CSP) -> None:
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Content-Security-Policy"] == csp
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Content-Type-Options"] == "nosniff"


class TestOAuthJson:
    def test_body_status_and_no_store(self) -> None:
        """RFC 6749 §5.2 body, the error's status, `Cache-Control: no-store` (R19)."""
        resp = oauth_json_error(InvalidGrant("code expired"))
        assert resp.status == 400
        assert _json(resp) == {"error": "invalid_grant", "error_description": "code expired"}
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.content_type == "application/json"
        assert "WWW-Authenticate" not in resp.headers

    def test_invalid_client_with_basic_gets_a_basic_challenge(self) -> None:
        """`invalid_client` after HTTP Basic: 401 + `WWW-Authenticate: Basic` (R19)."""
        resp = oauth_json_error(InvalidClient("bad credentials"), basic_auth_used=True)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="mfa-gateway"'
        assert _json(resp) == {"error": "invalid_client", "error_description": "bad credentials"}

    def test_invalid_client_without_basic_has_no_challenge(self) -> None:
        """Without the Authorization header no Basic challenge is sent (R19)."""
        resp = oauth_json_error(InvalidClient())
        assert resp.status == 401
        assert "WWW-Authenticate" not in resp.headers
        assert _json(resp) == {"error": "invalid_client"}


class TestRedirectError:
    def test_error_state_and_iss(self) -> None:
        """303 to the verified URI with `error`, `error_description`, `state`, `iss` (R11, R14)."""
        resp = redirect_error(
            "https://client.example/cb",
            AccessDenied("user denied"),
            state="s 1",
            iss="https://gw.example",
        )
        assert resp.status == 303
        assert resp.headers["Location"] == (
            "https://client.example/cb?error=access_denied&error_description=user+denied"
            "&state=s+1&iss=https%3A%2F%2Fgw.example"
        )
        assert resp.headers["Cache-Control"] == "no-store"

    def test_keeps_client_query_and_omits_absent_state(self) -> None:
        """The client's own query is kept (RFC 6749 §3.1.2); no `state` when there was none."""
        resp = redirect_error(
            "http://127.0.0.1:5000/cb?x=1", InvalidRequest(), state=None, iss="https://gw"
        )
        assert resp.headers["Location"] == (
            "http://127.0.0.1:5000/cb?x=1&error=invalid_request&iss=https%3A%2F%2Fgw"
        )


class TestBearerChallenge:
    def test_missing_token_has_no_error(self) -> None:
        """No credentials: 401 and a challenge without `error` (RFC 6750 §3.1, R3, R29)."""
        resp = bearer_challenge(MissingToken(), resource_metadata=PRM)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == f'Bearer resource_metadata="{PRM}"'
        assert _json(resp) == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": -32001, "message": "authentication required"},
        }

    def test_invalid_token(self) -> None:
        """`invalid_token` → 401 with error, description and resource_metadata (R27, R29)."""
        resp = bearer_challenge(InvalidToken("token expired"), resource_metadata=PRM)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == (
            f'Bearer error="invalid_token", error_description="token expired", '
            f'resource_metadata="{PRM}"'
        )
        assert resp.headers["Cache-Control"] == "no-store"

    def test_insufficient_scope(self) -> None:
        """`insufficient_scope` → 403 with `scope` and `resource_metadata` (R29)."""
        resp = bearer_challenge(
            InsufficientScope("needs admin", scope="mcp admin"), resource_metadata=PRM
        )
        assert resp.status == 403
        assert resp.headers["WWW-Authenticate"] == (
            f'Bearer error="insufficient_scope", error_description="needs admin", '
            f'scope="mcp admin", resource_metadata="{PRM}"'
        )

    def test_step_up(self) -> None:
        """RFC 9470: `insufficient_user_authentication` with `max_age` and `acr_values` (R30)."""
        err = InsufficientUserAuthentication(
            "a fresh TOTP step-up is required", max_age=900, acr_values="urn:mfa-gateway:totp"
        )
        resp = bearer_challenge(err, resource_metadata=PRM)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == (
            'Bearer error="insufficient_user_authentication", '
            'error_description="a fresh TOTP step-up is required", max_age="900", '
            f'acr_values="urn:mfa-gateway:totp", resource_metadata="{PRM}"'
        )

    def test_quotes_cannot_break_the_header(self) -> None:
        """A `"` or `\\` in a value is escaped, CR/LF dropped: no header injection."""
        err = InsufficientScope("x", scope='a"b\\c\r\nX-Evil: 1')
        value = bearer_challenge(err, resource_metadata=PRM).headers["WWW-Authenticate"]
        assert 'scope="a\\"b\\\\cX-Evil: 1"' in value
        assert "\r" not in value
        assert "\n" not in value


def test_jsonrpc_error() -> None:
    """A JSON-RPC 2.0 error with the request's id and `no-store`."""
    resp = jsonrpc_error(400, -32600, "Invalid Request", id=7)
    assert resp.status == 400
    assert _json(resp) == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": -32600, "message": "Invalid Request"},
    }
    assert resp.headers["Cache-Control"] == "no-store"


class TestPages:
    def test_render_escapes_every_value(self) -> None:
        """Values are HTML-escaped, attribute quotes included (XSS)."""
        html = render("error", title="<b>", message='"><script>alert(1)</script>', request_id="r&1")
        assert "<script>" not in html
        assert "&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "&lt;b&gt;" in html
        assert "r&amp;1" in html

    def test_safe_is_not_escaped_twice(self) -> None:
        """`safe()` markup is inserted as is (used for nesting rendered templates)."""
        page = render_page("error", title="T", message="m", request_id="r")
        assert page.startswith("<!doctype html>")
        assert "<h1>T</h1>" in page
        assert render("base", title="t", content=safe("<p>x</p>")).count("<p>x</p>") == 1

    def test_missing_value_is_an_error(self) -> None:
        """A placeholder without a value raises instead of rendering an empty hole."""
        with pytest.raises(KeyError):
            render("error", title="t")

    @pytest.mark.parametrize("name", ["../error", "error.html", "Error", ""])
    def test_template_names_are_checked(self, name: str) -> None:
        """Only plain template names are loaded (no path traversal)."""
        with pytest.raises(ValueError, match="invalid template name"):
            render(name)

    def test_page_has_no_script_and_no_third_party(self) -> None:
        """Pages carry no JavaScript and load nothing from elsewhere (R14)."""
        page = render_page("error", title="t", message="m", request_id="r")
        assert "<script" not in page.lower()
        assert "http://" not in page
        assert "https://" not in page
        assert 'name="referrer" content="no-referrer"' in page

    def test_html_page_headers(self) -> None:
        """Every interactive page: no framing, no caching, no referrer, strict CSP (R13, R14)."""
        resp = html_page("<p>x</p>", status=200)
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.charset == "utf-8"
        _assert_page_headers(resp.headers)

    def test_form_action_sources(self) -> None:
        """`form_action` adds the origins/schemes a form POST may redirect to, nothing else."""
        csp = content_security_policy(
            [
                "https://IdP.example:8443/authorize?x=1",
                "http://127.0.0.1:5173/cb",
                "com.example.app:/cb",
                "https://idp.example:8443/other",
                "javascript:alert(1)",
                "https://user@evil.example/",
            ]
        )
        assert csp == (
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self' "
            "https://idp.example:8443 http://127.0.0.1:5173 com.example.app:; "
            "frame-ancestors 'none'; base-uri 'none'"
        )

    @pytest.mark.parametrize(
        ("url", "source"),
        [
            ("https://IdP.example:8443/a?b", "https://idp.example:8443"),
            ("http://127.0.0.1:5173/cb", "http://127.0.0.1:5173"),
            ("com.example.app:/cb", "com.example.app:"),
            ("https://user@evil.example/", None),
            ("javascript:alert(1)", None),
            ("data:text/html,x", None),
            ("https://exa mple/", None),
            ("https:///nohost", None),
            ("", None),
        ],
    )
    def test_csp_source(self, url: str, source: str | None) -> None:
        """Only well-formed origins and schemes become CSP sources (no CSP injection)."""
        assert csp_source(url) == source


# --------------------------------------------------------------------------- middleware


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    """Capture JSON log lines for the test; restore logging afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buf = io.StringIO()
    configure_logging("debug", "json", buf)
    try:
        yield buf
    finally:
        reset_logging()
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def _app(exc: BaseException | None, tmp_path: Path | None = None) -> web.Application:
    async def boom(request: web.Request) -> web.Response:
        assert exc is not None
        raise exc

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        raise RuntimeError(CANARY)

    app = web.Application(middlewares=[context_middleware, error_middleware])
    if tmp_path is not None:
        app[SETTINGS] = load_settings(make_config(tmp_path))
    app.router.add_get("/boom", boom)
    app.router.add_post("/boom", boom)
    app.router.add_get("/mcp", boom)
    app.router.add_get("/stream", stream)
    return app


class TestErrorMiddleware:
    async def test_oauth_error_becomes_json(self, aiohttp_client: AioClient) -> None:
        """An `OAuthError` escaping a handler is rendered as RFC 6749 JSON (STYLE §4.2)."""
        client = await aiohttp_client(_app(InvalidGrant("bad code")))
        resp = await client.post("/boom")
        assert resp.status == 400
        assert await resp.json() == {"error": "invalid_grant", "error_description": "bad code"}
        assert resp.headers["Cache-Control"] == "no-store"

    @pytest.mark.parametrize(
        "exc", [StoreUnavailable("redis down"), UpstreamUnavailable("idp timeout")]
    )
    async def test_outage_is_503_json(self, aiohttp_client: AioClient, exc: Exception) -> None:
        """Store or upstream failure → 503 `temporarily_unavailable`: fail closed (DESIGN §7.8)."""
        client = await aiohttp_client(_app(exc))
        resp = await client.post("/boom", headers={"Accept": "application/json"})
        assert resp.status == 503
        assert await resp.json() == {
            "error": "temporarily_unavailable",
            "error_description": "the service is temporarily unavailable",
        }
        assert resp.headers["Cache-Control"] == "no-store"

    async def test_outage_in_browser_is_an_html_page(self, aiohttp_client: AioClient) -> None:
        """A browser (Accept: text/html) gets a 503 page with the page security headers."""
        client = await aiohttp_client(_app(StoreUnavailable("down")))
        resp = await client.get("/boom", headers={"Accept": "text/html,*/*"})
        assert resp.status == 503
        assert resp.content_type == "text/html"
        _assert_page_headers(resp.headers)
        body = await resp.text()
        assert "Temporarily unavailable" in body
        assert resp.headers["X-Request-Id"] in body

    async def test_fault_is_a_bare_500(
        self, aiohttp_client: AioClient, log_buffer: io.StringIO
    ) -> None:
        """Anything else: generic 500 without detail; traceback only in the log (R35)."""
        client = await aiohttp_client(_app(RuntimeError(CANARY)))
        resp = await client.get("/boom")
        assert resp.status == 500
        assert await resp.json() == {"error": "server_error", "error_description": "internal error"}
        assert CANARY not in await resp.text()
        lines = [json.loads(li) for li in log_buffer.getvalue().splitlines()]
        unhandled = [li for li in lines if li["event"] == "unhandled_error"]
        assert len(unhandled) == 1
        assert unhandled[0]["exception"][0]["exc_type"] == "RuntimeError"
        assert unhandled[0]["request_id"] == resp.headers["X-Request-Id"]

    async def test_fault_in_browser_is_a_page(self, aiohttp_client: AioClient) -> None:
        """A browser gets the generic 500 as a page, without detail and never a redirect."""
        client = await aiohttp_client(_app(RuntimeError(CANARY)))
        resp = await client.get("/boom", headers={"Accept": "text/html"}, allow_redirects=False)
        assert resp.status == 500
        assert "Location" not in resp.headers
        _assert_page_headers(resp.headers)
        assert CANARY not in await resp.text()

    async def test_http_exceptions_pass_through(self, aiohttp_client: AioClient) -> None:
        """aiohttp's own HTTP exceptions (404, 405) are not turned into 500s."""
        client = await aiohttp_client(_app(web.HTTPForbidden()))
        assert (await client.get("/boom")).status == 403
        assert (await client.get("/nowhere")).status == 404
        assert (await client.delete("/boom")).status == 405

    async def test_bearer_error_on_a_resource_path_is_a_challenge(
        self, aiohttp_client: AioClient, tmp_path: Path
    ) -> None:
        """A `BearerError` escaping on a resource path gets the RFC 9728 challenge (R3)."""
        client = await aiohttp_client(_app(InvalidToken("bad signature"), tmp_path))
        resp = await client.get("/mcp")
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == (
            'Bearer error="invalid_token", error_description="bad signature", '
            'resource_metadata="http://127.0.0.1:8080/.well-known/oauth-protected-resource/mcp"'
        )

    async def test_error_after_stream_started_is_not_rendered(
        self, aiohttp_client: AioClient, log_buffer: io.StringIO
    ) -> None:
        """Once a stream sent bytes no second response is written; the connection is cut."""
        client = await aiohttp_client(_app(None))
        resp = await client.get("/stream")
        assert resp.status == 200
        with pytest.raises(Exception) as info:  # noqa: PT011 - the client sees a broken stream
            await resp.read()
        assert CANARY not in str(info.value)
        assert "unhandled_error" in log_buffer.getvalue()


def test_html_error_page() -> None:
    """`html_error` names the problem, shows the request id, never redirects (R8, R13)."""
    from aiohttp.test_utils import make_mocked_request

    request = make_mocked_request("GET", "/oauth/authorize")
    resp = html_error(request, "Unknown client", "The client <x> is not registered.", 400)
    assert resp.status == 400
    assert "Location" not in resp.headers
    _assert_page_headers(resp.headers)
    assert resp.text is not None
    assert "The client &lt;x&gt; is not registered." in resp.text


def test_oauth_error_types_have_their_wire_codes() -> None:
    """Each typed error renders its own code and status (sanity of the renderer's input)."""
    cases: list[tuple[OAuthError, int, str]] = [
        (InvalidRequest(), 400, "invalid_request"),
        (AccessDenied(), 403, "access_denied"),
        (InvalidClient(), 401, "invalid_client"),
    ]
    for err, status, code in cases:
        resp = oauth_json_error(err)
        assert (resp.status, _json(resp)["error"]) == (status, code)
