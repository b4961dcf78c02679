"""Per-request context: request id, log context, the one `request_finished` line, metrics.

The middleware is the outermost one. It gives every request a fresh id (returned as
`X-Request-Id`; an incoming one is taken only from a trusted proxy and only if it is a short
token), binds `request_id`, `route` (the canonical route, never the raw path or query, which can
carry codes), `method` and the client `ip` into structlog's contextvars, and after the handler
returned (for a stream: after the stream ended) logs `request_finished` and updates the request
counter and latency histogram. Label values are bounded: unknown methods become `OTHER`,
unrouted requests `unmatched`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
import uuid

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.web.appkeys import METRICS, SETTINGS

log = structlog.get_logger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_IP = web.RequestKey("client_ip", str)

_INCOMING_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


def route_name(request: web.Request) -> str:
    """The canonical name of the matched resource (e.g. `/mcp{tail}`), or `unmatched`."""
    resource = request.match_info.route.resource
    if resource is None:
        return UNMATCHED
    return resource.canonical or UNMATCHED


def _method_label(method: str) -> str:
    return method if method in _METHODS else "OTHER"


def _parse_ip(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip().strip("[]")))
    except ValueError:
        return None


def _trust_forwarded(request: web.Request) -> bool:
    settings = request.config_dict.get(SETTINGS)
    return settings is not None and settings.server.trust_forwarded_headers


def client_ip(request: web.Request) -> str:
    """The client's IP: the peer, or behind a trusted proxy the last `X-Forwarded-For` entry."""
    known: str | None = request.get(CLIENT_IP)
    if known is not None:
        return known
    ip: str | None = None
    if _trust_forwarded(request):
        forwarded = request.headers.getall("X-Forwarded-For", [])
        entries = [e for h in forwarded for e in h.split(",") if e.strip()]
        if entries:
            ip = _parse_ip(entries[-1])
    if ip is None:
        ip = _parse_ip(request.remote or "") or "unknown"
    return ip


def request_id(request: web.Request) -> str:
    """This request's id (set by the middleware; a fresh one if called outside it)."""
    rid = request.get(REQUEST_ID)
    if rid is None:
        rid = uuid.uuid4().hex
        request[REQUEST_ID] = rid
    return rid


def _new_request_id(request: web.Request) -> str:
    incoming = request.headers.get("X-Request-Id")
    if incoming and _INCOMING_ID.match(incoming) and _trust_forwarded(request):
        return incoming
    return uuid.uuid4().hex


@web.middleware
async def context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind the request context, run the handler, log `request_finished`, count the request."""
    rid = _new_request_id(request)
    request[REQUEST_ID] = rid
    ip = client_ip(request)
    request[CLIENT_IP] = ip
    route = route_name(request)
    method = _method_label(request.method)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=rid, route=route, method=method, ip=ip)
    start = time.perf_counter()
    status = 500
    outcome = "error"
    try:
        response = await handler(request)
        status = response.status
        outcome = "ok"
        if not response.prepared:
            response.headers["X-Request-Id"] = rid
        return response
    except web.HTTPException as exc:
        status = exc.status
        outcome = "ok"
        exc.headers["X-Request-Id"] = rid
        raise
    except asyncio.CancelledError:
        status = 499
        outcome = "cancelled"
        raise
    finally:
        elapsed = time.perf_counter() - start
        metrics = request.config_dict.get(METRICS)
        if metrics is not None:
            metrics.requests.labels(route, method, str(status)).inc()
            metrics.latency.labels(route).observe(elapsed)
        level = log.warning if status >= 500 and status != 503 else log.info
        level(
            "request_finished",
            status=status,
            duration_ms=round(elapsed * 1000, 3),
            outcome=outcome,
        )
        structlog.contextvars.clear_contextvars()


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: every response, streams included, carries `X-Request-Id`."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-Id"] = rid


def setup_context(app: web.Application) -> None:
    """Install the `X-Request-Id` response hook (the middleware itself is in `build_app`)."""
    app.on_response_prepare.append(add_request_id_header)
