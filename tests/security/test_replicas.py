"""Step-up limits hold across replicas: two gateways sharing one real Redis (the same key
prefix, as replicas of one deployment do) count failures and burn TOTP steps together, so an
attacker gains nothing by spreading guesses or replays over replicas (DESIGN §2.8, R34).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.peers import LegacyIdp, McpServer
from tests.security.harness import Target, User, serve_target

pytestmark = pytest.mark.redis


@asynccontextmanager
async def replicas(
    tmp_path: Path,
    idp: LegacyIdp,
    ports: tuple[int, int],
    mcp: McpServer,
    redis_url: str,
    **policy: Any,
) -> AsyncIterator[tuple[Target, Target]]:
    """Two gateways on one Redis key prefix (one on each registered callback port)."""
    prefix = f"mfagw-replicas-{secrets.token_hex(4)}:"
    async with AsyncExitStack() as stack:
        pair = [
            await stack.enter_async_context(
                serve_target(
                    tmp_path / f"replica-{i}",
                    idp=idp,
                    port=port,
                    resources=[{"path": "/mcp", "upstream": mcp.url}],
                    store_url=redis_url,
                    store={"key_prefix": prefix},
                    policy=policy,
                )
            )
            for i, port in enumerate(ports)
        ]
        yield pair[0], pair[1]


def wrong_code(user: User) -> str:
    """A 6-digit code none of the acceptable time steps has."""
    valid = {user.code(s) for s in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222") if c not in valid)


async def test_failures_on_two_replicas_add_up_to_one_lockout(
    tmp_path: Path,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    redis_url: str,
) -> None:
    """R34, invariant 5: wrong codes spread over two replicas count against one budget; once
    it is spent the right code is refused on both."""
    async with replicas(
        tmp_path,
        legacy_idp,
        gateway_ports,
        mcp_server,
        redis_url,
        stepup={"max_failures_per_user": 4, "max_failures_per_ip": 100},
    ) as (a, b):
        user = await a.new_user()
        b_client, a_client = await b.register(), await a.register()
        for target, client, tries in ((a, a_client, 2), (b, b_client, 2)):
            async with target.browser(user, client) as ua:
                at = await target.to_totp(ua, client)
                for _ in range(tries):
                    assert (await target.submit_totp(at, wrong_code(user))).status == 400
        outcomes = []
        for target, client in ((a, a_client), (b, b_client)):
            async with target.browser(user, client) as ua:
                at = await target.to_totp(ua, client)
                outcomes.append((await target.submit_totp(at, user.code())).status)
    assert outcomes == [400, 400]


async def test_a_code_used_on_one_replica_is_refused_on_the_other(
    tmp_path: Path,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    redis_url: str,
) -> None:
    """R34: the burned TOTP step is shared: the code accepted by replica A is a replay at
    replica B."""
    async with replicas(tmp_path, legacy_idp, gateway_ports, mcp_server, redis_url) as (a, b):
        user = await a.new_user()
        a_client, b_client = await a.register(), await b.register()
        code = user.code()
        async with a.browser(user, a_client) as ua:
            first = await a.submit_totp(await a.to_totp(ua, a_client), code)
        async with b.browser(user, b_client) as ua:
            second = await b.submit_totp(await b.to_totp(ua, b_client), code)
        replayed = await b.metric("mfagw_stepups_total", outcome="replayed")
    assert first.status == 303
    assert second.status == 400
    assert replayed == 1
