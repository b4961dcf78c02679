"""MCP-aware policy: JSON-RPC inspection, routing-header agreement and rule evaluation (pure)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.policy import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_BATCH,
    PARSE_ERROR,
    Decision,
    Effect,
    Facts,
    JsonRpcBody,
    JsonRpcError,
    check_routing_headers,
    decode_header_value,
    evaluate,
    evaluate_body,
    inspect_jsonrpc,
    missing_amr,
)
from gateway.settings import McpPolicy, McpRule

NOW = 1_800_000_000.0


def _body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _call(tool: str, id: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": {"secret": "x"}},
    }


def _req(method: str, id: int | str = 1, **params: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params:
        msg["params"] = params
    return msg


def _refused(body: bytes, code: int) -> JsonRpcError:
    with pytest.raises(JsonRpcError) as info:
        inspect_jsonrpc(body)
    assert info.value.code == code
    return info.value


class TestInspect:
    def test_single_request(self) -> None:
        """A request yields its method, id and (for tools/call) the tool name."""
        body = inspect_jsonrpc(_body(_call("search", id=7)))
        assert not body.batch
        (msg,) = body.messages
        assert (msg.kind, msg.method, msg.id, msg.tool) == ("request", "tools/call", 7, "search")

    def test_notification_and_response(self) -> None:
        """Notifications have no id; responses have no method."""
        note = inspect_jsonrpc(_body({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        assert note.messages[0].kind == "notification"
        resp = inspect_jsonrpc(_body({"jsonrpc": "2.0", "id": "s1", "result": {}}))
        assert (resp.messages[0].kind, resp.messages[0].method) == ("response", None)

    def test_name_bearing_methods(self) -> None:
        """prompts/get and resources/read expose their Mcp-Name value; only tools/call a tool."""
        p = inspect_jsonrpc(_body(_req("prompts/get", name="greet"))).messages[0]
        r = inspect_jsonrpc(_body(_req("resources/read", uri="file:///a"))).messages[0]
        assert (p.name, p.tool) == ("greet", None)
        assert (r.name, r.tool) == ("file:///a", None)

    def test_batch(self) -> None:
        """A JSON array is a batch of messages, each inspected."""
        body = inspect_jsonrpc(_body([_call("a", 1), _req("tools/list", 2)]))
        assert body.batch
        assert [m.method for m in body.messages] == ["tools/call", "tools/list"]
        assert body.first_id is None

    @pytest.mark.parametrize(
        "raw",
        [
            b"",
            b"{",
            b"\xff\xfe{}",
            b"\xef\xbb\xbf" + _body(_req("ping")),
            b'{"jsonrpc": "2.0", "id": NaN, "method": "ping"}',
            b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "method": "tools/call"}',
            b"[" * 100_000,
        ],
    )
    def test_parse_errors(self, raw: bytes) -> None:
        """Non-UTF-8, BOMs, NaN, duplicate members and deep nesting are parse errors (-32700)."""
        _refused(raw, PARSE_ERROR)

    @pytest.mark.parametrize(
        "obj",
        [
            [],
            [1],
            "tools/call",
            {"id": 1, "method": "ping"},
            {"jsonrpc": "1.0", "id": 1, "method": "ping"},
            {"jsonrpc": "2.0", "id": True, "method": "ping"},
            {"jsonrpc": "2.0", "id": 1.5, "method": "ping"},
            {"jsonrpc": "2.0", "id": None, "method": "ping"},
            {"jsonrpc": "2.0", "id": 1, "method": ""},
            {"jsonrpc": "2.0", "id": 1, "method": 5},
            {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": "x"},
            {"jsonrpc": "2.0", "id": 1, "method": "ping", "result": {}},
            {"jsonrpc": "2.0", "id": 1},
            {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}},
            {"jsonrpc": "2.0", "result": {}},
        ],
    )
    def test_invalid_requests(self, obj: Any) -> None:
        """Malformed messages and empty batches are invalid requests (-32600)."""
        _refused(_body(obj), INVALID_REQUEST)

    @pytest.mark.parametrize("params", [None, {}, {"name": 5}, {"name": None}, {"arguments": {}}])
    def test_tools_call_needs_a_name(self, params: Any) -> None:
        """A tools/call whose tool cannot be told is refused, so tool rules cannot be dodged."""
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
        if params is not None:
            msg["params"] = params
        _refused(_body(msg), INVALID_PARAMS)

    def test_batch_cap(self) -> None:
        """Batches longer than the cap are refused."""
        _refused(_body([_req("ping", i) for i in range(MAX_BATCH + 1)]), INVALID_REQUEST)
        assert len(inspect_jsonrpc(_body([_req("ping", i) for i in range(MAX_BATCH)])).messages)

    def test_id_echoed_when_known(self) -> None:
        """A refusal carries the request id when it could be read."""
        err = _refused(_body({"jsonrpc": "2.0", "id": 9, "method": "tools/call"}), INVALID_PARAMS)
        assert err.id == 9


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=256))
def test_inspector_raises_only_its_error_on_bytes(raw: bytes) -> None:
    """Arbitrary bytes either parse or raise JsonRpcError, nothing else."""
    with contextlib.suppress(JsonRpcError):
        inspect_jsonrpc(raw)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["jsonrpc", "id", "method", "params", "name", "result", "error", "x"]),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(value=_json)
def test_inspector_raises_only_its_error_on_json(value: object) -> None:
    """Arbitrary JSON documents (message-shaped or not) never crash the inspector."""
    try:
        body = inspect_jsonrpc(json.dumps(value).encode())
    except JsonRpcError:
        return
    assert all(m.method is None or isinstance(m.method, str) for m in body.messages)


def _headers_ok(body: JsonRpcBody, **h: str | None) -> None:
    check_routing_headers(
        body,
        protocol_version=h.get("version"),
        mcp_method=h.get("method"),
        mcp_name=h.get("name"),
    )


def _headers_refused(body: JsonRpcBody, **h: str | None) -> None:
    with pytest.raises(JsonRpcError) as info:
        _headers_ok(body, **h)
    assert info.value.code == HEADER_MISMATCH


class TestRoutingHeaders:
    CALL = inspect_jsonrpc(_body(_call("search")))

    def test_modern_matching_headers(self) -> None:
        """2026-07-28: Mcp-Method and Mcp-Name equal to the body pass."""
        _headers_ok(self.CALL, version="2026-07-28", method="tools/call", name="search")

    def test_modern_requires_method_header(self) -> None:
        """2026-07-28: a missing Mcp-Method is a mismatch (400)."""
        _headers_refused(self.CALL, version="2026-07-28", name="search")

    def test_modern_requires_name_header(self) -> None:
        """2026-07-28: a tools/call without Mcp-Name is a mismatch."""
        _headers_refused(self.CALL, version="2026-07-28", method="tools/call")

    def test_method_header_disagrees(self) -> None:
        """A header naming a harmless method over a tools/call body is refused."""
        _headers_refused(self.CALL, version="2026-07-28", method="tools/list", name="search")

    def test_name_header_disagrees(self) -> None:
        """A header naming another tool than the body is refused."""
        _headers_refused(self.CALL, version="2026-07-28", method="tools/call", name="read")

    def test_base64_name_header(self) -> None:
        """Mcp-Name may be =?base64?...?= wrapped; it is compared decoded."""
        body = inspect_jsonrpc(_body(_call("naïve tool")))
        wrapped = "=?base64?bmHDr3ZlIHRvb2w=?="
        _headers_ok(body, version="2026-07-28", method="tools/call", name=wrapped)
        _headers_refused(body, version="2026-07-28", method="tools/call", name="=?base64?!!?=")

    def test_legacy_without_headers(self) -> None:
        """Older revisions need no routing headers."""
        _headers_ok(self.CALL, version="2025-11-25")
        _headers_ok(self.CALL)

    def test_legacy_headers_must_still_agree(self) -> None:
        """Sent on an older revision, the headers must agree all the same."""
        _headers_refused(self.CALL, version="2025-06-18", method="tools/list")
        _headers_refused(self.CALL, method="tools/call", name="other")

    def test_unknown_version_is_treated_as_modern(self) -> None:
        """An unknown protocol version gets the strict reading."""
        _headers_refused(self.CALL, version="2099-01-01")

    def test_batch_with_headers_refused(self) -> None:
        """Routing headers cannot describe a batch; the modern wire has no batches."""
        batch = inspect_jsonrpc(_body([_call("a"), _call("b", 2)]))
        _headers_refused(batch, method="tools/call")
        _headers_refused(batch, version="2026-07-28")
        _headers_ok(batch, version="2025-03-26")

    def test_response_with_method_header_refused(self) -> None:
        """A response carries no method, so an Mcp-Method header on it disagrees."""
        resp = inspect_jsonrpc(_body({"jsonrpc": "2.0", "id": 1, "result": {}}))
        _headers_refused(resp, method="tools/call")
        _headers_ok(resp, version="2026-07-28")

    def test_decode_header_value(self) -> None:
        """Plain values pass verbatim; malformed sentinels decode to None."""
        assert decode_header_value("abc") == "abc"
        assert decode_header_value(None) is None
        assert decode_header_value("=?base64?YWJj?=") == "abc"
        assert decode_header_value("=?base64?YWJ=?=") is None
        assert decode_header_value("=?base64?/w==?=") is None


def _policy(*rules: McpRule, default: str = "allow") -> McpPolicy:
    return McpPolicy(rules=rules, default_effect=default)


def _facts(
    method: str = "tools/call",
    tool: str | None = "search",
    *,
    scopes: str = "mcp",
    auth_time: float | None = NOW - 60,
    acr: str | None = None,
) -> Facts:
    return Facts(
        method=method, tool=tool, scopes=frozenset(scopes.split()), auth_time=auth_time, acr=acr
    )


class TestEvaluate:
    def test_default_allow(self) -> None:
        """Without rules the default effect decides."""
        assert evaluate(_facts(), _policy(), NOW) == Decision(
            Effect.ALLOW, "allowed", method="tools/call", tool="search"
        )
        assert evaluate(_facts(), _policy(default="deny"), NOW).reason == "default_denied"

    def test_deny_rule_by_tool_glob(self) -> None:
        """A deny rule matching the tool by glob denies the call."""
        policy = _policy(McpRule(method="tools/call", tool="delete_*", effect="deny"))
        assert evaluate(_facts(tool="delete_repo"), policy, NOW).effect is Effect.DENY
        assert evaluate(_facts(tool="search"), policy, NOW).effect is Effect.ALLOW

    def test_tool_rules_only_match_tools_call(self) -> None:
        """A rule naming a tool never matches other methods (prompts/get has a name too)."""
        policy = _policy(McpRule(method="*", tool="*", effect="deny"))
        assert evaluate(_facts("prompts/get", None), policy, NOW).effect is Effect.ALLOW
        assert evaluate(_facts("tools/call", "x"), policy, NOW).effect is Effect.DENY

    def test_globs_are_case_sensitive(self) -> None:
        """`Delete_*` does not match `delete_repo`: methods and tools are case-sensitive."""
        policy = _policy(McpRule(tool="Delete_*", effect="deny"))
        assert evaluate(_facts(tool="delete_repo"), policy, NOW).effect is Effect.ALLOW

    def test_first_match_wins(self) -> None:
        """Rules are read in order; the first that matches decides."""
        policy = _policy(
            McpRule(tool="search", effect="allow"),
            McpRule(method="tools/*", effect="deny"),
        )
        assert evaluate(_facts(tool="search"), policy, NOW).effect is Effect.ALLOW
        assert evaluate(_facts(tool="write"), policy, NOW).effect is Effect.DENY
        assert evaluate(_facts("tools/list", None), policy, NOW).reason == "rule_denied"

    def test_required_scopes(self) -> None:
        """Missing scopes give insufficient_scope naming every required scope (R29)."""
        policy = _policy(McpRule(tool="admin_*", require_scopes=("mcp", "admin")))
        d = evaluate(_facts(tool="admin_x", scopes="mcp"), policy, NOW)
        assert (d.effect, d.scope) == (Effect.INSUFFICIENT_SCOPE, "mcp admin")
        ok = evaluate(_facts(tool="admin_x", scopes="mcp admin"), policy, NOW)
        assert ok.effect is Effect.ALLOW

    def test_max_auth_age(self) -> None:
        """An authentication older than max_auth_age needs a step-up with max_age (R30)."""
        policy = _policy(McpRule(tool="pay", max_auth_age=300.0, acr_values="urn:x"))
        old = evaluate(_facts(tool="pay", auth_time=NOW - 301), policy, NOW)
        assert (old.effect, old.max_age, old.acr_values, old.reason) == (
            Effect.STEP_UP,
            300,
            "urn:x",
            "auth_too_old",
        )
        fresh = evaluate(_facts(tool="pay", auth_time=NOW - 300, acr="urn:x"), policy, NOW)
        assert fresh.effect is Effect.ALLOW

    def test_missing_auth_time_is_oldest(self) -> None:
        """No auth_time counts as the weakest case: step-up (R31)."""
        policy = _policy(McpRule(tool="pay", max_auth_age=300.0))
        assert evaluate(_facts(tool="pay", auth_time=None), policy, NOW).effect is Effect.STEP_UP

    def test_acr_values(self) -> None:
        """A rule with acr_values requires one of them."""
        policy = _policy(McpRule(tool="pay", acr_values="urn:a urn:b"))
        d = evaluate(_facts(tool="pay", acr="urn:c"), policy, NOW)
        assert (d.effect, d.reason, d.acr_values) == (
            Effect.STEP_UP,
            "acr_not_accepted",
            "urn:a urn:b",
        )
        assert evaluate(_facts(tool="pay", acr="urn:b"), policy, NOW).effect is Effect.ALLOW


class TestEvaluateBody:
    POLICY = _policy(
        McpRule(tool="rm", effect="deny"),
        McpRule(tool="admin", require_scopes=("admin",)),
        McpRule(tool="pay", max_auth_age=300.0),
        McpRule(tool="wire", max_auth_age=60.0),
    )

    def _eval(self, *msgs: dict[str, Any], auth_time: float = NOW - 120) -> Decision:
        raw = _body(list(msgs)) if len(msgs) > 1 else _body(msgs[0])
        return evaluate_body(
            inspect_jsonrpc(raw),
            scopes=["mcp"],
            auth_time=auth_time,
            acr=None,
            policy=self.POLICY,
            now=NOW,
        )

    def test_batch_never_waved_through(self) -> None:
        """One denied element denies the whole batch."""
        d = self._eval(_call("search", 1), _call("rm", 2), _call("admin", 3))
        assert (d.effect, d.tool) == (Effect.DENY, "rm")

    def test_batch_strictest_then_merged(self) -> None:
        """Scope needs outrank step-ups; step-ups merge to the shortest max_age."""
        d = self._eval(_call("pay", 1), _call("admin", 2))
        assert d.effect is Effect.INSUFFICIENT_SCOPE
        d = self._eval(_call("pay", 1), _call("wire", 2), auth_time=NOW - 400)
        assert (d.effect, d.max_age) == (Effect.STEP_UP, 60)

    def test_responses_are_not_calls(self) -> None:
        """A response to the server's own request invokes nothing."""
        d = self._eval({"jsonrpc": "2.0", "id": 1, "result": {}})
        assert d.effect is Effect.ALLOW


class TestMissingAmr:
    def test_values(self) -> None:
        """Every required value must be present; a non-list amr lacks them all (R31)."""
        assert missing_amr(("pwd", "otp", "mfa"), ("mfa",)) == ()
        assert missing_amr(("pwd",), ("mfa", "otp")) == ("mfa", "otp")
        assert missing_amr(None, ("mfa",)) == ("mfa",)
        assert missing_amr(("MFA",), ("mfa",)) == ("mfa",)


_glob = st.sampled_from(["*", "tools/*", "tools/call", "prompts/*", "?ools/call", "[tp]*"])
_tool_glob = st.none() | st.sampled_from(["*", "a*", "b", "[ab]"])
_rules = st.lists(
    st.builds(
        McpRule,
        method=_glob,
        tool=_tool_glob,
        effect=st.sampled_from(["allow", "deny"]),
        require_scopes=st.lists(st.sampled_from(["mcp", "admin"]), max_size=2).map(tuple),
        max_auth_age=st.none() | st.floats(0, 10_000),
        acr_values=st.none() | st.sampled_from(["urn:a", "urn:a urn:b"]),
    ),
    max_size=5,
)


@settings(max_examples=400, deadline=None)
@given(
    rules=_rules,
    default=st.sampled_from(["allow", "deny"]),
    method=st.sampled_from(["tools/call", "tools/list", "prompts/get", "ping"]),
    tool=st.sampled_from(["a", "ab", "b", "c"]),
    scopes=st.sets(st.sampled_from(["mcp", "admin"])),
    acr=st.none() | st.sampled_from(["urn:a", "urn:b"]),
    older=st.none() | st.floats(0, 20_000),
    fresher_by=st.floats(0, 20_000),
)
def test_fresher_auth_never_turns_allow_into_deny(
    rules: list[McpRule],
    default: str,
    method: str,
    tool: str,
    scopes: set[str],
    acr: str | None,
    older: float | None,
    fresher_by: float,
) -> None:
    """Policy evaluation is monotonic in auth_time: fresher MFA never loses an allow."""
    policy = _policy(*rules, default=default)
    t_old = None if older is None else NOW - older
    t_new = NOW - max(0.0, (older if older is not None else 20_000) - fresher_by)

    def decide(auth_time: float | None) -> Decision:
        return evaluate(
            Facts(
                method=method,
                tool=tool if method == "tools/call" else None,
                scopes=frozenset(scopes),
                auth_time=auth_time,
                acr=acr,
            ),
            policy,
            NOW,
        )

    if decide(t_old).allowed:
        assert decide(t_new).allowed
