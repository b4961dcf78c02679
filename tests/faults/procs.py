"""Real gateway processes for fault and replica tests: `python -m gateway run --config F`.

`GatewayProcess` is one gateway started exactly as an operator starts it (the CLI, uvloop, its
own `AppRunner`), with stdout/stderr in a log file that the tests read as JSON lines (the
gateway's structured log) and attach to the report of a failed test. The `gateway_processes`
fixture hands out a `GatewayLauncher` and stops every process it started at the end of the test.

`config_for(...)` writes a config through `tests.fixtures.config.make_config` with the test-only
relaxations every loopback gateway needs; `clone_config(...)` copies a config tree (same keys,
secrets, policies, store prefix) for a second replica that listens elsewhere. `mint_token` signs
an access token with a config's own signing key, the way the gateway itself would.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.clock import SystemClock
from gateway.core.tokens import build_access_claims, mint_access_token
from gateway.keys import KeyRing
from gateway.settings import Settings, load_settings
from tests.fixtures.config import make_config, merge, to_toml
from tests.fixtures.peers import PeerProcess

READY = r'"event":\s*"gateway_started"'
STARTUP_TIMEOUT = 20.0
FEED_TIMEOUT = 10.0
# What the gateway's own step-up puts into `amr` (the proxy requires `mfa`).
MCP_AMR = ("pwd", "otp", "mfa")


@dataclass
class GatewayProcess:
    """A running `mfa-gateway run` subprocess."""

    name: str
    config_path: Path
    port: int
    peer: PeerProcess = field(repr=False)

    @property
    def url(self) -> str:
        """Where this process listens (not necessarily its public_url)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def settings(self) -> Settings:
        return load_settings(self.config_path)

    @property
    def pid(self) -> int:
        assert self.peer.proc is not None
        return self.peer.proc.pid

    @property
    def alive(self) -> bool:
        return self.peer.alive

    def log_text(self) -> str:
        return self.peer.log_text()

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (optionally only those with `event`); other lines are skipped."""
        out: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and (event is None or item.get("event") == event):
                out.append(item)
        return out

    async def wait_event(
        self, event: str, *, count: int = 1, within: float = FEED_TIMEOUT, **match: object
    ) -> dict[str, Any]:
        """Wait until the log holds `count` lines of `event` (with `match` fields); the last."""
        deadline = time.monotonic() + within
        while True:
            found = [e for e in self.events(event) if all(e.get(k) == v for k, v in match.items())]
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no {count}x {event} {match} after {within}s")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.peer.stop()


class GatewayLauncher:
    """Starts gateway processes for one test; `stop_all()` ends them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[GatewayProcess] = []

    def start(self, config_path: Path, *, name: str | None = None) -> GatewayProcess:
        """Run `python -m gateway run --config <config_path>` and wait for `gateway_started`."""
        name = name or f"gateway-{len(self.started)}"
        settings = load_settings(config_path)
        argv = [sys.executable, "-m", "gateway", "run", "--config", str(config_path)]
        peer = PeerProcess(name, argv, self.log_dir / f"{name}.log", env={"PYTHONUNBUFFERED": "1"})
        peer.start(READY, timeout=STARTUP_TIMEOUT)
        gw = GatewayProcess(name, config_path, settings.server.bind_port, peer)
        self.started.append(gw)
        # The proxy fails closed until its revocation feed is proven live: wait for that too.
        deadline = time.monotonic() + FEED_TIMEOUT
        while not gw.events("revocation_feed_current"):
            if time.monotonic() > deadline or not gw.alive:
                pytest.fail(
                    f"{name}: the revocation feed never became current:\n" + peer.log_tail()
                )
            time.sleep(0.02)
        return gw

    def stop_all(self) -> None:
        for gw in self.started:
            gw.stop()


@pytest.fixture
def gateway_processes(tmp_path: Path) -> Iterator[GatewayLauncher]:
    """Start real gateway processes; all are stopped (SIGTERM, then SIGKILL) after the test."""
    launcher = GatewayLauncher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


def attach_gateway_logs(item: pytest.Item, report: pytest.TestReport) -> None:
    """Add the tail of every live gateway's log to a failed test's report."""
    if not report.failed:
        return
    for peer in PeerProcess.running:
        if peer.name.startswith(("gateway", "replica")):
            report.sections.append((f"{peer.name} log ({peer.log_path})", peer.log_tail()))


# --------------------------------------------------------------------------- configs


def config_for(
    directory: Path,
    *,
    port: int,
    public_url: str | None = None,
    store_url: str = "memory://",
    key_prefix: str | None = None,
    upstream: Mapping[str, Any] | None = None,
    resources: list[dict[str, Any]] | None = None,
    policy: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """A gateway.toml for a loopback gateway on `port` (public_url defaults to that port)."""
    directory.mkdir(parents=True, exist_ok=True)
    server = merge(
        {
            "listen": f"127.0.0.1:{port}",
            "public_url": public_url or f"http://127.0.0.1:{port}",
            "dev_http_loopback": True,
        },
        overrides.pop("server", {}),
    )
    store = {
        "url": store_url,
        "key_prefix": key_prefix or f"mfagw-faults-{secrets.token_hex(4)}:",
        **overrides.pop("store", {}),
    }
    return make_config(
        directory,
        server=server,
        store=store,
        upstream=dict(upstream or {}),
        resources=resources or [{"path": "/mcp", "upstream": "http://127.0.0.1:9/mcp"}],
        policy=merge({"registration": {"cimd_allow_private_addresses": True}}, policy or {}),
        **overrides,
    )


def clone_config(source: Path, directory: Path, *, listen_port: int) -> Path:
    """Copy `source`'s config tree (keys, policies, secrets, store prefix, public_url) into
    `directory`, changing only `server.listen`: a second replica of the same deployment."""
    import tomllib

    shutil.copytree(source.parent, directory)
    path = directory / source.name
    raw = tomllib.loads(path.read_text("utf-8"))
    raw["server"]["listen"] = f"127.0.0.1:{listen_port}"
    path.write_text(to_toml(raw), "utf-8")
    return path


def mint_token(
    config_path: Path,
    *,
    sub: str = "alice",
    resource: str = "/mcp",
    amr: tuple[str, ...] = MCP_AMR,
    ttl: float = 600.0,
    scope: str = "mcp",
) -> str:
    """An access token signed with the config's active key, as the gateway issues them."""
    settings = load_settings(config_path)
    keys = KeyRing.from_settings(settings)
    now = SystemClock().now()  # the gateway process reads the same wall clock
    claims = build_access_claims(
        issuer=settings.issuer,
        sub=sub,
        audience=settings.server.public_url + resource,
        client_id="fault-test-client",
        scope=scope,
        auth_time=now - 5,
        amr=amr,
        acr="urn:mfa-gateway:totp",
        gid="fault-test-grant",
        now=now,
        ttl=ttl,
    )
    return mint_access_token(claims, keys.active)


async def wait_ready(url: str, *, within: float = 15.0, status: int = 200) -> dict[str, Any]:
    """Poll `/readyz` until it answers `status`; its JSON body."""
    deadline = time.monotonic() + within
    last: object = None
    async with httpx.AsyncClient(timeout=2.0) as http:
        while time.monotonic() < deadline:
            try:
                resp = await http.get(url + "/readyz")
                last = (resp.status_code, resp.text)
                if resp.status_code == status:
                    body: dict[str, Any] = resp.json()
                    return body
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.1)
    pytest.fail(f"{url}/readyz did not answer {status} within {within}s (last: {last})")


async def enroll(config_path: Path, user: str, secret: str) -> None:
    """Enrol `user` in the config's (shared) store, as `mfa-gateway totp enroll` does."""
    from gateway.adapters.factory import open_store
    from gateway.crypto import Sealer
    from gateway.flows.enrollment import enroll_user

    settings = load_settings(config_path)
    clock = SystemClock()
    store = open_store(settings, clock)
    try:
        await enroll_user(
            store,
            Sealer(settings.store.encryption_key_bytes),
            settings.global_policy.stepup,
            user,
            secret=secret,
            now=clock.now(),
            replace=True,
        )
    finally:
        await store.close()
