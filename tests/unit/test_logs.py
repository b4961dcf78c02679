"""The logging chain and the one `redact` processor (R35, DESIGN §6, STYLE §4.4)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Literal

import pytest
import structlog

from gateway.logs import REDACTED, configure_logging, is_sensitive_key, redact, reset_logging, scrub

# Canary values: each must never appear in any captured output.
JWT = (
    "eyJhbGciOiJFUzI1NiIsInR5cCI6ImF0K2p3dCJ9"
    ".eyJzdWIiOiJjYW5hcnktand0LXN1YmplY3QifQ"
    ".c2lnbmF0dXJlLWNhbmFyeS1qd3Q"
)
CANARIES = {
    "kwarg_access_token": "CANARY-access-token-1",
    "kwarg_client_secret": "CANARY-client-secret-2",
    "kwarg_password": "CANARY-password-3",
    "kwarg_code": "CANARY-code-4",
    "kwarg_totp": "731904",
    "kwarg_seed": "JBSWY3DPEHPK3PXPCANARY",
    "nested_refresh": "CANARY-nested-refresh-5",
    "nested_verifier": "CANARY-nested-verifier-6",
    "header_bearer": "CANARY-header-bearer-7",
    "header_cookie": "CANARY-header-cookie-8",
    "header_unlisted": "CANARY-unlisted-header-9",
    "exc_query": "CANARY-exception-code-10",
    "exc_bearer": "CANARY-exception-bearer-11",
    "stdlib_bearer": "CANARY-stdlib-bearer-12",
    "stdlib_extra": "CANARY-stdlib-extra-13",
    "url_code": "CANARY-url-code-14",
    "repr_secret": "CANARY-repr-secret-15",
    "local_var": "CANARY-frame-local-16",
    "recovery": "abcd-efgh-2345",
    "cookie_kwarg": "CANARY-cookie-kwarg-17",
    "basic": "Q0FOQVJZOmJhc2ljLWF1dGg=",
}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog and the root logger back as they were after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        reset_logging()
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def _configure(fmt: Literal["json", "console"]) -> io.StringIO:
    buf = io.StringIO()
    configure_logging("debug", fmt, buf)
    return buf


def _fail_with_local() -> None:
    secret_local = CANARIES["local_var"]  # must not be rendered: no frame locals in logs
    raise RuntimeError(f"lookup failed ({len(secret_local)} chars)")


def _plant_everything() -> None:
    log = structlog.get_logger("canary")
    log.info(
        "token_issued",
        access_token=CANARIES["kwarg_access_token"],
        client_secret=CANARIES["kwarg_client_secret"],
        Password=CANARIES["kwarg_password"],
        code=CANARIES["kwarg_code"],
        totp=CANARIES["kwarg_totp"],
        seed=CANARIES["kwarg_seed"],
        cookie=CANARIES["cookie_kwarg"],
        state="visible-state",
    )
    log.info(
        "nested",
        data={
            "outer": {"refresh_token": CANARIES["nested_refresh"]},
            "items": [{"code_verifier": CANARIES["nested_verifier"]}],
            "recovery_codes": [CANARIES["recovery"]],
        },
    )
    log.info(
        "upstream_call",
        headers={
            "Authorization": f"Bearer {CANARIES['header_bearer']}",
            "Cookie": f"mfagw_tx={CANARIES['header_cookie']}",
            "X-Custom": CANARIES["header_unlisted"],
            "Content-Type": "application/json",
        },
    )
    log.info(f"client presented {JWT} in free text")
    log.info(
        "redirect_built", url=f"https://client.example/cb?code={CANARIES['url_code']}&state=s1"
    )
    log.info("parsed", body=repr({"client_secret": CANARIES["repr_secret"], "scope": "mcp"}))
    log.info("auth_header_seen", detail=f"Basic {CANARIES['basic']}")
    try:
        raise ValueError(f"exchange failed: code={CANARIES['exc_query']} with {JWT}")
    except ValueError:
        log.exception("upstream_login_failed")
    try:
        raise ConnectionError(f"401 for Authorization: Bearer {CANARIES['exc_bearer']}")
    except ConnectionError as exc:
        log.error("upstream_unavailable", reason=str(exc), exc_info=True)
    try:
        _fail_with_local()
    except RuntimeError:
        log.exception("unhandled_error")
    std = logging.getLogger("aiohttp.server")
    std.error("bad request Authorization: Bearer %s", CANARIES["stdlib_bearer"])
    std.warning("extra fields", extra={"refresh_token": CANARIES["stdlib_extra"]})
    try:
        raise KeyError(JWT)
    except KeyError:
        logging.getLogger("aiohttp.web").exception("Error handling request")


@pytest.mark.usefixtures("restore_logging")
class TestCanaries:
    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_no_canary_reaches_the_output(self, fmt: Literal["json", "console"]) -> None:
        """Secrets planted through every logging path never reach the output (R35, DESIGN §6)."""
        buf = _configure(fmt)
        _plant_everything()
        out = buf.getvalue()
        if fmt == "json":
            assert out.count("\n") == 13  # one line per record, tracebacks included
        for name, canary in CANARIES.items():
            assert canary not in out, name
        assert JWT not in out
        assert "eyJ" not in out
        assert REDACTED in out
        assert "visible-state" in out
        assert "state=s1" in out

    def test_json_lines_keep_useful_fields(self) -> None:
        """JSON lines carry timestamp, level, event and bound context; safe headers are kept."""
        buf = _configure("json")
        structlog.contextvars.bind_contextvars(request_id="r-1")
        _plant_everything()
        lines = [json.loads(line) for line in buf.getvalue().splitlines()]
        first = lines[0]
        assert first["event"] == "token_issued"
        assert first["level"] == "info"
        assert first["request_id"] == "r-1"
        assert first["timestamp"].endswith("Z")
        assert first["access_token"] == REDACTED
        assert first["code"] == REDACTED
        headers = next(li for li in lines if li["event"] == "upstream_call")["headers"]
        assert headers == {"Content-Type": "application/json"}
        exc_line = next(li for li in lines if li["event"] == "upstream_login_failed")
        assert exc_line["exception"][0]["exc_type"] == "ValueError"
        assert "frames" in exc_line["exception"][0]
        assert "locals" not in json.dumps(exc_line["exception"])
        stdlib = next(li for li in lines if li.get("logger") == "aiohttp.server")
        assert stdlib["level"] == "error"
        assert stdlib["event"] == f"bad request Authorization: {REDACTED}"


@pytest.mark.usefixtures("restore_logging")
class TestInjection:
    def test_json_crlf_cannot_forge_a_line(self) -> None:
        """CR/LF in values and events are escaped: one record is one line (R35, log injection)."""
        buf = _configure("json")
        log = structlog.get_logger("x")
        log.info('evil\n{"event":"forged"}', user='bob\r\n{"level":"error"}')
        logging.getLogger("aiohttp.server").warning("line1\nline2")
        lines = buf.getvalue().splitlines()
        assert len(lines) == 2
        record = json.loads(lines[0])
        assert record["event"] == 'evil\\n{"event":"forged"}'
        assert record["user"] == 'bob\\r\\n{"level":"error"}'
        assert json.loads(lines[1])["event"] == "line1\\nline2"

    def test_console_crlf_cannot_forge_a_line(self) -> None:
        """In console format too, one record is exactly one line, terminal escapes included."""
        buf = _configure("console")
        structlog.get_logger("x").info("evil", user="a\nb\x1b[31mc")
        out = buf.getvalue()
        assert out.count("\n") == 1
        assert "\x1b" not in out
        assert "a\\nb\\x1b[31mc" in out

    def test_console_traceback_cannot_forge_a_record(self) -> None:
        """A console traceback keeps its lines, but every continuation line is indented."""
        buf = _configure("console")
        try:
            raise ValueError("boom\n2030-01-01T00:00:00Z [info     ] forged_event")
        except ValueError:
            structlog.get_logger("x").exception("unhandled_error")
        lines = buf.getvalue().splitlines()
        assert lines[1] == "Traceback (most recent call last):"
        assert all(line.startswith("    ") for line in lines[2:])
        assert lines[-1] == "    2030-01-01T00:00:00Z [info     ] forged_event"


@pytest.mark.usefixtures("restore_logging")
class TestConfiguration:
    def test_aiohttp_access_log_is_off(self) -> None:
        """aiohttp's access log (raw paths with codes in the query) writes nothing (R35)."""
        buf = _configure("json")
        logging.getLogger("aiohttp.access").info('127.0.0.1 "GET /cb?code=CANARY-X" 200')
        assert buf.getvalue() == ""

    def test_level_filters(self) -> None:
        """Below the configured level nothing is written, for structlog and stdlib alike."""
        buf = io.StringIO()
        configure_logging("warning", "json", buf)
        structlog.get_logger("x").info("quiet")
        logging.getLogger("y").info("quiet too")
        structlog.get_logger("x").warning("loud")
        lines = buf.getvalue().splitlines()
        assert [json.loads(li)["event"] for li in lines] == ["loud"]

    def test_bad_level_and_format_refused(self) -> None:
        """Unknown levels and formats are errors, not silently ignored."""
        with pytest.raises(ValueError, match="unknown log level"):
            configure_logging("verbose", "json", io.StringIO())
        with pytest.raises(ValueError, match="unknown log format"):
            configure_logging("info", "xml", io.StringIO())  # type: ignore[arg-type]


class TestRedactUnit:
    @pytest.mark.parametrize(
        "key",
        [
            "authorization",
            "Authorization",
            "set-cookie",
            "Cookie",
            "code",
            "code_verifier",
            "access_token",
            "refresh_token",
            "id_token",
            "upstream_tokens_key",
            "client_secret",
            "password",
            "seed",
            "totp",
            "otp",
            "otpauth_uri",
            "recovery_codes",
            "client_assertion",
            "pending_seed_sealed",
            "mcp-session-id",
            "api_key",
        ],
    )
    def test_sensitive_keys(self, key: str) -> None:
        """Key names of secrets are recognised case-insensitively (R35)."""
        assert is_sensitive_key(key)

    @pytest.mark.parametrize(
        "key",
        [
            "state",
            "client_id",
            "sub",
            "reason",
            "resource",
            "method",
            "tool",
            "ip",
            "status",
            "token_type",
            "token_endpoint_auth_method",
            "error",
            "route",
            "duration_ms",
        ],
    )
    def test_plain_keys(self, key: str) -> None:
        """Facts the audit log needs are not masked."""
        assert not is_sensitive_key(key)

    def test_redact_keeps_shape(self) -> None:
        """Numbers and booleans survive; secrets become the marker; lists stay lists."""
        out = redact(
            None,
            "info",
            {
                "event": "x",
                "status": 401,
                "ok": False,
                "ratio": 0.5,
                "none": None,
                "scopes": ("mcp", "read"),
                "code": 123456,
            },
        )
        assert out == {
            "event": "x",
            "status": 401,
            "ok": False,
            "ratio": 0.5,
            "none": None,
            "scopes": ["mcp", "read"],
            "code": REDACTED,
        }

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (f"token {JWT}", f"token {REDACTED}"),
            ("Authorization: Bearer abc.def", f"Authorization: {REDACTED}"),
            ("bearer abc123", f"bearer {REDACTED}"),
            ("cb?code=xyz&state=s", f"cb?code={REDACTED}&state=s"),
            ("a=1&refresh_token=r1", f"a=1&refresh_token={REDACTED}"),
            ("{'password': 'p w'}", f"{{'password': '{REDACTED}'}}"),
            ('{"client_secret": "s3"}', f"{{\"client_secret\": '{REDACTED}'}}"),
            ("error_code=5 state=x", "error_code=5 state=x"),
            ("basic information", "basic information"),
        ],
    )
    def test_scrub_free_text(self, text: str, expected: str) -> None:
        """Secrets are found by shape inside any string (R35)."""
        assert scrub(text) == expected
