"""The authorization flow once in a real browser: headless Chromium driven by the SDK client.

The official MCP SDK client connects to the gateway, is challenged, discovers, registers with a
loopback redirect URI (RFC 8252) on which this test listens like a native client would, and
"opens the browser": its redirect handler hands the authorization URL to Chromium (Python
`playwright`, Debian's ``/usr/bin/chromium``, a fresh profile). The browser approves consent,
signs in at the legacy provider, types the TOTP code, and the gateway's redirect lands on the
loopback listener, whose query the SDK's callback handler returns. Real CSP, cookies and
constraint validation apply: `form-action` must allow each redirect after a form POST, the
`tx` cookie must survive the round trip through the provider, and the TOTP page must refuse to
be framed. Screenshots of the consent and TOTP pages go to ``test-artifacts/`` at the repo root.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from mcp.client.auth import AuthorizationCodeResult, OAuthFlowError
from PIL import Image
from playwright.async_api import BrowserContext, Response, async_playwright

from tests.e2e.mcp_oauth import client_metadata, oauth_mcp_client, totp_code
from tests.e2e.support import new_secret, unverified
from tests.fixtures.gateway import GatewayFactory, RunningGateway
from tests.fixtures.peers import REPO, LegacyIdp, McpServer, free_port

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = REPO / "test-artifacts"
CONSENT_PNG = ARTIFACTS / "browser-consent.png"
TOTP_PNG = ARTIFACTS / "browser-totp.png"
STEP_TIMEOUT_MS = 15_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the native client's
# loopback listener


class LoopbackListener:
    """What a native MCP client runs on 127.0.0.1 to receive the authorization response; it
    also serves a page that tries to frame another URL (the clickjacking probe)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.responses: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self._runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redirect_uri(self) -> str:
        return self.origin + "/callback"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/callback", self._callback)
        app.router.add_get("/frame", self._frame)
        app.router.add_get("/frameable", self._frameable)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _callback(self, request: web.Request) -> web.Response:
        await self.responses.put(dict(request.query))
        return web.Response(
            text="<!doctype html><title>Signed in</title><p id=done>You can close this window.",
            content_type="text/html",
        )

    async def _frame(self, request: web.Request) -> web.Response:
        target = html.escape(request.query["target"], quote=True)
        return web.Response(
            text=(
                "<!doctype html><title>framer</title>"
                '<iframe name="control" src="/frameable"></iframe>'
                f'<iframe name="target" src="{target}"></iframe>'
            ),
            content_type="text/html",
        )

    async def _frameable(self, request: web.Request) -> web.Response:
        return web.Response(
            text='<!doctype html><p id="frameable">framed fine</p>', content_type="text/html"
        )


# --------------------------------------------------------------------------- the browser


@dataclass
class Seen:
    """What the test observed in the browser, for the assertions after the flow."""

    consent_headers: Mapping[str, str] = field(default_factory=dict)
    totp_headers: Mapping[str, str] = field(default_factory=dict)
    totp_url: str = ""
    totp_dom: Mapping[str, Any] = field(default_factory=dict)
    validity: Mapping[str, bool] = field(default_factory=dict)
    control_framed: bool = False
    target_framed: bool = True
    console: list[str] = field(default_factory=list)
    landed: str = ""


@dataclass
class ChromiumBridge:
    """The SDK's redirect and callback handlers, backed by Chromium and the loopback listener."""

    context: BrowserContext
    listener: LoopbackListener
    gw: RunningGateway
    idp: LegacyIdp
    user: str
    secret: str
    seen: Seen = field(default_factory=Seen)

    async def redirect_handler(self, authorization_url: str) -> None:
        """Open the authorization URL and do what the user does, page by page."""
        page = self.context.pages[0] if self.context.pages else await self.context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        consent = await page.goto(authorization_url)
        assert consent is not None
        assert consent.status == 200
        self.seen.consent_headers = await consent.all_headers()
        await page.screenshot(path=str(CONSENT_PNG), full_page=True)

        await page.click('button[name="decision"][value="approve"]')
        await page.wait_for_url(self.idp.issuer + "/interaction/**")
        await page.fill('input[name="username"]', self.user)
        await page.fill('input[name="password"]', self.idp.accounts[self.user])

        def totp_get(response: Response) -> bool:
            return response.request.method == "GET" and response.url.startswith(
                self.gw.url + "/oauth/totp?"
            )

        async with page.expect_response(totp_get) as totp_info:
            await page.click('form[action$="/login"] button[type="submit"]')
        totp = await totp_info.value
        assert totp.status == 200
        await page.wait_for_load_state("load")
        self.seen.totp_headers = await totp.all_headers()
        self.seen.totp_url = page.url
        self.seen.totp_dom = await page.evaluate(_TOTP_DOM)
        self.seen.validity = await page.evaluate(_CODE_VALIDITY, list(_CODES))
        await page.screenshot(path=str(TOTP_PNG), full_page=True)
        await self._try_to_frame(page.url)

        await page.fill('input[name="code"]', totp_code(self.secret))
        await page.click('button[type="submit"]')
        await page.wait_for_url(self.listener.redirect_uri + "?**")
        await page.wait_for_selector("#done")
        self.seen.landed = page.url

    async def _try_to_frame(self, url: str) -> None:
        """Load a page on another origin that frames `url` next to a frameable control page."""
        framer = await self.context.new_page()
        framer.on("console", lambda message: self.seen.console.append(message.text))
        await framer.goto(f"{self.listener.origin}/frame?{urlencode({'target': url})}")
        await framer.wait_for_load_state("load")
        await asyncio.sleep(0.2)  # blocked frames commit their error page asynchronously
        control = framer.frame(name="control")
        target = framer.frame(name="target")
        assert control is not None
        assert target is not None
        self.seen.control_framed = await control.locator("#frameable").count() == 1
        self.seen.target_framed = await _has_code_input(target)
        await framer.close()

    async def callback_handler(self) -> AuthorizationCodeResult:
        """What arrived at the loopback redirect URI."""
        try:
            query = await asyncio.wait_for(self.listener.responses.get(), 10)
        except TimeoutError:
            raise OAuthFlowError("nothing arrived at the loopback redirect URI") from None
        if "code" not in query:
            raise OAuthFlowError(f"authorization failed: {query.get('error')}")
        return AuthorizationCodeResult(
            code=query["code"], state=query.get("state"), iss=query.get("iss")
        )


async def _has_code_input(frame: Any) -> bool:
    try:
        return bool(await frame.locator('input[name="code"]').count())
    except Exception:  # a blocked frame holds Chromium's error page, which may not be queryable
        return False


_TOTP_DOM = """() => {
  const forms = Array.from(document.forms);
  const form = forms[0];
  const code = form.querySelector('input[name="code"]');
  const hidden = Array.from(form.querySelectorAll('input[type="hidden"]'));
  return {
    forms: forms.length,
    method: form.getAttribute('method'),
    action: form.getAttribute('action'),
    named: Array.from(form.elements).filter(e => e.name).map(e => e.name).sort(),
    code_type: code.type,
    autocomplete: code.getAttribute('autocomplete'),
    inputmode: code.getAttribute('inputmode'),
    required: code.required,
    hidden: Object.fromEntries(hidden.map(e => [e.name, e.value])),
    scripts: document.scripts.length,
  };
}"""

# What the browser's own constraint validation says about values typed into `code`.
_CODES = {
    "123456": True,
    "12345678": True,
    "abcd-efgh-2345": True,  # a recovery code goes into the same field
    "12345": False,
    "123456789": False,
    "12a456": False,
    "": False,
}
_CODE_VALIDITY = """(values) => {
  const code = document.querySelector('input[name="code"]');
  const out = {};
  for (const v of values) { code.value = v; out[v] = code.checkValidity(); }
  code.value = '';
  return out;
}"""


@pytest.fixture
async def chromium(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """Headless Debian Chromium with a fresh user-data dir."""
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
        )
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
async def listener() -> AsyncIterator[LoopbackListener]:
    """The native client's loopback redirect listener."""
    lsn = LoopbackListener()
    await lsn.start()
    try:
        yield lsn
    finally:
        await lsn.stop()


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= 200
    assert height >= 100


# --------------------------------------------------------------------------- the test


async def test_chromium_signs_in_for_the_sdk_client_through_consent_login_and_totp(
    gateway_factory: GatewayFactory,
    legacy_idp: LegacyIdp,
    mcp_server: McpServer,
    chromium: BrowserContext,
    listener: LoopbackListener,
) -> None:
    """The SDK client's redirect handler drives Chromium through consent, the upstream password
    login and the TOTP page; the code lands on the client's loopback listener, the SDK gets
    tokens that prove MFA and calls a tool (DESIGN §2, R7, R36). In the real browser the TOTP
    page has one POST form with a `code` input (`autocomplete=one-time-code`, 6-8 digits or a
    recovery code) and hidden `csrf`/`tx` (DESIGN §2.8), and it cannot be framed (R13)."""
    ARTIFACTS.mkdir(exist_ok=True)
    for png in (CONSENT_PNG, TOTP_PNG):
        png.unlink(missing_ok=True)
    gw = await gateway_factory(
        resources=[{"path": "/mcp", "upstream": mcp_server.url, "name": "Demo MCP server"}]
    )
    user, secret = "rupert", new_secret()
    await gw.enroll(user, secret)
    bridge = ChromiumBridge(chromium, listener, gw, legacy_idp, user, secret)
    mark = mcp_server.mark()

    async with oauth_mcp_client(
        gw.resource_url(),
        metadata=client_metadata(listener.redirect_uri, client_name="Chromium e2e client"),
        redirect_handler=bridge.redirect_handler,
        callback_handler=bridge.callback_handler,
    ) as conn:
        tools = await conn.client.list_tools()
        echoed = await conn.client.call_tool("echo", {"text": "from chromium"})
        tokens = conn.storage.tokens

    seen = bridge.seen
    # The flow completed and the client called the MCP server with an MFA token.
    assert seen.landed.startswith(listener.redirect_uri + "?")
    assert {t.name for t in tools.tools} >= {"echo", "whoami"}
    assert echoed.structured_content == {"result": "from chromium"}
    assert mcp_server.tool_runs(since=mark) == ["echo"]
    assert tokens is not None
    _, claims = unverified(tokens.access_token)
    assert claims["sub"] == user
    assert {"pwd", "otp", "mfa"} <= set(claims["amr"])

    # The TOTP page as the browser parsed it (DESIGN §2.8).
    dom = seen.totp_dom
    assert dom["forms"] == 1
    assert dom["method"] == "post"
    assert dom["action"] == "/oauth/totp"
    assert dom["named"] == ["code", "csrf", "tx"]
    assert dom["code_type"] == "text"
    assert dom["autocomplete"] == "one-time-code"
    assert dom["inputmode"] == "numeric"
    assert dom["required"] is True
    assert set(dom["hidden"]) == {"csrf", "tx"}
    assert seen.totp_url.endswith("tx=" + dom["hidden"]["tx"])
    assert dom["hidden"]["csrf"]
    assert dom["scripts"] == 0
    assert seen.validity == _CODES

    # Neither interactive page may be framed, cached or leak a referrer (R13, R14).
    for headers in (seen.consent_headers, seen.totp_headers):
        assert headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["cache-control"] == "no-store"
        assert headers["referrer-policy"] == "no-referrer"
    assert listener.origin in seen.totp_headers["content-security-policy"]
    assert seen.control_framed is True
    assert seen.target_framed is False
    assert any("frame-ancestors" in m or "X-Frame-Options" in m for m in seen.console), seen.console

    # Screenshots for humans, kept as test artifacts.
    _assert_png(CONSENT_PNG)
    _assert_png(TOTP_PNG)
