"""Upstream tokens of a grant: moved at redemption, refreshed behind the scenes (DESIGN §2.11)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.core.errors import InvalidGrant, InvalidToken, UpstreamUnavailable
from gateway.flows.upstream_tokens import (
    blob_key,
    move_upstream_tokens,
    refresh_upstream,
    upstream_access_token,
)
from gateway.web.stepup_handlers import UPSTREAM
from tests.stepup.conftest import Gateway


async def _grant(gw: Gateway, gid: str = "grant-1") -> str:
    """A grant whose upstream tokens came from a real callback; returns the access token."""
    await gw.enroll()
    txid = await gw.login()
    assert await move_upstream_tokens(gw.store, gw.sealer, txid, gid, ttl=86400, now=gw.clock.now())
    assert await gw.store.get_blob(blob_key(txid)) is None
    return next(iter(gw.idp.access_tokens))


async def test_fresh_token_is_returned_without_refresh(gateway: Gateway) -> None:
    """A still-valid upstream access token is returned as is."""
    access = await _grant(gateway)
    got = await upstream_access_token(
        gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-1", gateway.clock.now()
    )
    assert got == access
    assert gateway.idp.hits["token"] == 1


async def test_expired_token_is_refreshed_and_stored_sealed(gateway: Gateway) -> None:
    """An expired upstream access token is refreshed; the new set is stored sealed for the
    same grant (and the next call uses it without another refresh)."""
    access = await _grant(gateway)
    gateway.clock.advance(3600)
    got = await upstream_access_token(
        gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-1", gateway.clock.now()
    )
    assert got != access
    assert got in gateway.idp.access_tokens
    sealed = await gateway.store.get_blob(blob_key("grant-1"))
    assert sealed is not None
    assert got not in sealed
    again = await upstream_access_token(
        gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-1", gateway.clock.now()
    )
    assert again == got
    assert gateway.idp.hits["token"] == 2


async def test_concurrent_callers_refresh_once(gateway: Gateway) -> None:
    """Ten concurrent requests with an expired token cause exactly one upstream refresh (a
    rotating provider would revoke the grant on a second use of the refresh token)."""
    await _grant(gateway)
    gateway.clock.advance(3600)
    got = await asyncio.gather(
        *(
            upstream_access_token(
                gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-1", gateway.clock.now()
            )
            for _ in range(10)
        )
    )
    assert len(set(got)) == 1
    assert gateway.idp.hits["token"] == 2


async def test_refused_refresh_is_invalid_token_and_drops_the_tokens(gateway: Gateway) -> None:
    """The provider refusing the refresh → `InvalidToken`; the dead tokens are deleted."""
    await _grant(gateway)
    gateway.clock.advance(3600)
    gateway.idp.refresh = "error"
    with pytest.raises(InvalidToken):
        await upstream_access_token(
            gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-1", gateway.clock.now()
        )
    assert await gateway.store.get_blob(blob_key("grant-1")) is None


async def test_unknown_or_copied_blob_is_invalid_token(gateway: Gateway) -> None:
    """Invariant 10: no tokens → `InvalidToken`; a sealed blob copied onto another grant's key
    does not open there."""
    await _grant(gateway)
    with pytest.raises(InvalidToken):
        await upstream_access_token(
            gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-2", gateway.clock.now()
        )
    sealed = await gateway.store.get_blob(blob_key("grant-1"))
    assert sealed is not None
    await gateway.store.put_blob(blob_key("grant-2"), sealed, 60)
    with pytest.raises(InvalidToken):
        await upstream_access_token(
            gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-2", gateway.clock.now()
        )


async def test_refresh_upstream_rotates_or_fails_with_invalid_grant(gateway: Gateway) -> None:
    """The gateway refresh grant refreshes upstream too; a refusal is `invalid_grant`."""
    access = await _grant(gateway)
    await refresh_upstream(
        gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-1", gateway.clock.now()
    )
    got = await upstream_access_token(
        gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-1", gateway.clock.now()
    )
    assert got != access
    gateway.idp.refresh = "error"
    with pytest.raises(InvalidGrant):
        await refresh_upstream(
            gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-1", gateway.clock.now()
        )
    with pytest.raises(InvalidGrant):
        await refresh_upstream(
            gateway.store,
            gateway.sealer,
            gateway.app[UPSTREAM],
            "no-such-grant",
            gateway.clock.now(),
        )


async def test_upstream_down_during_refresh_fails_closed(gateway: Gateway) -> None:
    """Invariant 8: a stalled provider → `UpstreamUnavailable` (503), tokens kept for later."""
    await _grant(gateway)
    gateway.idp.refresh = "stall"
    with pytest.raises(UpstreamUnavailable):
        await refresh_upstream(
            gateway.store, gateway.sealer, gateway.app[UPSTREAM], "grant-1", gateway.clock.now()
        )
    assert await gateway.store.get_blob(blob_key("grant-1")) is not None
