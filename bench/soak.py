"""Soak benchmark (issue 5, part 8): `python bench/soak.py` — a benchmark, not a CI test.

Starts, each as its own process: a redis-server on a free port (default; `--store memory` for the
embedded store), the minimal MCP server (`bench/servers.py mcp`) and the gateway in front of it
with every check on (the same configuration as `bench/run.py`: ES256 verification, `amr` must
hold `mfa`, revocation set, Origin/path checks, policy rules, routing headers,
`forward_token = "identity"`, audit lines, metrics). Then:

1. Real grants: a dynamic client is registered and `--families` authorization codes are issued
   exactly as the step-up flow leaves them (`issue_code` on a transaction in stage `done`, as the
   flow tests seed them), then redeemed through `POST /oauth/token` (PKCE), which creates real
   refresh families. With Redis the seeding runs here on the gateway's own key prefix; the
   embedded store lives inside the gateway process, so `--store memory` starts the gateway
   through this file's `memory-gateway` subcommand (the real `gateway.cli.serve`, with
   `build_app` handed a `MemoryStore` seeded in that process).
2. Maximum: `bench/loadgen.py rps` drives `tools/call` at `--max-connections` for
   `--max-seconds` (closed loop) and the gateway's requests per second is taken as its maximum.
3. Soak: for `--duration` seconds an open-loop generator (requests sent on a fixed schedule at
   `--load` x the maximum, whatever the answers do; latency counted from the scheduled send time,
   so queueing is not hidden) sends `tools/call` with the families' current access tokens, and
   every `1/--refresh-ratio`-th request is a refresh-token rotation through `/oauth/token`
   instead (one at a time per family; the new access token is used from then on).

Reported: achieved rate, errors by kind (non-2xx by status, transport errors, time-outs),
p50/p99/max latency over the run and per `--window` seconds, refreshes and their errors, and the
gateway's resident memory (`VmRSS`) and open file descriptors at start, every window and end.
Servers are pinned to CPU 0 and the generator to CPU 1 (as `bench/run.py` does). Every wait is
bounded and the run stops by itself; all traffic goes to 127.0.0.1. Figures are printed (and
written as JSON with `--json FILE`); nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlencode

import orjson
import uvloop
from run import free_port, loadgen, pin, rss_kib, wait_http, wait_port, write_config

from gateway.clock import Clock, SystemClock
from gateway.core.pkce import s256
from gateway.flows.codes import issue_code
from gateway.flows.register import register_client
from gateway.logs import configure_logging
from gateway.ports import Store
from gateway.settings import Settings, load_settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
SELF = Path(__file__).resolve()
HOST = "127.0.0.1"
REDIRECT = "http://127.0.0.1:5555/callback"
SCOPE = "mcp offline_access"
IDLE_DISCARD = 10.0  # seconds; the gateway closes idle keep-alive connections after 30 s


# --------------------------------------------------------------------------- grants


async def seed_grants(store: Store, settings: Settings, count: int) -> dict[str, Any]:
    """Register a public client and issue `count` codes as the step-up flow leaves them.

    Returns `{"client_id", "grants": [{"code", "verifier", "sub"}]}`; the codes live
    `tokens.code_ttl` (60 s by default), so redeem them at once.
    """
    now = SystemClock().now()
    client, _ = await register_client(
        store,
        settings,
        {
            "client_name": "soak client",
            "redirect_uris": [REDIRECT],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
            "application_type": "native",
            "scope": SCOPE,
        },
        ip=HOST,
        now=now,
    )
    resource = settings.resource_url(settings.resources[0])
    grants = []
    for i in range(count):
        verifier = secrets.token_urlsafe(48)
        txid = secrets.token_urlsafe(32)
        sub = f"soak-user-{i}"
        tx: dict[str, Any] = {
            "client_id": client.client_id,
            "redirect_uri": REDIRECT,
            "redirect_uri_sent": True,
            "state": secrets.token_urlsafe(12),
            "code_challenge": s256(verifier),
            "scope": SCOPE,
            "resource": resource,
            "browser": secrets.token_urlsafe(12),
            "created_at": now,
            "expires_at": now + 600,
            "stage": "done",
            "sub": sub,
            "auth_time_upstream": now - 5,
            "amr_upstream": ["pwd"],
            "consented_at": now,
        }
        await store.put_transaction(txid, tx, 600)
        code = await issue_code(store, settings, txid, tx, now)
        grants.append({"code": code, "verifier": verifier, "sub": sub})
    return {"client_id": client.client_id, "grants": grants}


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new 0600 file, atomically (it holds single-use codes)."""
    part = path.with_suffix(".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    part.rename(path)


def memory_gateway(config: Path, families: int, grants_out: Path) -> int:
    """`soak.py memory-gateway`: the real `gateway.cli.serve` over a pre-seeded MemoryStore."""
    from aiohttp import web

    import gateway.app as app_module
    from gateway import cli
    from gateway.adapters.memory_store import MemoryStore

    settings = load_settings(config)
    configure_logging(
        settings.logging.level, settings.logging.format, sys.stdout, cache_loggers=True
    )
    original = app_module.build_app
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        memory = MemoryStore(SystemClock())
        seeded = runner.run(seed_grants(memory, settings, families))

        def build_with_store(
            settings: Settings, *, clock: Clock | None = None, store: Store | None = None
        ) -> web.Application:
            return original(settings, clock=clock, store=memory)

        app_module.build_app = build_with_store  # `serve` imports it when called
        write_private(grants_out, orjson.dumps(seeded))
        code = runner.run(cli.serve(settings, reuse_port=False))
        runner.run(memory.close())
    return code


# --------------------------------------------------------------------------- raw HTTP client


class BadResponse(Exception):
    """The answer was not an HTTP/1.1 response with a Content-Length body."""


class ConnectFailed(Exception):
    """No connection to the gateway could be opened (refused, or not within 5 s)."""


def build_request(method: str, path: str, port: int, headers: dict[str, str], body: bytes) -> bytes:
    """One HTTP/1.1 keep-alive request, pre-built."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep-alive) of one response; `BadResponse` without a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        raise BadResponse("not HTTP/1.1")
    lower = head.lower()
    i = lower.find(b"\r\ncontent-length:")
    try:
        status = int(head[9:12])
        length = int(lower[i + 17 : lower.find(b"\r\n", i + 2)]) if i >= 0 else -1
    except ValueError:
        raise BadResponse("unparsable status line or Content-Length") from None
    if length < 0:
        raise BadResponse(f"no Content-Length (status {status})")
    body = await reader.readexactly(length) if length else b""
    return status, body, b"\r\nconnection: close" not in lower


async def http_once(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, bytes]:
    """One request on a fresh connection (set-up only; bounded to 10 s)."""
    async with asyncio.timeout(10.0):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(build_request(method, path, port, headers, body))
            status, data, _ = await read_response(reader)
            return status, data
        finally:
            writer.close()


FORM = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}


async def redeem(port: int, client_id: str, code: str, verifier: str) -> dict[str, Any]:
    """Exchange one code at `/oauth/token` (authorization_code + PKCE); the 200 body."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "client_id": client_id,
        "redirect_uri": REDIRECT,
    }
    status, body = await http_once(port, "POST", "/oauth/token", FORM, urlencode(form).encode())
    if status != 200:
        raise RuntimeError(f"code redemption answered {status}: {body[:200]!r}")
    data: dict[str, Any] = orjson.loads(body)
    if "refresh_token" not in data:
        raise RuntimeError("code redemption gave no refresh token")
    return data


# --------------------------------------------------------------------------- connection pool


@dataclass(eq=False)
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    last_used: float = 0.0
    busy_since: float | None = None
    timed_out: bool = False


class Pool:
    """Keep-alive connections to one port: reuse an idle one, open up to `limit`, else wait."""

    def __init__(self, port: int, limit: int) -> None:
        self.port = port
        self.limit = limit
        self.open = 0
        self.opened = 0
        self.idle: deque[Conn] = deque()
        self.busy: set[Conn] = set()
        self.waiters: deque[asyncio.Future[Conn | None]] = deque()

    async def acquire(self) -> Conn:
        while True:
            while self.idle:
                conn = self.idle.pop()  # most recently used first
                if conn.writer.is_closing() or conn.reader.at_eof():
                    self._drop(conn)
                    continue
                return self._busy(conn)
            if self.open < self.limit:
                self.open += 1
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, self.port), 5.0
                    )
                except BaseException:
                    self.open -= 1
                    self._wake(None)
                    raise
                self.opened += 1
                return self._busy(Conn(reader, writer))
            fut: asyncio.Future[Conn | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            handed = await fut
            if handed is not None:
                return self._busy(handed)

    def _busy(self, conn: Conn) -> Conn:
        conn.busy_since = time.perf_counter()
        self.busy.add(conn)
        return conn

    def release(self, conn: Conn) -> None:
        """Give back a connection that answered cleanly."""
        self.busy.discard(conn)
        conn.busy_since = None
        conn.last_used = time.perf_counter()
        if not self._wake(conn):
            self.idle.append(conn)

    def discard(self, conn: Conn) -> None:
        """Close a connection that failed or timed out (its slot goes to a waiter)."""
        self.busy.discard(conn)
        self._drop(conn)

    def _drop(self, conn: Conn) -> None:
        conn.writer.transport.abort()
        self.open -= 1
        self._wake(None)

    def _wake(self, conn: Conn | None) -> bool:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def sweep(self, timeout: float) -> None:
        """Abort requests older than `timeout`; close connections idle too long."""
        now = time.perf_counter()
        for conn in list(self.busy):
            if conn.busy_since is not None and now - conn.busy_since > timeout:
                conn.timed_out = True
                conn.writer.transport.abort()  # the pending read fails; the request sees it
        while self.idle and now - self.idle[0].last_used > IDLE_DISCARD:
            self._drop(self.idle.popleft())

    def close(self) -> None:
        for conn in [*self.idle, *self.busy]:
            conn.writer.transport.abort()
        self.idle.clear()
        self.busy.clear()


# --------------------------------------------------------------------------- the soak


@dataclass(eq=False)
class Family:
    """One grant: its rotating refresh token and the access token in use."""

    sub: str
    refresh_token: str
    access_token: str
    request: bytes = b""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    refreshes: int = 0
    dead: bool = False


@dataclass
class Sample:
    kind: str  # "mcp" | "refresh"
    scheduled: float  # seconds since the soak started (the planned send time)
    latency: float  # scheduled send -> last body byte (seconds; open loop)
    service: float  # write -> last body byte (seconds; NaN when never sent)
    outcome: str  # "ok" or the error kind


def mcp_headers(token: str) -> dict[str, str]:
    """The headers of `bench/run.py`'s `tools/call` (2026-07-28 routing headers included)."""
    return {
        "Authorization": "Bearer " + token,
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
    }


MCP_BODY = orjson.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hello"}},
    }
)


def process_facts(pid: int) -> dict[str, int]:
    """Resident memory (KiB) and open file descriptors of a process."""
    return {"rss_kib": rss_kib(pid), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Soak:
    """The open-loop run: requests on a fixed schedule, a pool of keep-alive connections."""

    def __init__(
        self,
        port: int,
        client_id: str,
        families: list[Family],
        args: argparse.Namespace,
        rate: float,
        watch: dict[str, int],
    ) -> None:
        self.port = port
        self.client_id = client_id
        self.families = families
        self.args = args
        self.rate = rate
        self.watch = watch  # name -> pid, sampled every window
        self.pool = Pool(port, args.max_conns)
        self.samples: list[Sample] = []
        self.memory: list[dict[str, Any]] = []
        self.start = 0.0
        self._mcp_next = 0
        self._refresh_next = 0
        for fam in families:
            fam.request = build_request(
                "POST", "/mcp", port, mcp_headers(fam.access_token), MCP_BODY
            )

    async def _exchange(self, request: bytes) -> tuple[int, bytes, float]:
        """Send one pre-built request on a pooled connection: (status, body, service time)."""
        try:
            conn = await self.pool.acquire()
        except (OSError, TimeoutError):
            raise ConnectFailed from None
        t0 = time.perf_counter()
        try:
            conn.writer.write(request)
            status, body, keep = await read_response(conn.reader)
        except BaseException:
            self.pool.discard(conn)
            if conn.timed_out:
                raise TimeoutError from None
            raise
        if keep:
            self.pool.release(conn)
        else:
            self.pool.discard(conn)
        return status, body, time.perf_counter() - t0

    async def _record(
        self, kind: str, scheduled: float, job: Callable[[], Awaitable[tuple[str, float]]]
    ) -> None:
        """Run one request and keep its sample, whatever happened to it."""
        service = float("nan")
        try:
            outcome, service = await job()
        except asyncio.CancelledError:
            outcome = "unfinished"  # still open when the bounded drain ended
        except TimeoutError:
            outcome = "timeout"
        except ConnectFailed:
            outcome = "connect_failed"
        except (asyncio.IncompleteReadError, ConnectionError):
            outcome = "connection_lost"
        except (BadResponse, asyncio.LimitOverrunError):
            outcome = "bad_response"
        except OSError as exc:
            outcome = f"os_error:{exc.errno}"
        done = time.perf_counter() - self.start
        self.samples.append(Sample(kind, scheduled, done - scheduled, service, outcome))

    async def _mcp(self) -> tuple[str, float]:
        fam = self.families[self._mcp_next % len(self.families)]
        self._mcp_next += 1
        status, body, service = await self._exchange(fam.request)
        if status != 200:
            return f"http_{status}", service
        if b'"result"' not in body:
            return "no_jsonrpc_result", service
        return "ok", service

    async def _refresh(self) -> tuple[str, float]:
        live = [f for f in self.families if not f.dead]
        if not live:
            return "no_live_family", float("nan")
        fam = live[self._refresh_next % len(live)]
        self._refresh_next += 1
        async with fam.lock:  # one rotation at a time per family, as a real client does
            form = urlencode(
                {
                    "grant_type": "refresh_token",
                    "refresh_token": fam.refresh_token,
                    "client_id": self.client_id,
                }
            ).encode()
            request = build_request("POST", "/oauth/token", self.port, FORM, form)
            status, body, service = await self._exchange(request)
            if status != 200:
                try:
                    error = str(orjson.loads(body).get("error", "?"))
                except (orjson.JSONDecodeError, AttributeError):
                    error = "?"
                if status == 400 and error == "invalid_grant":
                    fam.dead = True  # the family is gone: later rotations would fail the same way
                return f"http_{status}:{error}", service
            data = orjson.loads(body)
            new_refresh, new_access = data.get("refresh_token"), data.get("access_token")
            if not isinstance(new_refresh, str) or not isinstance(new_access, str):
                return "token_response_incomplete", service
            fam.refresh_token, fam.access_token = new_refresh, new_access
            fam.request = build_request(
                "POST", "/mcp", self.port, mcp_headers(new_access), MCP_BODY
            )
            fam.refreshes += 1
            return "ok", service

    def _sample_memory(self, at: float) -> None:
        row: dict[str, Any] = {"t": round(at, 1)}
        for name, pid in self.watch.items():
            with contextlib.suppress(OSError):
                row[name] = process_facts(pid)
        self.memory.append(row)

    async def _ticker(self, stop: asyncio.Event) -> None:
        """Time-out sweep twice a second; memory and fds every window."""
        next_window = self.args.window
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            self.pool.sweep(self.args.timeout)
            at = time.perf_counter() - self.start
            if at >= next_window and next_window <= self.args.duration:
                self._sample_memory(next_window)
                next_window += self.args.window

    async def run(self) -> dict[str, Any]:
        """Send `rate` x `duration` requests on schedule; wait (bounded) for the stragglers."""
        total = int(self.rate * self.args.duration)
        every = max(1, round(1 / self.args.refresh_ratio)) if self.args.refresh_ratio > 0 else 0
        tasks: set[asyncio.Task[None]] = set()
        stop = asyncio.Event()
        self._sample_memory(0.0)
        self.start = time.perf_counter()
        ticker = asyncio.create_task(self._ticker(stop))
        i = 0
        while i < total:
            now = time.perf_counter() - self.start
            due = min(total, int(now * self.rate) + 1)
            while i < due:
                scheduled = i / self.rate
                refresh = every > 0 and i % every == every // 2
                job = self._refresh if refresh else self._mcp
                task = asyncio.create_task(
                    self._record("refresh" if refresh else "mcp", scheduled, job)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            delay = i / self.rate - (time.perf_counter() - self.start)
            await asyncio.sleep(max(0.0, delay))
        sent_for = time.perf_counter() - self.start
        if tasks:
            await asyncio.wait(tasks, timeout=self.args.timeout + 2.0)
        unfinished = len(tasks)
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)  # each records itself as "unfinished"
        ended = time.perf_counter() - self.start
        stop.set()
        await ticker
        self.pool.close()
        self._sample_memory(round(ended, 1))
        return self.summary(total, sent_for, unfinished)

    def summary(self, scheduled: int, sent_for: float, unfinished: int) -> dict[str, Any]:
        """The figures of the run, overall and per window."""
        win = self.args.window
        windows: list[dict[str, Any]] = []
        n_windows = max(1, int(-(-self.args.duration // win)))
        for w in range(n_windows):
            lo, hi = w * win, (w + 1) * win
            hi = min(hi, self.args.duration)
            windows.append(
                {"from_s": lo, "to_s": hi}
                | figures([s for s in self.samples if lo <= s.scheduled < hi], hi - lo)
            )
        for row in windows:
            row["refreshes"] = sum(
                1
                for s in self.samples
                if s.kind == "refresh"
                and row["from_s"] <= s.scheduled
                and s.scheduled < row["from_s"] + win
            )
            later = [m for m in self.memory if m["t"] >= row["to_s"]]
            row["memory_at_end"] = later[0] if later else None
        return {
            "rate_target": self.rate,
            "scheduled": scheduled,
            "schedule_seconds": round(sent_for, 3),
            "unfinished": unfinished,
            "connections_opened": self.pool.opened,
            "overall": figures(self.samples, self.args.duration),
            "refreshes": figures([s for s in self.samples if s.kind == "refresh"], None),
            "mcp": figures([s for s in self.samples if s.kind == "mcp"], None),
            "windows": windows,
            "memory": self.memory,
            "families": [{"refreshes": f.refreshes, "dead": f.dead} for f in self.families],
        }


def pct(sorted_values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) in milliseconds."""
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] * 1e3, 3)


def figures(samples: list[Sample], seconds: float | None) -> dict[str, Any]:
    """Count, rate, errors by kind, latency p50/p99/max (from the scheduled send time)."""
    latencies = sorted(s.latency for s in samples)
    service = sorted(s.service for s in samples if s.service == s.service)  # drop NaN
    errors = Counter(s.outcome for s in samples if s.outcome != "ok")
    n = len(samples)
    out: dict[str, Any] = {
        "requests": n,
        "ok": n - sum(errors.values()),
        "errors": dict(errors),
        "error_rate": (sum(errors.values()) / n) if n else 0.0,
        "p50_ms": pct(latencies, 0.50),
        "p99_ms": pct(latencies, 0.99),
        "max_ms": round(latencies[-1] * 1e3, 3) if latencies else None,
        "service_p50_ms": pct(service, 0.50),
        "service_p99_ms": pct(service, 0.99),
    }
    if seconds:
        out["rate"] = round(n / seconds, 1)
    return out


# --------------------------------------------------------------------------- orchestration


def log_findings(path: Path) -> dict[str, int]:
    """The gateway's warning/error log events by name, and its request statuses."""
    found: Counter[str] = Counter()
    with path.open("rb") as fh:
        for line in fh:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                found["unparsed_line"] += 1
                continue
            if not isinstance(rec, dict):
                continue
            level = rec.get("level")
            if level in ("warning", "error", "critical"):
                found[f"{level}:{rec.get('event')}"] += 1
            if rec.get("event") == "request_finished":
                found[f"status:{rec.get('status')}"] += 1
    return dict(sorted(found.items()))


async def obtain_grants(
    port: int, store_url: str | None, settings: Settings, families: int, seeded: bytes | None
) -> tuple[str, list[tuple[str, str, str]]]:
    """Seed codes (into Redis here, or take those the memory gateway seeded) and redeem them
    through `/oauth/token`: (client_id, [(sub, refresh_token, access_token)]), one family each."""
    if store_url is not None:
        from gateway.adapters.redis_store import RedisStore

        store = RedisStore.from_url(
            store_url, clock=SystemClock(), key_prefix=settings.store.key_prefix, timeout=2.0
        )
        try:
            grants = await seed_grants(store, settings, families)
        finally:
            await store.close()
    else:
        assert seeded is not None
        grants = orjson.loads(seeded)
    out = []
    for grant in grants["grants"]:
        tokens = await redeem(port, grants["client_id"], grant["code"], grant["verifier"])
        out.append((str(grant["sub"]), tokens["refresh_token"], tokens["access_token"]))
    return str(grants["client_id"]), out


async def soak_phase(
    port: int,
    client_id: str,
    tokens: list[tuple[str, str, str]],
    args: argparse.Namespace,
    rate: float,
    watch: dict[str, int],
) -> dict[str, Any]:
    """The open-loop soak itself (its own event loop)."""
    families = [Family(sub, refresh, access) for sub, refresh, access in tokens]
    return await Soak(port, client_id, families, args, rate, watch).run()


def start_process(
    argv: list[str], cpus: set[int] | None, procs: list[subprocess.Popen[bytes]], log: Path
) -> subprocess.Popen[bytes]:
    """Start a server process (output to `log`), pinned to the servers' CPU."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    pin(proc.pid, cpus)
    procs.append(proc)
    return proc


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bytes:
    """The contents of `path` once it exists (bounded; fails if `proc` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            data = path.read_bytes()
            path.unlink()
            return data
        if proc.poll() is not None:
            raise RuntimeError("the gateway exited during start-up")
        time.sleep(0.1)
    raise RuntimeError("the gateway did not hand over its grants")


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the processes this run started, then SIGKILL what is left after 10 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def run_soak(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Everything: processes, grants, the maximum, the soak; returns the figures."""
    ncpu = os.cpu_count() or 1
    server_cpus = {0} if ncpu >= 2 else None
    load_cpus = {1} if ncpu >= 2 else None
    mcp_port, gw_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    watch: dict[str, int] = {}
    redis_url: str | None = None
    try:
        if args.store == "redis":
            redis_port = free_port()
            redis = start_process(
                [
                    "redis-server",
                    "--port", str(redis_port),
                    "--bind", HOST,
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(tmp),
                ],
                server_cpus,
                procs,
                tmp / "redis.log",
            )  # fmt: skip
            watch["redis"] = redis.pid
            wait_port(redis_port)
            redis_url = f"redis://{HOST}:{redis_port}/0"
        config, _key = write_config(tmp, gw_port, mcp_port, redis_url or "memory://")
        settings = load_settings(config)
        start_process(
            [PY, str(HERE / "servers.py"), "mcp", "--port", str(mcp_port)],
            server_cpus,
            procs,
            tmp / "mcp.log",
        )
        gw_log = tmp / "gateway.log"
        grants_file = tmp / "grants.json"
        if redis_url is not None:
            argv = [PY, "-m", "gateway", "run", "--config", str(config)]
        else:
            argv = [
                PY,
                str(SELF),
                "memory-gateway",
                "--config", str(config),
                "--families", str(args.families),
                "--grants-out", str(grants_file),
            ]  # fmt: skip
        gateway = start_process(argv, server_cpus, procs, gw_log)
        watch = {"gateway": gateway.pid, **watch}
        wait_port(mcp_port)
        wait_http(f"http://{HOST}:{gw_port}/healthz")
        at_startup = process_facts(gateway.pid)
        seeded = None if redis_url is not None else wait_file(grants_file, gateway)
        client_id, tokens = uvloop.run(
            obtain_grants(gw_port, redis_url, settings, args.families, seeded)
        )

        pin(os.getpid(), load_cpus)  # the generator (this process) on the other core
        print(
            f"# mfa-gateway soak: {ncpu} CPUs, servers pinned to {sorted(server_cpus or [])}, "
            f"generator to {sorted(load_cpus or [])}; store {args.store}; "
            f"{len(tokens)} refresh families",
            flush=True,
        )
        maximum: dict[str, Any] | None = None
        if args.rate:
            rate = float(args.rate)
        else:
            probe = argparse.Namespace(duration=args.max_seconds, warmup=1.0)
            maximum = loadgen(
                gw_port,
                mcp_headers(tokens[0][2]),
                MCP_BODY.decode(),
                args.max_connections,
                probe,
                load_cpus,
            )
            rate = args.load * float(maximum["rps"])
            print(
                f"# maximum: {maximum['rps']:.0f} req/s at {args.max_connections} connections "
                f"(p50 {maximum['p50_ms']:.2f} ms, p99 {maximum['p99_ms']:.2f} ms, "
                f"{maximum['errors']} errors); soak at {args.load:.0%} = {rate:.0f} req/s "
                f"for {args.duration:.0f} s",
                flush=True,
            )
            time.sleep(2.0)  # let the gateway settle after the closed-loop burst

        cpu0 = {name: cpu_ticks(pid) for name, pid in watch.items()}
        result = uvloop.run(soak_phase(gw_port, client_id, tokens, args, rate, watch))
        tck = os.sysconf("SC_CLK_TCK")
        result["cpu_share"] = {
            name: round((cpu_ticks(pid) - cpu0[name]) / tck / args.duration, 3)
            for name, pid in watch.items()
        }
        time.sleep(args.settle)
        result["memory_after_settle"] = {name: process_facts(pid) for name, pid in watch.items()}
        result |= {
            "machine": machine(),
            "store": args.store,
            "cpus": ncpu,
            "pinned": server_cpus is not None,
            "maximum": maximum,
            "gateway_at_startup": at_startup,
            "load": args.load,
            "duration": args.duration,
            "refresh_ratio": args.refresh_ratio,
            "families": args.families,
            "settle": args.settle,
        }
        gateway.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            gateway.wait(timeout=20)
        result["gateway_exit"] = gateway.poll()
        result["gateway_log"] = log_findings(gw_log)
        return result
    finally:
        stop_all(procs)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def machine() -> str:
    """CPU model, core count and kernel, for the report."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    python = sys.version.split()[0]
    return f"{os.cpu_count()} x {model}, Linux {os.uname().release}, Python {python}"


def report(r: dict[str, Any]) -> None:
    """The figures, human-readable."""
    o = r["overall"]
    print(
        f"# soak: {r['scheduled']} requests scheduled at {r['rate_target']:.0f}/s over "
        f"{r['schedule_seconds']:.1f} s ({r['unfinished']} unfinished, "
        f"{r['connections_opened']} connections opened)"
    )
    print(
        f"overall  achieved {o['rate']:.0f}/s  ok {o['ok']}  error rate {o['error_rate']:.4%} "
        f"{o['errors']}  p50 {o['p50_ms']} ms  p99 {o['p99_ms']} ms  max {o['max_ms']} ms"
    )
    for name in ("mcp", "refreshes"):
        f = r[name]
        print(
            f"{name:<8} {f['requests']} sent, ok {f['ok']}, errors {f['errors']}, "
            f"p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, max {f['max_ms']} ms"
        )
    print(f"{'window':>9} {'req/s':>7} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'refr':>4} {'gw RSS KiB':>10} {'gw fds':>6}")  # fmt: skip
    for w in r["windows"]:
        mem = (w.get("memory_at_end") or {}).get("gateway") or {}
        print(
            f"{w['from_s']:>3.0f}-{w['to_s']:<3.0f}s {w.get('rate', 0):>7.0f} "
            f"{sum(w['errors'].values()):>6} {w['p50_ms']!s:>8} {w['p99_ms']!s:>8} "
            f"{w['max_ms']!s:>8} {w['refreshes']:>4} {mem.get('rss_kib', '?')!s:>10} "
            f"{mem.get('fds', '?')!s:>6}"
        )
    mem0, mem1 = r["memory"][0], r["memory"][-1]
    print(
        f"gateway RSS: at start-up {r['gateway_at_startup']['rss_kib']} KiB, soak start "
        f"{mem0['gateway']['rss_kib']} KiB ({mem0['gateway']['fds']} fds), end "
        f"{mem1['gateway']['rss_kib']} KiB ({mem1['gateway']['fds']} fds), "
        f"{r['settle']:.0f} s later {r['memory_after_settle'].get('gateway')}"
    )
    print(f"CPU share over the soak: {r['cpu_share']}")
    print(f"gateway log: {r['gateway_log']}")


# --------------------------------------------------------------------------- command line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command")
    mg = sub.add_parser("memory-gateway", help="(internal) gateway over a pre-seeded MemoryStore")
    mg.add_argument("--config", type=Path, required=True)
    mg.add_argument("--families", type=int, required=True)
    mg.add_argument("--grants-out", type=Path, required=True)
    p.add_argument("--store", choices=["redis", "memory"], default="redis")
    p.add_argument("--duration", type=float, default=60.0, help="soak seconds")
    p.add_argument("--load", type=float, default=0.8, help="fraction of the measured maximum")
    p.add_argument("--rate", type=float, help="req/s to soak at (skips measuring the maximum)")
    p.add_argument("--max-seconds", type=float, default=5.0, help="seconds measuring the maximum")
    p.add_argument("--max-connections", type=int, default=16)
    p.add_argument("--refresh-ratio", type=float, default=0.01, help="share of token refreshes")
    p.add_argument("--families", type=int, default=8, help="refresh families (grants)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per reported window")
    p.add_argument("--max-conns", type=int, default=256, help="open-loop connection cap")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request time-out (s)")
    p.add_argument("--settle", type=float, default=5.0, help="idle seconds before the last RSS")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, config)")
    args = p.parse_args()
    if args.command == "memory-gateway":
        return memory_gateway(args.config, args.families, args.grants_out)
    configure_logging("error", "console", sys.stderr)  # the seeding's audit lines are noise here
    if not 0 < args.duration <= 3600 or not 0 < args.load <= 1.5 or args.families < 1:
        p.error("need 0 < --duration <= 3600, 0 < --load <= 1.5, --families >= 1")

    def overrun(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("the soak overran its time budget")

    signal.signal(signal.SIGALRM, overrun)
    signal.alarm(int(args.duration + args.max_seconds + args.settle + 180))  # a hard bound
    tmp = Path(tempfile.mkdtemp(prefix="mfagw-soak-"))
    try:
        result = run_soak(args, tmp)
    finally:
        signal.alarm(0)
        if args.keep:
            print(f"# kept {tmp} (config, logs)", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
