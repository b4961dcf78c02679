"""Streaming relay: SSE event by event, disconnects, stalls and dead servers (DESIGN §4.5)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import gateway.web.mcp_routes as mcp_routes
from gateway.adapters.memory_store import MemoryStore
from gateway.clock import FixedClock, SystemClock
from gateway.core.tokens import build_access_claims, mint_access_token
from gateway.settings import load_settings
from gateway.web.appkeys import KEYS
from tests.fixtures.config import make_config
from tests.proxy.conftest import MakeGateway, Peer, build_test_app, rpc, tool_call


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _sse_start(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    return resp


class TestSse:
    async def test_first_event_before_second_is_sent(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Each SSE event reaches the client as soon as the server sent it (no buffering)."""
        release = asyncio.Event()
        sent: list[int] = []

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = await _sse_start(request)
            await resp.write(b'event: message\ndata: {"n": 1}\n\n')
            sent.append(1)
            await release.wait()
            await resp.write(b'event: message\ndata: {"n": 2}\n\n')
            sent.append(2)
            await resp.write_eof()
            return resp

        upstream_peer.handler = handler
        gw = await make_gateway()
        resp = await gw.client.post("/mcp", json=tool_call("count"), headers=gw.auth())
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        async with asyncio.timeout(5):
            first = await resp.content.readuntil(b"\n\n")
        assert first == b'event: message\ndata: {"n": 1}\n\n'
        assert sent == [1]  # the server has not sent the second event yet
        release.set()
        async with asyncio.timeout(5):
            rest = await resp.content.read()
        assert rest == b'event: message\ndata: {"n": 2}\n\n'
        assert sent == [1, 2]

    async def test_get_stream_with_last_event_id(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """GET streams are proxied; Last-Event-ID reaches the server (resumption)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = await _sse_start(request)
            await resp.write(b"id: 8\ndata: {}\n\n")
            await resp.write_eof()
            return resp

        upstream_peer.handler = handler
        gw = await make_gateway()
        headers = {
            "Authorization": "Bearer " + gw.token(),
            "Accept": "text/event-stream",
            "Last-Event-ID": "7",
        }
        resp = await gw.client.get("/mcp", headers=headers)
        assert resp.status == 200
        assert await resp.read() == b"id: 8\ndata: {}\n\n"
        seen = upstream_peer.last()
        assert (seen.method, seen.headers["Last-Event-ID"]) == ("GET", "7")

    async def test_chunked_json_relayed(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A chunked (length-less) JSON response is relayed whole."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for part in (b'{"jsonrpc": "2.0", ', b'"id": 1, ', b'"result": {}}'):
                await resp.write(part)
            await resp.write_eof()
            return resp

        upstream_peer.handler = handler
        gw = await make_gateway()
        resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth())
        assert await resp.json() == {"jsonrpc": "2.0", "id": 1, "result": {}}


async def _stream_then_hang(peer: Peer) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = await _sse_start(request)
        await resp.write(b"data: 1\n\n")
        await asyncio.sleep(30)
        return resp

    peer.handler = handler


class TestDisconnect:
    async def test_client_disconnect_closes_upstream(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """When the client goes away mid-stream, the upstream request is closed too."""
        await _stream_then_hang(upstream_peer)
        gw = await make_gateway()
        resp = await gw.client.post("/mcp", json=tool_call("count"), headers=gw.auth())
        async with asyncio.timeout(5):
            assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
        resp.close()
        async with asyncio.timeout(5):
            await upstream_peer.disconnected.wait()

    @pytest.mark.parametrize("chatty", [False, True])
    async def test_disconnect_noticed_without_handler_cancellation(
        self,
        upstream_peer: Peer,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
        chatty: bool,
    ) -> None:
        """Served without aiohttp's handler cancellation, the relay still notices: the stream
        sweeper for a silent stream, the failed write for a chatty one."""
        monkeypatch.setattr(mcp_routes, "DISCONNECT_POLL", 0.1 if not chatty else 60)
        if chatty:

            async def handler(request: web.Request) -> web.StreamResponse:
                resp = await _sse_start(request)
                await resp.write(b"data: 1\n\n")
                for _ in range(3000):
                    await asyncio.sleep(0.01)
                    await resp.write(b"data: more\n\n")
                return resp

            upstream_peer.handler = handler
        else:
            await _stream_then_hang(upstream_peer)
        settings = load_settings(
            make_config(tmp_path, resources=[{"path": "/mcp", "upstream": upstream_peer.mcp_url}])
        )
        clock = FixedClock(SystemClock().now())
        app = build_test_app(settings, MemoryStore(clock), clock)
        runner = web.AppRunner(app, handler_cancellation=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            async with asyncio.timeout(5):
                await app[mcp_routes.MCP_STATE].revocations.wait_current()
            claims = build_access_claims(
                issuer=settings.issuer,
                sub="alice",
                audience=settings.issuer + "/mcp",
                client_id="c",
                scope="mcp",
                auth_time=clock.now(),
                amr=["mfa"],
                acr=None,
                gid="g",
                now=clock.now(),
                ttl=600,
            )
            token = mint_access_token(claims, app[KEYS].active)
            port = runner.addresses[0][1]
            async with aiohttp.ClientSession() as http:
                resp = await http.post(
                    f"http://127.0.0.1:{port}/mcp",
                    json=tool_call("count"),
                    headers={"Authorization": "Bearer " + token},
                )
                async with asyncio.timeout(5):
                    assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
                resp.close()
            async with asyncio.timeout(5):
                await upstream_peer.disconnected.wait()
        finally:
            await runner.cleanup()


class TestFailures:
    async def _error(
        self, resp: aiohttp.ClientResponse, status: int, message: str, id: Any = 1
    ) -> None:
        assert resp.status == status
        assert await resp.json() == {
            "jsonrpc": "2.0",
            "id": id,
            "error": {"code": -32603, "message": message},
        }

    async def test_dead_server_502(self, make_gateway: MakeGateway) -> None:
        """Nothing listening: 502 with a JSON-RPC error, at once."""
        gw = await make_gateway(
            resources=[{"path": "/mcp", "upstream": f"http://127.0.0.1:{_free_port()}/mcp"}]
        )
        resp = await gw.client.post("/mcp", json=rpc("ping", 1), headers=gw.auth())
        await self._error(resp, 502, "The MCP server is unreachable")

    async def test_server_resets_before_answering_502(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A server that drops the connection before answering: 502."""

        async def handler(request: web.Request) -> web.StreamResponse:
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(1)
            return web.Response()

        upstream_peer.handler = handler
        gw = await make_gateway()
        resp = await gw.client.post("/mcp", json=rpc("ping", 3), headers=gw.auth())
        await self._error(resp, 502, "The MCP server is unreachable", id=3)

    async def test_stalled_server_504(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """A server that never answers: 504 after the request time-out, never a hang."""

        async def handler(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(30)
            return web.Response()

        upstream_peer.handler = handler
        gw = await make_gateway(server={"request_timeout": "300ms"})
        loop = asyncio.get_running_loop()
        start = loop.time()
        resp = await gw.client.post("/mcp", json=tool_call("slow", id=5), headers=gw.auth())
        await self._error(resp, 504, "The MCP server did not answer in time", id=5)
        assert loop.time() - start < 3

    async def test_stream_idle_timeout_closes(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A stream silent for longer than read_timeout is closed, upstream and downstream."""
        await _stream_then_hang(upstream_peer)
        gw = await make_gateway(
            resources=[{"path": "/mcp", "upstream": upstream_peer.mcp_url, "read_timeout": "300ms"}]
        )
        resp = await gw.client.post("/mcp", json=tool_call("count"), headers=gw.auth())
        async with asyncio.timeout(5):
            assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.content.read()
            await upstream_peer.disconnected.wait()

    async def test_large_body_deadline(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A large ordinary body that stalls is cut at the request time-out, not the idle one."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 200_000
            await resp.prepare(request)
            await resp.write(b" " * 100_000)
            await asyncio.sleep(30)
            return resp

        upstream_peer.handler = handler
        gw = await make_gateway(server={"request_timeout": "400ms"})
        loop = asyncio.get_running_loop()
        start = loop.time()
        resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth())
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        assert loop.time() - start < 3
        async with asyncio.timeout(5):
            await upstream_peer.disconnected.wait()

    async def test_truncated_small_answer_502(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A small answer cut short before its announced length is a 502, not a half body."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 100
            await resp.prepare(request)
            await resp.write(b'{"jsonrpc": ')
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return resp

        upstream_peer.handler = handler
        gw = await make_gateway()
        resp = await gw.client.post("/mcp", json=rpc("ping", 6), headers=gw.auth())
        await self._error(resp, 502, "The MCP server broke off its answer", id=6)

    async def test_truncated_stream_is_not_complete(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A large body cut short mid-relay is cut short for the client too (never padded)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 200_000
            await resp.prepare(request)
            await resp.write(b" " * 100_000)
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return resp

        upstream_peer.handler = handler
        gw = await make_gateway()
        resp = await gw.client.post("/mcp", json=rpc("ping"), headers=gw.auth())
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
