"""Tiny misbehaving peers on loopback, each in its own thread with its own event loop.

The gateway under test is a separate process, so the peers must answer whatever the test's
own event loop is doing; running them on a private loop in a thread also lets one peer serve
a whole test module. Behaviour is switched by plain attributes between tests.

- `TinyIdp`: an upstream provider just good enough to log alice in (discovery, an authorization
  endpoint that redirects straight back with a code, a token endpoint issuing an ES256-signed ID
  token with the right nonce, JWKS), whose discovery and token answers can be switched to junk:
  HTML, arrays, truncated JSON, wrong issuer, 5xx, error JSON, bad signatures, a dropped
  connection, or a stall. `gate` holds token answers until the test releases them.
- `RawMcpPeer`: an HTTP/1.1 server written by hand (asyncio streams), so it can do what no
  framework does on purpose: stall before the status line, cut a chunked SSE stream in the
  middle of an event, fall silent mid-stream, reset, or answer with bytes that are not HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from gateway.clock import SystemClock

_T = TypeVar("_T")
STALL_SECONDS = 3600.0
# Text that must never travel from a junk upstream answer to a user, a client or a log line.
JUNK_MARKER = "junk-marker-7f3a"


class PeerLoop:
    """An event loop running in a daemon thread; `run(coro)` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="junk-peer-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# --------------------------------------------------------------------------- upstream provider


@dataclass
class TinyIdp:
    """A scriptable upstream provider; `discovery` and `token` name the current behaviour."""

    client_id: str = "mfa-gateway"
    subject: str = "alice"
    discovery: str = "ok"
    token: str = "ok"
    url: str = ""
    token_requests: int = 0
    token_requested: threading.Event = field(default_factory=threading.Event)
    _gate: asyncio.Event | None = None
    _codes: dict[str, str] = field(default_factory=dict)
    _key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    _runner: web.AppRunner | None = None
    _loop: PeerLoop | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self, loop: PeerLoop) -> TinyIdp:
        self._loop = loop
        loop.run(self._start())
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/.well-known/oauth-authorization-server", self._discovery)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.2
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            self._loop.run(self._runner.cleanup())

    # ---------------------------------------------------------------- test controls

    def hold_tokens(self) -> None:
        """Token answers wait until `release_tokens()`."""
        assert self._loop is not None

        async def make() -> None:
            self._gate = asyncio.Event()

        self._loop.run(make())

    def release_tokens(self) -> None:
        assert self._loop is not None
        gate = self._gate
        if gate is not None:
            self._loop.call(gate.set)

    def reset(self) -> None:
        """Back to a well-behaved provider."""
        self.discovery = "ok"
        self.token = "ok"
        self.token_requests = 0
        self.token_requested.clear()
        self.release_tokens()
        self._gate = None

    # ---------------------------------------------------------------- endpoints

    def _metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "authorization_endpoint": self.url + "/authorize",
            "token_endpoint": self.url + "/token",
            "jwks_uri": self.url + "/jwks",
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "authorization_response_iss_parameter_supported": True,
        }

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        return await _junk_or(self.discovery, request, lambda: self._metadata())

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        """The user "logs in" at once: back to the redirect URI with a code and our issuer."""
        q = request.query
        code = secrets.token_urlsafe(16)
        self._codes[code] = q.get("nonce", "")
        params = {"code": code, "state": q.get("state", ""), "iss": self.url}
        raise web.HTTPFound(q["redirect_uri"] + "?" + urlencode(params))

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = dict(parse_qsl((await request.read()).decode()))
        self.token_requests += 1
        self.token_requested.set()
        if self._gate is not None:
            await self._gate.wait()
        nonce = self._codes.pop(form.get("code", ""), None)
        if self.token == "ok" and nonce is None:
            return web.json_response({"error": "invalid_grant"}, status=400)
        if self.token == "forged":
            return web.json_response(self._tokens(nonce or "", key=_other_key()))
        return await _junk_or(self.token, request, lambda: self._tokens(nonce or ""))

    def _tokens(self, nonce: str, *, key: ec.EllipticCurvePrivateKey | None = None) -> object:
        now = int(SystemClock().now())
        id_token = jwt.encode(
            {
                "iss": self.url,
                "aud": self.client_id,
                "sub": self.subject,
                "nonce": nonce,
                "iat": now,
                "exp": now + 300,
                "auth_time": now,
                "amr": ["pwd"],
            },
            key or self._key,
            algorithm="ES256",
            headers={"kid": "tiny-1"},
        )
        return {
            "access_token": "upstream-at-" + secrets.token_urlsafe(12),
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": id_token,
        }

    async def _jwks(self, request: web.Request) -> web.Response:
        jwk = json.loads(ECAlgorithm.to_jwk(self._key.public_key()))
        jwk.update(kid="tiny-1", alg="ES256", use="sig")
        return web.json_response({"keys": [jwk]})


def _other_key() -> ec.EllipticCurvePrivateKey:
    """A key the provider never published (an ID token signed with it is forged)."""
    return ec.generate_private_key(ec.SECP256R1())


async def _junk_or(
    mode: str, request: web.Request, good: Callable[[], object]
) -> web.StreamResponse:
    """Answer per `mode`: the good document, or one kind of junk."""
    if mode == "ok":
        return web.json_response(good())
    if mode == "html":
        return web.Response(
            text=f"<html><body>{JUNK_MARKER}</body></html>", content_type="text/html"
        )
    if mode == "array":
        return web.json_response([JUNK_MARKER])
    if mode == "truncated":
        return web.Response(
            text='{"access_token": "' + JUNK_MARKER, content_type="application/json"
        )
    if mode == "status_500":
        return web.Response(status=500, text=JUNK_MARKER)
    if mode == "wrong_issuer":
        doc = good()
        assert isinstance(doc, dict)
        return web.json_response({**doc, "issuer": "http://127.0.0.1:1/" + JUNK_MARKER})
    if mode == "no_id_token":
        doc = good()
        assert isinstance(doc, dict)
        return web.json_response({k: v for k, v in doc.items() if k != "id_token"})
    if mode == "error_json":
        return web.json_response(
            {"error": "invalid_grant", "error_description": JUNK_MARKER}, status=400
        )
    if mode == "drop":
        assert request.transport is not None
        request.transport.abort()
        return web.Response()
    if mode == "stall":
        await asyncio.sleep(STALL_SECONDS)
    raise AssertionError(f"unknown junk mode {mode!r}")


# --------------------------------------------------------------------------- raw MCP server

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
FIRST_EVENT = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
PARTIAL_EVENT = b'event: message\ndata: {"jsonrpc":"2.0","id":1,"res'


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@dataclass
class RawMcpPeer:
    """A hand-written HTTP/1.1 MCP server stand-in; the request path picks the behaviour:
    `/stall`, `/cut`, `/silent`, `/reset`, `/garbage`. `closed` records, per path, when the
    gateway closed its side of the connection (monotonic time)."""

    url: str = ""
    received: list[str] = field(default_factory=list)
    closed: dict[str, float] = field(default_factory=dict)
    _server: asyncio.Server | None = None
    _loop: PeerLoop | None = None

    def start(self, loop: PeerLoop) -> RawMcpPeer:
        self._loop = loop
        loop.run(self._start())
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            server = self._server

            async def close() -> None:
                server.close()

            self._loop.run(close())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = "?"
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            path = request_line.split(" ")[1]
            length = 0
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            self.received.append(path)
            await self._behave(path, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.closed.setdefault(path, time.monotonic())
            with contextlib.suppress(Exception):
                writer.close()

    async def _behave(
        self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if path.startswith("/stall"):
            await _until_closed(reader)
        elif path.startswith("/cut"):
            writer.write(SSE_HEAD + chunk(FIRST_EVENT) + chunk(PARTIAL_EVENT))
            await writer.drain()
            await asyncio.sleep(0.2)
            # FIN without the last chunk: the body is cut in the middle of an event.
        elif path.startswith("/silent"):
            writer.write(SSE_HEAD + chunk(FIRST_EVENT))
            await writer.drain()
            await _until_closed(reader)
        elif path.startswith("/reset"):
            transport = writer.transport
            transport.abort()
        elif path.startswith("/garbage"):
            writer.write(b"\x00\x01 this is not HTTP " + JUNK_MARKER.encode() + b"\r\n\r\n")
            await writer.drain()
        else:
            body = b'{"jsonrpc":"2.0","id":1,"result":{}}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()


async def _until_closed(reader: asyncio.StreamReader) -> None:
    """Wait (at most an hour) for the other side to close the connection."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(STALL_SECONDS):
            while await reader.read(1024):
                pass


@pytest.fixture(scope="module")
def peer_loop() -> Iterator[PeerLoop]:
    """One peer event loop (thread) for a test module."""
    loop = PeerLoop()
    try:
        yield loop
    finally:
        loop.close()


async def wait_for(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Poll `predicate` until true; the seconds it took (fails the test after `within`)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            pytest.fail(f"{what}: not after {within}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start
