"""Fuzzing MCP policy evaluation (`gateway.core.policy`): fresher MFA never hurts, batches never
hide anything (DESIGN §4.4, R30).

Supersedes `tests/unit/test_policy.py::test_fresher_auth_never_turns_allow_into_deny`: here the
property is the stronger "a fresher step-up never makes the decision stricter" (allow stays
allow, a step-up challenge may only disappear, deny and insufficient scope do not depend on
time), over rules with hostile globs, arbitrary methods and tool names, and whole batches.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.policy import (
    Decision,
    Effect,
    Facts,
    JsonRpcBody,
    JsonRpcMessage,
    evaluate,
    evaluate_body,
)
from gateway.settings import McpPolicy, McpRule
from tests.fuzz.strategies import NOW

RANK = {Effect.ALLOW: 0, Effect.STEP_UP: 1, Effect.INSUFFICIENT_SCOPE: 2, Effect.DENY: 3}
METHODS = [
    "tools/call",
    "tools/list",
    "prompts/get",
    "resources/read",
    "ping",
    "initialize",
    "notifications/initialized",
    "tools/callx",
    "TOOLS/CALL",
    "*",
    "[",
    "tools/*",
]
TOOLS = ["echo", "delete_everything", "transfer_funds", "a*", "[ab]", "", "x" * 200, "é", "*"]
GLOBS = [
    "*",
    "tools/*",
    "tools/call",
    "prompts/*",
    "?ools/call",
    "[tp]*",
    "[!t]*",
    "*/*",
    "",
    "[",
    "tools/[",
    "\\*",
    "**",
    "tools/call*",
]
SCOPES = ["mcp", "admin", "files:read"]
ACRS = ["urn:mfa-gateway:totp", "urn:a", "urn:b"]

rules = st.lists(
    st.builds(
        McpRule,
        method=st.one_of(st.sampled_from(GLOBS), st.text(max_size=6)),
        tool=st.one_of(st.none(), st.sampled_from(GLOBS + TOOLS)),
        effect=st.sampled_from(["allow", "deny"]),
        require_scopes=st.lists(st.sampled_from(SCOPES), max_size=2).map(tuple),
        max_auth_age=st.one_of(st.none(), st.floats(0, 100_000)),
        acr_values=st.one_of(st.none(), st.sampled_from(["urn:a", "urn:a urn:b", ""])),
    ),
    max_size=6,
)
policies = st.builds(
    lambda r, d: McpPolicy(rules=tuple(r), default_effect=d),
    rules,
    st.sampled_from(["allow", "deny"]),
)
# auth_time None (unknown) is the weakest; otherwise seconds before NOW, or a little after.
ages = st.one_of(st.none(), st.floats(-60, 10**7, allow_nan=False))
methods = st.one_of(st.sampled_from(METHODS), st.text(max_size=12))
tools = st.one_of(st.sampled_from(TOOLS), st.text(max_size=12))


def _at(age: float | None) -> float | None:
    return None if age is None else NOW - age


def _fresher(older: float | None, fresher_by: float) -> float:
    """An age at most `older` (an unknown auth_time is older than any known one)."""
    base = 10**7 if older is None else older
    return max(-60.0, base - fresher_by)


@settings(max_examples=200, deadline=None)
@given(
    policy=policies,
    method=methods,
    tool=tools,
    scopes=st.frozensets(st.sampled_from(SCOPES)),
    acr=st.one_of(st.none(), st.sampled_from(ACRS)),
    older=ages,
    fresher_by=st.floats(0, 10**7),
)
def test_a_fresher_step_up_never_makes_a_decision_stricter(
    policy: McpPolicy,
    method: str,
    tool: str,
    scopes: frozenset[str],
    acr: str | None,
    older: float | None,
    fresher_by: float,
) -> None:
    """For any rules and call, evaluating with a more recent `auth_time` gives a decision at
    most as strict: allow stays allow, only a `max_age` challenge can go away, and the same
    rule decides (R30: step-up is about freshness, nothing else depends on it)."""

    def decide(age: float | None) -> Decision:
        facts = Facts(
            method=method,
            tool=tool if method == "tools/call" else None,
            scopes=scopes,
            auth_time=_at(age),
            acr=acr,
        )
        return evaluate(facts, policy, NOW)

    old, new = decide(older), decide(_fresher(older, fresher_by))
    assert RANK[new.effect] <= RANK[old.effect], (old, new)
    if old.allowed:
        assert new.allowed
    if old.effect in (Effect.DENY, Effect.INSUFFICIENT_SCOPE):
        assert new == old
    if new.effect is Effect.STEP_UP and new.reason == "auth_too_old":
        assert (old.effect, old.reason) == (Effect.STEP_UP, "auth_too_old")


def _message(method: str | None, tool: str | None, i: int) -> JsonRpcMessage:
    if method is None:
        return JsonRpcMessage(kind="response", method=None, id=i, name=None)
    name = tool if method in ("tools/call", "prompts/get") else None
    return JsonRpcMessage(kind="request", method=method, id=i, name=name)


calls = st.lists(st.tuples(st.one_of(st.none(), methods), tools), min_size=1, max_size=8)


@settings(max_examples=120, deadline=None)
@given(
    policy=policies,
    batch=calls,
    extra=st.tuples(methods, tools),
    scopes=st.frozensets(st.sampled_from(SCOPES)),
    age=ages,
    fresher_by=st.floats(0, 10**7),
)
def test_a_batch_is_as_strict_as_its_strictest_call(
    policy: McpPolicy,
    batch: list[tuple[str | None, str]],
    extra: tuple[str, str],
    scopes: frozenset[str],
    age: float | None,
    fresher_by: float,
) -> None:
    """A JSON-RPC batch is decided as strictly as its strictest call: adding a call never
    relaxes the decision, no element's denial is lost, and freshness is monotonic for the
    whole batch too (DESIGN §4.4)."""

    def body(items: list[tuple[str | None, str]]) -> JsonRpcBody:
        return JsonRpcBody(
            messages=tuple(_message(m, t, i) for i, (m, t) in enumerate(items)),
            batch=len(items) > 1,
        )

    def decide(items: list[tuple[str | None, str]], a: float | None) -> Decision:
        return evaluate_body(
            body(items), scopes=scopes, auth_time=_at(a), acr="urn:a", policy=policy, now=NOW
        )

    whole = decide(batch, age)
    for method, tool in batch:
        if method is None:
            continue
        single = evaluate(
            Facts(
                method=method,
                tool=tool if method == "tools/call" else None,
                scopes=scopes,
                auth_time=_at(age),
                acr="urn:a",
            ),
            policy,
            NOW,
        )
        assert RANK[whole.effect] >= RANK[single.effect]
    grown = decide([*batch, extra], age)
    assert RANK[grown.effect] >= RANK[whole.effect]
    fresher = decide(batch, _fresher(age, fresher_by))
    assert RANK[fresher.effect] <= RANK[whole.effect]
    if whole.effect is Effect.STEP_UP and whole.max_age is not None:
        ages_asked = [r.max_auth_age for r in policy.rules if r.max_auth_age is not None]
        assert whole.max_age in {int(a) for a in ages_asked}


@settings(max_examples=100, deadline=None)
@given(policy=policies, method=methods, tool=tools, age=ages)
def test_evaluation_is_a_pure_function(
    policy: McpPolicy, method: str, tool: str, age: float | None
) -> None:
    """The same facts always give the same decision, and a decision's reason is one of the
    fixed audit strings (used as a metric label: never attacker text; R35)."""
    facts = Facts(
        method=method,
        tool=tool if method == "tools/call" else None,
        scopes=frozenset({"mcp"}),
        auth_time=_at(age),
        acr=None,
    )
    first: Any = evaluate(facts, policy, NOW)
    assert evaluate(facts, policy, NOW) == first
    assert first.reason in {
        "allowed",
        "rule_denied",
        "default_denied",
        "insufficient_scope",
        "auth_too_old",
        "acr_not_accepted",
    }
