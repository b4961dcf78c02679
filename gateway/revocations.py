"""The local set of revoked access-token ids (`jti`), kept current without a round trip per request.

`RevocationSet.run()` subscribes to `store.watch_revocations()` (which yields the store's snapshot
once subscribed, then each new revocation from any process or replica). A subscription is trusted
only once it has proved itself live: the set revokes a random probe id (prefix `mfagw-probe:`,
never a real `jti`, expiring after a minute) and waits for it to come back through the feed.
While the feed is quiet the store is asked a cheap question every `liveness_interval` (so a
silent store is noticed within that interval plus the store's time-out) and the whole
`store.revoked_snapshot()` is read again every `resync_interval`. While the feed is down
the set reports `current = False` and `check()` raises `TemporarilyUnavailable`, so the proxy
fails closed with 503 instead of accepting a token that might have been revoked (DESIGN §7.8).
Entries leave the set when the token would have expired anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import structlog

from gateway.clock import Clock
from gateway.core.errors import StoreUnavailable, TemporarilyUnavailable
from gateway.ports import RevocationStore

log = structlog.get_logger(__name__)

# Revocation ids with this prefix are liveness probes of the feed, never real token ids.
PROBE_PREFIX = "mfagw-probe:"


class RevocationSet:
    """A process-local mirror of the revoked `jti` deny-list."""

    def __init__(
        self,
        store: RevocationStore,
        clock: Clock,
        *,
        liveness_interval: float = 5.0,
        resync_interval: float = 60.0,
        retry_min: float = 0.05,
        retry_max: float = 2.0,
        prune_every: int = 1024,
        subscribe_timeout: float = 10.0,
        probe_ttl: float = 60.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._liveness_interval = liveness_interval
        self._resync_interval = resync_interval
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._prune_every = prune_every
        self._subscribe_timeout = subscribe_timeout
        self._probe_ttl = probe_ttl
        self._revoked: dict[str, float] = {}
        self._current = False
        self._added = 0
        self._became_current = asyncio.Event()
        self._went_current = False

    @property
    def current(self) -> bool:
        """True while the feed is known to be live (the set can be trusted)."""
        return self._current

    def __len__(self) -> int:
        return len(self._revoked)

    def is_revoked(self, jti: str) -> bool:
        """The local answer, whether or not the set is current (use `check` on the hot path)."""
        exp = self._revoked.get(jti)
        if exp is None:
            return False
        if exp <= self._clock.now():
            del self._revoked[jti]
            return False
        return True

    def check(self, jti: str) -> bool:
        """True if `jti` is revoked; raise `TemporarilyUnavailable` while not current."""
        if not self._current:
            raise TemporarilyUnavailable(
                "the service is temporarily unavailable", log_reason="revocation feed down"
            )
        return self.is_revoked(jti)

    async def wait_current(self) -> None:
        """Wait until the set is current (start-up, tests); wrap in `asyncio.timeout`."""
        if not self._current:
            await self._became_current.wait()

    def _add(self, jti: str, exp: float) -> None:
        if exp <= self._clock.now() or jti.startswith(PROBE_PREFIX):
            return
        if self._revoked.get(jti, 0.0) < exp:
            self._revoked[jti] = exp
        self._added += 1
        if self._added % self._prune_every == 0:
            self._prune()

    def _prune(self) -> None:
        now = self._clock.now()
        for jti in [j for j, e in self._revoked.items() if e <= now]:
            del self._revoked[jti]

    def _set_current(self, value: bool) -> None:
        if value and not self._current:
            self._became_current.set()
        elif not value:
            self._became_current.clear()
        self._current = value

    async def _resync(self) -> None:
        snapshot = await self._store.revoked_snapshot()
        for jti, exp in snapshot.items():
            self._add(jti, exp)
        self._prune()

    async def _follow(self) -> None:
        """One subscription: returns only by raising when the feed or the store fails."""
        feed: AsyncIterator[tuple[str, float]] = aiter(self._store.watch_revocations())
        pending: asyncio.Future[tuple[str, float]] = asyncio.ensure_future(anext(feed))
        try:
            # Prove the subscription is live before trusting the set: revoke a random probe id
            # and wait until it comes back through this very feed (live message, or the
            # snapshot a store yields once subscribed).
            probe = PROBE_PREFIX + secrets.token_urlsafe(12)
            await self._store.revoke_jti(probe, self._clock.now() + self._probe_ttl)
            async with asyncio.timeout(self._subscribe_timeout):
                while True:
                    jti, exp = await pending
                    pending = asyncio.ensure_future(anext(feed))
                    if jti == probe:
                        break
                    self._add(jti, exp)
            await self._resync()
            self._set_current(True)
            self._went_current = True
            log.info("revocation_feed_current", revoked=len(self._revoked))
            loop = asyncio.get_running_loop()
            synced = loop.time()
            while True:
                done, _ = await asyncio.wait({pending}, timeout=self._liveness_interval)
                if not done:
                    # A quiet feed: prove the store still answers (a silent Redis is noticed
                    # within this interval plus the store time-out), now and then resync.
                    if loop.time() - synced >= self._resync_interval:
                        await self._resync()
                        synced = loop.time()
                    else:
                        await self._store.is_revoked(probe)
                    continue
                jti, exp = pending.result()
                self._add(jti, exp)
                pending = asyncio.ensure_future(anext(feed))
        finally:
            self._set_current(False)
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
            aclose = getattr(feed, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def run(self) -> None:
        """Keep the set current until cancelled; resubscribe with back-off after failures.

        Every failure (including an unexpected one) leaves the set not current, so requests
        fail closed while this loop retries.
        """
        delay = self._retry_min
        while True:
            self._went_current = False
            try:
                await self._follow()
            except StopAsyncIteration:
                log.warning("store_unavailable", reason="revocation feed ended")
            except StoreUnavailable:
                log.warning("store_unavailable", reason="revocation feed broken")
            except Exception as exc:  # fail closed and retry; never let the follower die
                log.error(
                    "store_unavailable", reason="revocation feed failed", error=type(exc).__name__
                )
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A client library turned our cancellation into an error (redis-py's pub/sub
                # read can): honour it, or app shutdown would wait for this loop forever.
                raise asyncio.CancelledError
            if self._went_current:
                delay = self._retry_min
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)
