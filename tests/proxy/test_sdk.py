"""Full stack: the official MCP SDK client → the real gateway app → the SDK MCP server.

The gateway is `gateway.app.build_app` (every middleware and route), the server is
`demo/mcp_server.py` (records every request and tool run), the client is `mcp.Client` with a
bearer token minted by the gateway's key (the OAuth dance itself is the e2e suite's). Both the
2026-07-28 wire (`server/discover`, routing headers, no sessions) and the 2025-11-25 handshake
(`initialize`, `Mcp-Session-Id`) are exercised (DESIGN §4, R26, R32).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from mcp.shared.exceptions import MCPError

from gateway.adapters.memory_store import MemoryStore
from gateway.app import build_app
from gateway.clock import SystemClock
from gateway.core.tokens import build_access_claims, mint_access_token
from gateway.settings import Settings, load_settings
from gateway.web.appkeys import KEYS
from gateway.web.mcp_routes import MCP_STATE
from tests.e2e.mcp_oauth import plain_mcp_client
from tests.fixtures.config import make_config
from tests.fixtures.peers import McpServer, McpServerFactory

pytestmark = pytest.mark.e2e

POLICY = {
    "mcp": {
        "rules": [
            {"method": "tools/call", "tool": "delete_everything", "effect": "deny"},
            {"method": "tools/call", "tool": "transfer_funds", "max_auth_age": "5m"},
        ]
    }
}


@dataclass
class Stack:
    url: str
    settings: Settings
    app: web.Application
    server: McpServer
    client: TestClient[web.Request, web.Application]

    def token(self, sub: str = "alice", *, auth_time_ago: float = 60.0) -> str:
        now = SystemClock().now()
        claims = build_access_claims(
            issuer=self.settings.issuer,
            sub=sub,
            audience=self.settings.issuer + "/mcp",
            client_id="sdk-client",
            scope="mcp",
            auth_time=now - auth_time_ago,
            amr=["pwd", "otp", "mfa"],
            acr="urn:mfa-gateway:totp",
            gid="g1",
            now=now,
            ttl=600,
        )
        return mint_access_token(claims, self.app[KEYS].active)


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def stack(
    tmp_path: Path,
    mcp_server_factory: McpServerFactory,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> StackFactory:
    """`await stack(stateful=..., forward_token=...)`: server, gateway app and test client."""

    async def factory(*, stateful: bool = False, forward_token: str = "none") -> Stack:
        server = mcp_server_factory(stateful=stateful)
        path = make_config(
            tmp_path,
            resources=[{"path": "/mcp", "upstream": server.url, "forward_token": forward_token}],
            policy=POLICY,
        )
        settings = load_settings(path)
        store = MemoryStore(SystemClock())
        app = build_app(settings, store=store)
        client = await aiohttp_client(app)
        async with asyncio.timeout(5):
            await app[MCP_STATE].revocations.wait_current()
        url = str(client.make_url("/mcp"))
        return Stack(url=url, settings=settings, app=app, server=server, client=client)

    return factory


@asynccontextmanager
async def sdk(stack: Stack, token: str, mode: str = "auto") -> AsyncIterator[Any]:
    async with plain_mcp_client(
        stack.url, mode=mode, headers={"Authorization": "Bearer " + token}
    ) as client:
        yield client


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


class TestSdkThroughGateway:
    async def test_modern_client_calls_tools(self, stack: StackFactory) -> None:
        """2026-07-28 client: discovery, tool list and call pass; the client token never
        reaches the server (R26)."""
        s = await stack()
        token = s.token()
        async with sdk(s, token) as client:
            tools = await client.list_tools()
            assert "echo" in {t.name for t in tools.tools}
            result = await client.call_tool("echo", {"text": "hello"})
            assert _text(result) == "hello"
        assert s.server.tool_runs() == ["echo"]
        http = s.server.records("http")
        assert http
        assert all(r["authorization"] is None for r in http)
        assert any(r["mcp_method"] == "tools/call" and r["mcp_name"] == "echo" for r in http)
        assert all(r["x_forwarded_for"] == "127.0.0.1" for r in http)

    async def test_denied_tool_never_runs(self, stack: StackFactory) -> None:
        """Policy denies delete_everything: the SDK sees an error, the tool never ran."""
        s = await stack()
        async with sdk(s, s.token()) as client:
            with pytest.raises(MCPError, match="Forbidden by the gateway's policy") as info:
                await client.call_tool("delete_everything", {})
            assert info.value.error.code == -32003
        assert "delete_everything" not in s.server.tool_runs()

    async def test_legacy_session_bound_to_subject(self, stack: StackFactory) -> None:
        """2025-11-25 handshake with sessions: the session works for its owner only (R32)."""
        s = await stack(stateful=True)
        async with sdk(s, s.token("alice"), mode="legacy") as client:
            assert _text(await client.call_tool("echo", {"text": "hi"})) == "hi"
            sids = {r["mcp_session_id"] for r in s.server.records("http")} - {None}
            assert len(sids) == 1
            sid = sids.pop()
            seen = len(s.server.records("http"))
            body = {
                "jsonrpc": "2.0",
                "id": 9,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "x"}},
            }
            resp = await s.client.post(
                "/mcp",
                data=json.dumps(body),
                headers={
                    "Authorization": "Bearer " + s.token("mallory"),
                    "Content-Type": "application/json",
                    "Accept": "application/json, text/event-stream",
                    "Mcp-Session-Id": sid,
                    "MCP-Protocol-Version": "2025-11-25",
                },
            )
            assert resp.status == 404
            assert len(s.server.records("http")) == seen
            assert _text(await client.call_tool("echo", {"text": "again"})) == "again"
        assert s.server.tool_runs() == ["echo", "echo"]

    async def test_identity_forwarded(self, stack: StackFactory) -> None:
        """forward_token = identity: the server sees a gateway-signed identity JWT only."""
        s = await stack(forward_token="identity")
        token = s.token("alice")
        async with sdk(s, token) as client:
            who = (await client.call_tool("whoami", {})).structured_content
        assert who is not None
        auth = who["authorization"]
        assert auth.startswith("Bearer ")
        identity = auth.removeprefix("Bearer ")
        assert identity != token
        claims = jwt.decode(
            identity,
            s.app[KEYS].active.private_key.public_key(),
            algorithms=["ES256"],
            audience=s.server.url,
            issuer=s.settings.issuer,
        )
        assert (claims["sub"], claims["client_id"]) == ("alice", "sdk-client")
        assert "mfa" in claims["amr"]

    async def test_progress_stream(self, stack: StackFactory) -> None:
        """A tool streaming progress over SSE reaches the client event by event."""
        s = await stack()
        seen: list[float] = []

        async def progress(value: float, total: float | None, message: str | None) -> None:
            seen.append(value)

        async with sdk(s, s.token()) as client:
            result = await client.call_tool(
                "count", {"n": 3, "delay": 0.05}, progress_callback=progress
            )
        assert _text(result) == "counted to 3"
        assert seen == [1, 2, 3]
