"""Two gateway processes, one deployment: shared Redis, one public URL (DESIGN §1, §7.5).

A real deployment runs several replicas behind a load balancer: they share the config (signing
keys, cookie secret, encryption key, store prefix), the Redis, and one `public_url`, which is the
issuer, the `resource` and the callback URI registered at the provider. Here both replicas are
`python -m gateway run` processes with the same config but their own listen port; the public
URL is replica A's address, and the tests play the load balancer by sending some requests
directly to replica B's port (the scripted browser keeps one cookie jar, as a browser does for
one host name). Whatever a replica writes, the other must honour: the transaction, the burned
TOTP step, the failure counters and lockout, and the revocations, which reach the other
replica's proxy through the store's pub/sub within a short bound.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.mcp_oauth import DEFAULT_REDIRECT_URI
from tests.e2e.useragent import Page, at_form_with
from tests.faults.flow import (
    ALICE_SECRET,
    HTTP_TIMEOUT,
    RegisteredClient,
    RoutedUserAgent,
    TotpDevice,
    answers,
    browser,
    legacy_upstream,
    mcp_post,
    register_client,
    rpc,
    tokens_for,
)
from tests.faults.procs import GatewayLauncher, GatewayProcess, clone_config, config_for, enroll
from tests.fixtures.peers import LegacyIdp, McpServer

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

MAX_FAILURES = 3
# How soon a revocation made through one replica must be enforced by the other.
PROPAGATION_BOUND = 2.0
GENERIC_FAILURE = "That code was not accepted."


@dataclass
class Deployment:
    """Replica A (whose address is the public URL) and replica B."""

    a: GatewayProcess
    b: GatewayProcess
    idp: LegacyIdp
    device: TotpDevice

    @property
    def public_url(self) -> str:
        return self.a.url

    def browser(self, *backends: GatewayProcess) -> RoutedUserAgent:
        """A browser behind the balancer, sent round robin to `backends` (default: A, B)."""
        chosen = backends or (self.a, self.b)
        return browser(
            RoutedUserAgent(
                public_url=self.public_url,
                backends=[g.url for g in chosen],
                redirect_uri=DEFAULT_REDIRECT_URI,
                answers=answers(self.idp, self.device),
            )
        )


@pytest.fixture
async def deployment(
    tmp_path: Path,
    gateway_processes: GatewayLauncher,
    legacy_idp: LegacyIdp,
    mcp_server: McpServer,
    gateway_ports: tuple[int, int],
    redis_url: str,
) -> Deployment:
    """Replicas A and B: same config and Redis prefix, one public URL (A's), own ports."""
    port_a, port_b = gateway_ports
    config_a = config_for(
        tmp_path / "replica-a",
        port=port_a,
        store_url=redis_url,
        key_prefix=f"replicas-{secrets.token_hex(4)}:",
        upstream=legacy_upstream(legacy_idp),
        resources=[{"path": "/mcp", "upstream": mcp_server.url}],
        policy={"stepup": {"max_failures_per_user": MAX_FAILURES}},
    )
    config_b = clone_config(config_a, tmp_path / "replica-b", listen_port=port_b)
    a, b = await asyncio.gather(
        asyncio.to_thread(gateway_processes.start, config_a, name="replica-a"),
        asyncio.to_thread(gateway_processes.start, config_b, name="replica-b"),
    )
    assert a.settings.server.public_url == b.settings.server.public_url == a.url
    await enroll(config_a, "alice", ALICE_SECRET)
    return Deployment(a=a, b=b, idp=legacy_idp, device=TotpDevice(ALICE_SECRET))


async def _at_totp_page(
    d: Deployment, client: RegisteredClient, *backends: GatewayProcess
) -> tuple[RoutedUserAgent, Page]:
    """A user who logged in upstream and now sees the TOTP form (served via `backends`)."""
    ua = d.browser(*backends)
    auth = client.authorization(d.public_url)
    outcome = await ua.run(auth.url, stop=at_form_with("code"))
    assert outcome.page is not None
    assert outcome.page.status == 200
    return ua, outcome.page


async def test_an_authorization_started_on_one_replica_finishes_on_the_other(
    deployment: Deployment,
) -> None:
    """The balancer alternates replicas on every request: authorize on A, consent on B, the
    provider's callback on A, the TOTP page on B, the TOTP answer on A; the client then redeems
    the code on B, and the token works on both replicas' proxies (issuer = the one public URL,
    DESIGN §1 "otherwise stateless")."""
    d = deployment
    client = await register_client(d.b.url)
    auth = client.authorization(d.public_url)
    ua = d.browser()
    async with ua:
        response = await ua.authorize(auth.url)
        routes = list(ua.routes)
    assert [(m, p) for m, p, _ in routes] == [
        ("GET", "/oauth/authorize"),
        ("POST", "/oauth/consent"),
        ("GET", "/oauth/callback"),
        ("GET", "/oauth/totp"),
        ("POST", "/oauth/totp"),
    ]
    assert [backend for _, _, backend in routes] == [d.a.url, d.b.url] * 2 + [d.a.url]
    assert response.iss == d.public_url
    tokens = await tokens_for(d.b.url, client, auth, response)
    for replica in (d.a, d.b):
        resp = await mcp_post(replica.url + "/mcp", tokens["access_token"], rpc("tools/list"))
        assert resp.status_code == 200


async def test_a_totp_step_burned_on_one_replica_is_refused_on_the_other(
    deployment: Deployment,
) -> None:
    """Alice has two sign-ins open, one served by A and one by B. The code accepted on A is
    refused on B (same generic failure page, logged there as a replay); the next code is then
    accepted on B, so it was the replay that was refused (invariant 5, R34)."""
    d = deployment
    client = await register_client(d.a.url)
    ua_a, page_a = await _at_totp_page(d, client, d.a)
    ua_b, page_b = await _at_totp_page(d, client, d.b)
    code = d.device.code()

    accepted = await ua_a.submit_via(d.a.url, page_a, code)
    assert accepted.status == 303
    assert accepted.location is not None
    assert accepted.location.startswith(DEFAULT_REDIRECT_URI + "?code=")

    replayed = await ua_b.submit_via(d.b.url, page_b, code)
    assert replayed.status == 400
    assert replayed.location is None
    assert GENERIC_FAILURE in replayed.html
    await d.b.wait_event("totp_replay_rejected", reason="replayed", sub="alice")
    assert d.a.events("totp_replay_rejected") == []

    fresh = await ua_b.submit_via(d.b.url, replayed, d.device.code())
    assert fresh.status == 303
    assert fresh.location is not None
    assert fresh.location.startswith(DEFAULT_REDIRECT_URI + "?code=")
    await ua_a.aclose()
    await ua_b.aclose()


def _wrong(code: str) -> str:
    return f"{(int(code) + 500_000) % 1_000_000:06d}"


async def test_failures_on_both_replicas_add_up_to_one_lockout(deployment: Deployment) -> None:
    """Wrong codes alternately on A, B and A reach the limit of 3 together: the account locks
    (logged on the replica that saw the third failure), and then even the right code is
    refused on B (invariant 5 "locked out across replicas", R34)."""
    d = deployment
    client = await register_client(d.a.url)
    ua, page = await _at_totp_page(d, client)
    for replica in (d.a, d.b, d.a):
        page = await ua.submit_via(replica.url, page, _wrong(d.device.peek()))
        assert page.status == 400
        assert GENERIC_FAILURE in page.html
    await d.a.wait_event("account_locked", scope="user", sub="alice")
    assert d.b.events("account_locked") == []

    refused = await ua.submit_via(d.b.url, page, d.device.peek())
    await ua.aclose()
    assert refused.status == 400
    assert refused.location is None
    assert GENERIC_FAILURE in refused.html
    await d.b.wait_event("totp_failed", reason="user_locked", sub="alice")


async def _refused_within(url: str, token: str, bound: float) -> tuple[httpx.Response, float]:
    """Poll an MCP call with `token` until it is refused; the refusal and how long it took."""
    start = time.monotonic()
    while True:
        resp = await mcp_post(url, token, rpc("tools/list"))
        elapsed = time.monotonic() - start
        if resp.status_code != 200 or elapsed > bound:
            return resp, elapsed
        await asyncio.sleep(0.02)


async def test_revocations_on_one_replica_reach_the_others_proxy(
    deployment: Deployment,
) -> None:
    """An access token revoked through A is refused by B's proxy within 2 s (pub/sub, no round
    trip per request); a refresh token revoked through B takes its grant's access tokens and
    itself down on A too (R22, DESIGN §2.12)."""
    d = deployment
    client = await register_client(d.a.url)
    auth = client.authorization(d.public_url)
    async with d.browser() as ua:
        response = await ua.authorize(auth.url)
    tokens = await tokens_for(d.a.url, client, auth, response)
    first = tokens["access_token"]
    assert (await mcp_post(d.b.url + "/mcp", first, rpc("tools/list"))).status_code == 200

    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        revoked = await http.post(
            d.a.url + "/oauth/revoke", data={"token": first, "client_id": client.client_id}
        )
        assert revoked.status_code == 200
        refusal, elapsed = await _refused_within(d.b.url + "/mcp", first, PROPAGATION_BOUND)
        assert refusal.status_code == 401, f"still accepted after {elapsed:.2f}s"
        assert elapsed <= PROPAGATION_BOUND
        challenge = refusal.headers["www-authenticate"]
        assert challenge.startswith('Bearer error="invalid_token"')

        refresh = {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": client.client_id,
            "resource": auth.resource,
        }
        rotated = await http.post(d.b.url + "/oauth/token", data=refresh)
        assert rotated.status_code == 200
        second = rotated.json()
        assert (
            await mcp_post(d.a.url + "/mcp", second["access_token"], rpc("ping"))
        ).status_code == 200
        gone = await http.post(
            d.b.url + "/oauth/revoke",
            data={"token": second["refresh_token"], "client_id": client.client_id},
        )
        assert gone.status_code == 200
        refusal, elapsed = await _refused_within(
            d.a.url + "/mcp", second["access_token"], PROPAGATION_BOUND
        )
        assert refusal.status_code == 401, f"still accepted after {elapsed:.2f}s"
        again = await http.post(
            d.a.url + "/oauth/token", data={**refresh, "refresh_token": second["refresh_token"]}
        )
        assert again.status_code == 400
        assert again.json()["error"] == "invalid_grant"
