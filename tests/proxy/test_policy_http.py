"""MCP-aware policy on the wire: deny, scopes, step-up, body caps, routing headers (R29, R30)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.proxy.conftest import MakeGateway, Peer, challenge, rpc, tool_call

POLICY: dict[str, Any] = {
    "mcp": {
        "max_body": "2KiB",
        "rules": [
            {"method": "tools/call", "tool": "delete_*", "effect": "deny"},
            {"method": "tools/call", "tool": "admin_*", "require_scopes": ["mcp", "admin"]},
            {"method": "tools/call", "tool": "transfer_funds", "max_auth_age": "5m"},
            {"method": "resources/*", "effect": "deny"},
        ],
    }
}


async def _gw(make_gateway: MakeGateway, **kw: Any) -> Any:
    return await make_gateway(policy=POLICY, **kw)


class TestRules:
    async def test_deny_never_reaches_server(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A denied tool gets 403 with a JSON-RPC error for its id; the server sees nothing."""
        gw = await _gw(make_gateway)
        resp = await gw.client.post(
            "/mcp", json=tool_call("delete_everything", id=42), headers=gw.auth()
        )
        assert resp.status == 403
        assert "WWW-Authenticate" not in resp.headers
        assert await resp.json() == {
            "jsonrpc": "2.0",
            "id": 42,
            "error": {"code": -32003, "message": "Forbidden by the gateway's policy"},
        }
        assert upstream_peer.seen == []

    async def test_deny_by_method(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """Rules match the JSON-RPC method by glob."""
        gw = await _gw(make_gateway)
        resp = await gw.client.post(
            "/mcp", json=rpc("resources/read", uri="file:///etc/passwd"), headers=gw.auth()
        )
        assert resp.status == 403
        assert upstream_peer.seen == []

    async def test_allowed_tool_passes(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Tools no rule names follow the default effect (allow)."""
        gw = await _gw(make_gateway)
        resp = await gw.client.post("/mcp", json=tool_call("echo"), headers=gw.auth())
        assert resp.status == 200
        assert len(upstream_peer.seen) == 1

    async def test_insufficient_scope(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """Missing scopes: 403 insufficient_scope naming the scopes (R29)."""
        gw = await _gw(make_gateway)
        resp = await gw.client.post("/mcp", json=tool_call("admin_reset"), headers=gw.auth())
        assert resp.status == 403
        assert resp.headers["WWW-Authenticate"] == challenge(
            "insufficient_scope", "The access token lacks a required scope", scope="mcp admin"
        )
        assert upstream_peer.seen == []
        ok = await gw.client.post(
            "/mcp", json=tool_call("admin_reset"), headers=gw.auth(gw.token(scope="mcp admin"))
        )
        assert ok.status == 200

    async def test_step_up_max_age(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """An old authentication gets an RFC 9470 challenge with max_age (R30)."""
        gw = await _gw(make_gateway)
        old = gw.token(auth_time=gw.clock.now() - 301)
        resp = await gw.client.post("/mcp", json=tool_call("transfer_funds"), headers=gw.auth(old))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge(
            "insufficient_user_authentication",
            "A more recent authentication is required",
            scope=None,
            max_age="300",
        )
        assert upstream_peer.seen == []
        fresh = gw.token(auth_time=gw.clock.now() - 10)
        ok = await gw.client.post("/mcp", json=tool_call("transfer_funds"), headers=gw.auth(fresh))
        assert ok.status == 200

    async def test_default_deny(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """With default_effect = deny only explicitly allowed calls pass."""
        gw = await make_gateway(
            policy={
                "mcp": {
                    "default_effect": "deny",
                    "rules": [{"method": "initialize"}, {"method": "tools/call", "tool": "echo"}],
                }
            }
        )
        assert (
            await gw.client.post("/mcp", json=tool_call("echo"), headers=gw.auth())
        ).status == 200
        assert (
            await gw.client.post("/mcp", json=tool_call("other"), headers=gw.auth())
        ).status == 403
        assert (
            await gw.client.post("/mcp", json=rpc("tools/list"), headers=gw.auth())
        ).status == 403
        assert len(upstream_peer.seen) == 1

    async def test_batch_with_denied_element(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A batch is evaluated element by element: one denied call refuses it all."""
        gw = await _gw(make_gateway)
        batch = [tool_call("echo", 1), tool_call("delete_everything", 2)]
        resp = await gw.client.post("/mcp", json=batch, headers=gw.auth())
        assert resp.status == 403
        assert (await resp.json())["id"] is None
        assert upstream_peer.seen == []
        ok = await gw.client.post(
            "/mcp", json=[tool_call("echo", 1), rpc("ping", 2)], headers=gw.auth()
        )
        assert ok.status == 200
        assert len(upstream_peer.seen) == 1

    async def test_policy_only_after_authentication(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Without a token a denied call gets the plain 401 challenge: rules are not leaked."""
        gw = await _gw(make_gateway)
        resp = await gw.client.post("/mcp", json=tool_call("delete_everything"))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge()


class TestBody:
    async def test_too_large_declared(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """A Content-Length over max_body: 413."""
        gw = await _gw(make_gateway)
        big = json.dumps(tool_call("echo", text="x" * 3000))
        resp = await gw.client.post("/mcp", data=big, headers=gw.auth())
        assert resp.status == 413
        assert (await resp.json())["error"]["message"] == "Request body too large"
        assert upstream_peer.seen == []

    async def test_too_large_chunked(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """A chunked body is read only up to the cap: 413."""
        gw = await _gw(make_gateway)

        async def chunks() -> Any:
            for _ in range(10):
                yield b" " * 512

        resp = await gw.client.post("/mcp", data=chunks(), headers=gw.auth())
        assert resp.status == 413
        assert upstream_peer.seen == []

    async def test_body_that_never_completes_408(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A body that never completes is given up on after the request time-out (slow
        clients must not hold the proxy, DESIGN §7.8)."""
        gw = await _gw(make_gateway, server={"request_timeout": "300ms"})
        reader, writer = await asyncio.open_connection(gw.client.server.host, gw.client.server.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in gw.auth().items())
        writer.write(
            f"POST /mcp HTTP/1.1\r\nHost: x\r\n{head}Content-Length: 500\r\n\r\n".encode()
            + b'{"jsonrpc": "2.0", '
        )
        await writer.drain()
        try:
            async with asyncio.timeout(3):
                head_in = await reader.readuntil(b"\r\n\r\n")
                length = int(head_in.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body_in = await reader.readexactly(length)
        finally:
            writer.close()
        assert head_in.startswith(b"HTTP/1.1 408 ")
        assert body_in.endswith(b'"message": "Request body not received in time"}}')
        assert upstream_peer.seen == []

    async def test_client_leaving_mid_body_is_not_a_fault(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A client hanging up inside its body is logged as such, never as an error."""
        gw = await _gw(make_gateway, handler_cancellation=False)
        with capture_logs() as logs:
            _reader, writer = await asyncio.open_connection(
                gw.client.server.host, gw.client.server.port
            )
            head = "".join(f"{k}: {v}\r\n" for k, v in gw.auth().items())
            writer.write(
                f"POST /mcp HTTP/1.1\r\nHost: x\r\n{head}Content-Length: 500\r\n\r\n{{".encode()
            )
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            async with asyncio.timeout(3):
                while not any(e.get("reason") == "client_gone" for e in logs):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
        assert upstream_peer.seen == []
        ok = await gw.client.post("/mcp", json=tool_call("echo"), headers=gw.auth())
        assert ok.status == 200

    async def test_not_json(self, make_gateway: MakeGateway, upstream_peer: Peer) -> None:
        """Only application/json bodies are inspected and forwarded: 415 otherwise."""
        gw = await _gw(make_gateway)
        headers = gw.auth(**{"Content-Type": "text/plain"})
        resp = await gw.client.post("/mcp", data=json.dumps(tool_call("echo")), headers=headers)
        assert resp.status == 415
        assert upstream_peer.seen == []

    @pytest.mark.parametrize(
        ("raw", "code"),
        [
            (b"{nope", -32700),
            (b"[]", -32600),
            (b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}', -32602),
        ],
    )
    async def test_malformed_jsonrpc(
        self, make_gateway: MakeGateway, upstream_peer: Peer, raw: bytes, code: int
    ) -> None:
        """Bodies policy cannot read are refused with 400 and the JSON-RPC code."""
        gw = await _gw(make_gateway)
        resp = await gw.client.post("/mcp", data=raw, headers=gw.auth())
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == code
        assert upstream_peer.seen == []


class TestRoutingHeaders:
    async def test_method_header_mismatch(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """2026-07-28: Mcp-Method disagreeing with the body is 400 (-32020)."""
        gw = await _gw(make_gateway)
        headers = gw.auth(**{"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"})
        resp = await gw.client.post("/mcp", json=tool_call("delete_everything"), headers=headers)
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == -32020
        assert upstream_peer.seen == []

    async def test_name_header_mismatch(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Mcp-Name naming a harmless tool over a denied one is 400."""
        gw = await _gw(make_gateway)
        headers = gw.auth(
            **{"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
        )
        resp = await gw.client.post("/mcp", json=tool_call("admin_x"), headers=headers)
        assert resp.status == 400
        assert upstream_peer.seen == []

    async def test_repeated_routing_header(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A routing header sent twice is refused (first- and last-copy readers disagree)."""
        gw = await _gw(make_gateway)
        headers = [*gw.auth().items(), ("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/list")]
        resp = await gw.client.post("/mcp", data=json.dumps(tool_call("echo")), headers=headers)
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == -32020
        assert upstream_peer.seen == []

    async def test_modern_matching_headers_pass(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Agreeing routing headers pass and are forwarded."""
        gw = await _gw(make_gateway)
        headers = gw.auth(
            **{"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
        )
        resp = await gw.client.post("/mcp", json=tool_call("echo"), headers=headers)
        assert resp.status == 200


class TestAuditAndMetrics:
    async def test_audit_names_tool_never_arguments(self, make_gateway: MakeGateway) -> None:
        """mcp_allowed / mcp_denied carry reason, method and tool, never tool arguments."""
        gw = await _gw(make_gateway)
        with capture_logs() as logs:
            await gw.client.post(
                "/mcp", json=tool_call("echo", secret_arg="canary-1"), headers=gw.auth()
            )
            await gw.client.post(
                "/mcp",
                json=tool_call("delete_everything", secret_arg="canary-2"),
                headers=gw.auth(),
            )
        events = [e for e in logs if e["event"] in ("mcp_allowed", "mcp_denied")]
        assert [(e["event"], e["method"], e.get("tool"), e["reason"]) for e in events] == [
            ("mcp_allowed", "tools/call", "echo", "allowed"),
            ("mcp_denied", "tools/call", "delete_everything", "rule_denied"),
        ]
        assert events[0]["sub"] == "alice"
        assert events[0]["client_id"] == "client-1"
        assert "canary" not in repr(logs)
        assert "Bearer" not in repr(logs)

    async def test_metrics_per_resource_outcome_reason(self, make_gateway: MakeGateway) -> None:
        """Metrics.mcp counts by resource, outcome and reason."""
        from gateway.web.appkeys import METRICS

        gw = await _gw(make_gateway)
        await gw.client.post("/mcp", json=tool_call("echo"), headers=gw.auth())
        await gw.client.post("/mcp", json=tool_call("delete_x"), headers=gw.auth())
        await gw.client.post("/mcp", json=tool_call("echo"))
        text = gw.app[METRICS].render().decode()
        assert (
            'mfagw_mcp_requests_total{outcome="allowed",reason="allowed",resource="/mcp"} 1.0'
            in text
        )
        assert (
            'mfagw_mcp_requests_total{outcome="denied",reason="rule_denied",'
            'resource="/mcp"} 1.0' in text
        )
        assert (
            'mfagw_mcp_requests_total{outcome="denied",reason="missing_token",'
            'resource="/mcp"} 1.0' in text
        )
