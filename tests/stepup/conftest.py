"""Fixtures of the step-up suite: settings, both real stores, the fake provider and a gateway.

`store` is parametrised over the embedded `MemoryStore` and a `RedisStore` on the session's
real `redis-server` (never a mock). `Gateway` wires the step-up routes into a small app with
the shared app keys and the real middlewares, and drives a transaction the way the authorize
and consent steps leave it.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpServer

from gateway.adapters.memory_store import MemoryStore
from gateway.adapters.redis_store import RedisStore
from gateway.clock import FixedClock
from gateway.core import totp
from gateway.core.pkce import s256
from gateway.crypto import Sealer, generate_encryption_key
from gateway.flows.enrollment import Enrollment, enroll_user
from gateway.flows.upstream_login import begin_upstream_login
from gateway.metrics import Metrics
from gateway.ports import Json, Store
from gateway.settings import (
    KeySettings,
    LoggingSettings,
    Policy,
    ResourceSettings,
    ServerSettings,
    Settings,
    StepUpPolicy,
    StoreSettings,
    UpstreamSettings,
)
from gateway.web.appkeys import CLOCK, COOKIES, HTTP, METRICS, SEALER, SETTINGS, STORE
from gateway.web.context import setup_context
from gateway.web.cookies import CookieCodec
from gateway.web.errors import error_middleware
from gateway.web.stepup_handlers import UPSTREAM, add_stepup_routes
from tests.fixtures.redis_server import delete_prefix
from tests.stepup.fake_idp import FakeIdp

PUBLIC_URL = "http://127.0.0.1:8080"
CLIENT_REDIRECT = "http://127.0.0.1:5555/callback"
RESOURCE = PUBLIC_URL + "/mcp"
START = 1_800_000_000.0


def make_settings(
    issuer: str,
    *,
    store_url: str = "memory://",
    stepup: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
) -> Settings:
    """Settings for one test: http loopback, one resource, the default policy adjusted."""
    up: dict[str, Any] = {
        "issuer": issuer,
        "client_id": "gw",
        "client_secret": "s3cret",
        "allow_insecure_http_loopback": True,
        "timeout": 1.0,
        "scopes": ("openid", "profile"),
        "id_token_algs": ("ES256",),
    }
    up.update(upstream or {})
    return Settings(
        server=ServerSettings(public_url=PUBLIC_URL, dev_http_loopback=True),
        store=StoreSettings(url=store_url, encryption_key=generate_encryption_key()),
        upstream=UpstreamSettings(**up),
        resources=(ResourceSettings(path="/mcp", upstream="http://127.0.0.1:9/mcp", name="Tools"),),
        keys=KeySettings(cookie_secret="c" * 40, dev_generate=True),
        logging=LoggingSettings(),
        policies={"default": Policy(stepup=StepUpPolicy(**(stepup or {})))},
        authorization_policy="default",
        config_path=Path("/nonexistent/gateway.toml"),
    )


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(START)


@pytest.fixture
async def idp(aiohttp_server: AiohttpServer, clock: FixedClock) -> FakeIdp:
    fake = FakeIdp(clock)
    server = await aiohttp_server(fake.app)
    fake.issuer = str(server.make_url("")).rstrip("/")
    return fake


StoreFactory = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["memory", "redis"])
async def store_factory(
    request: pytest.FixtureRequest, clock: FixedClock
) -> AsyncIterator[StoreFactory]:
    """Opens stores of one kind; every Redis store of a test shares one fresh key prefix (so
    two "replicas" see the same state), deleted afterwards."""
    opened: list[Store] = []
    prefix = f"stepup-{secrets.token_hex(6)}:"
    redis_url: str | None = None
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_url")
    memory: MemoryStore | None = None

    async def factory() -> Store:
        nonlocal memory
        if redis_url is None:
            if memory is None:
                memory = MemoryStore(clock)
                opened.append(memory)
            return memory
        store = RedisStore.from_url(redis_url, clock=clock, key_prefix=prefix, timeout=2.0)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()
    if redis_url is not None:
        await delete_prefix(redis_url, prefix)


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    return await store_factory()


class Gateway:
    """The step-up routes of one gateway instance, with helpers to drive a transaction."""

    def __init__(self, settings: Settings, store: Store, clock: FixedClock, idp: FakeIdp) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.idp = idp
        self.sealer = Sealer(settings.store.encryption_key_bytes)
        self.cookies = CookieCodec(
            settings.keys.cookie_secret.get_secret_value().encode(), secure=False
        )
        self.metrics = Metrics()
        app = web.Application(middlewares=[error_middleware])
        app[SETTINGS] = settings
        app[CLOCK] = clock
        app[STORE] = store
        app[SEALER] = self.sealer
        app[COOKIES] = self.cookies
        app[METRICS] = self.metrics
        setup_context(app)

        async def http(app: web.Application) -> AsyncIterator[None]:
            app[HTTP] = aiohttp.ClientSession()
            yield
            await app[HTTP].close()

        app.cleanup_ctx.append(http)
        add_stepup_routes(app)
        self.app = app
        self.client: TestClient[web.Request, web.Application] = TestClient(TestServer(app))

    async def start(self) -> None:
        await self.client.start_server()

    async def close(self) -> None:
        await self.client.close()

    @property
    def policy(self) -> StepUpPolicy:
        return self.settings.global_policy.stepup

    def cookie(self, txid: str) -> dict[str, str]:
        """The `Cookie` header of the browser that holds transaction `txid`."""
        value = self.cookies.sign(txid, purpose="tx", expires_at=self.clock.now() + 600)
        return {"Cookie": f"{self.cookies.name('tx')}={value}"}

    async def new_transaction(self, **fields: Any) -> tuple[str, Json, str]:
        """A transaction as consent leaves it; returns (txid, tx, upstream authorize URL)."""
        now = self.clock.now()
        txid = secrets.token_urlsafe(32)
        tx: Json = {
            "client_id": "client-1",
            "client_name": "Test Client",
            "redirect_uri": CLIENT_REDIRECT,
            "redirect_uri_sent": True,
            "state": "client-state-1",
            "code_challenge": s256("v" * 50),
            "scope": "mcp",
            "resource": RESOURCE,
            "browser": secrets.token_urlsafe(16),
            "created_at": now,
            "expires_at": now + 600,
            "stage": "upstream",
        }
        tx.update(fields)
        await self.store.put_transaction(txid, tx, 600)
        url = await begin_upstream_login(
            self.store, self.app[UPSTREAM], self.settings, txid, tx, now
        )
        return txid, tx, url

    async def upstream_redirect(self, authorize_url: str) -> dict[str, str]:
        """Follow the upstream authorize URL (real HTTP): the callback's query parameters."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(authorize_url, allow_redirects=False) as resp,
        ):
            assert resp.status == 303
            location = resp.headers["Location"]
        assert location.startswith(PUBLIC_URL + "/oauth/callback?")
        return dict(parse_qsl(urlsplit(location).query))

    async def callback(self, params: dict[str, str], txid: str | None) -> aiohttp.ClientResponse:
        headers = self.cookie(txid) if txid is not None else {}
        return await self.client.get(
            "/oauth/callback", params=params, headers=headers, allow_redirects=False
        )

    async def login(self, **fields: Any) -> str:
        """A transaction driven through the callback to stage totp/enroll; its txid."""
        txid, _, url = await self.new_transaction(**fields)
        resp = await self.callback(await self.upstream_redirect(url), txid)
        assert resp.status == 303, await resp.text()
        assert resp.headers["Location"] == f"/oauth/totp?tx={txid}"
        return txid

    async def page(self, txid: str) -> aiohttp.ClientResponse:
        return await self.client.get("/oauth/totp", params={"tx": txid}, headers=self.cookie(txid))

    def csrf(self, txid: str, form: str = "totp") -> str:
        return self.cookies.csrf_token(f"{form}:{txid}")

    async def submit(
        self,
        txid: str,
        code: str,
        *,
        csrf: str | None = "auto",
        ip: str | None = None,
        cookie: bool = True,
        form: str = "totp",
    ) -> aiohttp.ClientResponse:
        data = {"tx": txid, "code": code}
        if csrf == "auto":
            data["csrf"] = self.csrf(txid, form)
        elif csrf is not None:
            data["csrf"] = csrf
        headers = self.cookie(txid) if cookie else {}
        if ip is not None:
            headers["X-Forwarded-For"] = ip
        return await self.client.post(
            "/oauth/totp", data=data, headers=headers, allow_redirects=False
        )

    async def enroll(self, user: str = "alice") -> Enrollment:
        return await enroll_user(
            self.store, self.sealer, self.policy, user, secret=None, now=self.clock.now()
        )

    def code(self, secret: str, offset: int = 0) -> str:
        """The TOTP code of the current time step + `offset`."""
        step = totp.time_step(self.clock.now(), self.policy.period) + offset
        return totp.code_at_step(
            secret, step, digits=self.policy.digits, algorithm=self.policy.algorithm
        )


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(
    store_factory: StoreFactory, clock: FixedClock, idp: FakeIdp
) -> AsyncIterator[GatewayFactory]:
    """Start gateway instances: `await make_gateway(stepup={...}, upstream={...})`. Instances
    of one test share the store (one MemoryStore, or one Redis key prefix)."""
    started: list[Gateway] = []

    async def factory(
        *,
        stepup: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
        trust_forwarded: bool = True,
    ) -> Gateway:
        settings = make_settings(idp.issuer, stepup=stepup, upstream=upstream)
        if trust_forwarded:
            server = settings.server.model_copy(update={"trust_forwarded_headers": True})
            settings = dataclasses.replace(settings, server=server)
        if started:  # replicas share the encryption key and cookie secret
            first = started[0].settings
            settings = dataclasses.replace(settings, store=first.store, keys=first.keys)
        gw = Gateway(settings, await store_factory(), clock, idp)
        await gw.start()
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        await gw.close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()
