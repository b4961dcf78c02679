"""The official MCP SDK client, with its OAuth support, driven end to end in tests.

`oauth_mcp_client(url, useragent=...)` builds `mcp.client.auth.OAuthClientProvider` (mcp 2.3.0)
with an in-memory `TokenStorage`, a redirect handler that hands the authorization URL to the
scripted browser (`tests.e2e.useragent.UserAgent`) and a callback handler returning the
``code``/``state``/``iss`` it reached, puts it on an ``httpx2.AsyncClient`` under the SDK's
streamable HTTP transport and yields a connected `mcp.Client` (its ``.session`` is the initialised
`ClientSession`). The SDK does everything else itself: the 401, RFC 9728/8414 discovery,
dynamic registration, PKCE, ``resource``, the token request and the retried MCP request.

`redirect_handler=`/`callback_handler=` replace the scripted browser with another one (the
Chromium suite drives a real browser and listens on a loopback port like a native client).

`plain_mcp_client(url)` is the same client without OAuth, and `totp_code` computes the code an
authenticator app would show for a known secret.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx2
import pyotp
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider, OAuthFlowError
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from pydantic import AnyUrl

from tests.e2e.useragent import Answer, AuthorizationResponse, UserAgent

# A loopback redirect URI (RFC 8252 §7.3): nothing listens there, the user agent stops before it.
DEFAULT_REDIRECT_URI = "http://127.0.0.1:33418/callback"
HTTP_TIMEOUT = httpx2.Timeout(30.0, read=60.0)


class InMemoryTokenStorage:
    """`mcp.client.auth.TokenStorage` kept in memory for one test."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@dataclass
class BrowserBridge:
    """Connects the SDK's redirect/callback handlers to the scripted browser."""

    useragent: UserAgent
    answers: Mapping[str, Answer] = field(default_factory=dict)
    authorization_urls: list[str] = field(default_factory=list)
    responses: list[AuthorizationResponse] = field(default_factory=list)

    async def redirect_handler(self, authorization_url: str) -> None:
        """The SDK "opens the browser": the user agent runs the whole interactive flow."""
        self.authorization_urls.append(authorization_url)
        self.responses.append(
            await self.useragent.authorize(authorization_url, answers=self.answers)
        )

    async def callback_handler(self) -> AuthorizationCodeResult:
        """The SDK "receives the redirect": what the user agent reached."""
        if not self.responses:
            raise OAuthFlowError("the user agent did not reach the redirect URI")
        response = self.responses[-1]
        if response.error is not None or response.code is None:
            raise OAuthFlowError(f"authorization failed: {response.error}")
        return AuthorizationCodeResult(code=response.code, state=response.state, iss=response.iss)


@dataclass
class OAuthMcpConnection:
    """A connected SDK client and what its OAuth flow went through."""

    client: Client
    storage: InMemoryTokenStorage
    bridge: BrowserBridge | None
    provider: OAuthClientProvider

    @property
    def session(self) -> ClientSession:
        return self.client.session


def client_metadata(
    redirect_uri: str = DEFAULT_REDIRECT_URI,
    *,
    client_name: str = "e2e test client",
    scope: str | None = None,
) -> OAuthClientMetadata:
    """What the SDK registers (RFC 7591): a native public client with a loopback redirect."""
    return OAuthClientMetadata(
        redirect_uris=[AnyUrl(redirect_uri)],
        client_name=client_name,
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method="none",
        scope=scope,
    )


@asynccontextmanager
async def oauth_mcp_client(
    url: str,
    *,
    useragent: UserAgent | None = None,
    answers: Mapping[str, Answer] | None = None,
    metadata: OAuthClientMetadata | None = None,
    storage: InMemoryTokenStorage | None = None,
    mode: str = "auto",
    read_timeout: float = 30.0,
    redirect_handler: Callable[[str], Awaitable[None]] | None = None,
    callback_handler: Callable[[], Awaitable[AuthorizationCodeResult]] | None = None,
) -> AsyncIterator[OAuthMcpConnection]:
    """Connect the SDK client to `url`, authorizing through `useragent` when challenged (or
    through the given `redirect_handler`/`callback_handler` pair, with `metadata`).

    `mode` is the SDK's: ``"auto"`` (2026-07-28 ``server/discover``, falling back to
    ``initialize``) or ``"legacy"`` (the ``initialize`` handshake with a session id).
    """
    store = storage if storage is not None else InMemoryTokenStorage()
    bridge: BrowserBridge | None = None
    if redirect_handler is None or callback_handler is None:
        if useragent is None or redirect_handler is not None or callback_handler is not None:
            raise TypeError("give a useragent, or both redirect_handler and callback_handler")
        bridge = BrowserBridge(useragent, dict(answers or {}))
        redirect_handler, callback_handler = bridge.redirect_handler, bridge.callback_handler
    if metadata is None:
        if useragent is None:
            raise TypeError("metadata (with the redirect URI) is needed without a useragent")
        metadata = client_metadata(useragent.redirect_uri)
    provider = OAuthClientProvider(
        server_url=url,
        client_metadata=metadata,
        storage=store,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )
    async with httpx2.AsyncClient(auth=provider, timeout=HTTP_TIMEOUT) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=read_timeout) as client:
            yield OAuthMcpConnection(client, store, bridge, provider)


@asynccontextmanager
async def plain_mcp_client(
    url: str,
    *,
    mode: str = "auto",
    headers: Mapping[str, str] | None = None,
    read_timeout: float = 30.0,
) -> AsyncIterator[Client]:
    """The SDK client without OAuth (optionally with fixed headers, e.g. a bearer token)."""
    async with httpx2.AsyncClient(headers=dict(headers or {}), timeout=HTTP_TIMEOUT) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=read_timeout) as client:
            yield client


def totp_code(
    secret: str,
    *,
    at: float | None = None,
    digits: int = 6,
    period: int = 30,
    digest: str = "sha1",
) -> str:
    """The TOTP code for `secret` (base32) at time `at` (default: now), as an app shows it."""
    totp = pyotp.TOTP(secret, digits=digits, interval=period, digest=getattr(hashlib, digest))
    return str(totp.at(int(at))) if at is not None else str(totp.now())
