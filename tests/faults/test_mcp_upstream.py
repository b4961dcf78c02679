"""A real gateway process in front of MCP servers that are down, stall, cut or garble (DESIGN §4.5,
§7.8): every failure is a JSON-RPC error or a stream that visibly ends, never a hang.

One gateway (`python -m gateway run`, memory store) serves one resource per misbehaviour, all
backed by `RawMcpPeer` (hand-written HTTP/1.1) or by a port where nothing listens. Time-outs are
short: `server.request_timeout = 2s` (until the MCP server's response headers) and
`read_timeout = 1s` (silence on a stream) for `/silent`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.faults.flow import MCP_ACCEPT, mcp_post, rpc
from tests.faults.junk_peers import (
    FIRST_EVENT,
    PARTIAL_EVENT,
    PeerLoop,
    RawMcpPeer,
    peer_loop,
    wait_for,
)
from tests.faults.procs import GatewayLauncher, GatewayProcess, config_for, mint_token
from tests.fixtures.peers import free_port

__all__ = ["peer_loop"]

REQUEST_TIMEOUT = 2.0
READ_TIMEOUT = 1.0


@dataclass
class McpFaults:
    gateway: GatewayProcess
    peer: RawMcpPeer

    def url(self, path: str) -> str:
        return self.gateway.url + path

    def token(self, path: str) -> str:
        return mint_token(self.gateway.config_path, resource=path)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, peer_loop: PeerLoop) -> Iterator[McpFaults]:
    """The gateway process and the raw peer behind its resources."""
    peer = RawMcpPeer().start(peer_loop)
    directory = tmp_path_factory.mktemp("mcp-faults")
    nothing_listens = free_port()
    resources = [
        {"path": "/down", "upstream": f"http://127.0.0.1:{nothing_listens}/mcp"},
        {"path": "/ok", "upstream": peer.url + "/ok"},
        {"path": "/stall", "upstream": peer.url + "/stall"},
        {"path": "/cut", "upstream": peer.url + "/cut"},
        {"path": "/silent", "upstream": peer.url + "/silent", "read_timeout": "1s"},
        {"path": "/reset", "upstream": peer.url + "/reset"},
        {"path": "/garbage", "upstream": peer.url + "/garbage"},
    ]
    path = config_for(
        directory / "config",
        port=free_port(),
        resources=resources,
        server={"request_timeout": f"{REQUEST_TIMEOUT:g}s"},
    )
    launcher = GatewayLauncher(directory)
    try:
        yield McpFaults(launcher.start(path), peer)
    finally:
        launcher.stop_all()
        peer.stop()


def _gateway_error(message: str, id: int | None = 1) -> dict[str, object]:
    """The JSON-RPC error body of a gateway-side failure (code -32603)."""
    return {"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": message}}


async def test_a_healthy_server_is_reached(faults: McpFaults) -> None:
    """Control: the same gateway relays a well-formed answer of the same peer (200, R25)."""
    resp = await mcp_post(faults.url("/ok"), faults.token("/ok"), rpc("ping"))
    assert resp.status_code == 200
    assert resp.json() == {"jsonrpc": "2.0", "id": 1, "result": {}}


async def test_server_down_is_502_at_once(faults: McpFaults) -> None:
    """Nothing listens at the MCP server's address: 502 with a JSON-RPC error, without waiting
    for any time-out (DESIGN §4.5)."""
    start = time.monotonic()
    resp = await mcp_post(faults.url("/down"), faults.token("/down"), rpc("tools/list"))
    elapsed = time.monotonic() - start
    assert resp.status_code == 502
    assert resp.headers["content-type"] == "application/json; charset=utf-8"
    assert resp.headers["cache-control"] == "no-store"
    assert resp.json() == _gateway_error("The MCP server is unreachable")
    assert elapsed < 1.5


@pytest.mark.parametrize("path", ["/reset", "/garbage"])
async def test_reset_or_non_http_answer_is_502(faults: McpFaults, path: str) -> None:
    """A server that drops the connection, or answers bytes that are not HTTP: 502, and none of
    its bytes reach the client (DESIGN §4.5)."""
    resp = await mcp_post(faults.url(path), faults.token(path), rpc("tools/list"))
    assert resp.status_code == 502
    assert resp.json() == _gateway_error("The MCP server is unreachable")
    assert "junk-marker" not in resp.text


async def test_stalled_server_is_504_within_the_request_timeout(faults: McpFaults) -> None:
    """A server that accepts the request and never answers: 504 after `request_timeout` (2 s),
    not before and not much after, and the gateway hangs up on it (no leaked connection;
    invariant 8: a time-out on every outbound call)."""
    start = time.monotonic()
    resp = await mcp_post(faults.url("/stall"), faults.token("/stall"), rpc("tools/list"))
    elapsed = time.monotonic() - start
    assert resp.status_code == 504
    assert resp.json() == _gateway_error("The MCP server did not answer in time")
    assert REQUEST_TIMEOUT - 0.2 <= elapsed < REQUEST_TIMEOUT + 2.0
    await wait_for(lambda: "/stall" in faults.peer.closed, 2.0, "gateway closed the stalled call")


async def _read_stream(url: str, token: str) -> tuple[int, str, bytes, Exception | None, float]:
    """POST and read the raw SSE body until it ends; (status, type, bytes, error, seconds)."""
    received = b""
    error: Exception | None = None
    headers = {
        "Authorization": "Bearer " + token,
        "Content-Type": "application/json",
        "Accept": MCP_ACCEPT,
    }
    start = time.monotonic()
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http,
        http.stream("POST", url, json=rpc("tools/call", name="count"), headers=headers) as resp,
    ):
        try:
            async for data in resp.aiter_raw():
                received += data
        except httpx.HTTPError as exc:
            error = exc
        return (
            resp.status_code,
            resp.headers.get("content-type", ""),
            received,
            error,
            time.monotonic() - start,
        )


async def test_stream_cut_mid_event_ends_the_clients_stream(faults: McpFaults) -> None:
    """The server closes its SSE stream in the middle of an event: the client gets every byte
    that was sent, then its stream ends at once and visibly incomplete (no terminating chunk that
    would pass the half event off as a complete body); the gateway keeps serving (DESIGN §4.5)."""
    status, ctype, received, error, elapsed = await _read_stream(
        faults.url("/cut"), faults.token("/cut")
    )
    assert status == 200
    assert ctype == "text/event-stream"
    assert received == FIRST_EVENT + PARTIAL_EVENT
    assert isinstance(error, httpx.RemoteProtocolError)
    assert elapsed < 3.0
    await faults.gateway.wait_event("proxy_stream_closed", reason="upstream_broke")
    resp = await mcp_post(faults.url("/ok"), faults.token("/ok"), rpc("ping"))
    assert resp.status_code == 200


async def test_silent_stream_is_closed_after_the_read_timeout(faults: McpFaults) -> None:
    """A stream that falls silent after its first event is closed after `read_timeout` (1 s),
    toward the client (incomplete, never a hang) and toward the server (invariant 8)."""
    status, _, received, error, elapsed = await _read_stream(
        faults.url("/silent"), faults.token("/silent")
    )
    assert status == 200
    assert received == FIRST_EVENT
    assert isinstance(error, httpx.RemoteProtocolError)
    assert READ_TIMEOUT - 0.2 <= elapsed < READ_TIMEOUT + 2.5
    await faults.gateway.wait_event("proxy_stream_closed", reason="upstream_idle_timeout")
    await wait_for(lambda: "/silent" in faults.peer.closed, 2.0, "gateway closed the stream")


async def test_no_fault_reached_the_unhandled_error_path(faults: McpFaults) -> None:
    """None of these faults was a crash: no `unhandled_error`, no traceback in the log, and the
    process is still the one that started (R35)."""
    await mcp_post(faults.url("/garbage"), faults.token("/garbage"), rpc("ping"))
    assert faults.gateway.alive
    assert faults.gateway.events("unhandled_error") == []
    assert "Traceback" not in faults.gateway.log_text()
