"""The `mfa-gateway` command line (`gateway.cli`): every command, its output and exit codes."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.cli import jwk_thumbprint, main
from gateway.logs import reset_logging
from tests.fixtures.config import make_config

B32 = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """CLI commands configure logging; put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        reset_logging()
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def redis_config(tmp_path: Path, redis_url: str) -> Iterator[Path]:
    """A config whose store is the session's real Redis under a fresh key prefix."""
    prefix = f"cli-{secrets.token_hex(4)}:"
    path = make_config(tmp_path, store={"url": redis_url, "key_prefix": prefix})
    yield path
    raw = redis.Redis.from_url(redis_url)
    try:
        for key in raw.scan_iter(match=prefix + "*"):
            raw.delete(key)
    finally:
        raw.close()


def _redis_dump(redis_url: str, prefix: str) -> str:
    """Every key, member and value under `prefix`, as text (to grep for plaintext secrets)."""
    raw: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        parts: list[str] = []
        for key in raw.scan_iter(match=prefix + "*"):
            kind = raw.type(key)
            if kind == "string":
                parts.append(raw.get(key) or "")
            elif kind == "hash":
                parts.extend(f"{k}={v}" for k, v in raw.hgetall(key).items())
            elif kind == "set":
                parts.extend(raw.smembers(key))
            elif kind == "zset":
                parts.extend(raw.zrange(key, 0, -1))
            elif kind == "list":
                parts.extend(raw.lrange(key, 0, -1))
            parts.append(key)
        return "\n".join(parts)
    finally:
        raw.close()


class TestKeysGenerate:
    def test_signing_key_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`keys generate --out` writes a PKCS#8 P-256 PEM with mode 0600 and suggests a kid."""
        out = tmp_path / "es256-1.pem"
        assert main(["keys", "generate", "--out", str(out)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        pem = out.read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        printed = capsys.readouterr().out.splitlines()
        assert printed[1] == "suggested kid: es256-1"
        assert printed[-3:] == ['kid = "es256-1"', f'file = "{out.as_posix()}"', 'alg = "ES256"']

    def test_eddsa_key_and_thumbprint_kid(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """EdDSA makes an Ed25519 key; a file name unfit for a kid gives a thumbprint kid."""
        out = tmp_path / "my key.pem"
        assert main(["keys", "generate", "--alg", "EdDSA", "--out", str(out)]) == 0
        pem = out.read_bytes()
        assert isinstance(serialization.load_pem_private_key(pem, None), ed25519.Ed25519PrivateKey)
        printed = capsys.readouterr().out.splitlines()
        assert printed[1] == f"suggested kid: eddsa-{jwk_thumbprint(pem)[:16]}"

    def test_refuses_to_overwrite(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An existing key file is never overwritten (a lost key invalidates all tokens)."""
        out = tmp_path / "k.pem"
        out.write_text("keep me", "utf-8")
        assert main(["keys", "generate", "--out", str(out)]) == 1
        assert out.read_text("utf-8") == "keep me"
        assert (
            capsys.readouterr().err == f"mfa-gateway: {out} exists already; refusing to "
            "overwrite it\n"
        )

    def test_encryption_key(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`--encryption-key` prints 32 fresh random bytes, base64url, different each time."""
        assert main(["keys", "generate", "--encryption-key"]) == 0
        assert main(["keys", "generate", "--encryption-key"]) == 0
        first, second = capsys.readouterr().out.split()
        assert first != second
        assert len(base64.urlsafe_b64decode(first + "=")) == 32

    def test_cookie_secret(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`--cookie-secret` prints a fresh secret long enough for `keys.cookie_secret`."""
        assert main(["keys", "generate", "--cookie-secret"]) == 0
        value = capsys.readouterr().out.strip()
        assert len(value) >= 32

    def test_needs_exactly_one_target(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`keys generate` without a target is a usage error, not a traceback."""
        assert main(["keys", "generate"]) == 2
        assert (
            "one of the arguments --out --encryption-key --cookie-secret is required"
            in capsys.readouterr().err
        )


class TestCheckConfig:
    def test_ok(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A valid config prints OK and exits 0."""
        path = make_config(tmp_path)
        assert main(["check-config", "--config", str(path)]) == 0
        assert capsys.readouterr().out == "OK\n"

    def test_config_from_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without --config, $MFA_GATEWAY_CONFIG names the file."""
        monkeypatch.setenv("MFA_GATEWAY_CONFIG", str(make_config(tmp_path)))
        assert main(["check-config"]) == 0
        assert capsys.readouterr().out == "OK\n"

    def test_default_is_gateway_toml_here(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without --config or the variable, ./gateway.toml is read."""
        monkeypatch.delenv("MFA_GATEWAY_CONFIG", raising=False)
        monkeypatch.chdir(tmp_path)
        assert main(["check-config"]) == 1
        assert capsys.readouterr().err.splitlines()[0] == "gateway.toml: (file): not found"

    def test_unusable_key_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A key file that is not a usable key is a config problem naming the key."""
        path = make_config(tmp_path)
        (tmp_path / "keys" / "es256-1.pem").write_text("garbage", "utf-8")
        assert main(["check-config", "--config", str(path)]) == 1
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith(f"{path}: keys.signing[0].file: ")
        assert err[-1] == "mfa-gateway: 1 configuration problem(s)"


class TestTotpCommands:
    def test_memory_store_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With memory:// the CLI cannot reach the gateway's store: refuse, change nothing."""
        path = make_config(tmp_path)
        assert main(["totp", "enroll", "alice", "--config", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("mfa-gateway: store.url is memory://")

    def test_enroll_list_reset_roundtrip(
        self, redis_config: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Enrol prints the seed once as JSON; list shows the user; reset removes it (R34)."""
        cfg = ["--config", str(redis_config)]
        assert main(["totp", "enroll", "alice", "--json", *cfg]) == 0
        enrolled = json.loads(capsys.readouterr().out)
        assert sorted(enrolled) == ["otpauth_uri", "recovery_codes", "secret", "user"]
        assert enrolled["user"] == "alice"
        assert (
            len(base64.b32decode(enrolled["secret"] + "=" * (-len(enrolled["secret"]) % 8))) >= 16
        )
        assert enrolled["otpauth_uri"].startswith("otpauth://totp/")
        assert len(enrolled["recovery_codes"]) == 10
        prefix = redis_config.read_text("utf-8").split('key_prefix = "')[1].split('"')[0]
        dump = _redis_dump(redis_url, prefix)
        assert dump  # something was stored ...
        assert enrolled["secret"] not in dump  # ... but never the seed in clear (R34)
        assert all(
            c not in dump and c.replace("-", "") not in dump for c in enrolled["recovery_codes"]
        )

        assert main(["totp", "list", *cfg]) == 0
        assert capsys.readouterr().out == "alice\n"
        assert main(["totp", "list", "--json", *cfg]) == 0
        assert json.loads(capsys.readouterr().out) == ["alice"]

        assert main(["totp", "enroll", "alice", *cfg]) == 1
        assert "already enrolled" in capsys.readouterr().err

        assert main(["totp", "reset", "alice", *cfg]) == 0
        assert capsys.readouterr().out == "TOTP reset for alice\n"
        assert main(["totp", "list", *cfg]) == 0
        assert capsys.readouterr().out == ""
        assert main(["totp", "reset", "alice", *cfg]) == 1
        assert capsys.readouterr().err == "mfa-gateway: no TOTP enrolment for 'alice'\n"

    def test_enroll_with_given_secret_and_qr_files(
        self, redis_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--secret uses the administrator's seed; QR files are written 0600 (they hold it)."""
        png, svg = tmp_path / "qr.png", tmp_path / "qr.svg"
        code = main(
            [
                "totp",
                "enroll",
                "bob",
                "--secret",
                B32,
                "--json",
                "--qr-png",
                str(png),
                "--qr-svg",
                str(svg),
                "--config",
                str(redis_config),
            ]
        )
        assert code == 0
        assert json.loads(capsys.readouterr().out)["secret"] == B32
        for f in (png, svg):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        from PIL import Image

        with Image.open(png) as img:
            assert img.size[0] == img.size[1]
            assert img.size[0] >= 200
        assert b"<svg" in svg.read_bytes()

    def test_enroll_rejects_a_bad_secret(
        self, redis_config: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A malformed or short seed is refused with a message, not stored."""
        assert (
            main(
                [
                    "totp",
                    "enroll",
                    "carol",
                    "--secret",
                    "not base32!",
                    "--config",
                    str(redis_config),
                ]
            )
            == 1
        )
        assert capsys.readouterr().err.startswith("mfa-gateway: cannot enrol 'carol': ")
        assert main(["totp", "list", "--config", str(redis_config)]) == 0
        assert capsys.readouterr().out == ""

    def test_enroll_text_output_through_the_real_command(self, redis_config: Path) -> None:
        """`python -m gateway totp enroll` prints URI, a terminal QR code, secret and codes."""
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "totp",
                "enroll",
                "dave",
                "--config",
                str(redis_config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == "TOTP enrolled for dave"
        assert any("█" in line for line in lines)
        uri = next(li for li in lines if li.startswith("otpauth URI: "))
        secret = next(li for li in lines if li.startswith("Secret (base32, for manual entry): "))
        assert secret.rsplit(" ", 1)[1] in uri
        codes_at = lines.index(
            "Recovery codes (each works once; shown only now, store them safely):"
        )
        assert len(lines[codes_at + 1 :]) == 10
        assert "Traceback" not in proc.stderr

    @pytest.mark.parametrize("command", [["totp", "list"], ["totp", "reset", "x"]])
    def test_store_unavailable(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
    ) -> None:
        """Redis down: one line on stderr, exit 2, and the password in the URL never shown."""
        port = _free_port()
        path = make_config(
            tmp_path, store={"url": f"redis://:hunter2@127.0.0.1:{port}/0", "timeout": "500ms"}
        )
        assert main([*command, "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.endswith(f"mfa-gateway: the store at redis://127.0.0.1:{port} is unavailable\n")
        assert "hunter2" not in err
        assert "Traceback" not in err


class TestUsage:
    def test_no_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        """No command: usage on stderr and exit 2."""
        assert main([]) == 2
        assert capsys.readouterr().err.startswith("usage: mfa-gateway")

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--version prints the version and exits 0."""
        assert main(["--version"]) == 0
        assert capsys.readouterr().out == "mfa-gateway 0.1.0\n"


# --------------------------------------------------------------------------- run


def _wait_healthy(port: int, proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    pytest.fail("the gateway did not become healthy")


def _serve(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class TestRun:
    def test_run_serves_and_stops_on_sigterm(self, tmp_path: Path) -> None:
        """`run` serves /healthz and exits 0 on SIGTERM; logs are JSON lines, no access log."""
        port = _free_port()
        path = make_config(
            tmp_path,
            server={"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"},
            upstream={"timeout": "500ms"},
        )
        proc = _serve(path)
        try:
            _wait_healthy(port, proc)
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/healthz?code=CANARY-in-query", timeout=2
            ) as resp:
                assert resp.headers["X-Request-Id"]
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        events = [json.loads(line)["event"] for line in out.splitlines()]
        assert "upstream_unavailable" in events  # probed at start-up, not fatal
        assert "gateway_started" in events
        assert events[-1] == "gateway_stopping"
        assert events.count("request_finished") >= 2
        assert "CANARY" not in out + err

    def test_run_workers_share_the_port(self, tmp_path: Path, redis_url: str) -> None:
        """workers = 2: two processes serve one port (SO_REUSEPORT); SIGTERM stops all."""
        port = _free_port()
        path = make_config(
            tmp_path,
            server={
                "listen": f"127.0.0.1:{port}",
                "public_url": f"http://127.0.0.1:{port}",
                "workers": 2,
            },
            store={"url": redis_url, "key_prefix": f"run-{secrets.token_hex(4)}:"},
            upstream={"timeout": "500ms"},
        )
        proc = _serve(path)
        assert proc.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
        reader.start()
        try:
            _wait_healthy(port, proc)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "".join(lines).count('"gateway_started"') < 2:
                time.sleep(0.1)
            pids = _worker_pids(proc.pid)
            assert len(pids) == 2
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=40)  # stdout belongs to the reader thread
            reader.join(timeout=10)
            err = proc.stderr.read() if proc.stderr else ""
        assert proc.returncode == 0, err
        assert not any(_alive(pid) for pid in pids)
        events = [json.loads(line)["event"] for line in lines]
        assert events.count("gateway_started") == 2
        assert events.count("gateway_stopping") == 2
        assert events[-1] == "supervisor_stopped"

    def test_run_store_unavailable(self, tmp_path: Path) -> None:
        """`run` with Redis down exits 2 with one line on stderr, never a traceback."""
        port = _free_port()
        path = make_config(
            tmp_path,
            store={"url": f"redis://127.0.0.1:{_free_port()}/0", "timeout": "500ms"},
            server={"listen": f"127.0.0.1:{port}"},
        )
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2
        assert proc.stderr.splitlines()[-1].startswith("mfa-gateway: the store at redis://")
        assert "Traceback" not in proc.stderr


def _worker_pids(parent: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            cmdline = (entry / "cmdline").read_bytes()
            if b"spawn_main" in cmdline:  # not the resource tracker
                pids.add(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
