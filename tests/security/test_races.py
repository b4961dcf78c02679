"""Races against real Redis: one-time things stay one-time under 50 concurrent HTTP requests.

The gateway runs on the real `redis-server` (the shared store of every replica); the attacker
fires 50 requests at once at the token endpoint with one authorization code, with one refresh
token, and at the TOTP form with one TOTP code spread over ten browsers' transactions of the
same user. Each race has exactly one winner (invariants 4 and 5, STYLE §5.2 "check-then-set").
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio

from tests.fixtures.peers import LegacyIdp, McpServer
from tests.security.harness import RegisteredClient, Target, serve_target

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.redis]

RACERS = 50


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(
    tmp_path_factory: pytest.TempPathFactory,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    redis_url: str,
) -> AsyncIterator[Target]:
    """The module's gateway on the real Redis (lockout out of the way)."""
    async with serve_target(
        tmp_path_factory.mktemp("races"),
        idp=legacy_idp,
        port=gateway_ports[0],
        resources=[{"path": "/mcp", "upstream": mcp_server.url}],
        store_url=redis_url,
        # Refusals in the TOTP race must come from the replay guard, not the lockout.
        policy={"stepup": {"max_failures_per_user": 1000, "max_failures_per_ip": 1000}},
    ) as t:
        yield t


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(target: Target) -> RegisteredClient:
    """A public client registered for the module."""
    return await target.register(name="Race client")


async def test_one_code_redeemed_fifty_times_at_once_yields_one_token(
    target: Target, client: RegisteredClient
) -> None:
    """R17, invariant 4: 50 concurrent redemptions of one code: exactly one 200, 49
    `invalid_grant`; the replays were valid, so the token the winner got is revoked."""
    user = await target.new_user()
    grant = await target.grant(user, client)
    form = target.redeem_form(grant)
    responses = await asyncio.gather(*(target.token(form) for _ in range(RACERS)))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 1, 400: RACERS - 1}
    assert {r.json()["error"] for r in responses if r.status_code == 400} == {"invalid_grant"}
    [winner] = [r.json() for r in responses if r.status_code == 200]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    status = 200
    while loop.time() < deadline and status != 401:
        status = (await target.mcp(token=winner["access_token"])).status_code
        await asyncio.sleep(0.05)
    assert status == 401


async def test_one_refresh_token_used_fifty_times_at_once_rotates_once(
    target: Target, client: RegisteredClient
) -> None:
    """R20, invariant 4: 50 concurrent refreshes with one refresh token: exactly one new pair;
    the other 49 are reuse of a rotated-out token, which revokes the family, so the winner's
    new refresh token is dead too."""
    user = await target.new_user()
    tokens = await target.tokens(user, client)
    assert tokens.refresh_token is not None
    responses = await asyncio.gather(
        *(target.refresh(tokens.refresh_token, client) for _ in range(RACERS))
    )
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 1, 400: RACERS - 1}
    assert {r.json()["error"] for r in responses if r.status_code == 400} == {"invalid_grant"}
    [winner] = [r.json() for r in responses if r.status_code == 200]
    after = await target.refresh(winner["refresh_token"], client)
    assert after.status_code == 400
    assert after.json()["error"] == "invalid_grant"


async def test_one_totp_code_posted_fifty_times_at_once_succeeds_once(
    target: Target, client: RegisteredClient
) -> None:
    """R34, invariant 5: one user has ten transactions waiting at the TOTP form (ten
    browsers); the same code posted 50 times at once across them yields exactly one
    authorization code, every other answer is a refusal page."""
    user = await target.new_user()
    browsers = [target.browser(user, client) for _ in range(10)]
    try:
        at = await asyncio.gather(*(target.to_totp(ua, client) for ua in browsers))
        code = user.code()
        pages = await asyncio.gather(
            *(target.submit_totp(at[i % len(at)], code) for i in range(RACERS))
        )
    finally:
        for ua in browsers:
            await ua.aclose()
    statuses = Counter(p.status for p in pages)
    assert statuses == {303: 1, 400: RACERS - 1}
    [winner] = [p for p in pages if p.status == 303]
    assert (winner.location or "").startswith(client.redirect_uri + "?code=")


async def redis_dump(url: str, prefix: str) -> str:
    """Every key under `prefix` and every value stored there, as one text."""
    client: redis.asyncio.Redis = redis.asyncio.from_url(url, decode_responses=False)
    parts: list[str] = []
    try:
        async for raw_key in client.scan_iter(match=prefix + "*", count=1000):
            key = bytes(raw_key).decode("latin-1")
            raw_kind = await client.type(raw_key)
            kind = raw_kind.decode() if isinstance(raw_kind, bytes) else raw_kind
            parts.append(key)
            if kind == "string":
                value: object = await client.get(raw_key)
            elif kind == "hash":
                value = await client.hgetall(raw_key)
            elif kind == "set":
                value = await client.smembers(raw_key)
            elif kind == "zset":
                value = await client.zrange(raw_key, 0, -1, withscores=True)
            elif kind == "list":
                value = await client.lrange(raw_key, 0, -1)
            else:
                value = kind
            parts.append(repr(value))
    finally:
        await client.aclose()
    return "\n".join(parts)


async def test_store_holds_no_usable_secret(target: Target, redis_url: str) -> None:
    """Invariant 10, R34 (keys in a secure area): whoever reads every key the gateway keeps in
    Redis during and after a login finds no TOTP seed or recovery code, authorization code,
    PKCE verifier, access or refresh token, client secret or password in the clear."""
    user = await target.new_user()
    confidential = await target.register(auth_method="client_secret_basic", name="At rest")
    assert confidential.client_secret is not None
    prefix = target.gw.settings.store.key_prefix
    async with target.browser(user, confidential) as ua:
        at = await target.to_totp(ua, confidential)
        during = await redis_dump(redis_url, prefix)
        grant = target.grant_from(at, await target.submit_totp(at, user.code()))
    with_code = await redis_dump(redis_url, prefix)
    form = target.redeem_form(grant)
    del form["client_id"]
    resp = await target.token(form, auth=(confidential.client_id, confidential.client_secret))
    assert resp.status_code == 200, resp.text
    tokens = resp.json()
    after = await redis_dump(redis_url, prefix)
    secrets = [
        user.secret,
        user.secret.lower(),
        user.password,
        confidential.client_secret,
        grant.code,
        grant.pkce.verifier,
        tokens["access_token"],
        tokens["refresh_token"].split(".", 1)[1],
        *user.recovery_codes,
    ]
    for dump in (during, with_code, after):
        assert user.name in dump or "totp" in dump  # the dump did read the gateway's keys
        assert [s for s in secrets if s and s in dump] == []
