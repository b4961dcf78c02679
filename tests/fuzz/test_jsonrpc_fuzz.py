"""Fuzzing the JSON-RPC inspector and the routing-header check (`gateway.core.policy`) on
arbitrary bytes: only `JsonRpcError`, never a crash (DESIGN §4.4, MCP 2026-07-28).

Supersedes `tests/unit/test_policy.py::test_inspector_raises_only_its_error_on_bytes` and
`::test_inspector_raises_only_its_error_on_json`: here also non-UTF-8 and BOM-prefixed bodies,
lone surrogates, numbers past Python's integer-string limit, `NaN`/`Infinity`, duplicate members,
nesting far past the recursion limit, batches around the size cap, and message-shaped objects
with every member of the wrong type; what is accepted must be exactly what policy relies on.
"""

# Properties branch on whether an input was refused, so they assert inside `except` blocks
# (`pytest.raises` cannot say "may raise"): PT017 does not apply to this file.
# ruff: noqa: PT017

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.policy import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_BATCH,
    NAME_BEARING_METHODS,
    PARSE_ERROR,
    JsonRpcBody,
    JsonRpcError,
    check_routing_headers,
    decode_header_value,
    evaluate_body,
    inspect_jsonrpc,
)
from gateway.settings import McpPolicy, McpRule
from tests.fuzz.strategies import NOW, hostile_text, json_scalars

CODES = {PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS}
MEMBERS = ["jsonrpc", "id", "method", "params", "result", "error", "name", "uri"]
POLICY = McpPolicy(
    rules=(
        McpRule(method="tools/call", tool="delete_*", effect="deny"),
        McpRule(method="tools/*", require_scopes=("admin",)),
        McpRule(method="prompts/*", max_auth_age=60.0),
    ),
)


def _check(body: JsonRpcBody) -> None:
    """What policy and the proxy rely on whenever the inspector accepts a body."""
    assert body.messages
    assert body.batch or len(body.messages) == 1
    assert len(body.messages) <= MAX_BATCH
    for msg in body.messages:
        assert msg.id is None or (type(msg.id) in (str, int))
        if msg.kind == "response":
            assert msg.method is None
            assert msg.name is None
            continue
        assert isinstance(msg.method, str)
        assert msg.method
        if msg.method == "tools/call":
            assert isinstance(msg.name, str)
        if msg.name is not None:
            assert msg.method in NAME_BEARING_METHODS
    decision = evaluate_body(
        body, scopes=frozenset({"mcp"}), auth_time=NOW - 3600, acr=None, policy=POLICY, now=NOW
    )
    assert decision.reason


def _inspect(raw: bytes) -> JsonRpcBody | None:
    try:
        body = inspect_jsonrpc(raw)
    except JsonRpcError as err:
        assert err.code in CODES
        assert err.id is None or type(err.id) in (str, int)
        return None
    _check(body)
    return body


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=300))
@example(raw=b"[" * 100_000)
@example(raw=b'{"a":' * 50_000)
@example(raw=b"1" * 5000)
@example(raw=b"\xef\xbb\xbf{}")
@example(raw=b'"\\ud800"')
@example(raw=b'{"jsonrpc":"2.0","id":NaN,"method":"x"}')
@example(raw=b'{"jsonrpc":"2.0","id":1e999,"method":"x"}')
@example(raw=b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}')
@example(raw=b"\xff\xfe{\x00}\x00")
@example(raw=b"")
def test_arbitrary_bytes_raise_only_jsonrpc_errors(raw: bytes) -> None:
    """Any byte string is parsed or refused with a JSON-RPC error code, never an exception of
    another kind (which would be a 500 and a traceback in the log, R35)."""
    _inspect(raw)


@st.composite
def messages(draw: st.DrawFn) -> Any:
    """Message-shaped objects whose members are right, wrong or missing."""
    msg: dict[str, Any] = {}
    for member in draw(st.lists(st.sampled_from(MEMBERS), max_size=6, unique=True)):
        msg[member] = draw(
            st.one_of(
                json_scalars,
                st.sampled_from(["2.0", "tools/call", "ping", "prompts/get", "resources/read"]),
                st.dictionaries(
                    st.sampled_from(["name", "uri", "arguments"]),
                    st.one_of(json_scalars, hostile_text),
                    max_size=3,
                ),
                st.lists(json_scalars, max_size=3),
            )
        )
    return msg


bodies = st.one_of(
    messages(),
    st.lists(messages(), max_size=MAX_BATCH + 2),
    st.lists(st.one_of(messages(), json_scalars), max_size=4),
)


@settings(max_examples=120, deadline=None)
@given(doc=bodies, style=st.sampled_from(["compact", "ascii", "indent"]))
def test_message_shaped_documents_parse_only_into_what_policy_relies_on(
    doc: Any, style: str
) -> None:
    """Objects with JSON-RPC members of every type: refused with the right code, or parsed into
    messages that have a string method (a name for `tools/call`), a string or integer id, at
    most 32 per batch, which policy then evaluates without error (DESIGN §4.4)."""
    kwargs: dict[str, Any] = {"ensure_ascii": style == "ascii"}
    if style == "indent":
        kwargs["indent"] = 2
    body = _inspect(json.dumps(doc, **kwargs).encode("utf-8", "surrogatepass"))
    if body is None:
        return
    items = doc if isinstance(doc, list) else [doc]
    assert len(body.messages) == len(items)
    for msg, item in zip(body.messages, items, strict=True):
        assert msg.method == item.get("method")
        assert item.get("jsonrpc") == "2.0"


@settings(max_examples=150, deadline=None)
@given(
    doc=messages(),
    version=st.one_of(st.none(), st.sampled_from(["2025-11-25", "2026-07-28", "x"]), hostile_text),
    method=st.one_of(st.none(), st.sampled_from(["tools/call", "ping"]), hostile_text),
    name=st.one_of(st.none(), hostile_text, st.builds(lambda s: f"=?base64?{s}?=", hostile_text)),
)
def test_routing_headers_of_any_value_raise_only_header_mismatch(
    doc: Any, version: str | None, method: str | None, name: str | None
) -> None:
    """`MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` of any value (base64-wrapped too)
    either agree with a parsed body or are refused with `-32020`; when they pass on the modern
    wire they name exactly the body's method (nothing routes a call policy did not see;
    DESIGN §4.4)."""
    body = _inspect(json.dumps(doc).encode())
    assert decode_header_value(name) is None or isinstance(decode_header_value(name), str)
    if body is None:
        return
    try:
        check_routing_headers(body, protocol_version=version, mcp_method=method, mcp_name=name)
    except JsonRpcError as err:
        assert err.code == HEADER_MISMATCH
        return
    msg = body.messages[0]
    if method is not None:
        assert method == msg.method
    if msg.kind != "response" and name is not None and msg.name is not None:
        assert decode_header_value(name) == msg.name
