"""Harness for the MCP proxy tests: a gateway app in front of a tiny aiohttp peer on loopback.

`upstream_peer` is an aiohttp server that records every request it receives (method, raw path,
headers, body) and answers with whatever `peer.handler` does (a JSON-RPC echo by default), so a
test can script SSE streams, stalls, resets and session ids. `make_gateway(...)` writes a config
(`tests.fixtures.config.make_config`) whose resources point at the peer, builds a small app with
the shared `AppKey`s, the context and error middlewares and `add_mcp_routes`, and serves it with
aiohttp's test client; `Gateway.token(...)` mints access tokens with the app's own key.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from multidict import CIMultiDictProxy

from gateway.adapters.memory_store import MemoryStore
from gateway.clock import FixedClock, SystemClock
from gateway.core.tokens import build_access_claims, mint_access_token
from gateway.crypto import Sealer
from gateway.keys import KeyRing
from gateway.metrics import Metrics
from gateway.ports import Store
from gateway.settings import Settings, load_settings
from gateway.web.appkeys import CLOCK, COOKIES, HTTP, KEYS, METRICS, SEALER, SETTINGS, STORE
from gateway.web.context import context_middleware, setup_context
from gateway.web.cookies import CookieCodec
from gateway.web.errors import error_middleware
from gateway.web.mcp_routes import MCP_STATE, McpState, add_mcp_routes
from tests.fixtures.config import make_config

PUBLIC = "http://127.0.0.1:8080"
PRM = f"{PUBLIC}/.well-known/oauth-protected-resource/mcp"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as the MCP server saw it."""

    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Peer:
    """A scriptable MCP server stand-in."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    handler: Handler | None = None
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def mcp_url(self) -> str:
        return self.url + "/mcp"

    def last(self) -> Seen:
        assert self.seen, "the MCP server received no request"
        return self.seen[-1]


async def echo(request: web.Request) -> web.StreamResponse:
    """A JSON-RPC result echoing the method (202 for bodies without an id)."""
    if request.method != "POST":
        return web.json_response({"ok": request.method})
    msg = json.loads(await request.read())
    if isinstance(msg, list):
        return web.json_response([{"jsonrpc": "2.0", "id": m.get("id"), "result": {}} for m in msg])
    if "id" not in msg:
        return web.Response(status=202)
    return web.json_response(
        {"jsonrpc": "2.0", "id": msg["id"], "result": {"method": msg.get("method")}}
    )


@pytest.fixture
async def upstream_peer(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> Peer:
    """A loopback MCP server stand-in recording what it receives."""
    peer = Peer()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer.seen.append(Seen(request.method, request.raw_path, request.headers, body))
        handler = peer.handler or echo
        try:
            return await handler(request)
        except (asyncio.CancelledError, ConnectionResetError):
            peer.disconnected.set()
            raise

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    peer.url = str(server.make_url("")).rstrip("/")
    return peer


@dataclass
class Gateway:
    """A gateway app under test and handles on its state."""

    client: TestClient[web.Request, web.Application]
    app: web.Application
    settings: Settings
    store: Store
    clock: FixedClock

    @property
    def keys(self) -> KeyRing:
        return self.app[KEYS]

    @property
    def state(self) -> McpState:
        return self.app[MCP_STATE]

    def token(
        self,
        *,
        sub: str = "alice",
        audience: str = PUBLIC + "/mcp",
        scope: str = "mcp",
        amr: Any = ("pwd", "otp", "mfa"),
        auth_time: float | None = None,
        ttl: float = 600,
        gid: str | None = "grant-1",
        client_id: str = "client-1",
        **extra: Any,
    ) -> str:
        """An access token signed by this gateway's active key."""
        now = self.clock.now()
        claims = build_access_claims(
            issuer=self.settings.issuer,
            sub=sub,
            audience=audience,
            client_id=client_id,
            scope=scope,
            auth_time=now - 60 if auth_time is None else auth_time,
            amr=["x"],
            acr="urn:mfa-gateway:totp",
            gid=gid or "",
            now=now,
            ttl=ttl,
        )
        if gid is None:
            del claims["gid"]
        claims["amr"] = list(amr) if isinstance(amr, tuple) else amr
        claims.update(extra)
        return mint_access_token(claims, self.keys.active)

    def auth(self, token: str | None = None, **headers: str) -> dict[str, str]:
        """Headers of an authenticated JSON-RPC POST."""
        out = {
            "Authorization": "Bearer " + (token or self.token()),
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        }
        out.update(headers)
        return out

    async def ready(self) -> None:
        """Wait until the revocation feed is current (the proxy fails closed before)."""
        async with asyncio.timeout(5):
            await self.state.revocations.wait_current()


def build_test_app(settings: Settings, store: Store, clock: FixedClock) -> web.Application:
    """The shared keys, the context and error middlewares, and the MCP routes."""
    app = web.Application(middlewares=[context_middleware, error_middleware])
    app[SETTINGS] = settings
    app[STORE] = store
    app[CLOCK] = clock
    app[KEYS] = KeyRing.from_settings(settings)
    app[SEALER] = Sealer(settings.store.encryption_key_bytes)
    app[COOKIES] = CookieCodec(b"x" * 32, secure=False)
    app[METRICS] = Metrics()
    setup_context(app)

    async def http(app: web.Application) -> AsyncIterator[None]:
        app[HTTP] = aiohttp.ClientSession()
        yield
        await app[HTTP].close()

    app.cleanup_ctx.append(http)
    add_mcp_routes(app)
    return app


MakeGateway = Callable[..., Awaitable[Gateway]]


class NoCancellationServer(TestServer):
    """A test server whose runner does not cancel handlers of vanished clients (like the CLI)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs["handler_cancellation"] = False
        return await super()._make_runner(**kwargs)


@pytest.fixture
async def make_gateway(
    tmp_path: Path,
    upstream_peer: Peer,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> MakeGateway:
    """`await make_gateway(resources=..., policy=..., store=..., **config)` -> a ready Gateway.

    `setup(app)` runs before the app starts (e.g. to append a cleanup context);
    `handler_cancellation=False` serves it like the CLI does (handlers are not cancelled when
    their client disconnects).
    """
    counter = 0

    async def factory(
        *,
        resources: list[dict[str, Any]] | None = None,
        policy: dict[str, Any] | None = None,
        store: Store | None = None,
        clock: FixedClock | None = None,
        wait_ready: bool = True,
        setup: Callable[[web.Application], None] | None = None,
        handler_cancellation: bool = True,
        **overrides: Any,
    ) -> Gateway:
        nonlocal counter
        counter += 1
        directory = tmp_path / f"gw{counter}"
        directory.mkdir()
        path = make_config(
            directory,
            resources=resources or [{"path": "/mcp", "upstream": upstream_peer.mcp_url}],
            policy=policy or {},
            **overrides,
        )
        settings = load_settings(path)
        the_clock = clock or FixedClock(SystemClock().now())
        the_store: Store = store if store is not None else MemoryStore(the_clock)
        app = build_test_app(settings, the_store, the_clock)
        if setup is not None:
            setup(app)
        client = await aiohttp_client(app if handler_cancellation else NoCancellationServer(app))
        gw = Gateway(client=client, app=app, settings=settings, store=the_store, clock=the_clock)
        if wait_ready:
            await gw.ready()
        return gw

    return factory


async def eventually(predicate: Callable[[], bool], within: float = 3.0) -> None:
    """Wait until `predicate()` holds (state another task updates), or fail after `within`."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polling state owned by another task
            await asyncio.sleep(0.01)


def challenge(
    error: str | None = None,
    description: str | None = None,
    *,
    scope: str | None = "mcp",
    prm: str = PRM,
    **extra: str,
) -> str:
    """The exact `WWW-Authenticate` value the gateway sends."""
    params: list[tuple[str, str]] = []
    if error:
        params.append(("error", error))
        if description:
            params.append(("error_description", description))
    if scope:
        params.append(("scope", scope))
    params.extend(extra.items())
    params.append(("resource_metadata", prm))
    return "Bearer " + ", ".join(f'{k}="{v}"' for k, v in params)


def rpc(method: str, id: int | str | None = 1, **params: Any) -> dict[str, Any]:
    """A JSON-RPC request (a notification when `id` is None)."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        msg["id"] = id
    if params:
        msg["params"] = params
    return msg


def tool_call(name: str, id: int = 1, **arguments: Any) -> dict[str, Any]:
    """A tools/call request."""
    return rpc("tools/call", id, name=name, arguments=arguments)
