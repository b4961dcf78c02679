"""Attacks on the browser steps: consent and TOTP forms (CSRF), the upstream callback (state,
browser binding), the TOTP step-up (replay, brute force) and what reaches the client before it.

One gateway on a real port in front of the real legacy provider, shared by the module; every
test logs in as its own user with its own browser (cookie jar). The per-IP failure limit of the
shared gateway is raised so that tests do not lock each other out; the per-IP lockout has its
own gateway (on the second registered port).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.e2e.useragent import Page, UserAgent
from tests.fixtures.peers import LegacyIdp, McpServer
from tests.security.harness import (
    RegisteredClient,
    Target,
    User,
    assert_page_headers,
    hidden_fields,
    http_client,
    query_of,
    serve_target,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

GENERIC = "That code was not accepted."


def resources(mcp: McpServer) -> list[dict[str, str]]:
    """One resource in front of the SDK MCP server."""
    return [{"path": "/mcp", "upstream": mcp.url, "name": "Demo MCP"}]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(
    tmp_path_factory: pytest.TempPathFactory,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
) -> AsyncIterator[Target]:
    """The module's gateway (per-IP limit raised, per-user limit 5)."""
    async with serve_target(
        tmp_path_factory.mktemp("browser"),
        idp=legacy_idp,
        port=gateway_ports[0],
        resources=resources(mcp_server),
        policy={"stepup": {"max_failures_per_user": 5, "max_failures_per_ip": 1000}},
    ) as t:
        yield t


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(target: Target) -> RegisteredClient:
    """A public client registered for the module."""
    return await target.register(name="Browser-suite client")


def goes_to_client(page: Page, client: RegisteredClient) -> bool:
    """True if `page` redirects to the client's redirect URI."""
    return (page.location or "").startswith(client.redirect_uri)


def stops_before(prefix: str) -> Callable[[Page], bool]:
    """A `stop` predicate: the page redirects to a URL starting with `prefix` (not followed)."""

    def predicate(page: Page) -> bool:
        return (page.location or "").startswith(prefix)

    return predicate


async def consent_page(target: Target, ua: UserAgent, client: RegisteredClient) -> Page:
    """Open the consent page of a new authorization in `ua`."""
    page = await ua.get(target.authorize_url(client))
    assert page.status == 200, page.html[:300]
    return page


def assert_error_page(page: Page, status: int) -> None:
    """An HTML error page with the interactive-page headers, and no redirect."""
    assert page.status == status, (page.status, page.html[:300])
    assert page.location is None
    assert "location" not in page.headers
    assert_page_headers(page)


# --------------------------------------------------------------------------- consent


class TestConsentForm:
    async def test_consent_without_or_with_a_wrong_csrf_token_is_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R13, invariant 5: the consent POST needs the page's CSRF token: missing → 400,
        wrong → 403, neither moves the transaction on; the genuine form then still works."""
        async with target.browser(None, client) as ua:
            page = await consent_page(target, ua, client)
            fields = hidden_fields(page)
            form = target.url + "/oauth/consent"
            missing = await ua.request(
                "POST", form, data=[("tx", fields["tx"]), ("decision", "approve")]
            )
            wrong = await ua.request(
                "POST",
                form,
                data=[("tx", fields["tx"]), ("csrf", "A" * 43), ("decision", "approve")],
            )
            other_tx = await ua.request(
                "POST",
                form,
                data=[
                    ("tx", fields["tx"]),
                    ("csrf", fields["csrf"][::-1]),
                    ("decision", "approve"),
                ],
            )
            genuine = await ua.request(
                "POST", form, data=[*fields.items(), ("decision", "approve")]
            )
        assert_error_page(missing, 400)
        assert_error_page(wrong, 403)
        assert_error_page(other_tx, 403)
        assert genuine.status == 303
        assert (genuine.location or "").startswith(target.idp.issuer + "/")

    async def test_consent_posted_by_another_browser_is_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R13, R15: an attacker's own consent form (tx + csrf) auto-submitted from the
        victim's browser is refused: the victim holds no cookie for that transaction."""
        async with target.browser(None, client) as attacker, target.browser(None, client) as victim:
            page = await consent_page(target, attacker, client)
            fields = hidden_fields(page)
            forged = await victim.request(
                "POST",
                target.url + "/oauth/consent",
                data=[*fields.items(), ("decision", "approve")],
            )
        assert_error_page(forged, 403)

    async def test_consent_decision_is_single_use(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R15: one decision per transaction; replaying the approval is refused (no second
        upstream state for the same transaction)."""
        async with target.browser(None, client) as ua:
            page = await consent_page(target, ua, client)
            data = [*hidden_fields(page).items(), ("decision", "approve")]
            first = await ua.request("POST", target.url + "/oauth/consent", data=data)
            again = await ua.request("POST", target.url + "/oauth/consent", data=data)
        assert first.status == 303
        assert_error_page(again, 400)

    async def test_deny_sends_access_denied_to_the_client(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """DESIGN §2.5: deny → 303 `access_denied` with the client's state and `iss`."""
        async with target.browser(None, client) as ua:
            page = await ua.get(target.authorize_url(client, state="deny-me"))
            resp = await ua.request(
                "POST",
                target.url + "/oauth/consent",
                data=[*hidden_fields(page).items(), ("decision", "deny")],
            )
        assert resp.status == 303
        assert goes_to_client(resp, client)
        params = query_of(resp.location or "")
        assert params == {
            "error": "access_denied",
            "error_description": "the user denied the request",
            "state": "deny-me",
            "iss": target.url,
        }

    async def test_unknown_decision_and_get_are_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """The consent endpoint takes only a POST with `approve` or `deny`."""
        async with target.browser(None, client) as ua:
            page = await consent_page(target, ua, client)
            odd = await ua.request(
                "POST",
                target.url + "/oauth/consent",
                data=[*hidden_fields(page).items(), ("decision", "yes")],
            )
            twice = await ua.request(
                "POST",
                target.url + "/oauth/consent",
                data=[
                    *hidden_fields(page).items(),
                    ("decision", "approve"),
                    ("decision", "approve"),
                ],
            )
            get = await ua.get(target.url + "/oauth/consent")
        assert_error_page(odd, 400)
        assert_error_page(twice, 400)
        assert get.status == 405

    async def test_consent_cookie_is_bound_to_its_client(self, target: Target) -> None:
        """R15: an approval is remembered per client in a signed HttpOnly SameSite=Lax cookie;
        client A's cookie presented under client B's name does not skip B's consent."""
        a = await target.register(name="Client A")
        b = await target.register(name="Client B")
        async with target.browser(None, a) as ua:
            page = await consent_page(target, ua, a)
            approved = await ua.request(
                "POST",
                target.url + "/oauth/consent",
                data=[*hidden_fields(page).items(), ("decision", "approve")],
            )
            set_cookies = approved.headers.get_list("set-cookie")
            consent_cookies = [c for c in set_cookies if c.startswith("mfagw_c_")]
            assert len(consent_cookies) == 1
            flags = {p.strip().lower() for p in consent_cookies[0].split(";")[1:]}
            assert {"httponly", "samesite=lax", "path=/"} <= flags
            name_a, _, value_a = consent_cookies[0].split(";")[0].partition("=")

            again = await ua.get(target.authorize_url(a))  # remembered: straight upstream
            assert again.status == 303
            assert (again.location or "").startswith(target.idp.issuer + "/")

            # B's cookie name, learnt the way any browser would (its own approval elsewhere).
            async with target.browser(None, b) as other:
                page_b = await consent_page(target, other, b)
                approved_b = await other.request(
                    "POST",
                    target.url + "/oauth/consent",
                    data=[*hidden_fields(page_b).items(), ("decision", "approve")],
                )
                cookie_b = next(
                    c for c in approved_b.headers.get_list("set-cookie") if c.startswith("mfagw_c_")
                )
            name_b = cookie_b.split("=", 1)[0]
            assert name_b != name_a
            ua.client.cookies.set(name_b, value_a, domain="127.0.0.1", path="/")
            forged = await ua.get(target.authorize_url(b))
        assert forged.status == 200
        assert 'name="decision" value="approve"' in forged.html


# --------------------------------------------------------------------------- callback


class TestCallback:
    async def intercepted_callback(
        self, target: Target, user: User, client: RegisteredClient
    ) -> tuple[UserAgent, str]:
        """A browser that logged in upstream, and the callback URL it was sent to (not
        followed yet)."""
        ua = target.browser(user, client)
        outcome = await ua.run(
            target.authorize_url(client), stop=stops_before(target.url + "/oauth/callback")
        )
        assert outcome.page is not None
        assert outcome.page.location is not None
        return ua, outcome.page.location

    async def test_callback_without_state_is_refused(self, target: Target) -> None:
        """R16: no `state` → an error page, nothing else happens."""
        async with http_client() as http:
            resp = await http.get(target.url + "/oauth/callback", params={"code": "x"})
        assert resp.status_code == 400
        assert_page_headers(resp)

    async def test_callback_with_unknown_state_is_refused(self, target: Target) -> None:
        """R16: a state the gateway never issued → an error page."""
        async with http_client() as http:
            resp = await http.get(
                target.url + "/oauth/callback", params={"code": "x", "state": "A" * 43}
            )
        assert resp.status_code == 400
        assert "location" not in resp.headers

    async def test_callback_state_is_single_use(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R16: the upstream state is consumed at the first callback; replaying the same
        callback URL in the same browser is refused."""
        user = await target.new_user()
        ua, url = await self.intercepted_callback(target, user, client)
        async with ua:
            first = await ua.get(url)
            replay = await ua.get(url)
        assert first.status == 303
        assert (first.location or "").startswith(target.url + "/oauth/totp?")
        assert_error_page(replay, 400)

    async def test_callback_in_another_browser_is_refused_and_kills_the_login(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R16, DESIGN §2.6: a callback URL (with a valid code and state) opened in a browser
        that did not start the transaction is refused (403), and the state is spent, so the
        original browser cannot use it afterwards either."""
        user = await target.new_user()
        ua, url = await self.intercepted_callback(target, user, client)
        async with ua, target.browser(None, client) as victim:
            stolen = await victim.get(url)
            original = await ua.get(url)
        assert_error_page(stolen, 403)
        assert_error_page(original, 400)

    async def test_callback_with_repeated_state_is_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R14, R16: a callback with two `state` parameters is refused before anything is
        looked up."""
        user = await target.new_user()
        ua, url = await self.intercepted_callback(target, user, client)
        state = query_of(url)["state"]
        async with ua:
            resp = await ua.get(f"{url}&state={state}")
        assert_error_page(resp, 400)

    async def test_upstream_error_becomes_a_generic_access_denied(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """DESIGN §2.7: an upstream error at the (verified) callback reaches the client as
        `access_denied` with its state and `iss`, with no upstream detail."""
        user = await target.new_user()
        ua, url = await self.intercepted_callback(target, user, client)
        params = query_of(url)
        params.pop("code")
        params.update(error="access_denied", error_description="<script>upstream says</script>")
        async with ua:
            resp = await ua.request(
                "GET", target.url + "/oauth/callback?" + str(httpx.QueryParams(params))
            )
        assert resp.status == 303
        assert goes_to_client(resp, client)
        answer = query_of(resp.location or "")
        assert answer["error"] == "access_denied"
        assert answer["iss"] == target.url
        assert "code" not in answer
        assert "upstream says" not in (resp.location or "")

    async def test_callback_from_another_issuer_is_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """RFC 9207 (mix-up): a callback whose `iss` is not the upstream issuer never reaches
        the step-up; the client gets `access_denied` and no code."""
        user = await target.new_user()
        ua, url = await self.intercepted_callback(target, user, client)
        params = query_of(url)
        params["iss"] = "https://evil.example"
        async with ua:
            resp = await ua.get(target.url + "/oauth/callback?" + str(httpx.QueryParams(params)))
        assert resp.status == 303
        answer = query_of(resp.location or "")
        assert answer["error"] == "access_denied"
        assert "code" not in answer


# --------------------------------------------------------------------------- TOTP


class TestTotpForm:
    async def test_totp_without_or_with_a_wrong_csrf_token_is_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R13, invariant 5: the TOTP POST needs the TOTP page's own CSRF token, even with the
        right code (missing → 400, forged or the consent form's → 403, nothing consumed); the
        genuine form then works."""
        user = await target.new_user()
        async with target.browser(user, client) as ua:
            at = await target.to_totp(ua, client)
            missing = await ua.request(
                "POST", target.url + "/oauth/totp", data=[("tx", at.tx), ("code", user.code())]
            )
            wrong = await target.submit_totp(at, user.code(), csrf="B" * 43)
            consent = next(p for p in ua.pages if p.url.startswith(target.url + "/oauth/authorize"))
            consent_token = await target.submit_totp(
                at, user.code(), csrf=hidden_fields(consent)["csrf"]
            )
            genuine = await target.submit_totp(at, user.code())
        assert_error_page(missing, 400)
        assert_error_page(wrong, 403)
        assert_error_page(consent_token, 403)
        assert genuine.status == 303
        assert goes_to_client(genuine, client)

    async def test_totp_form_posted_from_another_browser_is_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """DESIGN §2.6: the victim's TOTP form values (tx, csrf) and even the right code, posted
        from another browser, are refused (403); the victim's own browser still succeeds."""
        user = await target.new_user()
        async with target.browser(user, client) as ua, target.browser(None, client) as thief:
            at = await target.to_totp(ua, client)
            stolen = await thief.request(
                "POST",
                target.url + "/oauth/totp",
                data=[("csrf", at.csrf), ("tx", at.tx), ("code", user.code())],
            )
            page = await thief.get(target.url + "/oauth/totp?tx=" + at.tx)
            genuine = await target.submit_totp(at, user.code())
        assert_error_page(stolen, 403)
        assert_error_page(page, 403)
        assert genuine.status == 303

    async def test_totp_page_and_its_refusal_are_unframeable(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R13, invariant 5: the TOTP page and its re-render after a wrong code carry the
        interactive-page headers; the form is the DESIGN §2.8 contract."""
        user = await target.new_user()
        async with target.browser(user, client) as ua:
            at = await target.to_totp(ua, client)
            refused = await target.submit_totp(at, wrong_code(user))
        assert_page_headers(at.page)
        assert_page_headers(refused)
        form = at.page.form()
        assert form is not None
        code_field = form.field("code")
        assert code_field is not None
        assert code_field.attrs["autocomplete"] == "one-time-code"
        assert set(form.hidden) == {"csrf", "tx"}
        csp = at.page.headers["content-security-policy"]
        assert "form-action 'self' http://127.0.0.1:33418;" in csp

    async def test_wrong_code_gets_the_generic_page_and_no_code(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """Invariant 1, DESIGN §2.8: a wrong code re-renders the page (400) with the one generic
        message and never redirects to the client."""
        user = await target.new_user()
        async with target.browser(user, client) as ua:
            at = await target.to_totp(ua, client)
            refused = await target.submit_totp(at, wrong_code(user))
            pages = list(ua.pages)
        assert refused.status == 400
        assert GENERIC in refused.html
        assert refused.has_field("code")
        assert not any(goes_to_client(p, client) for p in pages)

    async def test_malformed_codes_are_refused_generically(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """Malformed input gets the same generic refusal as a wrong code (no oracle)."""
        user = await target.new_user()
        async with target.browser(user, client) as ua:
            at = await target.to_totp(ua, client)
            refused = [
                await target.submit_totp(at, code)
                for code in ("", "12345", "123456789", "abcdef", "\uff11" * 6, "0" * 70)
            ]
        assert [p.status for p in refused] == [400] * 6
        assert all(GENERIC in p.html for p in refused)

    async def test_no_code_reaches_the_client_before_the_totp_step(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """Invariant 1: through consent, the upstream login and the callback, no response
        points at the client's redirect URI; the only one is the 303 answering the TOTP POST,
        and it carries code, state and iss only."""
        user = await target.new_user()
        async with target.browser(user, client) as ua:
            at = await target.to_totp(ua, client, state="inv-1")
            before = list(ua.pages)
            done = await target.submit_totp(at, user.code())
        assert not any(goes_to_client(p, client) for p in before)
        assert not any(
            "code=" in (p.location or "")
            and p.url.startswith(target.url)
            and not p.url.startswith(target.url + "/oauth/callback")
            for p in before
        )
        assert (done.method, done.status) == ("POST", 303)
        params = query_of(done.location or "")
        assert set(params) == {"code", "state", "iss"}
        assert params["state"] == "inv-1"
        assert params["iss"] == target.url
        assert len(params["code"]) >= 43  # ≥ 256 bits of base64url (R10: ≥ 128)

    async def test_transaction_yields_one_code_only(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R10, invariant 4: after the TOTP step the transaction is spent: posting its form
        again with a fresh (newer, valid) code — even with the transaction cookie put back,
        as an attacker replaying the browser's state would — gives an error page, never a
        second code."""
        user = await target.new_user()
        async with target.browser(user, client) as ua:
            at = await target.to_totp(ua, client)
            tx_cookie = ua.client.cookies.get("mfagw_tx")
            assert tx_cookie is not None
            first = await target.submit_totp(at, user.code())
            assert "mfagw_tx" not in ua.client.cookies  # the 303 cleared it
            ua.client.cookies.set("mfagw_tx", tx_cookie, domain="127.0.0.1", path="/")
            second = await target.submit_totp(at, user.code(1))
            page = await ua.get(target.url + "/oauth/totp?tx=" + at.tx)
        assert first.status == 303
        assert second.status == 400
        assert second.location is None
        assert page.status == 400


# --------------------------------------------------------------------------- replay, brute force


def wrong_code(user: User) -> str:
    """A 6-digit code none of the acceptable time steps has."""
    valid = {user.code(s) for s in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in valid)


class TestReplay:
    async def test_code_accepted_once_is_refused_in_a_new_transaction(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R34, invariant 5: a TOTP code (time step) accepted once is refused afterwards, even
        in a fresh transaction and browser; the refusal is counted as a replay."""
        user = await target.new_user()
        code = user.code()
        replays = await target.metric("mfagw_stepups_total", outcome="replayed")
        async with target.browser(user, client) as first_ua:
            first = await target.submit_totp(await target.to_totp(first_ua, client), code)
        async with target.browser(user, client) as second_ua:
            second = await target.submit_totp(await target.to_totp(second_ua, client), code)
        assert first.status == 303
        assert second.status == 400
        assert GENERIC in second.html
        assert await target.metric("mfagw_stepups_total", outcome="replayed") == replays + 1

    async def test_same_code_in_two_concurrent_transactions_succeeds_once(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R34, invariant 5: two browsers of the same user submit the same code at once:
        exactly one gets an authorization code."""
        user = await target.new_user()
        async with target.browser(user, client) as a, target.browser(user, client) as b:
            at_a, at_b = await asyncio.gather(target.to_totp(a, client), target.to_totp(b, client))
            code = user.code()
            pages = await asyncio.gather(
                target.submit_totp(at_a, code), target.submit_totp(at_b, code)
            )
        assert sorted(p.status for p in pages) == [303, 400]

    async def test_older_step_after_a_newer_one_is_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R34: accepted steps strictly increase per user; once the next step's code was used,
        the current step's code (still inside the window) is refused as a replay."""
        user = await target.new_user()
        newer, older = user.code(1), user.code(0)
        replays = await target.metric("mfagw_stepups_total", outcome="replayed")
        async with target.browser(user, client) as first_ua:
            first = await target.submit_totp(await target.to_totp(first_ua, client), newer)
        async with target.browser(user, client) as second_ua:
            second = await target.submit_totp(await target.to_totp(second_ua, client), older)
        assert first.status == 303
        assert second.status == 400
        assert await target.metric("mfagw_stepups_total", outcome="replayed") == replays + 1


class TestBruteForce:
    async def test_user_is_locked_after_the_limit_even_with_the_right_code(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R34, invariant 5: after `max_failures_per_user` wrong codes the account is locked:
        the right code is refused with the same generic page, in this transaction and in a new
        one; the lockout is counted once."""
        user = await target.new_user()
        locks = await target.metric("mfagw_lockouts_total", scope="user")
        async with target.browser(user, client) as ua:
            at = await target.to_totp(ua, client)
            for _ in range(5):
                assert (await target.submit_totp(at, wrong_code(user))).status == 400
            right = await target.submit_totp(at, user.code())
        async with target.browser(user, client) as fresh:
            later = await target.submit_totp(await target.to_totp(fresh, client), user.code(1))
        assert right.status == 400
        assert GENERIC in right.html
        assert later.status == 400
        assert await target.metric("mfagw_lockouts_total", scope="user") == locks + 1

    async def test_concurrent_guesses_cannot_exceed_the_budget(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R34: 20 wrong guesses sent at once are all refused and lock the user; the budget is
        taken before verifying, so a parallel burst does not buy extra attempts."""
        user = await target.new_user()
        async with target.browser(user, client) as ua:
            at = await target.to_totp(ua, client)
            bad = wrong_code(user)
            pages = await asyncio.gather(*(target.submit_totp(at, bad) for _ in range(20)))
            right = await target.submit_totp(at, user.code())
        assert {p.status for p in pages} == {400}
        assert right.status == 400


async def test_ip_is_locked_across_users_and_forwarded_headers_do_not_help(
    tmp_path: Path,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
) -> None:
    """R34, R33: failures are also counted per client IP: after `max_failures_per_ip` wrong
    codes (spread over two users) a third user's right code is refused from that IP; an
    `X-Forwarded-For` the gateway was not told to trust changes nothing."""
    async with serve_target(
        tmp_path / "ip-lock",
        idp=legacy_idp,
        port=gateway_ports[1],
        resources=resources(mcp_server),
        policy={"stepup": {"max_failures_per_user": 10, "max_failures_per_ip": 3}},
    ) as strict:
        client = await strict.register()
        one, two, three = [await strict.new_user() for _ in range(3)]
        for user, tries in ((one, 2), (two, 1)):
            async with strict.browser(user, client) as ua:
                at = await strict.to_totp(ua, client)
                for _ in range(tries):
                    assert (await strict.submit_totp(at, wrong_code(user))).status == 400
        async with strict.browser(three, client) as ua:
            ua.client.headers["X-Forwarded-For"] = "203.0.113.7"
            ua.client.headers["X-Real-IP"] = "203.0.113.7"
            at = await strict.to_totp(ua, client)
            refused = await strict.submit_totp(at, three.code())
        assert refused.status == 400
        assert GENERIC in refused.html
        assert await strict.metric("mfagw_lockouts_total", scope="ip") == 1
        assert await strict.metric("mfagw_lockouts_total", scope="user") == 0


async def test_first_login_enrolment_cannot_replace_an_existing_seed(
    tmp_path: Path,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
) -> None:
    """R34 (changing MFA needs re-authentication): with enrolment at first login, a new user
    is shown a seed on an unframeable page, but an enrolled user who logs in upstream (the
    password alone) gets the TOTP form, never a new seed."""
    async with serve_target(
        tmp_path / "enrol",
        idp=legacy_idp,
        port=gateway_ports[1],
        resources=resources(mcp_server),
        policy={"stepup": {"enrollment": "first_login"}},
    ) as enrolling:
        client = await enrolling.register()
        enrolled = await enrolling.new_user()
        fresh_name = "wendy"
        fresh = User(fresh_name, legacy_idp.accounts[fresh_name], "", enrolling.clock)
        async with enrolling.browser(enrolled, client) as ua:
            at = await enrolling.to_totp(ua, client)
        async with enrolling.browser(fresh, client) as ua:
            at_enrol = await enrolling.to_totp(ua, client)
    assert "otpauth://" not in at.page.html
    assert "Set up two-step verification" not in at.page.html
    assert "Set up two-step verification" in at_enrol.page.html
    assert_page_headers(at_enrol.page)
    assert at_enrol.page.headers["cache-control"] == "no-store"
