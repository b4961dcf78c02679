"""`issue_code`: no code before the step-up succeeded (invariant 1), one code per transaction."""

from __future__ import annotations

import pytest

from gateway.crypto import token_hash
from gateway.flows.codes import StepUpIncomplete, gateway_amr, issue_code
from gateway.ports import Json, Store
from tests.flows.conftest import REDIRECT, HarnessFactory


def transaction(stage: str, **extra: object) -> Json:
    return {
        "client_id": "c1",
        "redirect_uri": REDIRECT,
        "state": "s",
        "stage": stage,
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "scope": "mcp",
        "resource": "http://127.0.0.1:8080/mcp",
        "sub": "alice",
        "amr_upstream": ["pwd"],
        **extra,
    }


@pytest.mark.parametrize("stage", ["consent", "upstream", "totp", "enroll", "", "DONE"])
async def test_no_code_before_step_up(
    make_harness: HarnessFactory, store: Store, stage: str
) -> None:
    """Any stage but `done` is refused and nothing is stored (invariant 1)."""
    gw = await make_harness(store)
    tx = transaction(stage)
    await store.put_transaction("tx1", tx, 600)
    with pytest.raises(StepUpIncomplete) as info:
        await issue_code(store, gw.settings, "tx1", tx, gw.clock.now())
    assert info.value.error == "access_denied"
    assert await store.get_transaction("tx1") is not None  # not consumed
    assert gw.metric("mfagw_codes_issued_total") == 0


async def test_stored_stage_done_with_caller_copy_not_done_is_refused(
    make_harness: HarnessFactory, store: Store
) -> None:
    """The caller's copy must say `done` too: a stale copy cannot mint a code."""
    gw = await make_harness(store)
    await store.put_transaction("tx1", transaction("done"), 600)
    with pytest.raises(StepUpIncomplete):
        await issue_code(store, gw.settings, "tx1", transaction("totp"), gw.clock.now())


async def test_one_code_per_transaction(make_harness: HarnessFactory, store: Store) -> None:
    """The transaction is consumed: a second call (or a racing one) gets no second code."""
    gw = await make_harness(store)
    tx = transaction("done")
    await store.put_transaction("tx1", tx, 600)
    code = await issue_code(store, gw.settings, "tx1", tx, gw.clock.now())
    assert len(code) >= 43  # 256 bits (R10)
    with pytest.raises(StepUpIncomplete):
        await issue_code(store, gw.settings, "tx1", tx, gw.clock.now())
    assert await store.get_transaction("tx1") is None


async def test_transaction_must_match_the_stored_one(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A caller copy bound to another client or redirect URI is refused."""
    gw = await make_harness(store)
    await store.put_transaction("tx1", transaction("done"), 600)
    with pytest.raises(StepUpIncomplete):
        await issue_code(
            store,
            gw.settings,
            "tx1",
            transaction("done", redirect_uri="https://evil.example/cb"),
            gw.clock.now(),
        )


async def test_subject_required(make_harness: HarnessFactory, store: Store) -> None:
    """A transaction without the upstream subject cannot produce a code."""
    gw = await make_harness(store)
    tx = transaction("done", sub=None)
    await store.put_transaction("tx1", tx, 600)
    with pytest.raises(StepUpIncomplete):
        await issue_code(store, gw.settings, "tx1", tx, gw.clock.now())


async def test_code_record_binding(make_harness: HarnessFactory, store: Store) -> None:
    """Stored under token_hash(code) only, bound as DESIGN §2.9; consent recorded for the sub."""
    gw = await make_harness(store)
    tx = transaction("done", consented_at=gw.clock.now(), amr_upstream=["pwd", "otp", "hwk"])
    await store.put_transaction("tx1", tx, 600)
    code = await issue_code(store, gw.settings, "tx1", tx, gw.clock.now())
    assert await store.take_code(code) is None  # never stored in the clear
    data = await store.take_code(token_hash(code))
    assert data is not None
    assert {
        k: data[k]
        for k in ("client_id", "redirect_uri", "code_challenge", "resource", "scope", "sub")
    } == {
        k: tx[k]
        for k in ("client_id", "redirect_uri", "code_challenge", "resource", "scope", "sub")
    }
    assert data["amr"] == ["pwd", "hwk", "otp", "mfa"]
    assert data["auth_time"] == int(gw.clock.now())
    assert data["acr"] == "urn:mfa-gateway:totp"
    assert await store.has_consent("alice", "c1") is True


def test_gateway_amr() -> None:
    """Upstream amr (default pwd) plus otp and mfa, deduplicated; an upstream `mfa`/`otp` is
    not believed (DESIGN §3, R31)."""
    assert gateway_amr(None) == ["pwd", "otp", "mfa"]
    assert gateway_amr("pwd") == ["pwd", "otp", "mfa"]
    assert gateway_amr([]) == ["pwd", "otp", "mfa"]
    assert gateway_amr(["mfa", "pwd", 3, "otp"]) == ["pwd", "otp", "mfa"]
    assert gateway_amr(["mfa"]) == ["pwd", "otp", "mfa"]
