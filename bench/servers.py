"""The two comparison peers of the benchmark, each a small uvloop aiohttp process.

- `mcp`: a minimal Streamable-HTTP MCP server in JSON-response mode. `POST /mcp` answers every
  JSON-RPC request with a `tools/call`-shaped result (and 202 for notifications); `GET /mcp`
  opens an SSE stream that sends one comment and then stays idle until the client leaves. It is
  deliberately cheap, so the measurements show the proxies' own cost.
- `bare`: a bare aiohttp pass-through proxy (no checks at all): reads the request body, sends
  it to the upstream over one pooled `ClientSession`, streams the response back. This is the
  yardstick the gateway is compared with.

Run: `python bench/servers.py mcp --port P` or `python bench/servers.py bare --port P
--upstream http://127.0.0.1:Q/mcp`. Each prints `ready` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys

import aiohttp
import orjson
import uvloop
from aiohttp import web

_RESULT = {"content": [{"type": "text", "text": "ok"}], "isError": False}


def raise_fd_limit() -> None:
    """Allow as many sockets as the hard limit permits (idle-stream test)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def mcp_app() -> web.Application:
    async def post(request: web.Request) -> web.StreamResponse:
        msg = orjson.loads(await request.read())
        if "id" not in msg:
            return web.Response(status=202)
        body = orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": _RESULT})
        return web.Response(body=body, content_type="application/json")

    async def get(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        await resp.write(b": stream open\n\n")
        await asyncio.Event().wait()  # idle until the client goes away (handler cancelled)
        return resp  # pragma: no cover

    app = web.Application()
    app.router.add_post("/mcp", post)
    app.router.add_get("/mcp", get)
    return app


_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "host",
    "content-length",
    "proxy-connection",
    "trailer",
}


def bare_app(upstream: str) -> web.Application:
    session: dict[str, aiohttp.ClientSession] = {}

    async def start(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def stop(app: web.Application) -> None:
        await session["s"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read() if request.method == "POST" else None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session["s"].request(request.method, upstream, headers=headers, data=body) as up:
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in _HOP and k.lower() not in ("date", "server"):
                    resp.headers.add(k, v)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/mcp", proxy)
    return app


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["mcp", "bare"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream")
    args = p.parse_args()
    raise_fd_limit()
    app = mcp_app() if args.kind == "mcp" else bare_app(args.upstream)
    try:
        uvloop.run(serve(app, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
