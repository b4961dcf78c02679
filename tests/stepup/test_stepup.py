"""The TOTP step-up page and its verification, against both real stores (DESIGN §2.8-9)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import MutableMapping
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from structlog.testing import capture_logs

from gateway.core.regulation import keys_for
from gateway.crypto import token_hash
from gateway.flows.codes import StepUpIncomplete, issue_code
from gateway.flows.stepup import GENERIC_FAILURE, StepUpNotReady, verify_stepup
from tests.stepup.conftest import CLIENT_REDIRECT, PUBLIC_URL, Gateway, GatewayFactory


class _Forms(HTMLParser):
    """Collects forms and their inputs (attributes as dicts)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, str | None]] = []
        self.inputs: list[dict[str, str | None]] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "form":
            self.forms.append(dict(attrs))
        elif tag == "input":
            self.inputs.append(dict(attrs))
        elif tag == "script":
            self.scripts += 1


def parse(html: str) -> _Forms:
    forms = _Forms()
    forms.feed(html)
    return forms


def metric(gw: Gateway, name: str, **labels: str) -> float | None:
    return gw.metrics.registry.get_sample_value(name, labels)


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def _redeemable(gw: Gateway, location: str) -> dict[str, object]:
    """The stored code data behind a client redirect (asserting its exact shape)."""
    parts = urlsplit(location)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == CLIENT_REDIRECT
    query = dict(parse_qsl(parts.query))
    assert set(query) == {"code", "state", "iss"}
    assert query["state"] == "client-state-1"
    assert query["iss"] == PUBLIC_URL
    data = await gw.store.take_code(token_hash(query["code"]))
    assert data is not None
    return data


# --------------------------------------------------------------------------- the page


async def test_page_follows_the_html_contract(gateway: Gateway) -> None:
    """R13, DESIGN §2.8: one POST form, `code` input (one-time-code), hidden csrf and tx; no
    script; names the client and the account; interactive-page security headers."""
    await gateway.enroll()
    txid = await gateway.login()
    resp = await gateway.page(txid)
    assert resp.status == 200
    html = await resp.text()
    parsed = parse(html)
    assert len(parsed.forms) == 1
    assert parsed.forms[0]["method"] == "post"
    assert parsed.forms[0]["action"] == "/oauth/totp"
    by_name = {i["name"]: i for i in parsed.inputs}
    assert set(by_name) == {"code", "csrf", "tx"}
    code = by_name["code"]
    assert code["type"] == "text"
    assert code["autocomplete"] == "one-time-code"
    assert code["inputmode"] == "numeric"
    assert code["pattern"] is not None
    assert re.fullmatch(code["pattern"], "123456")
    assert re.fullmatch(code["pattern"], "12345678")
    assert not re.fullmatch(code["pattern"], "12345")
    assert by_name["csrf"]["type"] == "hidden"
    assert by_name["csrf"]["value"] == gateway.csrf(txid)
    assert by_name["tx"] == {"type": "hidden", "name": "tx", "value": txid}
    assert parsed.scripts == 0
    assert "Test Client" in html
    assert "alice" in html
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    csp = resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp.split("; ")
    assert "form-action 'self' http://127.0.0.1:5555" in csp.split("; ")


async def test_page_refused_without_the_transaction_cookie(gateway: Gateway) -> None:
    """DESIGN §2.6: the step-up page belongs to the browser that started the transaction."""
    await gateway.enroll()
    txid = await gateway.login()
    resp = await gateway.client.get("/oauth/totp", params={"tx": txid})
    assert resp.status == 403
    other_txid = await gateway.login()
    resp = await gateway.client.get(
        "/oauth/totp", params={"tx": txid}, headers=gateway.cookie(other_txid)
    )
    assert resp.status == 403


async def test_page_refused_for_a_transaction_not_waiting_for_a_code(gateway: Gateway) -> None:
    """Invariant 1: a transaction still in stage `upstream` (or unknown) has no TOTP page."""
    txid, _, _ = await gateway.new_transaction()
    resp = await gateway.page(txid)
    assert resp.status == 400
    assert "<form" not in await resp.text()
    resp = await gateway.page("no-such-transaction")
    assert resp.status == 400


# --------------------------------------------------------------------------- verification


async def test_valid_code_redirects_to_the_client_with_a_code(gateway: Gateway) -> None:
    """DESIGN §2.9: after a valid TOTP, 303 to the verified redirect URI with code, state, iss;
    the code is bound to the subject, with auth_time = now and amr + otp, mfa."""
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    with capture_logs() as logs:
        resp = await gateway.submit(txid, gateway.code(enrolled.secret))
    assert resp.status == 303
    data = await _redeemable(gateway, resp.headers["Location"])
    assert data["sub"] == "alice"
    assert data["client_id"] == "client-1"
    assert data["auth_time"] == int(gateway.clock.now())
    assert data["amr"] == ["pwd", "otp", "mfa"]
    assert "mfagw_tx=" in resp.headers["Set-Cookie"]  # the transaction cookie is cleared
    assert [e["sub"] for e in events(logs, "totp_accepted")] == ["alice"]
    assert metric(gateway, "mfagw_stepups_total", outcome="succeeded") == 1


async def test_wrong_code_is_refused_with_the_generic_message(gateway: Gateway) -> None:
    """R34: a wrong code gives the generic page (400), no redirect, no code; logged."""
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    good = gateway.code(enrolled.secret)
    wrong = f"{(int(good) + 1) % 1_000_000:06d}"
    with capture_logs() as logs:
        resp = await gateway.submit(txid, wrong)
    assert resp.status == 400
    assert "Location" not in resp.headers
    assert GENERIC_FAILURE in await resp.text()
    assert [e["reason"] for e in events(logs, "totp_failed")] == ["wrong_code"]
    assert (await gateway.store.get_transaction(txid) or {})["stage"] == "totp"


async def test_window_accepts_the_previous_step_but_not_older(gateway: Gateway) -> None:
    """RFC 6238 §5.2 / R34: at most `window` steps of drift are accepted."""
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    resp = await gateway.submit(txid, gateway.code(enrolled.secret, -2))
    assert resp.status == 400
    resp = await gateway.submit(txid, gateway.code(enrolled.secret, -1))
    assert resp.status == 303


async def test_replayed_code_is_refused_in_a_new_transaction(gateway: Gateway) -> None:
    """R34: an accepted code is never accepted again (also not in another transaction); the
    replay is logged as `totp_replay_rejected` and counted."""
    enrolled = await gateway.enroll()
    code = gateway.code(enrolled.secret)
    first = await gateway.login()
    assert (await gateway.submit(first, code)).status == 303
    second = await gateway.login()
    with capture_logs() as logs:
        resp = await gateway.submit(second, code)
    assert resp.status == 400
    assert GENERIC_FAILURE in await resp.text()
    assert [e["sub"] for e in events(logs, "totp_replay_rejected")] == ["alice"]
    assert metric(gateway, "mfagw_stepups_total", outcome="replayed") == 1
    assert await gateway.store.get_counter(keys_for("alice", "127.0.0.1").ip_failures) == 1


async def test_older_step_after_a_newer_one_is_refused(gateway: Gateway) -> None:
    """R34: accepted steps strictly increase: after step T+1 was used, step T is refused even
    though it is still inside the window."""
    enrolled = await gateway.enroll()
    first = await gateway.login()
    assert (await gateway.submit(first, gateway.code(enrolled.secret, +1))).status == 303
    second = await gateway.login()
    resp = await gateway.submit(second, gateway.code(enrolled.secret, 0))
    assert resp.status == 400


async def test_twenty_concurrent_submissions_of_one_code_succeed_once(
    gateway: Gateway,
) -> None:
    """R34, invariant 5: 20 concurrent submissions of the same valid code (20 transactions of
    the same user) yield exactly one authorization code."""
    enrolled = await gateway.enroll()
    txids = [await gateway.login() for _ in range(20)]
    code = gateway.code(enrolled.secret)
    gw = gateway
    txs = [await gw.store.get_transaction(txid) or {} for txid in txids]
    results = await asyncio.gather(
        *(
            verify_stepup(
                gw.store, gw.sealer, gw.settings, txid, tx, code, "10.0.0.1", gw.clock.now()
            )
            for txid, tx in zip(txids, txs, strict=True)
        )
    )
    assert sum(r.accepted for r in results) == 1
    assert all(r.redirect_to is None for r in results if not r.accepted)


async def test_concurrent_posts_on_one_transaction_issue_one_code(gateway: Gateway) -> None:
    """Invariant 1/4: double submission of one form yields at most one code."""
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    code = gateway.code(enrolled.secret)
    responses = await asyncio.gather(*(gateway.submit(txid, code) for _ in range(5)))
    assert sorted(r.status for r in responses) == [303, 400, 400, 400, 400]


# --------------------------------------------------------------------------- lockout


async def test_user_lockout_after_policy_failures(gateway: Gateway) -> None:
    """R34: 5 failures per user lock the user's step-up; then even the right code fails, with
    the same generic page; `account_locked` is logged and counted once."""
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    good = gateway.code(enrolled.secret)
    wrong = f"{(int(good) + 7) % 1_000_000:06d}"
    with capture_logs() as logs:
        for _ in range(5):
            assert (await gateway.submit(txid, wrong)).status == 400
        resp = await gateway.submit(txid, good)
    assert resp.status == 400
    assert GENERIC_FAILURE in await resp.text()
    locked = events(logs, "account_locked")
    assert [(e["scope"], e["sub"]) for e in locked] == [("user", "alice")]
    assert [e["reason"] for e in events(logs, "totp_failed")][-1] == "user_locked"
    assert metric(gateway, "mfagw_lockouts_total", scope="user") == 1
    assert await gateway.store.is_locked(keys_for("alice", None).user_lock)


async def test_user_lock_lifts_after_the_lockout(
    make_gateway: GatewayFactory,
) -> None:
    """R34: the lock has the policy's duration, then the right code works again."""
    gateway = await make_gateway(stepup={"lockout": "1s", "max_failures_per_user": 2})
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    wrong = f"{(int(gateway.code(enrolled.secret)) + 3) % 1_000_000:06d}"
    for _ in range(2):
        await gateway.submit(txid, wrong)
    assert (await gateway.submit(txid, gateway.code(enrolled.secret))).status == 400
    gateway.clock.advance(1.5)
    await asyncio.sleep(1.1)  # Redis TTLs run on real time
    txid = await gateway.login()
    assert (await gateway.submit(txid, gateway.code(enrolled.secret))).status == 303


async def test_ip_lockout_spans_users(make_gateway: GatewayFactory) -> None:
    """R34: failures are also counted per client IP; at the limit the IP is locked for every
    user, while the same user from another IP still gets in."""
    gateway = await make_gateway(stepup={"max_failures_per_ip": 3})
    users = {u: await gateway.enroll(u) for u in ("u1", "u2", "u3", "bob")}
    with capture_logs() as logs:
        for user in ("u1", "u2", "u3"):
            gateway.idp.user = user
            txid = await gateway.login()
            wrong = f"{(int(gateway.code(users[user].secret)) + 1) % 1_000_000:06d}"
            assert (await gateway.submit(txid, wrong, ip="203.0.113.9")).status == 400
    assert [e["scope"] for e in events(logs, "account_locked")] == ["ip"]
    assert metric(gateway, "mfagw_lockouts_total", scope="ip") == 1
    gateway.idp.user = "bob"
    txid = await gateway.login()
    code = gateway.code(users["bob"].secret)
    assert (await gateway.submit(txid, code, ip="203.0.113.9")).status == 400
    assert (await gateway.submit(txid, code, ip="198.51.100.7")).status == 303


async def test_ipv6_clients_are_counted_per_64(make_gateway: GatewayFactory) -> None:
    """R34: hopping addresses inside one IPv6 /64 does not reset the per-IP budget."""
    gateway = await make_gateway(stepup={"max_failures_per_ip": 2})
    users = {u: await gateway.enroll(u) for u in ("u1", "u2", "bob")}
    for n, user in enumerate(("u1", "u2")):
        gateway.idp.user = user
        txid = await gateway.login()
        wrong = f"{(int(gateway.code(users[user].secret)) + 1) % 1_000_000:06d}"
        await gateway.submit(txid, wrong, ip=f"2001:db8:1:2::{n + 1}")
    gateway.idp.user = "bob"
    txid = await gateway.login()
    code = gateway.code(users["bob"].secret)
    assert (await gateway.submit(txid, code, ip="2001:db8:1:2:ffff::9")).status == 400
    assert (await gateway.submit(txid, code, ip="2001:db8:1:3::1")).status == 303


async def test_lockout_holds_across_two_instances(make_gateway: GatewayFactory) -> None:
    """Invariant 5: attempts are capped across replicas: failures spread over two gateway
    instances sharing one store add up, and the lock set by one is enforced by the other."""
    one = await make_gateway()
    two = await make_gateway()
    enrolled = await one.enroll()
    txid = await one.login()
    wrong = f"{(int(one.code(enrolled.secret)) + 5) % 1_000_000:06d}"
    for n in range(5):
        gw = one if n % 2 == 0 else two
        assert (await gw.submit(txid, wrong)).status == 400
    assert (await two.submit(txid, two.code(enrolled.secret))).status == 400
    assert (await one.submit(txid, one.code(enrolled.secret))).status == 400


async def test_concurrent_guesses_cannot_exceed_the_budget(gateway: Gateway) -> None:
    """R34: 30 concurrent wrong guesses verify at most `max_failures_per_user` codes: the
    attempt slot is taken before the code is checked."""
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    good = int(gateway.code(enrolled.secret))
    tx = await gateway.store.get_transaction(txid) or {}
    guesses = [f"{(good + n) % 1_000_000:06d}" for n in range(1, 31)]
    with capture_logs() as logs:
        results = await asyncio.gather(
            *(
                verify_stepup(
                    gateway.store,
                    gateway.sealer,
                    gateway.settings,
                    txid,
                    dict(tx),
                    guess,
                    "10.0.0.2",
                    gateway.clock.now(),
                )
                for guess in guesses
            )
        )
    del logs
    assert not any(r.accepted for r in results)
    assert sum(r.reason == "wrong_code" for r in results) == 5
    assert sum(r.reason == "user_locked" for r in results) == 25


async def test_success_clears_the_user_failure_budget(gateway: Gateway) -> None:
    """R34: failures followed by a success do not accumulate toward a lockout."""
    enrolled = await gateway.enroll()
    for _ in range(2):
        txid = await gateway.login()
        wrong = f"{(int(gateway.code(enrolled.secret)) + 1) % 1_000_000:06d}"
        for _ in range(4):
            assert (await gateway.submit(txid, wrong)).status == 400
        gateway.clock.advance(gateway.policy.period)
        assert (await gateway.submit(txid, gateway.code(enrolled.secret))).status == 303


# --------------------------------------------------------------------------- recovery codes


async def test_recovery_code_works_exactly_once(gateway: Gateway) -> None:
    """R34: a recovery code (any case, with or without dashes) is accepted once."""
    enrolled = await gateway.enroll()
    code = enrolled.recovery_codes[0]
    txid = await gateway.login()
    with capture_logs() as logs:
        resp = await gateway.submit(txid, code.upper().replace("-", " "))
    assert resp.status == 303
    data = await _redeemable(gateway, resp.headers["Location"])
    assert data["amr"] == ["pwd", "otp", "mfa"]
    assert [e["sub"] for e in events(logs, "recovery_code_used")] == ["alice"]
    assert await gateway.store.count_recovery_codes("alice") == len(enrolled.recovery_codes) - 1
    txid = await gateway.login()
    resp = await gateway.submit(txid, code)
    assert resp.status == 400


async def test_generic_message_identical_for_every_failure_reason(
    make_gateway: GatewayFactory,
) -> None:
    """DESIGN §2.8: wrong, malformed, replayed, unknown recovery code and locked all render the
    same page with the same status; only the log tells them apart."""
    gateway = await make_gateway(stepup={"max_failures_per_user": 5})
    enrolled = await gateway.enroll()
    used = await gateway.login()
    code = gateway.code(enrolled.secret)
    assert (await gateway.submit(used, code)).status == 303
    txid = await gateway.login()
    wrong = f"{(int(code) + 2) % 1_000_000:06d}"
    bodies = []
    with capture_logs() as logs:
        for attempt in (wrong, "12ab", code, "zzzz-zzzz-zzzz", wrong, code):
            resp = await gateway.submit(txid, attempt)
            assert resp.status == 400
            bodies.append(await resp.text())
    reasons = [e["reason"] for e in events(logs, "totp_failed")]
    reasons += [str(e["reason"]) for e in events(logs, "totp_replay_rejected")]
    assert sorted(reasons) == sorted(
        [
            "wrong_code",
            "malformed",
            "replayed",
            "recovery_code_invalid",
            "wrong_code",
            "user_locked",
        ]
    )
    assert len(set(bodies)) == 1
    assert GENERIC_FAILURE in bodies[0]


# --------------------------------------------------------------------------- CSRF and binding


async def test_csrf_missing_or_wrong_is_refused_before_verifying(gateway: Gateway) -> None:
    """Invariant 5, R13: a POST without the form's CSRF token (or with another form's) is
    refused with 403 and the code is not even checked (no burn, no counter)."""
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    code = gateway.code(enrolled.secret)
    assert (await gateway.submit(txid, code, csrf=None)).status == 400  # field missing
    assert (await gateway.submit(txid, code, csrf="forged")).status == 403
    assert (await gateway.submit(txid, code, csrf=gateway.csrf(txid, "consent"))).status == 403
    other = await gateway.login()
    assert (await gateway.submit(txid, code, csrf=gateway.csrf(other))).status == 403
    assert await gateway.store.get_counter(keys_for("alice", None).user_failures) == 0
    assert (await gateway.submit(txid, code)).status == 303  # the code was not burned


async def test_post_from_another_browser_is_refused(gateway: Gateway) -> None:
    """DESIGN §2.6: without this transaction's signed cookie the POST is refused (403)."""
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    resp = await gateway.submit(txid, gateway.code(enrolled.secret), cookie=False)
    assert resp.status == 403
    assert (await gateway.store.get_transaction(txid) or {})["stage"] == "totp"


# --------------------------------------------------------------------------- invariant 1


async def test_no_code_exists_before_totp(gateway: Gateway) -> None:
    """Invariant 1: a transaction in stage `totp` has produced no code and no redirect with a
    code; `issue_code` refuses it; only the step-up makes one."""
    await gateway.enroll()
    with capture_logs() as logs:
        txid = await gateway.login()
    assert not events(logs, "code_issued")
    tx = await gateway.store.get_transaction(txid)
    assert tx is not None
    assert tx["stage"] == "totp"
    for stage in ("consent", "upstream", "totp", "enroll"):
        with pytest.raises(StepUpIncomplete) as info:
            await issue_code(
                gateway.store, gateway.settings, txid, {**tx, "stage": stage}, gateway.clock.now()
            )
        assert info.value.error == "access_denied"
    assert (await gateway.store.get_transaction(txid) or {})["stage"] == "totp"


async def test_unenrolled_user_gets_a_page_and_no_code(gateway: Gateway) -> None:
    """Enrolment mode `admin`: a user without a seed sees a clear page (403), nothing else."""
    txid, _, url = await gateway.new_transaction()
    with capture_logs() as logs:
        resp = await gateway.callback(await gateway.upstream_redirect(url), txid)
    assert resp.status == 403
    assert "no authenticator enrolled" in await resp.text()
    assert "Location" not in resp.headers
    assert [e["reason"] for e in events(logs, "upstream_login_failed")] == ["not_enrolled"]
    assert await gateway.store.get_transaction(txid) is None
    assert await gateway.store.get_blob(f"upstream:{txid}") is None


async def test_one_code_per_transaction_even_with_two_valid_codes(gateway: Gateway) -> None:
    """Invariant 4: two different valid codes (steps T and T+1) for one transaction, the second
    judged on the stale copy a concurrent request holds, produce one code only; the consumed
    transaction is not re-created."""
    enrolled = await gateway.enroll()
    txid = await gateway.login()
    tx = await gateway.store.get_transaction(txid)
    assert tx is not None
    gw = gateway
    first = await verify_stepup(
        gw.store,
        gw.sealer,
        gw.settings,
        txid,
        dict(tx),
        gw.code(enrolled.secret, 0),
        "10.0.0.3",
        gw.clock.now(),
    )
    assert first.accepted
    with pytest.raises(StepUpNotReady):
        await verify_stepup(
            gw.store,
            gw.sealer,
            gw.settings,
            txid,
            dict(tx),
            gw.code(enrolled.secret, 1),
            "10.0.0.3",
            gw.clock.now(),
        )
    assert await gateway.store.get_transaction(txid) is None


async def test_unreadable_seed_fails_closed(gateway: Gateway) -> None:
    """Invariant 8/10: a seed that does not open (another key, tampered) is a failure, counted
    like any other, never an error page with detail or a pass."""
    enrolled = await gateway.enroll()
    record = await gateway.store.get_totp("alice")
    assert record is not None
    await gateway.store.put_totp(
        dataclasses.replace(record, user="alice", sealed_seed=record.sealed_seed[:-4] + "AAAA")
    )
    txid = await gateway.login()
    with capture_logs() as logs:
        resp = await gateway.submit(txid, gateway.code(enrolled.secret))
    assert resp.status == 400
    assert GENERIC_FAILURE in await resp.text()
    assert [e["reason"] for e in events(logs, "totp_failed")] == ["seed_unreadable"]
