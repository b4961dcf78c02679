"""The whole authorization flow against gateway processes, for fault and replica tests.

A public client registers (RFC 7591), the scripted user agent (`tests.e2e.useragent`) runs
authorize → consent → upstream login → TOTP, the client redeems the code at `/oauth/token`.
`RoutedUserAgent` is that user agent behind a load balancer: every request to the deployment's
public origin (or any replica's) is sent to a replica chosen per request, while cookies stay
in one jar exactly as a browser keeps them for one host name. `TotpDevice` is the user's
authenticator app: it hands out codes for strictly increasing time steps, never one the gateway
has already burned, so several flows of one user in one test stay honest.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx

from gateway.clock import SystemClock
from tests.e2e.mcp_oauth import DEFAULT_REDIRECT_URI, totp_code
from tests.e2e.useragent import Answer, AuthorizationResponse, Page, UserAgent
from tests.fixtures.peers import LegacyIdp

_UA = TypeVar("_UA", bound=UserAgent)

# A fixed base32 seed (160 bits) so the tests compute what an authenticator app shows.
ALICE_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
HTTP_TIMEOUT = 15.0
MCP_ACCEPT = "application/json, text/event-stream"
# What a browser sends on a navigation: the gateway answers such requests with HTML pages.
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def legacy_upstream(idp: LegacyIdp) -> dict[str, Any]:
    """The `[upstream]` table for the session's legacy provider."""
    return {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
        "token_endpoint_auth_method": "client_secret_basic",
        "allow_insecure_http_loopback": True,
        "timeout": "5s",
    }


def browser(ua: _UA) -> _UA:
    """`ua` sending a browser's `Accept` header (navigations get HTML, not JSON)."""
    ua.client.headers["Accept"] = BROWSER_ACCEPT
    return ua


class TotpDevice:
    """An authenticator app for one seed: codes for strictly increasing steps, never stale.

    A code is always for the current step or the next one (both inside the gateway's window of
    one step), never for the previous step, which could fall out of the window on its way.
    """

    def __init__(self, secret: str, *, period: int = 30, window: int = 1) -> None:
        self.secret = secret
        self.period = period
        self.window = window
        self.used: list[int] = []

    def _current(self) -> int:
        return int(SystemClock().now() // self.period)

    def _next_step(self) -> int:
        last = self.used[-1] if self.used else -1
        return max(last + 1, self._current())

    def code(self) -> str:
        """The next unused code (marked used); fails if none is usable right now."""
        step = self._next_step()
        assert step <= self._current() + self.window, "no fresh TOTP code yet: await ready()"
        self.used.append(step)
        return totp_code(self.secret, at=step * self.period, period=self.period)

    def peek(self) -> str:
        """The code `code()` would give, without using it up."""
        step = self._next_step()
        return totp_code(self.secret, at=step * self.period, period=self.period)

    def replay(self) -> str:
        """The code of the last step used (a replay)."""
        assert self.used, "no code used yet"
        return totp_code(self.secret, at=self.used[-1] * self.period, period=self.period)

    async def ready(self, count: int = 1) -> None:
        """Wait until `count` more codes can be used without waiting in between."""
        # Waiting for wall-clock time to pass, not for another task: nothing to signal.
        while self._next_step() + count - 1 > self._current() + self.window:  # noqa: ASYNC110
            await asyncio.sleep(0.2)


def answers(idp: LegacyIdp, device: TotpDevice, user: str = "alice") -> dict[str, Answer]:
    """What the user types: upstream password, consent approval, TOTP code."""
    return {
        "username": user,
        "password": idp.accounts[user],
        "decision": "approve",
        "code": device.code,
    }


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Authorization:
    """One authorization request a client prepared (its PKCE verifier and state)."""

    url: str
    state: str
    verifier: str
    redirect_uri: str
    resource: str


@dataclass(frozen=True)
class RegisteredClient:
    """A public client registered at the gateway (dynamic registration)."""

    client_id: str
    redirect_uri: str

    def authorization(self, public_url: str, *, resource_path: str = "/mcp") -> Authorization:
        """A fresh authorization request: PKCE S256, state, resource."""
        verifier = secrets.token_urlsafe(48)
        state = secrets.token_urlsafe(16)
        resource = public_url + resource_path
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_uri,
                "code_challenge": _challenge(verifier),
                "code_challenge_method": "S256",
                "state": state,
                "scope": "mcp",
                "resource": resource,
            }
        )
        return Authorization(
            url=f"{public_url}/oauth/authorize?{query}",
            state=state,
            verifier=verifier,
            redirect_uri=self.redirect_uri,
            resource=resource,
        )

    def token_form(self, auth: Authorization, code: str) -> dict[str, str]:
        return {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": auth.verifier,
            "redirect_uri": auth.redirect_uri,
            "client_id": self.client_id,
            "resource": auth.resource,
        }


async def register_client(
    base_url: str, redirect_uri: str = DEFAULT_REDIRECT_URI
) -> RegisteredClient:
    """RFC 7591 registration of a native public client (what the MCP SDK registers)."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        resp = await http.post(
            base_url + "/oauth/register",
            json={
                "redirect_uris": [redirect_uri],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "application_type": "native",
                "client_name": "fault test client",
            },
        )
    assert resp.status_code == 201, resp.text
    return RegisteredClient(client_id=resp.json()["client_id"], redirect_uri=redirect_uri)


async def redeem(
    base_url: str, client: RegisteredClient, auth: Authorization, code: str
) -> httpx.Response:
    """POST /oauth/token (authorization_code) to `base_url`."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        return await http.post(base_url + "/oauth/token", data=client.token_form(auth, code))


async def tokens_for(
    base_url: str, client: RegisteredClient, auth: Authorization, response: AuthorizationResponse
) -> dict[str, Any]:
    """Check the authorization response and redeem its code; the token response body."""
    assert response.error is None, response.params
    assert response.state == auth.state
    assert response.code is not None
    resp = await redeem(base_url, client, auth, response.code)
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    body: dict[str, Any] = resp.json()
    return body


def rpc(method: str, id: int = 1, **params: Any) -> dict[str, Any]:
    """A JSON-RPC request."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params:
        msg["params"] = params
    return msg


async def mcp_post(
    url: str, token: str | None, body: object, *, headers: Mapping[str, str] | None = None
) -> httpx.Response:
    """One JSON-RPC POST to an MCP path with a bearer token (the response read whole)."""
    sent = {"Content-Type": "application/json", "Accept": MCP_ACCEPT, **(headers or {})}
    if token is not None:
        sent["Authorization"] = "Bearer " + token
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        return await http.post(url, json=body, headers=sent)


class RoutedUserAgent(UserAgent):
    """The scripted browser behind a load balancer: each request to one of `backends` (or the
    public origin) goes to the backend `route(method, path)` picks (round robin by default).
    `routes` records (method, path, backend) of every request the balancer forwarded."""

    def __init__(
        self,
        *,
        public_url: str,
        backends: Sequence[str],
        route: Callable[[str, str], str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.origins = {_origin(public_url), *(_origin(b) for b in backends)}
        cycle = itertools.cycle(backends)
        self.route = route or (lambda method, path: next(cycle))
        self.routes: list[tuple[str, str, str]] = []
        self.pinned: str | None = None  # when set, every request goes to this backend

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: Mapping[str, str] | list[tuple[str, str]] | None = None,
    ) -> Page:
        parts = urlsplit(url)
        if _origin(url) in self.origins:
            backend = self.pinned or self.route(method, parts.path)
            target = urlsplit(backend)
            url = urlunsplit((target.scheme, target.netloc, parts.path, parts.query, ""))
            self.routes.append((method, parts.path, backend))
        return await super().request(method, url, data=data)

    async def submit_via(self, backend: str, page: Page, code: str) -> Page:
        """Post `page`'s form with `code` typed in, through `backend`."""
        form = page.form()
        assert form is not None, "no form on the page"
        self.pinned = backend
        try:
            return await self.request("POST", form.action, data=self.fill(form, {"code": code}))
        finally:
            self.pinned = None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def rewrite_origin(url: str, base: str) -> str:
    """`url` with its scheme and host:port replaced by `base`'s."""
    parts, target = urlsplit(url), urlsplit(base)
    return urlunsplit((target.scheme, target.netloc, parts.path, parts.query, parts.fragment))
