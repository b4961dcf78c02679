"""The `mfa-gateway` command: run, check-config, totp enroll|list|reset, keys generate.

The only module that exits. Every command reads the same config (`--config`, default
`$MFA_GATEWAY_CONFIG` or `./gateway.toml`) and the same store. Problems are one clear line each
on stderr, never a traceback. Exit codes: 0 success, 1 configuration/usage problem or nothing
to do, 2 the store (or a dependency) is unavailable.

`run` with `server.workers > 1` starts that many worker processes that all bind the same port
with `SO_REUSEPORT`; the parent only supervises them: it forwards SIGTERM/SIGINT, restarts a
worker that dies after it had started, and gives up if workers die right after starting.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import wait as wait_for_sentinels
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import qrcode
import qrcode.image.pure
import qrcode.image.svg
import structlog

from gateway import __version__
from gateway.settings import ConfigError, Settings, load_settings

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_UNAVAILABLE = 2
CONFIG_ENV = "MFA_GATEWAY_CONFIG"
DEFAULT_CONFIG = "gateway.toml"
# A worker that dies sooner than this after it was started is failing to start, not crashing.
_STARTUP_GRACE = 10.0
_MAX_RESTARTS_PER_MINUTE = 10
_KID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

log = structlog.get_logger(__name__)


class CliError(Exception):
    """A problem to report on stderr as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.code = code


def _err(message: str) -> None:
    print(f"mfa-gateway: {message}", file=sys.stderr)


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _print_problems(exc: ConfigError) -> NoReturn:
    """Print every problem on its own line (stderr) and fail with exit code 1."""
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    raise CliError(f"{len(exc.problems)} configuration problem(s)")


def _load(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(_config_path(args))
    except ConfigError as exc:
        _print_problems(exc)


def _configure_logs(settings: Settings, *, stream: Any = None, cache: bool = False) -> None:
    from gateway.logs import configure_logging

    configure_logging(
        settings.logging.level,
        settings.logging.format,
        stream or sys.stderr,
        cache_loggers=cache,
    )


def _store_location(settings: Settings) -> str:
    """The store URL without credentials, for messages (also several `host:port`s: Sentinel,
    Cluster)."""
    parts = urlsplit(settings.store.url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _write_private(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write `data` to a new file readable only by its owner (mode 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CliError(f"{path} exists already; refusing to overwrite it") from None
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(data)


# --------------------------------------------------------------------------- check-config


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config, its policies and the key files; print OK or every problem."""
    settings = _load(args)
    from gateway.keys import KeyRing

    try:
        KeyRing.from_settings(settings)
    except ConfigError as exc:
        _print_problems(exc)
    except (KeyError, ValueError, OSError) as exc:
        _print_problems(ConfigError([f"{settings.config_path}: keys: {_exc_message(exc)}"]))
    print("OK")
    return EXIT_OK


def _exc_message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- store commands


def _run_with_store(settings: Settings, action: Callable[[Any], Awaitable[int]]) -> int:
    """Open the configured store, check it answers, run `action(store)`, close it."""
    if settings.store.url.startswith("memory:"):
        raise CliError(
            "store.url is memory://: that store lives inside the running gateway process, so "
            "this command would change nothing; configure a redis:// store (or let users "
            'enrol at first login with stepup.enrollment = "first_login")'
        )
    from gateway.adapters.factory import open_store
    from gateway.clock import SystemClock
    from gateway.core.errors import StoreUnavailable

    async def go() -> int:
        store = open_store(settings, SystemClock())
        try:
            async with asyncio.timeout(settings.store.timeout):
                await store.ping()
            return await action(store)
        except (StoreUnavailable, TimeoutError, OSError):
            raise CliError(
                f"the store at {_store_location(settings)} is unavailable", EXIT_UNAVAILABLE
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await store.close()

    return asyncio.run(go())


def _png(qr: Any) -> bytes:
    """The QR code as PNG, through qrcode's pure-Python PNG backend (pypng)."""
    buffer = io.BytesIO()
    qr.make_image(image_factory=qrcode.image.pure.PyPNGImage).save(buffer)
    return buffer.getvalue()


def _qr(uri: str) -> Any:
    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(uri)
    qr.make(fit=True)
    return qr


def _read_secret_arg(value: str | None) -> str | None:
    if value != "-":
        return value
    return sys.stdin.readline().strip()


def cmd_totp_enroll(args: argparse.Namespace) -> int:
    """Provision a user's TOTP seed; show the URI, a QR code, the secret and recovery codes once."""
    settings = _load(args)
    _configure_logs(settings)
    secret = _read_secret_arg(args.secret)
    from gateway.clock import SystemClock
    from gateway.crypto import Sealer
    from gateway.flows.enrollment import enroll_user

    async def action(store: Any) -> int:
        try:
            enrollment = await enroll_user(
                store,
                Sealer(settings.store.encryption_key_bytes),
                settings.global_policy.stepup,
                args.user,
                secret=secret,
                now=SystemClock().now(),
            )
        except ValueError as exc:
            raise CliError(f"cannot enrol {args.user!r}: {exc}") from None
        qr = _qr(enrollment.otpauth_uri)
        if args.qr_png:
            _write_private(Path(args.qr_png), _png(qr), exclusive=False)
        if args.qr_svg:
            svg = qr.make_image(image_factory=qrcode.image.svg.SvgPathImage).to_string()
            _write_private(Path(args.qr_svg), svg, exclusive=False)
        if args.json:
            print(
                json.dumps(
                    {
                        "user": enrollment.user,
                        "secret": enrollment.secret,
                        "otpauth_uri": enrollment.otpauth_uri,
                        "recovery_codes": list(enrollment.recovery_codes),
                    }
                )
            )
            return EXIT_OK
        out = sys.stdout
        print(f"TOTP enrolled for {enrollment.user}", file=out)
        print("Scan this QR code with an authenticator app:", file=out)
        qr.print_ascii(out=out, tty=False, invert=True)
        print(f"otpauth URI: {enrollment.otpauth_uri}", file=out)
        print(f"Secret (base32, for manual entry): {enrollment.secret}", file=out)
        if enrollment.recovery_codes:
            print("Recovery codes (each works once; shown only now, store them safely):", file=out)
            for code in enrollment.recovery_codes:
                print(f"  {code}", file=out)
        return EXIT_OK

    return _run_with_store(settings, action)


def cmd_totp_list(args: argparse.Namespace) -> int:
    """Print the users that have a TOTP enrolment, one per line (or a JSON array)."""
    settings = _load(args)
    _configure_logs(settings)
    from gateway.flows.enrollment import list_users

    async def action(store: Any) -> int:
        users = sorted(await list_users(store))
        if args.json:
            print(json.dumps(users))
        else:
            for user in users:
                print(user)
        return EXIT_OK

    return _run_with_store(settings, action)


def cmd_totp_reset(args: argparse.Namespace) -> int:
    """Remove a user's seed, recovery codes and burned steps."""
    settings = _load(args)
    _configure_logs(settings)
    from gateway.flows.enrollment import reset_user

    async def action(store: Any) -> int:
        if not await reset_user(store, args.user):
            raise CliError(f"no TOTP enrolment for {args.user!r}")
        print(f"TOTP reset for {args.user}")
        return EXIT_OK

    return _run_with_store(settings, action)


# --------------------------------------------------------------------------- keys


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(pem: bytes) -> str:
    """RFC 7638 SHA-256 thumbprint of a PEM private key's public part (EC P-256 or Ed25519)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = key.public_key().public_numbers()
        members = {
            "crv": "P-256",
            "kty": "EC",
            "x": _b64u(numbers.x.to_bytes(32, "big")),
            "y": _b64u(numbers.y.to_bytes(32, "big")),
        }
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        members = {"crv": "Ed25519", "kty": "OKP", "x": _b64u(raw)}
    else:
        raise ValueError("unsupported key type")
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64u(hashlib.sha256(canonical).digest())


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Print a fresh encryption key or cookie secret, or write a new signing key (0600)."""
    if args.encryption_key:
        from gateway.crypto import generate_encryption_key

        print(generate_encryption_key())
        return EXIT_OK
    if args.cookie_secret:
        print(secrets.token_urlsafe(48))
        return EXIT_OK
    if not args.out:
        raise CliError("keys generate needs --out FILE, --encryption-key or --cookie-secret")
    from gateway.keys import generate_private_key_pem

    out = Path(args.out)
    pem = generate_private_key_pem(args.alg)
    _write_private(out, pem, exclusive=True)
    kid = out.stem if _KID.match(out.stem) else f"{args.alg.lower()}-{jwk_thumbprint(pem)[:16]}"
    print(f"wrote {out} ({args.alg}, PKCS#8 PEM, mode 0600)")
    print(f"suggested kid: {kid}")
    print("add to gateway.toml:")
    print("[[keys.signing]]")
    print(f'kid = "{kid}"')
    print(f'file = "{out.as_posix()}"')
    print(f'alg = "{args.alg}"')
    return EXIT_OK


# --------------------------------------------------------------------------- run


def _new_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


async def serve(settings: Settings, *, reuse_port: bool) -> int:
    """Build the app, check the store, listen, and run until SIGTERM/SIGINT; graceful stop."""
    from aiohttp import web

    from gateway.app import READINESS, build_app
    from gateway.core.errors import StoreUnavailable
    from gateway.web.appkeys import HTTP, STORE

    try:
        app = build_app(settings)
    except ConfigError as exc:
        _print_problems(exc)
    except (KeyError, ValueError, OSError) as exc:
        raise CliError(f"{settings.config_path}: keys: {_exc_message(exc)}") from None
    except StoreUnavailable:
        raise CliError(
            f"the store at {_store_location(settings)} is unavailable", EXIT_UNAVAILABLE
        ) from None
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.server.shutdown_timeout,
        # aiohttp closes a connection whose next request has not arrived (headers included)
        # within the keep-alive time-out: with request_timeout it also cuts off slowloris
        # headers; bodies are bounded by gateway.web.bodies.
        keepalive_timeout=settings.server.request_timeout,
    )
    await runner.setup()
    try:
        try:
            async with asyncio.timeout(settings.store.timeout):
                await app[STORE].ping()
        except (StoreUnavailable, TimeoutError, OSError):
            raise CliError(
                f"the store at {_store_location(settings)} is unavailable", EXIT_UNAVAILABLE
            ) from None
        await app[READINESS].upstream_ok(app[HTTP])  # logs upstream_unavailable; not fatal
        site = web.TCPSite(
            runner,
            settings.server.bind_host or None,
            settings.server.bind_port,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        try:
            await site.start()
        except OSError as exc:
            raise CliError(
                f"cannot listen on {settings.server.listen}: {exc.strerror or exc}"
            ) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "gateway_started",
            listen=settings.server.listen,
            public_url=settings.server.public_url,
            pid=os.getpid(),
            version=__version__,
        )
        await stop.wait()
        log.info("gateway_stopping", pid=os.getpid())
    finally:
        await runner.cleanup()
    return EXIT_OK


def _worker_main(config_path: str) -> None:
    """Entry point of one worker process (spawned): serve with SO_REUSEPORT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards SIGTERM
    try:
        settings = load_settings(config_path)
        _configure_logs(settings, stream=sys.stdout, cache=True)
        with _new_runner() as runner:
            code = runner.run(serve(settings, reuse_port=True))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        code = EXIT_CONFIG
    except CliError as exc:
        _err(str(exc))
        code = exc.code
    except Exception as exc:  # never a traceback, as in `main`
        _err(f"unexpected error ({type(exc).__name__})")
        code = EXIT_CONFIG
    sys.exit(code)


class _Supervisor:
    """Runs N worker processes; forwards SIGTERM/SIGINT; restarts crashed workers."""

    def __init__(self, config_path: Path, workers: int, stop_timeout: float) -> None:
        self._config = str(config_path)
        self._n = workers
        self._stop_timeout = stop_timeout
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, tuple[multiprocessing.process.BaseProcess, float]] = {}
        self._stopping = False
        self._restarts: list[float] = []

    def _start(self, slot: int) -> None:
        proc = self._ctx.Process(target=_worker_main, args=(self._config,), name=f"worker-{slot}")
        proc.start()
        self._procs[slot] = (proc, time.monotonic())

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in range(self._n):
            self._start(slot)
        log.info("supervisor_started", workers=self._n, pid=os.getpid())
        code = EXIT_OK
        while not self._stopping:
            sentinels = [p.sentinel for p, _ in self._procs.values()]
            wait_for_sentinels(sentinels, timeout=0.5)
            for slot, (proc, started) in list(self._procs.items()):
                if proc.is_alive() or self._stopping:
                    continue
                exitcode = proc.exitcode
                log.warning("worker_exited", worker=slot, exitcode=exitcode)
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < 60.0] + [now]
                if now - started < _STARTUP_GRACE or len(self._restarts) > _MAX_RESTARTS_PER_MINUTE:
                    code = exitcode if exitcode and exitcode > 0 else EXIT_CONFIG
                    self._stopping = True
                    break
                self._start(slot)
        self._stop_all()
        return code

    def _stop_all(self) -> None:
        for proc, _ in self._procs.values():
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout + 5.0
        for proc, _ in self._procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        log.info("supervisor_stopped", pid=os.getpid())


def cmd_run(args: argparse.Namespace) -> int:
    """Serve: in this process, or with `server.workers` processes sharing the port."""
    settings = _load(args)
    _configure_logs(settings, stream=sys.stdout, cache=True)
    if settings.server.workers > 1:
        return _Supervisor(
            settings.config_path, settings.server.workers, settings.server.shutdown_timeout
        ).run()
    with _new_runner() as runner:
        return runner.run(serve(settings, reuse_port=False))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every subcommand takes --config)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"gateway.toml to use (default: ${CONFIG_ENV} or ./{DEFAULT_CONFIG})",
    )
    parser = argparse.ArgumentParser(
        prog="mfa-gateway",
        description="TOTP step-up gateway for MCP servers behind a legacy OAuth/OIDC provider.",
    )
    parser.add_argument("--version", action="version", version=f"mfa-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="serve")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", parents=[common], help="validate the configuration")
    check.set_defaults(func=cmd_check_config)

    totp = sub.add_parser("totp", help="manage TOTP enrolments")
    totp_sub = totp.add_subparsers(dest="totp_command", required=True, metavar="ACTION")
    enroll = totp_sub.add_parser("enroll", parents=[common], help="enrol a user")
    enroll.add_argument("user")
    enroll.add_argument(
        "--secret",
        metavar="BASE32",
        help="use this seed instead of a random one ('-' reads it from stdin)",
    )
    enroll.add_argument("--json", action="store_true", help="print one JSON object")
    enroll.add_argument("--qr-png", metavar="PATH", help="also write the QR code as PNG (0600)")
    enroll.add_argument("--qr-svg", metavar="PATH", help="also write the QR code as SVG (0600)")
    enroll.set_defaults(func=cmd_totp_enroll)
    lst = totp_sub.add_parser("list", parents=[common], help="list enrolled users")
    lst.add_argument("--json", action="store_true", help="print a JSON array")
    lst.set_defaults(func=cmd_totp_list)
    reset = totp_sub.add_parser("reset", parents=[common], help="remove a user's enrolment")
    reset.add_argument("user")
    reset.set_defaults(func=cmd_totp_reset)

    keys = sub.add_parser("keys", help="generate keys and secrets")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen = keys_sub.add_parser("generate", parents=[common], help="generate a key or secret")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", metavar="FILE", help="write a new signing key (PKCS#8 PEM, 0600)")
    what.add_argument(
        "--encryption-key", action="store_true", help="print a new [store] encryption_key"
    )
    what.add_argument(
        "--cookie-secret", action="store_true", help="print a new [keys] cookie_secret"
    )
    gen.add_argument(
        "--alg",
        choices=["ES256", "EdDSA"],
        default="ES256",
        help="signing algorithm of the new key (default ES256)",
    )
    gen.set_defaults(func=cmd_keys_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        _err(str(exc))
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback: one line naming the kind of failure
        _err(f"unexpected error ({type(exc).__name__})")
        return EXIT_CONFIG
