"""Demo launcher: run the gateway on the embedded store with one user enrolled in-process.

The embedded `memory://` store lives inside the gateway process, so `mfa-gateway totp enroll`
(a separate process) cannot reach it. This launcher builds the app with
`gateway.app.build_app(settings, store=MemoryStore(clock))`, enrols the demo user in that same
store with `gateway.flows.enrollment.enroll_user(...)`, prints what the user needs (name,
password, TOTP secret, otpauth URI, a terminal QR code, recovery codes, and the URL to point an
MCP client at), then serves until SIGINT/SIGTERM.

The TOTP seed is kept in ``--seed-file`` (created once, mode 0600) so that re-running the demo
keeps the authenticator entry the user already scanned; recovery codes are new on every start.

Run by ``demo/run.sh``; by hand:
``python demo/launch_gateway.py --config demo/.state/gateway.toml --user alice
--seed-file demo/.state/secrets/alice.totp`` (the password to print comes from
``$DEMO_PASSWORD``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import qrcode
from aiohttp import web

from gateway.adapters.memory_store import MemoryStore
from gateway.app import build_app
from gateway.clock import SystemClock
from gateway.core.totp import SeedError, new_seed, normalize_seed
from gateway.crypto import Sealer
from gateway.flows.enrollment import Enrollment, enroll_user
from gateway.logs import configure_logging
from gateway.settings import ConfigError, Settings, load_settings


def read_or_create_seed(path: Path) -> str:
    """The base32 seed stored at `path`, or a new one written there with mode 0600."""
    if path.exists():
        try:
            return normalize_seed(path.read_text(encoding="ascii"))
        except (SeedError, UnicodeDecodeError) as exc:
            raise SystemExit(
                f"{path}: not a usable TOTP seed ({exc}); delete it to get a new one"
            ) from None
    seed = new_seed()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(seed + "\n")
    return seed


def print_banner(settings: Settings, enrollment: Enrollment, password: str | None) -> None:
    """What the demo user needs, once, on the terminal (never in the logs)."""
    mcp_url = settings.resource_url(settings.resources[0])
    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(enrollment.otpauth_uri)
    qr.make(fit=True)
    out = sys.stdout
    rule = "=" * 72
    print(rule, file=out)
    print("mfa-gateway demo", file=out)
    print(rule, file=out)
    print(f"user:          {enrollment.user}", file=out)
    if password:
        print(f"password:      {password}   (at the legacy provider's login page)", file=out)
    print(f"TOTP secret:   {enrollment.secret}", file=out)
    print(f"otpauth URI:   {enrollment.otpauth_uri}", file=out)
    print("scan this with an authenticator app (or type the secret in):", file=out)
    if out.isatty():
        qr.print_tty(out=out)
    else:
        qr.print_ascii(out=out, invert=True)
    print("recovery codes (each works once instead of a TOTP code):", file=out)
    for code in enrollment.recovery_codes:
        print(f"  {code}", file=out)
    print(rule, file=out)
    print(f"point an MCP client at:  {mcp_url}", file=out)
    example = {"mcpServers": {"mfa-demo": {"type": "http", "url": mcp_url}}}
    print(f"e.g. in its config:      {json.dumps(example)}", file=out)
    print(
        "or: npx @modelcontextprotocol/inspector  (transport: Streamable HTTP, URL above)", file=out
    )
    print(f"gateway: {settings.server.public_url}   (Ctrl-C stops the demo)", file=out)
    print(rule, file=out, flush=True)


async def serve(settings: Settings, user: str, seed: str, password: str | None) -> None:
    """Enrol `user` in a fresh memory store, print the banner, serve until a signal."""
    clock = SystemClock()
    store = MemoryStore(clock)
    try:
        sealer = Sealer(settings.store.encryption_key_bytes)
        enrollment = await enroll_user(
            store, sealer, settings.global_policy.stepup, user, secret=seed, now=clock.now()
        )
        app = build_app(settings, clock=clock, store=store)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.server.bind_host, settings.server.bind_port)
            try:
                await site.start()
            except OSError as exc:
                raise SystemExit(
                    f"cannot listen on {settings.server.listen}: {exc.strerror}"
                ) from None
            print_banner(settings, enrollment, password)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="gateway.toml (store memory://)")
    p.add_argument("--user", default="alice", help="the user to enrol (the upstream subject)")
    p.add_argument("--seed-file", required=True, type=Path, help="where the TOTP seed is kept")
    args = p.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if not settings.store.url.startswith("memory:"):
        print("launch_gateway.py is for the embedded memory:// store", file=sys.stderr)
        return 2
    configure_logging(settings.logging.level, settings.logging.format, sys.stderr)
    seed = read_or_create_seed(args.seed_file)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings, args.user, seed, os.environ.get("DEMO_PASSWORD")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
