"""structlog configuration and the single redaction processor.

Every log line (structlog events and stdlib records such as aiohttp's) runs through one chain:
``merge_contextvars → add_log_level → TimeStamper(iso, utc) → exception to data → redact →
renderer``. Exceptions are turned into data (a dict for JSON, text for the console) *before*
`redact`, so exception messages and tracebacks are scrubbed like every other value and frame
locals are never rendered. `redact` is the last line of defence (DESIGN §6, R35): callers must not
log secrets in the first place.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any, Literal, TextIO

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.types import EventDict, Processor, WrappedLogger

REDACTED = "[redacted]"

# Key names (lower-cased, '-' → '_') whose values are always masked.
_SENSITIVE_EXACT = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "cookie",
        "cookies",
        "set_cookie",
        "code",
        "codes",
        "user_code",
        "device_code",
        "seed",
        "otp",
        "totp",
        "pin",
        "nonce",
        "recovery",
        "client_assertion",
        "assertion",
        "jwt",
        "jws",
        "bearer",
        "session_id",
        "mcp_session_id",
        "signature",
        "sig",
        "private_key",
        "api_key",
        "apikey",
        "key_material",
        "encryption_key",
        "pem",
    }
)
# Key names containing one of these fragments are masked too.
_SENSITIVE_FRAGMENTS = (
    "token",
    "secret",
    "passw",
    "cookie",
    "credential",
    "authorization",
    "verifier",
    "seed",
    "otp",
    "recovery",
    "assertion",
    "private_key",
    "api_key",
)
# Keys that look sensitive by name but hold no secret (kept so logs stay useful).
_SAFE_KEYS = frozenset(
    {
        "token_type",
        "token_type_hint",
        "token_endpoint_auth_method",
        "token_endpoint",
        "forward_token",
        "grant_type",
    }
)
# A logged `headers` mapping keeps only these names (values are still scrubbed).
SAFE_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "cache-control",
        "content-encoding",
        "content-length",
        "content-type",
        "host",
        "last-event-id",
        "mcp-method",
        "mcp-name",
        "mcp-protocol-version",
        "origin",
        "retry-after",
        "transfer-encoding",
        "user-agent",
        "www-authenticate",
        "x-request-id",
    }
)
_SKIP_KEYS = frozenset({"timestamp", "level", "logger", "_record", "_from_structlog"})

# Three base64url segments starting with a JOSE header: JWS (and the head of a JWE), also with an
# empty signature (alg "none").
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}")
_AUTH_SCHEME = re.compile(r"\b((?i:bearer|dpop)|Basic)(\s+)[A-Za-z0-9._~+/=:-]+")
_HEADER_LINE = re.compile(
    r"(?im)\b(authorization|proxy-authorization|cookie|set-cookie)(\s*:\s*)[^\r\n]+"
)
_PARAM_NAMES = (
    r"access_token|refresh_token|id_token|token|client_secret|client_assertion|code_verifier"
    r"|code|password|passwd|secret|otp|totp|seed|recovery_code|subject_token|assertion"
)
# key=value as in query strings and form bodies
_QUERY_PARAM = re.compile(rf"(?i)(?<![A-Za-z0-9_])({_PARAM_NAMES})=([^&\s\"'<>#]+)")
# 'key': 'value' / "key": "value" as in JSON and Python reprs
_QUOTED_PARAM = re.compile(
    rf"""(?i)(["'])({_PARAM_NAMES}|authorization|cookie|set-cookie)\1(\s*[:=]\s*)"""
    r"""(?:(["'])(?:(?!\4).)*\4|[^\s,}\]\)]+)"""
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
# Every pattern above needs one of these; most values (routes, ids, IPs) have none.
_SUSPECT = re.compile(r"eyJ|[=:'\"\x00-\x1f\x7f\x85\u2028\u2029]|(?i:bearer|basic|dpop)")
_CONTROL_NAMES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group(0)
    return _CONTROL_NAMES.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def scrub(text: str) -> str:
    """Mask JWT-shaped strings, auth schemes, secret parameters; neutralise CR/LF (R35)."""
    if not _SUSPECT.search(text):
        return text
    text = _JWT.sub(REDACTED, text)
    text = _HEADER_LINE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _QUERY_PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    text = _QUOTED_PARAM.sub(
        lambda m: f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}'{REDACTED}'", text
    )
    return _CONTROL.sub(_escape_control, text)


def _scrub_block(text: str) -> str:
    """A multi-line text (a console traceback): scrubbed line by line, continuation lines
    indented so that no line of it can pass for a log record of its own."""
    lines = text.rstrip("\n").split("\n")
    return "\n".join(
        ("" if i == 0 else "    ") + scrub(line.rstrip("\r")) for i, line in enumerate(lines)
    )


@lru_cache(maxsize=4096)
def is_sensitive_key(key: str) -> bool:
    """True if values under this key name are secrets (case-insensitive, '-' same as '_')."""
    norm = key.lower().replace("-", "_")
    if norm in _SAFE_KEYS:
        return False
    return norm in _SENSITIVE_EXACT or any(f in norm for f in _SENSITIVE_FRAGMENTS)


def _is_headers_key(key: str) -> bool:
    norm = key.lower().replace("-", "_")
    return norm == "headers" or norm.endswith("_headers")


def _header_items(value: object) -> Iterable[tuple[object, object]] | None:
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, list | tuple) and all(
        isinstance(i, list | tuple) and len(i) == 2 for i in value
    ):
        return [(i[0], i[1]) for i in value]
    return None


def _clean_headers(value: object, depth: int) -> object:
    items = _header_items(value)
    if items is None:
        return REDACTED
    out: dict[str, object] = {}
    for name, val in items:
        sname = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        if sname.lower() in SAFE_HEADERS:
            out[scrub(sname)] = _clean(val, depth + 1)
    return out


def _clean(value: object, depth: int = 0) -> object:
    """Recursively scrub a value; unknown objects become their scrubbed `str`."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub(value)
    if depth > 12:
        return "[too deep]"
    if isinstance(value, bytes | bytearray | memoryview):
        return scrub(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return _clean_mapping(value, depth + 1)
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v, depth + 1) for v in value]
    return scrub(str(value))


def _clean_mapping(mapping: Mapping[Any, Any], depth: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, val in mapping.items():
        skey = scrub(key if isinstance(key, str) else str(key))
        if is_sensitive_key(skey):
            out[skey] = REDACTED
        elif _is_headers_key(skey):
            out[skey] = _clean_headers(val, depth)
        else:
            out[skey] = _clean(val, depth)
    return out


def redact(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    """The one redaction processor: secrets by key name, by shape, headers by allow-list."""
    out: EventDict = {}
    for key, val in event_dict.items():
        if key in _SKIP_KEYS:
            out[key] = val
        elif key == "event":
            out[key] = _clean(val)
        elif key == "exception" and isinstance(val, str):
            out[key] = _scrub_block(val)
        elif key in ("exc_info", "stack_info") and not isinstance(val, str):
            # An exception that was not turned into data must not reach a renderer raw.
            out[key] = val if isinstance(val, bool) else _clean(val)
        elif is_sensitive_key(key):
            out[key] = REDACTED
        elif _is_headers_key(key):
            out[key] = _clean_headers(val, 0)
        else:
            out[key] = _clean(val)
    return out


def _orjson_dumps(obj: Any, **kw: Any) -> str:
    default: Callable[[Any], Any] | None = kw.get("default")
    return orjson.dumps(obj, default=default or str, option=orjson.OPT_NON_STR_KEYS).decode()


_installed: list[logging.Handler] = []

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def shared_processors() -> list[Processor]:
    """The processors every line (structlog or stdlib) goes through before rendering."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def render_processors(fmt: Literal["json", "console"], *, colors: bool = False) -> list[Processor]:
    """Exception-to-data, `redact` and the renderer for `fmt`."""
    if fmt == "json":
        return [
            structlog.processors.StackInfoRenderer(),
            structlog.processors.ExceptionRenderer(
                ExceptionDictTransformer(show_locals=False, use_rich=False, max_frames=20)
            ),
            redact,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
    return [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,
        structlog.dev.ConsoleRenderer(colors=colors),
    ]


def configure_logging(
    level: str,
    fmt: Literal["json", "console"],
    stream: TextIO = sys.stdout,
    *,
    cache_loggers: bool = False,
) -> None:
    """Configure structlog and stdlib logging to write redacted lines to `stream`.

    `cache_loggers=True` (the server) makes bound loggers immutable after first use; tests keep
    the default so that reconfiguring takes effect.
    """
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}")
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    colors = fmt == "console" and hasattr(stream, "isatty") and stream.isatty()
    tail = render_processors(fmt, colors=colors)

    structlog.configure(
        processors=[*shared_processors(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        context_class=dict,
        cache_logger_on_first_use=cache_loggers,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            *shared_processors(),
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    _installed.append(handler)
    root.setLevel(numeric)
    # We write our own `request_finished` line; aiohttp's access log would log raw paths and
    # query strings (authorization codes).
    access = logging.getLogger("aiohttp.access")
    access.setLevel(logging.CRITICAL + 1)
    access.propagate = False
    logging.captureWarnings(True)


def reset_logging() -> None:
    """Undo `configure_logging` (tests): structlog defaults, our handlers off the root logger,
    the aiohttp access log and warnings capture back to normal."""
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    while _installed:
        root.removeHandler(_installed.pop())
    access = logging.getLogger("aiohttp.access")
    access.setLevel(logging.NOTSET)
    access.propagate = True
    logging.captureWarnings(False)
