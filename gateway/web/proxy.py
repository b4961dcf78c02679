"""The streaming reverse proxy toward MCP servers: headers, paths, time-outs, relay.

- Request headers (R26, R33): hop-by-hop fields and every field named in `Connection` are
  removed, so are the client's `Authorization`, `Cookie`, `Origin` and every client-sent identity
  or forwarding field (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`, `X-Remote-User`, ...); the
  gateway then sets `X-Forwarded-For/Proto/Host` itself. MCP fields (`Mcp-Session-Id`,
  `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`, `Last-Event-ID`) pass.
- Paths: the request path must be the resource path or below it, made of plain segments;
  `.`/`..`, empty segments, encoded `/`, `\\`, `.` or control characters are refused, so no
  request can leave the upstream's prefix.
- Relay: the upstream response is streamed chunk by chunk as it arrives (SSE events are never
  buffered) and each write waits for the client to drain (back-pressure). Time-outs: connect,
  response headers, a whole non-streaming body, and idle silence on a stream. A client that
  goes away closes the upstream request. A dead or stalled upstream gives 502/504 with a
  JSON-RPC-shaped body, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes, urlsplit

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

log = structlog.get_logger(__name__)

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# Never forwarded upstream: credentials, framing the proxy recomputes, and identity or
# forwarding claims only the gateway may make.
_STRIP_REQUEST: Final = frozenset(
    {
        "authorization",
        "cookie",
        "cookie2",
        "host",
        "content-length",
        "expect",
        "origin",
        "forwarded",
        "via",
        "x-real-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "remote-user",
        "x-remote-user",
        "x-remote-addr",
        "x-user",
        "x-user-id",
        "x-email",
        "x-preferred-username",
        "x-access-token",
        "x-id-token",
        "x-request-id",
        "x-api-key",
    }
)
_STRIP_REQUEST_PREFIXES: Final = (
    "x-forwarded-",
    "x-original-",
    "x-auth",
    "x-remote-",
    "x-user-",
    "x-mfa",
    "x-gateway",
    "x-identity",
    "x-authenticated",
    "x-webauth",
    "x-proxy",
    "x-amzn-oidc",
    "x-goog-authenticated",
    "x-ms-client-principal",
    "x-ssl-client",
    "x-client-cert",
    "x-forwarded",
)
_STRIP_RESPONSE: Final = frozenset(
    {
        "content-length",
        "set-cookie",
        "set-cookie2",
        "server",
        "date",
        "www-authenticate",
        "alt-svc",
    }
)
SESSION_HEADER: Final = "Mcp-Session-Id"
# MCP-TR "Session Management": visible ASCII only.
_SESSION_ID = re.compile(r"^[\x21-\x7e]{1,256}$")
_PCHAR = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*$")
_QUERY = re.compile(r"^[\x21-\x7e]*$")
DISCONNECT_POLL: Final = 5.0
# Non-stream bodies up to this size with a Content-Length are relayed in one piece.
SMALL_BODY: Final = 64 * 1024


class ProxyError(Exception):
    """The upstream could not be reached or did not answer in time (502 / 504)."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def valid_session_id(value: str) -> bool:
    return _SESSION_ID.fullmatch(value) is not None


def confine_path(raw_path: str, prefix: str) -> str | None:
    """The part of the raw request path below `prefix` ("" or "/seg/..."), or None if refused.

    `raw_path` is the request target's path as received (still percent-encoded).
    """
    if prefix == "/":
        rest = raw_path
        if not rest.startswith("/"):
            return None
        if rest == "/":
            return ""
    else:
        if raw_path == prefix:
            return ""
        if not raw_path.startswith(prefix + "/"):
            return None
        rest = raw_path[len(prefix) :]
    segments = rest[1:].split("/")
    for i, seg in enumerate(segments):
        if seg == "" and i != len(segments) - 1:
            return None  # "//": an empty segment
        if not _PCHAR.fullmatch(seg):
            return None
        decoded = unquote_to_bytes(seg)
        if (
            decoded in (b".", b"..")
            or any(c in decoded for c in b"/\\")
            or any(c < 0x20 or c == 0x7F for c in decoded)
        ):
            return None
    return rest


def upstream_url(base: str, rest: str, query: str) -> URL | None:
    """`base` (the resource's upstream URL) + the confined path + the raw query string."""
    if query and not _QUERY.fullmatch(query):
        return None
    text = base.rstrip("/") + rest if rest else base
    if query:
        text += "?" + query
    return URL(text, encoded=True)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def _strip_request_field(name: str) -> bool:
    lname = name.lower()
    return (
        lname in HOP_BY_HOP or lname in _STRIP_REQUEST or lname.startswith(_STRIP_REQUEST_PREFIXES)
    )


def forward_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    client_ip: str,
    proto: str,
    host: str,
) -> CIMultiDict[str]:
    """The headers sent upstream: the client's minus everything stripped, plus X-Forwarded-*."""
    named = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if _strip_request_field(name) or name.lower() in named:
            continue
        out.add(name, value)
    out["X-Forwarded-For"] = client_ip
    out["X-Forwarded-Proto"] = proto
    out["X-Forwarded-Host"] = host
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop, cookies and framing."""
    named = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in _STRIP_RESPONSE or lname in named:
            continue
        out.add(name, value)
    return out


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds: TCP connect, until response headers, a whole non-stream body, stream silence."""

    connect: float
    headers: float
    body: float
    idle: float

    @property
    def client(self) -> aiohttp.ClientTimeout:
        """Connect time-outs, and `sock_read` = the longest silence allowed on a response."""
        return aiohttp.ClientTimeout(
            total=None, connect=self.connect, sock_connect=self.connect, sock_read=self.idle
        )


def new_upstream_session(*, limit: int = 10_000) -> aiohttp.ClientSession:
    """One pooled session per upstream: no cookies kept (they would mix users), no env proxy,
    no transparent decompression (bytes are relayed as they came)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ttl_dns_cache=300),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _is_stream(resp: aiohttp.ClientResponse) -> bool:
    ctype = resp.headers.get("Content-Type", "")
    return ctype.split(";", 1)[0].strip().lower() == "text/event-stream"


OnResponse = Callable[[aiohttp.ClientResponse], Awaitable[None]]


async def open_upstream(
    session: aiohttp.ClientSession,
    *,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    body: bytes | None,
    timeouts: Timeouts,
    client_timeout: aiohttp.ClientTimeout | None = None,
) -> aiohttp.ClientResponse:
    """Send the request and wait for the response headers; `ProxyError` on failure."""
    try:
        async with asyncio.timeout(timeouts.headers):
            return await session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=client_timeout or timeouts.client,
            )
    except aiohttp.ConnectionTimeoutError:
        raise ProxyError(
            504, "The MCP server did not accept the connection in time", "upstream_connect_timeout"
        ) from None
    except TimeoutError:
        raise ProxyError(504, "The MCP server did not answer in time", "upstream_timeout") from None
    except (aiohttp.ClientError, OSError):
        raise ProxyError(502, "The MCP server is unreachable", "upstream_unreachable") from None


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    *,
    timeouts: Timeouts,
    streams: StreamRegistry | None = None,
) -> web.StreamResponse:
    """Relay `upstream`'s response to the client; always releases `upstream`."""
    complete = False
    try:
        streaming = _is_stream(upstream)
        length = upstream.content_length
        if not streaming and length is not None and length <= SMALL_BODY:
            # A small body of announced length (a JSON-RPC answer) is read whole, under the
            # body deadline, and sent in one write; streams and chunked bodies never are.
            try:
                async with asyncio.timeout(timeouts.body):
                    data = await upstream.content.readexactly(length)
            except TimeoutError:
                raise ProxyError(
                    504, "The MCP server did not answer in time", "upstream_timeout"
                ) from None
            except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError):
                raise ProxyError(
                    502, "The MCP server broke off its answer", "upstream_broke"
                ) from None
            complete = True
            return web.Response(
                status=upstream.status,
                reason=upstream.reason,
                body=data,
                headers=response_headers(upstream.headers),
            )
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        resp.headers.extend(response_headers(upstream.headers))
        if length is not None and not streaming:
            resp.content_length = length
        try:
            await resp.prepare(request)
        except ConnectionResetError:
            log.info("proxy_stream_closed", reason="client_gone")
            return resp  # aiohttp finishes (and forgets) a response to a vanished client
        # Streams have no deadline (idle silence is the client session's `sock_read`); a large
        # or chunked ordinary body must arrive within the body deadline.
        deadline = contextlib.nullcontext() if streaming else asyncio.timeout(timeouts.body)
        entry = streams.add(request, upstream) if streams is not None else None
        try:
            async with deadline:
                complete = await _pump(request, upstream.content, resp)
        except TimeoutError:
            log.warning("proxy_stream_closed", reason="upstream_body_timeout")
        finally:
            if streams is not None and entry is not None:
                streams.discard(entry)
        if complete:
            try:
                await resp.write_eof()
            except ConnectionResetError:
                log.info("proxy_stream_closed", reason="client_gone")
        else:
            # A stream cut short must not look complete to the client.
            with contextlib.suppress(Exception):
                if request.transport is not None:
                    request.transport.close()
        return resp
    finally:
        if complete:
            upstream.release()
        else:
            upstream.close()


async def _pump(
    request: web.Request, content: aiohttp.StreamReader, resp: web.StreamResponse
) -> bool:
    """Copy chunks as they arrive; True when the upstream body ended normally."""
    while True:
        try:
            chunk = await content.readany()
        except aiohttp.ServerTimeoutError:
            log.warning("proxy_stream_closed", reason="upstream_idle_timeout")
            return False
        except (aiohttp.ClientError, OSError):
            reason = "client_gone" if _client_gone(request) else "upstream_broke"
            log.info("proxy_stream_closed", reason=reason)
            return False
        if not chunk:
            return True
        try:
            await resp.write(chunk)  # waits for the client to drain: back-pressure
        except ConnectionResetError:
            log.info("proxy_stream_closed", reason="client_gone")
            return False


class StreamRegistry:
    """The responses being relayed, so that one sweeper (not a timer per stream) can close the
    upstream side of streams whose client has gone away.

    Needed when the server runs without aiohttp's handler cancellation; with it, a vanished
    client cancels the handler at once and the relay closes its upstream in `finally`.
    """

    def __init__(self) -> None:
        self._active: dict[int, tuple[web.Request, aiohttp.ClientResponse]] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._active)

    def add(self, request: web.Request, upstream: aiohttp.ClientResponse) -> int:
        self._next += 1
        self._active[self._next] = (request, upstream)
        return self._next

    def discard(self, entry: int) -> None:
        self._active.pop(entry, None)

    def sweep(self) -> int:
        """Close the upstream of every stream whose client is gone; how many were closed."""
        gone = [(k, up) for k, (req, up) in self._active.items() if _client_gone(req)]
        for key, upstream in gone:
            self._active.pop(key, None)
            upstream.close()  # wakes the relay's pending read with an error
        return len(gone)

    async def run(self, interval: float) -> None:
        """Sweep every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.sweep()


def upstream_origin(url: str) -> str:
    """`scheme://host:port` of an upstream URL (one pooled session per origin)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()
