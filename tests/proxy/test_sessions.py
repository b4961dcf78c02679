"""`Mcp-Session-Id` bound to the subject that created it (R32, DESIGN §4.6, §7.7)."""

from __future__ import annotations

import json

from aiohttp import web
from structlog.testing import capture_logs

from tests.proxy.conftest import Gateway, MakeGateway, Peer, rpc

SID = "sess-0123456789abcdef"


def _session_server(peer: Peer, session_id: str = SID) -> None:
    """An MCP server stand-in that opens a session on initialize and ends it on DELETE."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            return web.Response(status=204)
        msg = json.loads(await request.read())
        headers = {"Mcp-Session-Id": session_id} if msg.get("method") == "initialize" else {}
        return web.json_response(
            {"jsonrpc": "2.0", "id": msg.get("id"), "result": {}}, headers=headers
        )

    peer.handler = handler


async def _initialize(gw: Gateway, sub: str = "alice") -> str:
    resp = await gw.client.post(
        "/mcp", json=rpc("initialize", 0), headers=gw.auth(gw.token(sub=sub))
    )
    assert resp.status == 200
    return resp.headers["Mcp-Session-Id"]


class TestSessionBinding:
    async def test_owner_may_use_session(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """The subject that opened the session uses it normally."""
        _session_server(upstream_peer)
        gw = await make_gateway()
        sid = await _initialize(gw)
        assert sid == SID
        assert await gw.store.session_owner(SID) == "http://127.0.0.1:8080#alice"
        resp = await gw.client.post(
            "/mcp", json=rpc("tools/list"), headers=gw.auth(**{"Mcp-Session-Id": sid})
        )
        assert resp.status == 200
        assert upstream_peer.last().headers["Mcp-Session-Id"] == sid

    async def test_other_subject_gets_404(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Another subject presenting the session id gets 404; the server never sees it."""
        _session_server(upstream_peer)
        gw = await make_gateway()
        sid = await _initialize(gw, "alice")
        seen = len(upstream_peer.seen)
        with capture_logs() as logs:
            resp = await gw.client.post(
                "/mcp",
                json=rpc("tools/list", 4),
                headers=gw.auth(gw.token(sub="bob"), **{"Mcp-Session-Id": sid}),
            )
        assert resp.status == 404
        assert await resp.json() == {
            "jsonrpc": "2.0",
            "id": 4,
            "error": {"code": -32600, "message": "Session not found"},
        }
        assert len(upstream_peer.seen) == seen
        assert [e["event"] for e in logs if e["event"] == "session_hijack_refused"] == [
            "session_hijack_refused"
        ]
        assert SID not in repr(logs)

    async def test_other_subject_refused_on_get_and_delete(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Streams and session ends are bound the same way."""
        _session_server(upstream_peer)
        gw = await make_gateway()
        sid = await _initialize(gw, "alice")
        bob = {"Authorization": "Bearer " + gw.token(sub="bob"), "Mcp-Session-Id": sid}
        assert (await gw.client.get("/mcp", headers=bob)).status == 404
        assert (await gw.client.delete("/mcp", headers=bob)).status == 404
        assert await gw.store.session_owner(sid) == "http://127.0.0.1:8080#alice"

    async def test_unknown_session_404(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A session id the gateway never bound is not forwarded."""
        gw = await make_gateway()
        resp = await gw.client.post(
            "/mcp", json=rpc("tools/list"), headers=gw.auth(**{"Mcp-Session-Id": "made-up"})
        )
        assert resp.status == 404
        assert upstream_peer.seen == []

    async def test_malformed_session_id_400(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Session ids are visible ASCII (MCP-TR); anything else is a bad request."""
        gw = await make_gateway()
        resp = await gw.client.post(
            "/mcp", json=rpc("tools/list"), headers=gw.auth(**{"Mcp-Session-Id": "a b"})
        )
        assert resp.status == 400
        assert upstream_peer.seen == []

    async def test_delete_ends_binding(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """DELETE is proxied; once the server ended the session its binding is gone."""
        _session_server(upstream_peer)
        gw = await make_gateway()
        sid = await _initialize(gw)
        headers = {"Authorization": "Bearer " + gw.token(), "Mcp-Session-Id": sid}
        resp = await gw.client.delete("/mcp", headers=headers)
        assert resp.status == 204
        assert upstream_peer.last().method == "DELETE"
        assert await gw.store.session_owner(sid) is None
        again = await gw.client.post(
            "/mcp", json=rpc("ping"), headers=gw.auth(**{"Mcp-Session-Id": sid})
        )
        assert again.status == 404

    async def test_invalid_session_id_from_server_502(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """A session id the client could not safely echo is refused (502)."""
        _session_server(upstream_peer, session_id="bad\x7fid")
        gw = await make_gateway()
        resp = await gw.client.post("/mcp", json=rpc("initialize", 0), headers=gw.auth())
        assert resp.status == 502
        assert "Mcp-Session-Id" not in resp.headers

    async def test_repeated_session_header_400(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """Two Mcp-Session-Id headers are refused."""
        _session_server(upstream_peer)
        gw = await make_gateway()
        sid = await _initialize(gw)
        headers = [*gw.auth().items(), ("Mcp-Session-Id", sid), ("Mcp-Session-Id", "other")]
        resp = await gw.client.post("/mcp", data=json.dumps(rpc("ping")), headers=headers)
        assert resp.status == 400
        assert upstream_peer.last().headers.get("Mcp-Session-Id") is None

    async def test_server_reusing_anothers_session_id_502(
        self, make_gateway: MakeGateway, upstream_peer: Peer
    ) -> None:
        """If the server hands out an id already bound to another subject, the gateway does
        not give it to this one."""
        _session_server(upstream_peer, session_id="shared-id")
        gw = await make_gateway()
        await gw.store.bind_session("shared-id", "http://127.0.0.1:8080#bob", 60)
        resp = await gw.client.post("/mcp", json=rpc("initialize", 0), headers=gw.auth())
        assert resp.status == 502
        assert "Mcp-Session-Id" not in resp.headers
        assert await gw.store.session_owner("shared-id") == "http://127.0.0.1:8080#bob"
