"""The upstream provider's tokens for one grant: sealed at rest, refreshed behind the scenes.

The callback stores the token set under blob key `upstream:<txid>`; code redemption moves it to
`upstream:<gid>` (`move_upstream_tokens`). Each blob is sealed with the binding equal to its own
key, so a blob copied onto another grant's key does not open (DESIGN §7.10). The proxy asks
`upstream_access_token` for a usable access token (refreshed when expired); the gateway's
refresh grant calls `refresh_upstream` so an upstream that no longer honours the grant fails the
gateway refresh too (DESIGN §2.11). Concurrent refreshes of one grant are serialised with a
short store-side lock (an atomic counter), because providers that rotate refresh tokens revoke
the grant when one is used twice.

Failure model: a grant whose upstream tokens are gone, do not open, or are refused by the
provider raises `InvalidToken` (proxy) / `InvalidGrant` (refresh grant). A provider that is
down or times out raises `UpstreamUnavailable` (503, fail closed) instead, so a transient
outage does not make clients throw their refresh tokens away.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from gateway.core.errors import InvalidGrant, InvalidToken, UpstreamRejected, UpstreamUnavailable
from gateway.crypto import Sealer, SealError
from gateway.ports import Store, UpstreamIdP, UpstreamTokens

#: An access token this close to its expiry is refreshed first (seconds).
EXPIRY_SKEW = 30.0
#: Lifetime of the refresh lock; longer than any upstream call (its own time-out applies).
REFRESH_LOCK_TTL = 30.0
#: How long a caller waits for another process's refresh of the same grant.
REFRESH_WAIT = 15.0
_POLL = 0.05


class _CannotUse(Exception):
    """Internal: the grant's upstream tokens cannot produce a usable access token."""


def blob_key(owner: str) -> str:
    """`upstream:<txid>` before code redemption, `upstream:<gid>` after."""
    return f"upstream:{owner}"


@dataclass(frozen=True)
class _Stored:
    tokens: UpstreamTokens
    keep_until: float | None  # when the blob itself expires (kept across refreshes)


def seal_tokens(
    sealer: Sealer, owner: str, tokens: UpstreamTokens, *, keep_until: float | None
) -> str:
    """The sealed blob value for `owner` (binding = the blob key)."""
    payload = {**tokens.to_json(), "keep_until": keep_until}
    return sealer.seal(json.dumps(payload).encode("utf-8"), blob_key(owner))


def _open(sealer: Sealer, owner: str, sealed: str) -> _Stored:
    try:
        data = json.loads(sealer.open(sealed, blob_key(owner)))
        if not isinstance(data, dict):
            raise ValueError("not an object")
        keep = data.get("keep_until")
        if keep is not None and not isinstance(keep, int | float):
            raise ValueError("keep_until")
        return _Stored(UpstreamTokens.from_json(data), None if keep is None else float(keep))
    except (SealError, ValueError) as exc:
        raise _CannotUse(f"sealed upstream tokens unusable: {type(exc).__name__}") from None


async def store_tokens(
    store: Store, sealer: Sealer, owner: str, tokens: UpstreamTokens, *, ttl: float, now: float
) -> None:
    """Seal and store `tokens` for `owner` for `ttl` seconds."""
    sealed = seal_tokens(sealer, owner, tokens, keep_until=now + ttl)
    await store.put_blob(blob_key(owner), sealed, ttl)


async def move_upstream_tokens(
    store: Store, sealer: Sealer, txid: str, gid: str, *, ttl: float, now: float
) -> bool:
    """At code redemption: re-seal the transaction's tokens for grant `gid` (False if none)."""
    sealed = await store.get_blob(blob_key(txid))
    if sealed is None:
        return False
    try:
        stored = _open(sealer, txid, sealed)
    except _CannotUse:
        await store.delete_blob(blob_key(txid))
        return False
    await store_tokens(store, sealer, gid, stored.tokens, ttl=ttl, now=now)
    await store.delete_blob(blob_key(txid))
    return True


async def _load(store: Store, sealer: Sealer, gid: str) -> _Stored:
    sealed = await store.get_blob(blob_key(gid))
    if sealed is None:
        raise _CannotUse("no upstream tokens for this grant")
    return _open(sealer, gid, sealed)


def _fresh(tokens: UpstreamTokens, now: float) -> bool:
    return tokens.expires_at is None or now < tokens.expires_at - EXPIRY_SKEW


async def _refresh(
    store: Store, sealer: Sealer, upstream: UpstreamIdP, gid: str, now: float, *, force: bool
) -> UpstreamTokens:
    """Refresh under the grant's lock; another holder's result is used instead when it lands."""
    first = await _load(store, sealer, gid)
    if not force and _fresh(first.tokens, now):
        return first.tokens
    lock = f"uprefresh:{gid}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REFRESH_WAIT
    while True:
        if await store.incr_counter(lock, REFRESH_LOCK_TTL) == 1:
            try:
                current = await _load(store, sealer, gid)
                if current.tokens.access_token != first.tokens.access_token:
                    return current.tokens  # refreshed by someone else meanwhile
                if current.tokens.refresh_token is None:
                    if force and _fresh(current.tokens, now):
                        return current.tokens  # nothing to refresh with, still valid
                    raise _CannotUse("upstream access token expired and no refresh token")
                try:
                    new = await upstream.refresh(current.tokens.refresh_token)
                except UpstreamRejected as exc:
                    await store.delete_blob(blob_key(gid))
                    raise _CannotUse(f"upstream refused the refresh: {exc.error}") from None
                ttl = None if current.keep_until is None else current.keep_until - now
                if ttl is not None and ttl <= 0:
                    raise _CannotUse("upstream tokens outlived their grant")
                sealed = seal_tokens(sealer, gid, new, keep_until=current.keep_until)
                await store.put_blob(blob_key(gid), sealed, ttl)
                return new
            finally:
                await store.clear_counter(lock)
        if loop.time() >= deadline:
            raise UpstreamUnavailable("waited too long for a concurrent upstream refresh")
        await asyncio.sleep(_POLL)


async def upstream_access_token(
    store: Store, sealer: Sealer, upstream: UpstreamIdP, gid: str, now: float
) -> str:
    """A valid upstream access token for grant `gid`, refreshed first when expired.

    Raises `InvalidToken` when the grant has no usable upstream tokens any more and
    `UpstreamUnavailable` when the provider cannot be reached.
    """
    try:
        return (await _refresh(store, sealer, upstream, gid, now, force=False)).access_token
    except _CannotUse as exc:
        raise InvalidToken(
            "the upstream authorization is no longer valid", log_reason=str(exc)
        ) from None


async def refresh_upstream(
    store: Store, sealer: Sealer, upstream: UpstreamIdP, gid: str, now: float
) -> None:
    """Refresh the grant's upstream tokens now (gateway refresh grant).

    Raises `InvalidGrant` when the provider refuses or nothing usable is stored, and
    `UpstreamUnavailable` when the provider cannot be reached.
    """
    try:
        await _refresh(store, sealer, upstream, gid, now, force=True)
    except _CannotUse as exc:
        raise InvalidGrant(
            "the upstream authorization is no longer valid", log_reason=str(exc)
        ) from None
