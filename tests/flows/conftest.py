"""Fixtures of the authorization-facade flow suite: the real app, both real stores, tiny peers.

`store` is parametrised over the embedded `MemoryStore` and a `RedisStore` on the session's real
`redis-server` (never a mock). `make_harness(**config)` builds the gateway with
`gateway.app.build_app` around that store and a `FixedClock` that starts at the wall-clock time
(so Redis TTLs and token times agree), next to a fake upstream provider (discovery and a token
endpoint whose refresh answer each test picks) and a document server for client-ID metadata
documents. Steps past the upstream login are seeded through the store: a transaction in stage
`done` with a subject, then `issue_code`, exactly as the step-up flow leaves it.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.adapters.memory_store import MemoryStore
from gateway.adapters.redis_store import RedisStore
from gateway.app import build_app
from gateway.clock import FixedClock, SystemClock
from gateway.core.pkce import s256
from gateway.flows.codes import issue_code
from gateway.ports import Json, Store
from gateway.settings import Settings, load_settings
from gateway.web.appkeys import KEYS, METRICS, SEALER
from tests.fixtures.config import merge
from tests.fixtures.redis_server import delete_prefix

REDIRECT = "http://127.0.0.1:5555/callback"
SDK_METADATA: dict[str, Any] = {
    "client_name": "Test MCP client",
    "redirect_uris": [REDIRECT],
    "grant_types": ["authorization_code", "refresh_token"],
    "response_types": ["code"],
    "token_endpoint_auth_method": "none",
    "application_type": "native",
    "scope": "mcp offline_access",
}


def new_verifier() -> str:
    """A fresh PKCE verifier (64 unreserved characters)."""
    return secrets.token_urlsafe(48)


def query_of(location: str) -> dict[str, str]:
    """The query parameters of a redirect target (each must appear once)."""
    pairs = parse_qsl(urlsplit(location).query, keep_blank_values=True)
    out = dict(pairs)
    assert len(out) == len(pairs), f"repeated parameter in {location}"
    return out


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


# --------------------------------------------------------------------------- peers


@dataclass
class FakeUpstream:
    """Discovery and a token endpoint; `refresh_answer` decides what a refresh gets."""

    url: str = ""
    refresh_answer: str = "ok"  # "ok" | "invalid_grant" | "down"
    refreshes: int = 0
    authorize_hits: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        return app

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.url,
                "authorization_endpoint": self.url + "/authorize",
                "token_endpoint": self.url + "/token",
                "jwks_uri": self.url + "/jwks",
            }
        )

    async def _authorize(self, request: web.Request) -> web.Response:
        self.authorize_hits += 1
        return web.Response(text="login page")

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "refresh_token":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        self.refreshes += 1
        if self.refresh_answer == "invalid_grant":
            return web.json_response({"error": "invalid_grant"}, status=400)
        if self.refresh_answer == "down":
            return web.Response(status=502, text="bad gateway")
        return web.json_response(
            {
                "access_token": f"up-at-{self.refreshes}",
                "refresh_token": f"up-rt-{self.refreshes}",
                "token_type": "Bearer",
                "expires_in": 3600,
            }
        )


@dataclass
class DocumentServer:
    """Serves client-ID metadata documents; records every request it sees."""

    url: str = ""
    routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(
        default_factory=dict
    )
    seen: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        return app

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, request.headers.get("Host", "")))
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404)
        return await handler(request)

    def document(self, path: str, doc: dict[str, Any]) -> str:
        """Serve `doc` as JSON at `path`; return its URL."""

        async def serve(request: web.Request) -> web.Response:
            return web.json_response(doc)

        self.routes[path] = serve
        return self.url + path

    def client_document(self, path: str, **fields: Any) -> str:
        """Serve a valid public-client document whose client_id is its own URL."""
        url = self.url + path
        self.document(
            path,
            {"client_id": url, "client_name": "Doc client", "redirect_uris": [REDIRECT], **fields},
        )
        return url


# --------------------------------------------------------------------------- harness


@dataclass
class Harness:
    """One gateway app under test, with its store, clock and peers."""

    client: TestClient[web.Request, web.Application]
    settings: Settings
    store: Store
    clock: FixedClock
    upstream: FakeUpstream
    docs: DocumentServer

    @property
    def app(self) -> web.Application:
        app = self.client.app
        assert app is not None
        return app

    @property
    def issuer(self) -> str:
        return self.settings.issuer

    @property
    def resource(self) -> str:
        return self.settings.resource_url(self.settings.resources[0])

    def metric(self, name: str, **labels: str) -> float:
        value = self.app[METRICS].registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value

    async def register(self, **overrides: Any) -> dict[str, Any]:
        """Register a client like the MCP SDK does (201 expected); the response body."""
        meta = {**SDK_METADATA, **overrides}
        resp = await self.client.post("/oauth/register", json=meta)
        assert resp.status == 201, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    async def authorize(
        self,
        client_id: str,
        *,
        challenge: str | None = None,
        redirect_uri: str | None = REDIRECT,
        **extra: str,
    ) -> aiohttp.ClientResponse:
        params: dict[str, str] = {
            "response_type": "code",
            "client_id": client_id,
            "code_challenge": challenge or s256(new_verifier()),
            "code_challenge_method": "S256",
            "state": "client-state-1",
            "resource": self.resource,
        }
        if redirect_uri is not None:
            params["redirect_uri"] = redirect_uri
        params.update(extra)
        return await self.client.get("/oauth/authorize", params=params, allow_redirects=False)

    def tx_cookie(self) -> str | None:
        for cookie in self.client.session.cookie_jar:
            if cookie.key.endswith("mfagw_tx"):
                return cookie.value
        return None

    async def seed_code(
        self,
        client_id: str,
        verifier: str,
        *,
        redirect_uri: str = REDIRECT,
        scope: str = "mcp offline_access",
        resource: str | None = None,
        sub: str = "alice",
        amr_upstream: list[str] | None = None,
        extra: Json | None = None,
    ) -> tuple[str, str]:
        """A transaction as the step-up leaves it (stage `done`), then `issue_code`."""
        txid = secrets.token_urlsafe(32)
        now = self.clock.now()
        tx: Json = {
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "redirect_uri_sent": True,
            "state": "client-state-1",
            "code_challenge": s256(verifier),
            "scope": scope,
            "resource": resource or self.resource,
            "browser": "b",
            "created_at": now,
            "expires_at": now + 600,
            "stage": "done",
            "sub": sub,
            "auth_time_upstream": now - 5,
            "amr_upstream": amr_upstream if amr_upstream is not None else ["pwd"],
            "consented_at": now,
            **(extra or {}),
        }
        await self.store.put_transaction(txid, tx, 600)
        code = await issue_code(self.store, self.settings, txid, tx, now, metrics=self.app[METRICS])
        return code, txid

    async def token(
        self, form: dict[str, str], *, auth: str | None = None
    ) -> aiohttp.ClientResponse:
        headers = {"Authorization": auth} if auth is not None else {}
        return await self.client.post("/oauth/token", data=form, headers=headers)

    async def redeem(
        self, client_id: str, code: str, verifier: str, **extra: str
    ) -> aiohttp.ClientResponse:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            **extra,
        }
        return await self.token(form)

    async def tokens_for(self, client_id: str, **seed: Any) -> dict[str, Any]:
        """Seed a code and redeem it; the 200 token response."""
        verifier = new_verifier()
        code, _ = await self.seed_code(client_id, verifier, **seed)
        resp = await self.redeem(client_id, code, verifier)
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    @property
    def keys(self) -> Any:
        return self.app[KEYS]

    @property
    def sealer(self) -> Any:
        return self.app[SEALER]


@pytest.fixture
def clock() -> FixedClock:
    """A fixed clock at the real current time (Redis expires keys by real time)."""
    return FixedClock(start=float(int(SystemClock().now())))


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, clock: FixedClock) -> AsyncIterator[Store]:
    """The embedded store and a real Redis store (same contract)."""
    if request.param == "memory":
        memory = MemoryStore(clock)
        yield memory
        await memory.close()
    else:
        url: str = request.getfixturevalue("redis_url")  # the session's real redis-server
        prefix = f"flows-{secrets.token_hex(6)}:"
        redis = RedisStore.from_url(url, clock=SystemClock(), key_prefix=prefix, timeout=2.0)
        try:
            yield redis
        finally:
            await redis.close()
            await delete_prefix(url, prefix)


@pytest.fixture
async def memory_store(clock: FixedClock) -> AsyncIterator[Store]:
    """The embedded store alone, for tests that move the clock past a TTL."""
    memory = MemoryStore(clock)
    yield memory
    await memory.close()


@pytest.fixture
async def fake_upstream(aiohttp_server: AiohttpServer) -> FakeUpstream:
    peer = FakeUpstream()
    server: TestServer = await aiohttp_server(peer.app())
    peer.url = str(server.make_url("")).rstrip("/")
    return peer


@pytest.fixture
async def doc_server(aiohttp_server: AiohttpServer) -> DocumentServer:
    peer = DocumentServer()
    server: TestServer = await aiohttp_server(peer.app())
    peer.url = str(server.make_url("")).rstrip("/")
    return peer


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
def make_harness(
    tmp_path: Path,
    make_config: Callable[..., Path],
    aiohttp_client: AiohttpClient,
    fake_upstream: FakeUpstream,
    doc_server: DocumentServer,
    clock: FixedClock,
) -> HarnessFactory:
    """`await make_harness(store, policy={...}, **gateway_toml_overrides)`."""

    async def factory(store: Store, **overrides: Any) -> Harness:
        upstream = merge({"issuer": fake_upstream.url}, overrides.pop("upstream", {}))
        path = make_config(tmp_path, upstream=upstream, **overrides)
        settings = load_settings(path)
        app = build_app(settings, clock=clock, store=store)
        client = await aiohttp_client(app)
        return Harness(
            client=client,
            settings=settings,
            store=store,
            clock=clock,
            upstream=fake_upstream,
            docs=doc_server,
        )

    return factory
