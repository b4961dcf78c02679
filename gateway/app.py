"""Composition root: `build_app(settings)` wires every concrete class into one aiohttp app.

It sets the shared `AppKey`s of `gateway.web.appkeys`, opens and closes the pooled upstream
`ClientSession` (and the store it opened itself) with `cleanup_ctx`, installs the middlewares
(context outermost, then the error renderer), serves `/healthz`, `/readyz` and `/metrics`, and
lets the route modules add the OAuth and MCP routes with their own state. Nothing here exits or
reads the environment; `cli.py` runs the app.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from gateway.adapters.factory import open_store
from gateway.clock import Clock, SystemClock
from gateway.crypto import Sealer
from gateway.keys import KeyRing
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.ports import Store
from gateway.settings import Settings
from gateway.web.appkeys import CLOCK, COOKIES, HTTP, KEYS, METRICS, SEALER, SETTINGS, STORE
from gateway.web.context import context_middleware, setup_context
from gateway.web.cookies import CookieCodec
from gateway.web.errors import error_middleware
from gateway.web.mcp_routes import add_mcp_routes
from gateway.web.oauth_routes import add_oauth_routes

log = structlog.get_logger(__name__)

# Connection pool for calls to the upstream provider and client-ID metadata documents.
HTTP_POOL_LIMIT = 100
HTTP_POOL_LIMIT_PER_HOST = 32
# How long a readiness verdict on the upstream is reused (a flood of /readyz must not become
# a flood of discovery requests to the upstream).
READY_CACHE_SECONDS = 2.0
_MAX_DISCOVERY_BYTES = 256 * 1024
_NO_STORE = {"Cache-Control": "no-store"}


def discovery_urls(issuer: str) -> list[str]:
    """OpenID discovery first, then RFC 8414 (well-known inserted between host and path)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return [
        issuer.rstrip("/") + "/.well-known/openid-configuration",
        f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}",
    ]


@dataclass
class _Verdict:
    ok: bool
    at: float


class ReadinessProbe:
    """`/readyz` checks: the store answers `ping`, the upstream serves its discovery document."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self._lock = asyncio.Lock()
        self._upstream: _Verdict | None = None

    async def store_ok(self) -> bool:
        """True if the store answered within `store.timeout` (any failure: not ready)."""
        try:
            async with asyncio.timeout(self._settings.store.timeout):
                await self._store.ping()
        except Exception as exc:
            log.warning("store_unavailable", reason=type(exc).__name__)
            return False
        return True

    async def upstream_ok(self, http: aiohttp.ClientSession) -> bool:
        """True if a discovery document (200, JSON object) came back; reused for 2 seconds."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            cached = self._upstream
            if cached is not None and loop.time() - cached.at < READY_CACHE_SECONDS:
                return cached.ok
            ok = await self._probe_upstream(http)
            self._upstream = _Verdict(ok, loop.time())
            return ok

    async def _probe_upstream(self, http: aiohttp.ClientSession) -> bool:
        timeout = aiohttp.ClientTimeout(total=self._settings.upstream.timeout)
        reason = "no discovery document"
        for url in discovery_urls(self._settings.upstream.issuer):
            try:
                async with http.get(
                    url,
                    timeout=timeout,
                    allow_redirects=False,
                    headers={"Accept": "application/json"},
                ) as resp:
                    if resp.status != 200:
                        reason = f"status {resp.status}"
                        continue
                    body = await resp.content.read(_MAX_DISCOVERY_BYTES + 1)
                if len(body) > _MAX_DISCOVERY_BYTES:
                    reason = "discovery document too large"
                    continue
                doc = json.loads(body)
                if not isinstance(doc, dict):
                    reason = "discovery document is not a JSON object"
                elif doc.get("issuer") != self._settings.upstream.issuer:
                    # Logins would fail on the issuer check (RFC 8414 §3.3): not ready.
                    reason = "discovery document names another issuer"
                else:
                    return True
            except TimeoutError:
                reason = "time-out"
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                reason = type(exc).__name__
        log.warning("upstream_unavailable", reason=reason)
        return False


READINESS = web.AppKey("readiness", ReadinessProbe)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves requests."""
    return web.json_response({"status": "ok"}, headers=_NO_STORE)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when store and upstream answer, else 503 naming the failed check."""
    probe = request.app[READINESS]
    store_ok, upstream_ok = await asyncio.gather(
        probe.store_ok(), probe.upstream_ok(request.app[HTTP])
    )
    checks = {
        "store": "ok" if store_ok else "unavailable",
        "upstream": "ok" if upstream_ok else "unavailable",
    }
    ready = store_ok and upstream_ok
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
        headers=_NO_STORE,
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this app's registry."""
    resp = web.Response(body=request.app[METRICS].render(), headers=_NO_STORE)
    resp.headers["Content-Type"] = CONTENT_TYPE
    return resp


def _http_session(settings: Settings) -> aiohttp.ClientSession:
    timeout = settings.upstream.timeout
    connector = aiohttp.TCPConnector(
        limit=HTTP_POOL_LIMIT, limit_per_host=HTTP_POOL_LIMIT_PER_HOST, ttl_dns_cache=300
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=timeout),
        trust_env=False,
    )


def _client_max_size(settings: Settings) -> int:
    """Largest request body any handler may read (the MCP policies' `max_body`, at least 1 MiB)."""
    return max([1024 * 1024, *(p.mcp.max_body for p in settings.policies.values())])


def build_app(
    settings: Settings, *, clock: Clock | None = None, store: Store | None = None
) -> web.Application:
    """The gateway app. A `store` passed in stays the caller's to close; one opened here is
    closed on cleanup. Raises `KeyError`/`ValueError` for unusable signing keys."""
    clock = clock or SystemClock()
    owns_store = store is None
    the_store: Store = open_store(settings, clock) if store is None else store

    app = web.Application(
        middlewares=[context_middleware, error_middleware],
        client_max_size=_client_max_size(settings),
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[STORE] = the_store
    app[SEALER] = Sealer(settings.store.encryption_key_bytes)
    app[KEYS] = KeyRing.from_settings(settings)
    app[COOKIES] = CookieCodec(
        settings.keys.cookie_secret.get_secret_value().encode("utf-8"),
        secure=settings.server.secure_cookies,
    )
    app[METRICS] = Metrics()
    app[READINESS] = ReadinessProbe(settings, the_store)
    setup_context(app)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        app[HTTP] = _http_session(settings)
        try:
            yield
        finally:
            await app[HTTP].close()
            if owns_store:
                await the_store.close()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    add_oauth_routes(app)
    add_mcp_routes(app)
    return app
