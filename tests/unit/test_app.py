"""The composition root (`gateway.app`) and the per-request context (`gateway.web.context`)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.adapters.memory_store import MemoryStore
from gateway.app import build_app, discovery_urls
from gateway.clock import FixedClock
from gateway.logs import configure_logging, reset_logging
from gateway.metrics import Metrics
from gateway.settings import Settings, load_settings
from gateway.web.appkeys import HTTP, METRICS, SETTINGS, STORE
from gateway.web.context import client_ip, context_middleware, setup_context
from gateway.web.errors import error_middleware
from tests.fixtures.config import make_config
from tests.fixtures.redis_server import RedisServerProcess, _free_port

AioClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
AioServer = Callable[..., Awaitable[TestServer]]
HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Capture JSON log lines; call the returned function to parse what was logged so far."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buf = io.StringIO()
    configure_logging("debug", "json", buf)
    try:
        yield lambda: [json.loads(li) for li in buf.getvalue().splitlines()]
    finally:
        reset_logging()
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


async def _discovery_server(aiohttp_server: AioServer, *, oidc: bool = True) -> TestServer:
    """A tiny upstream serving a discovery document (OIDC or only RFC 8414)."""

    async def doc(request: web.Request) -> web.Response:
        return web.json_response({"issuer": str(request.url.origin())})

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", doc if oidc else missing)
    app.router.add_get("/.well-known/oauth-authorization-server", doc)
    server: TestServer = await aiohttp_server(app)
    return server


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(make_config(tmp_path, **overrides))


def _dead_port_url() -> str:
    return f"http://127.0.0.1:{_free_port()}"


class TestHealth:
    async def test_healthz(self, aiohttp_client: AioClient, tmp_path: Path) -> None:
        """`/healthz` is 200 `{"status":"ok"}`, uncached, with a request id (DESIGN §6)."""
        settings = _settings(tmp_path)
        client = await aiohttp_client(build_app(settings, store=MemoryStore(FixedClock())))
        resp = await client.get("/healthz")
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
        assert resp.headers["Cache-Control"] == "no-store"
        assert HEX32.match(resp.headers["X-Request-Id"])

    async def test_readyz_ok(
        self, aiohttp_client: AioClient, aiohttp_server: AioServer, tmp_path: Path
    ) -> None:
        """Store answers and discovery is served: 200 with both checks ok (DESIGN §6)."""
        upstream = await _discovery_server(aiohttp_server)
        settings = _settings(tmp_path, upstream={"issuer": str(upstream.make_url("/")).rstrip("/")})
        client = await aiohttp_client(build_app(settings, store=MemoryStore(FixedClock())))
        resp = await client.get("/readyz")
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "checks": {"store": "ok", "upstream": "ok"}}
        assert resp.headers["Cache-Control"] == "no-store"

    async def test_readyz_falls_back_to_rfc8414(
        self, aiohttp_client: AioClient, aiohttp_server: AioServer, tmp_path: Path
    ) -> None:
        """A plain OAuth 2.0 upstream (only RFC 8414 metadata) counts as reachable."""
        upstream = await _discovery_server(aiohttp_server, oidc=False)
        settings = _settings(tmp_path, upstream={"issuer": str(upstream.make_url("/")).rstrip("/")})
        client = await aiohttp_client(build_app(settings, store=MemoryStore(FixedClock())))
        resp = await client.get("/readyz")
        assert resp.status == 200

    async def test_readyz_upstream_down(
        self, aiohttp_client: AioClient, tmp_path: Path, log_lines: Callable[[], list[Any]]
    ) -> None:
        """Upstream unreachable: 503 naming `upstream`, no detail in the body (fail closed)."""
        settings = _settings(tmp_path, upstream={"issuer": _dead_port_url(), "timeout": "1s"})
        client = await aiohttp_client(build_app(settings, store=MemoryStore(FixedClock())))
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert await resp.json() == {
            "status": "unavailable",
            "checks": {"store": "ok", "upstream": "unavailable"},
        }
        events = [li["event"] for li in log_lines()]
        assert "upstream_unavailable" in events

    async def test_readyz_store_down(
        self, aiohttp_client: AioClient, aiohttp_server: AioServer, tmp_path: Path
    ) -> None:
        """A real Redis that stops answering turns `/readyz` into 503 naming `store`."""
        upstream = await _discovery_server(aiohttp_server)
        redis = RedisServerProcess(tmp_path)
        redis.start()
        try:
            settings = _settings(
                tmp_path,
                store={"url": redis.url, "timeout": "500ms"},
                upstream={"issuer": str(upstream.make_url("/")).rstrip("/")},
            )
            client = await aiohttp_client(build_app(settings))
            assert (await client.get("/readyz")).status == 200
            redis.stop()
            resp = await client.get("/readyz")
            assert resp.status == 503
            assert await resp.json() == {
                "status": "unavailable",
                "checks": {"store": "unavailable", "upstream": "ok"},
            }
        finally:
            redis.stop()

    async def test_metrics(self, aiohttp_client: AioClient, tmp_path: Path) -> None:
        """`/metrics` serves this app's registry in Prometheus text format, requests counted."""
        settings = _settings(tmp_path)
        client = await aiohttp_client(build_app(settings, store=MemoryStore(FixedClock())))
        await client.get("/healthz")
        await client.get("/healthz?code=CANARY-query")
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
        assert 'mfagw_http_requests_total{method="GET",route="/healthz",status="200"} 2.0' in text
        assert "mfagw_http_request_duration_seconds_bucket" in text
        assert "CANARY" not in text


class TestWiring:
    async def test_shared_state_and_cleanup(
        self, aiohttp_client: AioClient, tmp_path: Path
    ) -> None:
        """build_app sets the shared keys; the HTTP session is opened and closed with the app."""
        settings = _settings(tmp_path)
        store = MemoryStore(FixedClock())
        app = build_app(settings, store=store)
        assert app[SETTINGS] is settings
        assert app[STORE] is store
        client = await aiohttp_client(app)
        session = app[HTTP]
        assert not session.closed
        assert session.timeout.total == settings.upstream.timeout
        await client.close()
        assert session.closed

    def test_bad_key_file_is_refused(self, tmp_path: Path) -> None:
        """An unreadable signing key stops the app from being built (fail closed on keys)."""
        settings = _settings(tmp_path)
        (tmp_path / "keys" / "es256-1.pem").write_text("not a key", "utf-8")
        with pytest.raises(Exception, match=r"keys\.signing\[0\]\.file"):
            build_app(settings, store=MemoryStore(FixedClock()))

    def test_discovery_urls(self) -> None:
        """OIDC discovery appends; RFC 8414 inserts the well-known before the issuer path."""
        assert discovery_urls("https://idp.example/realms/x") == [
            "https://idp.example/realms/x/.well-known/openid-configuration",
            "https://idp.example/.well-known/oauth-authorization-server/realms/x",
        ]


# --------------------------------------------------------------------------- context middleware


def _context_app(tmp_path: Path | None = None, **server: Any) -> web.Application:
    async def item(request: web.Request) -> web.Response:
        if request.query.get("bind"):
            structlog.contextvars.bind_contextvars(sub="alice")
        structlog.get_logger("t").info("handler_ran")
        return web.json_response({"ip": client_ip(request)})

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: {i}\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application(middlewares=[context_middleware, error_middleware])
    app[METRICS] = Metrics()
    if tmp_path is not None:
        app[SETTINGS] = _settings(tmp_path, server=server)
    setup_context(app)
    app.router.add_get("/items/{id}", item)
    app.router.add_route("*", "/any", item)
    app.router.add_get("/stream", stream)
    return app


def _finished(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [li for li in lines if li["event"] == "request_finished"]


class TestContext:
    async def test_summary_line_uses_the_route_not_the_raw_path(
        self, aiohttp_client: AioClient, log_lines: Callable[[], list[dict[str, Any]]]
    ) -> None:
        """`request_finished` names the canonical route, never the path or query (R35)."""
        client = await aiohttp_client(_context_app())
        resp = await client.get("/items/CANARY-path?code=CANARY-code")
        assert resp.status == 200
        lines = log_lines()
        raw = json.dumps(lines)
        assert "CANARY" not in raw
        (line,) = _finished(lines)
        assert line["route"] == "/items/{id}"
        assert line["method"] == "GET"
        assert line["status"] == 200
        assert line["ip"] == "127.0.0.1"
        assert line["request_id"] == resp.headers["X-Request-Id"]
        assert isinstance(line["duration_ms"], float)
        handler = next(li for li in lines if li["event"] == "handler_ran")
        assert handler["request_id"] == line["request_id"]

    async def test_each_request_gets_a_fresh_context(
        self, aiohttp_client: AioClient, log_lines: Callable[[], list[dict[str, Any]]]
    ) -> None:
        """Context bound in one request never leaks into the next on the same connection."""
        client = await aiohttp_client(_context_app())
        first = await client.get("/items/1?bind=1")
        second = await client.get("/items/2")
        assert first.headers["X-Request-Id"] != second.headers["X-Request-Id"]
        lines = _finished(log_lines())
        assert lines[0]["sub"] == "alice"
        assert "sub" not in lines[1]

    async def test_incoming_request_id_ignored_without_trusted_proxy(
        self, aiohttp_client: AioClient
    ) -> None:
        """A client cannot choose its request id (log correlation spoofing)."""
        client = await aiohttp_client(_context_app())
        resp = await client.get("/items/1", headers={"X-Request-Id": "chosen-by-client"})
        assert HEX32.match(resp.headers["X-Request-Id"])

    @pytest.mark.parametrize(
        ("incoming", "accepted"),
        [
            ("abc-123", True),
            ("a" * 64, True),
            ("a" * 65, False),
            ("a b", False),
            ("x\r\ny", False),
            ("id;drop", False),
        ],
    )
    async def test_incoming_request_id_from_trusted_proxy(
        self, aiohttp_client: AioClient, tmp_path: Path, incoming: str, accepted: bool
    ) -> None:
        """Behind a trusted proxy an id is taken only if it matches ^[A-Za-z0-9-]{1,64}$."""
        client = await aiohttp_client(_context_app(tmp_path, trust_forwarded_headers=True))
        headers = {"X-Request-Id": incoming} if "\n" not in incoming else {}
        resp = await client.get("/items/1", headers=headers)
        rid = resp.headers["X-Request-Id"]
        assert (rid == incoming) is (accepted and bool(headers))
        if not accepted:
            assert HEX32.match(rid)

    async def test_client_ip_ignores_forwarded_for_by_default(
        self, aiohttp_client: AioClient
    ) -> None:
        """X-Forwarded-For is ignored unless the proxy is trusted (lockout evasion)."""
        client = await aiohttp_client(_context_app())
        resp = await client.get("/items/1", headers={"X-Forwarded-For": "203.0.113.9"})
        assert await resp.json() == {"ip": "127.0.0.1"}

    async def test_client_ip_from_trusted_proxy_is_the_last_hop(
        self, aiohttp_client: AioClient, tmp_path: Path
    ) -> None:
        """Behind a trusted proxy the IP it appended (the last entry) is used, not a spoof."""
        client = await aiohttp_client(_context_app(tmp_path, trust_forwarded_headers=True))
        resp = await client.get(
            "/items/1", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
        )
        assert await resp.json() == {"ip": "203.0.113.9"}
        resp = await client.get("/items/1", headers={"X-Forwarded-For": "not-an-ip"})
        assert await resp.json() == {"ip": "127.0.0.1"}

    async def test_streams_are_logged_when_they_end(
        self, aiohttp_client: AioClient, log_lines: Callable[[], list[dict[str, Any]]]
    ) -> None:
        """A streamed response carries X-Request-Id and is logged once, after it ended."""
        client = await aiohttp_client(_context_app())
        resp = await client.get("/stream")
        assert HEX32.match(resp.headers["X-Request-Id"])
        assert await resp.text() == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
        (line,) = _finished(log_lines())
        assert line["route"] == "/stream"
        assert line["status"] == 200
        assert line["request_id"] == resp.headers["X-Request-Id"]

    async def test_metric_labels_are_bounded(self, aiohttp_client: AioClient) -> None:
        """Unknown methods and unrouted paths do not create new label values."""
        app = _context_app()
        client = await aiohttp_client(app)
        await client.request("PROPFIND", "/any")
        await client.get("/nowhere/CANARY")
        text = app[METRICS].render().decode()
        assert 'mfagw_http_requests_total{method="OTHER",route="/any",status="200"} 1.0' in text
        assert 'mfagw_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
        assert "PROPFIND" not in text
        assert "CANARY" not in text
