"""A small MCP server on the official SDK, used as the protected resource in tests and the demo.

It serves streamable HTTP at ``/mcp`` with the SDK's `MCPServer` and offers five tools:
``echo(text)``, ``whoami()`` (what identity it received: the ``Authorization`` header, forwarded
identity headers, the introspection result), ``count(n, delay)`` (progress notifications while it
runs), ``delete_everything()`` (the "dangerous" tool policies deny) and ``transfer_funds(amount)``
(the tool policies protect with ``max_auth_age``).

``--record FILE`` appends one JSON line per HTTP request (method, path, the ``Authorization``
value received, MCP headers) and one per tool actually run, so tests can prove that the client's
token never reached this server and that denied tools never ran.

``--introspect URL --introspect-client ID:SECRET`` makes every HTTP request carry a bearer token
that is active by RFC 7662 introspection at the upstream provider, else ``401`` (used to test
``forward_token = "upstream"``).

Without ``--stateful`` the handshake-era ``initialize`` is served statelessly (no session ids);
with it, ``initialize`` opens a session (``Mcp-Session-Id``). Either way, 2026-07-28 clients are
served per request after their ``server/discover`` probe (the SDK routes them by header).

Host/Origin: the SDK's DNS-rebinding protection stays ON. It accepts loopback Host headers on any
port (the gateway forwards from 127.0.0.1) and loopback Origins; ``--allowed-host`` /
``--allowed-origin`` add more (e.g. the public host of a gateway elsewhere). A browser page on a
rebound DNS name therefore cannot reach this server directly; the gateway checks Origin itself.

Run: ``python demo/mcp_server.py --port 9100 [--stateful] [--record FILE]``; ``--port 0`` picks a
free port. The ready line is ``mcp-server listening on http://HOST:PORT/mcp``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx2
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Set by this server's introspection middleware only; any inbound copy is dropped first.
INTROSPECTION_HEADER = "x-demo-introspection"
MAX_RECORDED_HEADER = 8192
INTROSPECTION_TIMEOUT = 5.0


class Recorder:
    """Appends JSON lines to the record file (one writer per process, lines never interleave)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")[:MAX_RECORDED_HEADER]
    return None


def build_mcp(recorder: Recorder) -> MCPServer:
    """The MCP server and its tools."""
    mcp: MCPServer = MCPServer("mfa-gateway-demo", instructions="A demo server behind mfa-gateway.")

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        recorder.write({"kind": "tool", "tool": "echo", "arguments": {"text": text}})
        return text

    @mcp.tool()
    def whoami(ctx: Context) -> dict[str, Any]:
        """What this server was told about the caller."""
        recorder.write({"kind": "tool", "tool": "whoami", "arguments": {}})
        headers = {k.lower(): v for k, v in (ctx.headers or {}).items()}
        forwarded = {
            k: v
            for k, v in sorted(headers.items())
            if k.startswith(("x-", "forwarded")) and k != INTROSPECTION_HEADER
        }
        introspected = headers.get(INTROSPECTION_HEADER)
        return {
            "authorization": headers.get("authorization"),
            "forwarded_headers": forwarded,
            "introspection": json.loads(introspected) if introspected else None,
        }

    @mcp.tool()
    async def count(n: int, delay: float, ctx: Context) -> str:
        """Count to n, sending a progress notification every `delay` seconds."""
        if not 0 <= n <= 1000 or not 0 <= delay <= 10:
            raise ValueError("n must be 0..1000 and delay 0..10 seconds")
        recorder.write({"kind": "tool", "tool": "count", "arguments": {"n": n, "delay": delay}})
        for i in range(1, n + 1):
            await ctx.report_progress(i, n, f"counted {i} of {n}")
            if i < n:
                await anyio.sleep(delay)
        return f"counted to {n}"

    @mcp.tool()
    def delete_everything() -> str:
        """A dangerous tool: gateway policies deny it. Deletes nothing."""
        recorder.write({"kind": "tool", "tool": "delete_everything", "arguments": {}})
        return "everything deleted (not really: this is a demo)"

    @mcp.tool()
    def transfer_funds(amount: float) -> str:
        """A sensitive tool: gateway policies require a recent step-up. Moves nothing."""
        recorder.write({"kind": "tool", "tool": "transfer_funds", "arguments": {"amount": amount}})
        return f"transferred {amount:.2f} (not really: this is a demo)"

    return mcp


class RecordingMiddleware:
    """Records every HTTP request (including the Authorization header it carried)."""

    def __init__(self, app: ASGIApp, recorder: Recorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.recorder.write(
                {
                    "kind": "http",
                    "method": scope["method"],
                    "path": scope["path"],
                    "authorization": _header(scope, b"authorization"),
                    "mcp_session_id": _header(scope, b"mcp-session-id"),
                    "mcp_protocol_version": _header(scope, b"mcp-protocol-version"),
                    "mcp_method": _header(scope, b"mcp-method"),
                    "mcp_name": _header(scope, b"mcp-name"),
                    "host": _header(scope, b"host"),
                    "origin": _header(scope, b"origin"),
                    "x_forwarded_for": _header(scope, b"x-forwarded-for"),
                    "cookie": _header(scope, b"cookie"),
                }
            )
        await self.app(scope, receive, send)


class IntrospectionMiddleware:
    """Requires `Authorization: Bearer <token>` that the upstream says is active (RFC 7662)."""

    def __init__(self, app: ASGIApp, url: str, client_id: str, client_secret: str) -> None:
        self.app = app
        self.url = url
        basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode("ascii")
        self._auth = f"Basic {basic}"
        self._http = httpx2.AsyncClient(timeout=INTROSPECTION_TIMEOUT, follow_redirects=False)

    async def _introspect(self, token: str) -> dict[str, Any] | None:
        try:
            resp = await self._http.post(
                self.url,
                data={"token": token, "token_type_hint": "access_token"},
                headers={"Authorization": self._auth, "Accept": "application/json"},
            )
        except httpx2.HTTPError:
            return None  # fail closed
        if resp.status_code != 200:
            return None
        try:
            body = resp.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) and body.get("active") is True else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != INTROSPECTION_HEADER.encode()]
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        info = (
            await self._introspect(token.strip()) if scheme.lower() == "bearer" and token else None
        )
        if info is None:
            error = ', error="invalid_token"' if value else ""
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"www-authenticate", f'Bearer realm="mcp-server"{error}'.encode()),
                        (b"content-type", b"application/json"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b'{"error":"invalid_token"}'})
            return
        summary = {k: info.get(k) for k in ("sub", "client_id", "scope", "exp", "iss") if k in info}
        headers.append((INTROSPECTION_HEADER.encode(), json.dumps(summary).encode()))
        await self.app({**scope, "headers": headers}, receive, send)

    async def aclose(self) -> None:
        await self._http.aclose()


class _AnnouncingServer(uvicorn.Server):
    """Prints the ready line once the app's lifespan has started and the socket listens."""

    def __init__(self, config: uvicorn.Config, ready_line: str) -> None:
        super().__init__(config)
        self.ready_line = ready_line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready_line, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    p.add_argument("--stateful", action="store_true", help="initialize opens sessions")
    p.add_argument("--record", type=Path, help="append JSON lines of requests and tool runs")
    p.add_argument("--introspect", metavar="URL", help="RFC 7662 endpoint of the upstream")
    p.add_argument("--introspect-client", metavar="ID:SECRET", help="credentials for --introspect")
    p.add_argument("--allowed-host", action="append", default=[], help="extra allowed Host value")
    p.add_argument("--allowed-origin", action="append", default=[], help="extra allowed Origin")
    p.add_argument("--json-response", action="store_true", help="answer with JSON, not SSE")
    args = p.parse_args(argv)
    if bool(args.introspect) != bool(args.introspect_client):
        p.error("--introspect and --introspect-client go together")
    if args.introspect_client and ":" not in args.introspect_client:
        p.error("--introspect-client: expected ID:SECRET")
    return args


async def serve(args: argparse.Namespace) -> None:
    """Bind, print the ready line, serve until SIGINT/SIGTERM."""
    recorder = Recorder(args.record)
    mcp = build_mcp(recorder)
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", *args.allowed_host],
        allowed_origins=[
            "http://127.0.0.1:*",
            "http://localhost:*",
            "http://[::1]:*",
            *args.allowed_origin,
        ],
    )
    starlette_app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=not args.stateful,
        json_response=args.json_response,
        transport_security=security,
        host=args.host,
    )
    app: ASGIApp = starlette_app
    introspector: IntrospectionMiddleware | None = None
    if args.introspect:
        client_id, _, secret = args.introspect_client.partition(":")
        introspector = IntrospectionMiddleware(app, args.introspect, client_id, secret)
        app = introspector
    app = RecordingMiddleware(app, recorder)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    host = f"[{args.host}]" if ":" in args.host else args.host
    mode = "stateful" if args.stateful else "stateless"
    server = _AnnouncingServer(config, f"mcp-server listening on http://{host}:{port}/mcp ({mode})")
    try:
        await server.serve(sockets=[sock])
    finally:
        if introspector is not None:
            await introspector.aclose()
    if not server.started:
        raise SystemExit("mcp-server: failed to start")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
