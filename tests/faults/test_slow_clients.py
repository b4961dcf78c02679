"""Slow and stuck clients against a real gateway process: cut off by time-outs (DESIGN §7.8).

Slowloris-style clients hold a connection (and whatever the handler holds with it) by sending
headers one byte at a time, or a body that never completes. aiohttp's server (3.14) has no
header or body read time-out of its own: its only guard is `keepalive_timeout`, which the
gateway's runner leaves at aiohttp's default of 3630 s, and a handler reading a body waits as
long as the client keeps the connection open. The gateway documents `server.request_timeout` as
"time-out for a whole non-streaming request"; these tests set it to 1 s and expect a client that
has not delivered its request by then to be answered `408` or disconnected within 2.5 s.

A stuck client must also never starve others: the gateway keeps answering while many of them
hang on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.procs import GatewayLauncher, GatewayProcess, config_for, mint_token
from tests.fixtures.peers import free_port

REQUEST_TIMEOUT = 1.0
CUT_OFF_WITHIN = REQUEST_TIMEOUT + 1.5
GRACE = 1.0  # how much longer the test listens before it calls the connection "held"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway process (memory store) with `server.request_timeout = 1s`."""
    directory = tmp_path_factory.mktemp("slow-clients")
    path = config_for(
        directory / "config",
        port=free_port(),
        server={"request_timeout": f"{REQUEST_TIMEOUT:g}s"},
    )
    launcher = GatewayLauncher(directory)
    try:
        yield launcher.start(path)
    finally:
        launcher.stop_all()


async def _open(gateway: GatewayProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gateway.port)


async def _cut_off_after(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, started: float, trickle: bytes
) -> tuple[float | None, bytes]:
    """Keep sending `trickle` one byte per 100 ms (if any) and listen; return when the gateway
    answered or closed: (seconds since `started`, what it sent). (None, b"") if it still held
    the connection after `CUT_OFF_WITHIN + GRACE` seconds."""
    deadline = started + CUT_OFF_WITHIN + GRACE
    pending = iter(trickle)
    while time.monotonic() < deadline:
        byte = next(pending, None)
        if byte is not None:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                return time.monotonic() - started, b""
        try:
            async with asyncio.timeout(0.1):
                data = await reader.read(4096)
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - started, b""
        return time.monotonic() - started, data  # an answer, or b"" at EOF
    return None, b""


def _assert_cut_off(result: tuple[float | None, bytes], what: str) -> None:
    elapsed, data = result
    assert elapsed is not None, (
        f"{what}: the gateway still held the connection after {CUT_OFF_WITHIN + GRACE:.1f}s "
        f"(server.request_timeout = {REQUEST_TIMEOUT:g}s): no header/body read time-out"
    )
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert elapsed <= CUT_OFF_WITHIN, f"{what}: cut off only after {elapsed:.1f}s"


async def test_a_slow_but_complete_request_is_served(gateway: GatewayProcess) -> None:
    """Control: a request whose headers arrive in three pieces within the time-out is served
    (so the cut-offs below are about time, not fragmentation; invariant 8)."""
    reader, writer = await _open(gateway)
    try:
        for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.1)
        async with asyncio.timeout(5):
            status = await reader.readline()
    finally:
        writer.close()
    assert status == b"HTTP/1.1 200 OK\r\n"


async def test_headers_trickled_byte_by_byte_are_cut_off(gateway: GatewayProcess) -> None:
    """Slowloris: request headers sent one byte every 100 ms, never finished. The gateway must
    drop the connection (or answer 408) once `request_timeout` has passed, although bytes keep
    arriving (an idle-read timer alone would never fire; invariant 8)."""
    reader, writer = await _open(gateway)
    started = time.monotonic()
    trickle = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    try:
        result = await _cut_off_after(reader, writer, started, trickle)
    finally:
        writer.close()
    _assert_cut_off(result, "headers trickled byte by byte")


async def test_a_form_body_that_never_completes_is_cut_off(gateway: GatewayProcess) -> None:
    """`POST /oauth/token` announcing 100 bytes of form and sending 11: the token handler must
    not wait for the rest forever (408 or disconnect after `request_timeout`; invariant 8,
    R19)."""
    reader, writer = await _open(gateway)
    started = time.monotonic()
    writer.write(
        b"POST /oauth/token HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
        b"grant_type="
    )
    await writer.drain()
    try:
        result = await _cut_off_after(reader, writer, started, b"")
    finally:
        writer.close()
    _assert_cut_off(result, "token request body never completed")


async def test_an_mcp_body_that_never_completes_is_cut_off(gateway: GatewayProcess) -> None:
    """An authenticated `POST /mcp` whose JSON body never completes: the proxy, which buffers
    the (capped) body for policy before anything is forwarded, must give up after
    `request_timeout` (408 or disconnect), not hold the request forever (invariant 8, R25)."""
    token = mint_token(gateway.config_path)
    reader, writer = await _open(gateway)
    started = time.monotonic()
    writer.write(
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\n"
        + f"Authorization: Bearer {token}\r\n".encode()
        + b'Content-Length: 1000\r\n\r\n{"jsonrpc": "2.0", "id": 1, '
    )
    await writer.drain()
    try:
        result = await _cut_off_after(reader, writer, started, b"")
    finally:
        writer.close()
    _assert_cut_off(result, "MCP request body never completed")


async def test_stuck_clients_do_not_starve_others(gateway: GatewayProcess) -> None:
    """While 50 clients hold half-sent requests, the gateway still answers everyone else at
    once (no worker or lock is held by a stuck client; invariant 8)."""
    held: list[asyncio.StreamWriter] = []
    try:
        for i in range(50):
            _, writer = await _open(gateway)
            writer.write(
                b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n"
                if i % 2
                else b"GET /healthz HTTP/1.1\r\nHos"
            )
            await writer.drain()
            held.append(writer)
        start = time.monotonic()
        reader, writer = await _open(gateway)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b'{"status": "ok"}')
        assert time.monotonic() - start < 1.0
    finally:
        for writer in held:
            with contextlib.suppress(Exception):
                writer.close()
    assert gateway.alive


async def test_a_client_leaving_mid_body_is_not_a_fault(
    tmp_path: Path, gateway_processes: GatewayLauncher
) -> None:
    """A client that hangs up in the middle of its request body is the client's problem, not a
    gateway fault: no `unhandled_error` with a traceback in the log (the fault alarm, R35), no
    500 counted against the gateway, and the process keeps serving."""
    gateway = gateway_processes.start(config_for(tmp_path / "gw", port=free_port()))
    _, writer = await _open(gateway)
    writer.write(
        b"POST /oauth/token HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
        b"grant_type="
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    finished = await gateway.wait_event("request_finished", route="/oauth/token", within=5.0)
    assert gateway.events("unhandled_error") == []
    assert finished["status"] != 500
    assert "Traceback" not in gateway.log_text()
    assert gateway.alive
