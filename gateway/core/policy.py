"""MCP-aware policy: JSON-RPC inspection and rule evaluation, with no I/O.

`inspect_jsonrpc` turns a (size-capped) request body into the facts policy needs, refusing
anything ambiguous (non-UTF-8, duplicate members, non-JSON constants, malformed messages,
over-long batches) with a typed `JsonRpcError` and nothing else. `check_routing_headers` enforces
the 2026-07-28 rule that `Mcp-Method` / `Mcp-Name` agree with the body. `evaluate` matches the
policy's rules by glob on the method and, for `tools/call`, the tool name; the first matching
rule decides (deny / required scopes / recent step-up), else the default effect. Decisions are
values. Batches are evaluated element by element and the strictest decision wins, so no element
is ever waved through.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Final, Literal

from gateway.settings import McpPolicy, McpRule

# JSON-RPC 2.0 / MCP error codes.
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
INVALID_PARAMS: Final = -32602
HEADER_MISMATCH: Final = -32020  # MCP 2026-07-28: headers disagree with the body

MAX_BATCH: Final = 32
# Revisions that negotiate with `initialize`; anything else (2026-07-28 and later, or an
# unknown string) is treated as the modern wire that requires the routing headers.
HANDSHAKE_VERSIONS: Final = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
# Method -> params key mirrored in the `Mcp-Name` header (MCP 2026-07-28).
NAME_BEARING_METHODS: Final[Mapping[str, str]] = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
}
_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")


class JsonRpcError(Exception):
    """A request the gateway refuses before policy: rendered as a JSON-RPC error, HTTP 400."""

    def __init__(self, code: int, message: str, *, id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


@dataclass(frozen=True, slots=True)
class JsonRpcMessage:
    """One JSON-RPC message of a request body; `name` is the Mcp-Name-bearing param, if any."""

    kind: Literal["request", "notification", "response"]
    method: str | None
    id: str | int | None
    name: str | None

    @property
    def tool(self) -> str | None:
        """The tool name of a `tools/call`, else None."""
        return self.name if self.method == "tools/call" else None


@dataclass(frozen=True, slots=True)
class JsonRpcBody:
    """A parsed body: one message, or a batch (a JSON array) of them."""

    messages: tuple[JsonRpcMessage, ...]
    batch: bool

    @property
    def first_id(self) -> str | int | None:
        """The id to answer a refusal with (JSON-RPC: null when it cannot be told)."""
        return None if self.batch or not self.messages else self.messages[0].id


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # Two parsers could pick different members: refuse instead of guessing.
            raise ValueError("duplicate member")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: `json.loads` with hooks would build a new decoder on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def _valid_id(value: object) -> bool:
    return value is None or (isinstance(value, str | int) and not isinstance(value, bool))


def _message(obj: object) -> JsonRpcMessage:
    if not isinstance(obj, dict):
        raise JsonRpcError(INVALID_REQUEST, "A JSON-RPC message must be an object")
    raw_id = obj.get("id")
    msg_id = raw_id if _valid_id(raw_id) else None
    if obj.get("jsonrpc") != "2.0":
        raise JsonRpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"', id=msg_id)
    if not _valid_id(raw_id):
        raise JsonRpcError(INVALID_REQUEST, "id must be a string or an integer")
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or not method:
            raise JsonRpcError(INVALID_REQUEST, "method must be a non-empty string", id=msg_id)
        if "result" in obj or "error" in obj:
            raise JsonRpcError(INVALID_REQUEST, "a request has no result or error", id=msg_id)
        params = obj.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise JsonRpcError(INVALID_REQUEST, "params must be an object", id=msg_id)
        name: str | None = None
        key = NAME_BEARING_METHODS.get(method)
        if key is not None and isinstance(params, dict) and key in params:
            value = params[key]
            if not isinstance(value, str):
                raise JsonRpcError(INVALID_PARAMS, f"params.{key} must be a string", id=msg_id)
            name = value
        if method == "tools/call" and name is None:
            raise JsonRpcError(INVALID_PARAMS, "tools/call needs params.name", id=msg_id)
        if "id" in obj and raw_id is None:
            raise JsonRpcError(INVALID_REQUEST, "a request id must not be null")
        kind: Literal["request", "notification"] = "request" if "id" in obj else "notification"
        return JsonRpcMessage(kind=kind, method=method, id=msg_id, name=name)
    if ("result" in obj) == ("error" in obj) or "id" not in obj:
        raise JsonRpcError(INVALID_REQUEST, "not a JSON-RPC request or response", id=msg_id)
    return JsonRpcMessage(kind="response", method=None, id=msg_id, name=None)


def inspect_jsonrpc(body: bytes, *, max_batch: int = MAX_BATCH) -> JsonRpcBody:
    """Parse a JSON-RPC request body; raise only `JsonRpcError`."""
    try:
        text = body.decode("utf-8")
        doc = _DECODER.decode(text)
    except (ValueError, RecursionError):
        raise JsonRpcError(PARSE_ERROR, "Parse error") from None
    if isinstance(doc, list):
        if not doc:
            raise JsonRpcError(INVALID_REQUEST, "An empty batch is not a request")
        if len(doc) > max_batch:
            raise JsonRpcError(INVALID_REQUEST, f"A batch holds at most {max_batch} messages")
        return JsonRpcBody(messages=tuple(_message(m) for m in doc), batch=True)
    return JsonRpcBody(messages=(_message(doc),), batch=False)


def decode_header_value(value: str | None) -> str | None:
    """`Mcp-Name` values may be `=?base64?...?=`-wrapped; None if malformed (never matches)."""
    if value is None:
        return None
    m = _B64_SENTINEL.fullmatch(value)
    if m is None:
        return value
    payload = m.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(decoded).decode("ascii") != payload:
        return None
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


def is_modern_revision(protocol_version: str | None) -> bool:
    """True for 2026-07-28 and later (or an unknown version: the conservative reading)."""
    return protocol_version is not None and protocol_version not in HANDSHAKE_VERSIONS


def check_routing_headers(
    body: JsonRpcBody,
    *,
    protocol_version: str | None,
    mcp_method: str | None,
    mcp_name: str | None,
) -> None:
    """Refuse (`HEADER_MISMATCH`) when `Mcp-Method`/`Mcp-Name` disagree with the body.

    On the modern wire (2026-07-28) `Mcp-Method` is required and batches do not exist; on older
    revisions the headers are optional, but when sent they must agree all the same, so that
    nothing routing by header sees another call than the one policy evaluated.
    """
    modern = is_modern_revision(protocol_version)
    if body.batch:
        if modern or mcp_method is not None or mcp_name is not None:
            raise JsonRpcError(HEADER_MISMATCH, "routing headers cannot describe a batch")
        return
    msg = body.messages[0]
    if msg.kind == "response":
        if mcp_method is not None:
            raise JsonRpcError(HEADER_MISMATCH, "Mcp-Method header on a response", id=msg.id)
        return
    if (modern or mcp_method is not None) and mcp_method != msg.method:
        raise JsonRpcError(
            HEADER_MISMATCH, "Mcp-Method header does not match the body's method", id=msg.id
        )
    name_checked = msg.method in NAME_BEARING_METHODS and msg.name is not None
    name_sent = modern or mcp_name is not None
    if name_checked and name_sent and decode_header_value(mcp_name) != msg.name:
        raise JsonRpcError(HEADER_MISMATCH, "Mcp-Name header does not match the body", id=msg.id)


# --------------------------------------------------------------------------- decisions


class Effect(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    STEP_UP = "step_up"


# Strictness when combining the decisions of a batch: the strictest wins.
_RANK: Final = {Effect.ALLOW: 0, Effect.STEP_UP: 1, Effect.INSUFFICIENT_SCOPE: 2, Effect.DENY: 3}


@dataclass(frozen=True, slots=True)
class Facts:
    """What policy decides on: the call and the verified token's authentication facts."""

    method: str
    tool: str | None
    scopes: frozenset[str]
    auth_time: float | None
    acr: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome; `reason` is a short fixed string for audit logs and metric labels."""

    effect: Effect
    reason: str
    scope: str | None = None
    max_age: int | None = None
    acr_values: str | None = None
    method: str | None = None
    tool: str | None = None

    @property
    def allowed(self) -> bool:
        return self.effect is Effect.ALLOW


def rule_matches(rule: McpRule, method: str, tool: str | None) -> bool:
    """Glob on the method; a rule naming a tool matches only `tools/call` of such a tool."""
    if not fnmatchcase(method, rule.method):
        return False
    if rule.tool is None:
        return True
    return method == "tools/call" and tool is not None and fnmatchcase(tool, rule.tool)


def _apply(rule: McpRule, facts: Facts, now: float) -> Decision:
    m, t = facts.method, facts.tool
    if rule.effect == "deny":
        return Decision(Effect.DENY, "rule_denied", method=m, tool=t)
    missing = [s for s in rule.require_scopes if s not in facts.scopes]
    if missing:
        scope = " ".join(rule.require_scopes)
        return Decision(
            Effect.INSUFFICIENT_SCOPE, "insufficient_scope", scope=scope, method=m, tool=t
        )
    if rule.max_auth_age is not None and (
        facts.auth_time is None or now - facts.auth_time > rule.max_auth_age
    ):
        return Decision(
            Effect.STEP_UP,
            "auth_too_old",
            max_age=int(rule.max_auth_age),
            acr_values=rule.acr_values,
            method=m,
            tool=t,
        )
    if rule.acr_values is not None and facts.acr not in rule.acr_values.split():
        return Decision(
            Effect.STEP_UP, "acr_not_accepted", acr_values=rule.acr_values, method=m, tool=t
        )
    return Decision(Effect.ALLOW, "allowed", method=m, tool=t)


def evaluate(facts: Facts, policy: McpPolicy, now: float) -> Decision:
    """The first rule matching the call decides; otherwise the policy's default effect."""
    for rule in policy.rules:
        if rule_matches(rule, facts.method, facts.tool):
            return _apply(rule, facts, now)
    if policy.default_effect == "deny":
        return Decision(Effect.DENY, "default_denied", method=facts.method, tool=facts.tool)
    return Decision(Effect.ALLOW, "allowed", method=facts.method, tool=facts.tool)


def evaluate_body(
    body: JsonRpcBody,
    *,
    scopes: Iterable[str],
    auth_time: float | None,
    acr: str | None,
    policy: McpPolicy,
    now: float,
) -> Decision:
    """Evaluate every request and notification of a body; the strictest decision wins.

    Responses (answers to the server's own requests) invoke nothing and are not matched.
    """
    scope_set = frozenset(scopes)
    worst: Decision | None = None
    for msg in body.messages:
        if msg.method is None:
            continue
        d = evaluate(
            Facts(method=msg.method, tool=msg.tool, scopes=scope_set, auth_time=auth_time, acr=acr),
            policy,
            now,
        )
        worst = d if worst is None else _stricter(worst, d)
    if worst is None:
        return Decision(Effect.ALLOW, "allowed")
    return worst


def _stricter(a: Decision, b: Decision) -> Decision:
    if _RANK[b.effect] != _RANK[a.effect]:
        return b if _RANK[b.effect] > _RANK[a.effect] else a
    if a.effect is Effect.STEP_UP:
        # One challenge that satisfies every element: the shortest max_age, any acr_values.
        ages = [x for x in (a.max_age, b.max_age) if x is not None]
        return Decision(
            a.effect,
            a.reason,
            max_age=min(ages) if ages else None,
            acr_values=a.acr_values or b.acr_values,
            method=a.method,
            tool=a.tool,
        )
    if a.effect is Effect.INSUFFICIENT_SCOPE:
        merged = sorted(set((a.scope or "").split()) | set((b.scope or "").split()))
        return Decision(a.effect, a.reason, scope=" ".join(merged), method=a.method, tool=a.tool)
    return a


def missing_amr(amr: Sequence[str] | None, required: Sequence[str]) -> tuple[str, ...]:
    """The required `amr` values the token lacks; every one is missing if `amr` is not a list."""
    if amr is None:
        return tuple(required)
    have = set(amr)
    return tuple(r for r in required if r not in have)
