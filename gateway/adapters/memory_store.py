"""The embedded, single-process store: every port of `gateway.ports` in plain dictionaries.

This is the default (`[store] url = "memory://"`) for one process. It passes the same contract
suite as `RedisStore` (`tests/stores/`), so the two are interchangeable.

- Time comes from the injected `Clock`: an entry is dead once `clock.now() >= expires_at`. Dead
  entries are dropped lazily when touched, and every `sweep_interval` seconds (by that clock) a
  write sweeps all tables, so memory does not grow with expired state.
- Atomicity: the event loop runs one coroutine at a time and no method awaits between its check
  and its write, so every one-time operation (`take_*`, `burn_step`, `rotate_refresh`,
  `use_recovery_code`, `bind_session`, ...) is atomic within the process.
- Payloads are stored as JSON bytes (as in Redis): callers get a fresh copy on every read, and a
  payload that is not JSON-able fails at write time in both adapters alike.
- `watch_revocations` gives each subscriber a bounded `asyncio.Queue`. A subscriber that falls
  behind by more than `feed_buffer` events, and every subscriber when the store closes, gets
  `StoreUnavailable`, so the consumer fails closed and resubscribes (and gets the snapshot again).
- After `close()` every operation raises `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson

from gateway.clock import Clock
from gateway.core.errors import StoreUnavailable
from gateway.ports import Json, RotateOutcome, TotpRecord

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_FEED_BROKEN = None  # queue sentinel: the subscriber must resubscribe


def check_ttl(ttl: float) -> float:
    """A TTL must be a finite number of seconds greater than zero (a caller bug otherwise)."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise ValueError(f"ttl must be a number of seconds, got {ttl!r}")
    if not (math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"ttl must be a finite number of seconds > 0, got {ttl!r}")
    return float(ttl)


def dump_json(data: Mapping[str, Any]) -> bytes:
    """Serialise a payload the same way both adapters do."""
    return orjson.dumps(dict(data))


def load_json(raw: bytes | str) -> Json:
    """Parse a stored payload; anything but a JSON object means the store is corrupt."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StoreUnavailable("stored payload is not JSON") from exc
    if not isinstance(value, dict):
        raise StoreUnavailable("stored payload is not a JSON object")
    return value


class _Table(Generic[K, V]):
    """A dict whose entries may carry an absolute expiry time."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[K, tuple[V, float | None]] = {}

    def get(self, key: K, now: float) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        value, expires_at = item
        if expires_at is not None and expires_at <= now:
            del self._items[key]
            return None
        return value

    def expires_at(self, key: K) -> float | None:
        """The entry's expiry (None: never or absent); call `get` first to know it is live."""
        item = self._items.get(key)
        return None if item is None else item[1]

    def set(self, key: K, value: V, expires_at: float | None) -> None:
        self._items[key] = (value, expires_at)

    def pop(self, key: K, now: float) -> V | None:
        value = self.get(key, now)
        if value is not None:
            del self._items[key]
        return value

    def delete(self, key: K) -> None:
        self._items.pop(key, None)

    def live_items(self, now: float) -> list[tuple[K, V]]:
        return [(k, v) for k, (v, exp) in self._items.items() if exp is None or exp > now]

    def sweep(self, now: float) -> None:
        dead = [k for k, (_, exp) in self._items.items() if exp is not None and exp <= now]
        for k in dead:
            del self._items[k]

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _Family:
    """A refresh-token family; `data is None` once revoked by reuse (jtis kept for revoke)."""

    data: bytes | None
    current: str
    used: set[str] = field(default_factory=set)
    jtis: dict[str, float] = field(default_factory=dict)


class _Subscriber:
    __slots__ = ("queue",)

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue(maxsize)

    def push(self, item: tuple[str, float] | None) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # Too slow: drop its backlog and tell it to resubscribe (it re-reads the snapshot).
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(_FEED_BROKEN)


class MemoryStore:
    """Every store port for one process; TTLs judged by the injected clock."""

    def __init__(
        self, clock: Clock, *, sweep_interval: float = 60.0, feed_buffer: int = 10_000
    ) -> None:
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._last_sweep = clock.now()
        self._feed_buffer = feed_buffer
        self._closed = False
        self._transactions: _Table[str, bytes] = _Table()
        self._upstream_states: _Table[str, str] = _Table()
        self._codes: _Table[str, bytes] = _Table()
        self._used_codes: _Table[str, str] = _Table()
        self._clients: _Table[str, bytes] = _Table()
        self._totp: dict[str, TotpRecord] = {}
        self._recovery: dict[str, set[str]] = {}
        self._steps: _Table[str, int] = _Table()
        self._counters: _Table[str, int] = _Table()
        self._locks: _Table[str, bool] = _Table()
        self._consents: _Table[tuple[str, str], bool] = _Table()
        self._families: _Table[str, _Family] = _Table()
        self._revoked: _Table[str, float] = _Table()
        self._sessions: _Table[str, str] = _Table()
        self._blobs: _Table[str, str] = _Table()
        self._subscribers: set[_Subscriber] = set()

    # ------------------------------------------------------------------ housekeeping

    def _now(self) -> float:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        return self._clock.now()

    def _write_now(self) -> float:
        """`now` for a write; sweeps every table now and then."""
        now = self._now()
        if now - self._last_sweep >= self._sweep_interval:
            self._last_sweep = now
            for table in self._tables():
                table.sweep(now)
        return now

    def _tables(self) -> tuple[_Table[Any, Any], ...]:
        return (
            self._transactions,
            self._upstream_states,
            self._codes,
            self._used_codes,
            self._clients,
            self._steps,
            self._counters,
            self._locks,
            self._consents,
            self._families,
            self._revoked,
            self._sessions,
            self._blobs,
        )

    def entry_count(self) -> int:
        """Entries held, expired or not (memory accounting and tests)."""
        tables = sum(len(t) for t in self._tables())
        return tables + len(self._totp) + sum(len(s) for s in self._recovery.values())

    async def ping(self) -> None:
        """Raise StoreUnavailable once closed."""
        self._now()

    async def close(self) -> None:
        """Refuse further use and break every revocation feed."""
        self._closed = True
        for sub in list(self._subscribers):
            sub.push(_FEED_BROKEN)

    # ------------------------------------------------------------------ transactions

    async def put_transaction(self, txid: str, data: Mapping[str, Any], ttl: float) -> None:
        """Store an authorization transaction for `ttl` seconds."""
        now = self._write_now()
        self._transactions.set(txid, dump_json(data), now + check_ttl(ttl))

    async def get_transaction(self, txid: str) -> Json | None:
        raw = self._transactions.get(txid, self._now())
        return None if raw is None else load_json(raw)

    async def take_transaction(self, txid: str) -> Json | None:
        """Read and delete in one step."""
        raw = self._transactions.pop(txid, self._now())
        return None if raw is None else load_json(raw)

    async def bind_upstream_state(self, state: str, txid: str, ttl: float) -> None:
        now = self._write_now()
        self._upstream_states.set(state, txid, now + check_ttl(ttl))

    async def take_upstream_state(self, state: str) -> str | None:
        """The transaction of an upstream `state`, at most once."""
        return self._upstream_states.pop(state, self._now())

    # ------------------------------------------------------------------ codes

    async def put_code(self, code_hash: str, data: Mapping[str, Any], ttl: float) -> None:
        now = self._write_now()
        self._codes.set(code_hash, dump_json(data), now + check_ttl(ttl))

    async def take_code(self, code_hash: str) -> Json | None:
        """Of N concurrent callers exactly one gets the data."""
        raw = self._codes.pop(code_hash, self._now())
        return None if raw is None else load_json(raw)

    async def mark_code_used(self, code_hash: str, family_id: str, ttl: float) -> None:
        now = self._write_now()
        self._used_codes.set(code_hash, family_id, now + check_ttl(ttl))

    async def code_used_by(self, code_hash: str) -> str | None:
        return self._used_codes.get(code_hash, self._now())

    # ------------------------------------------------------------------ clients

    async def put_client(self, client_id: str, data: Mapping[str, Any], ttl: float | None) -> None:
        """Store a client; `ttl=None` keeps it until replaced."""
        now = self._write_now()
        expires_at = None if ttl is None else now + check_ttl(ttl)
        self._clients.set(client_id, dump_json(data), expires_at)

    async def get_client(self, client_id: str) -> Json | None:
        raw = self._clients.get(client_id, self._now())
        return None if raw is None else load_json(raw)

    # ------------------------------------------------------------------ TOTP

    async def put_totp(self, record: TotpRecord) -> None:
        self._write_now()
        self._totp[record.user] = record

    async def get_totp(self, user: str) -> TotpRecord | None:
        self._now()
        return self._totp.get(user)

    async def delete_totp(self, user: str) -> bool:
        """Remove the seed, recovery codes and burned steps; True if a seed existed."""
        self._write_now()
        self._recovery.pop(user, None)
        self._steps.delete(user)
        return self._totp.pop(user, None) is not None

    async def list_totp_users(self) -> list[str]:
        self._now()
        return sorted(self._totp)

    async def set_recovery_codes(self, user: str, code_hashes: list[str]) -> None:
        self._write_now()
        if code_hashes:
            self._recovery[user] = set(code_hashes)
        else:
            self._recovery.pop(user, None)

    async def use_recovery_code(self, user: str, code_hash: str) -> bool:
        """True exactly once per stored code."""
        self._write_now()
        codes = self._recovery.get(user)
        if codes is None or code_hash not in codes:
            return False
        codes.discard(code_hash)
        if not codes:
            del self._recovery[user]
        return True

    async def count_recovery_codes(self, user: str) -> int:
        self._now()
        return len(self._recovery.get(user, ()))

    async def burn_step(self, user: str, step: int, ttl: float) -> bool:
        """Record `step` if it is newer than the last burned one (R34)."""
        now = self._write_now()
        expires_at = now + check_ttl(ttl)
        last = self._steps.get(user, now)
        if last is not None and step <= last:
            return False
        self._steps.set(user, step, expires_at)
        return True

    # ------------------------------------------------------------------ counters and locks

    async def incr_counter(self, key: str, window: float) -> int:
        """Increment; the window starts at the first hit and is never extended."""
        now = self._write_now()
        window = check_ttl(window)
        count = self._counters.get(key, now)
        if count is None:
            self._counters.set(key, 1, now + window)
            return 1
        self._counters.set(key, count + 1, self._counters.expires_at(key))
        return count + 1

    async def get_counter(self, key: str) -> int:
        return self._counters.get(key, self._now()) or 0

    async def clear_counter(self, key: str) -> None:
        self._now()
        self._counters.delete(key)

    async def set_lock(self, key: str, ttl: float) -> None:
        now = self._write_now()
        self._locks.set(key, True, now + check_ttl(ttl))

    async def is_locked(self, key: str) -> bool:
        return self._locks.get(key, self._now()) is not None

    # ------------------------------------------------------------------ consent

    async def put_consent(self, subject: str, client_id: str, ttl: float) -> None:
        now = self._write_now()
        self._consents.set((subject, client_id), True, now + check_ttl(ttl))

    async def has_consent(self, subject: str, client_id: str) -> bool:
        return self._consents.get((subject, client_id), self._now()) is not None

    # ------------------------------------------------------------------ refresh families

    async def create_family(
        self, family_id: str, token_hash: str, data: Mapping[str, Any], ttl: float
    ) -> None:
        """Start a family whose current refresh token is `token_hash`."""
        now = self._write_now()
        family = _Family(data=dump_json(data), current=token_hash)
        self._families.set(family_id, family, now + check_ttl(ttl))

    async def get_family(self, family_id: str) -> Json | None:
        family = self._families.get(family_id, self._now())
        if family is None or family.data is None:
            return None
        return load_json(family.data)

    async def rotate_refresh(
        self, family_id: str, presented_hash: str, new_hash: str, ttl: float
    ) -> RotateOutcome:
        """ROTATED if current (the family lives `ttl` more); REUSED revokes; else INVALID."""
        now = self._write_now()
        expires_at = now + check_ttl(ttl)
        family = self._families.get(family_id, now)
        if family is None or family.data is None:
            return RotateOutcome.INVALID
        if presented_hash == family.current:
            family.used.add(presented_hash)
            family.current = new_hash
            self._families.set(family_id, family, expires_at)
            return RotateOutcome.ROTATED
        if presented_hash in family.used:
            family.data = None
            family.current = ""
            return RotateOutcome.REUSED
        return RotateOutcome.INVALID

    async def update_family(self, family_id: str, data: Mapping[str, Any]) -> None:
        """Replace a live family's data; a missing or revoked family stays missing."""
        now = self._write_now()
        raw = dump_json(data)
        family = self._families.get(family_id, now)
        if family is not None and family.data is not None:
            family.data = raw

    async def add_family_jti(self, family_id: str, jti: str, exp: float) -> None:
        """Remember an access token of the family; if the family is already gone (revoked or
        expired), the token is revoked at once instead (fail closed)."""
        now = self._write_now()
        family = self._families.get(family_id, now)
        if family is not None and family.data is not None:
            family.jtis[jti] = exp
            return
        await self.revoke_jti(jti, exp)

    async def revoke_family(self, family_id: str) -> list[tuple[str, float]]:
        """Delete the family; return the (jti, exp) pairs it issued (also after a reuse)."""
        family = self._families.pop(family_id, self._write_now())
        return [] if family is None else sorted(family.jtis.items())

    # ------------------------------------------------------------------ revocations

    async def revoke_jti(self, jti: str, exp: float) -> None:
        """Deny `jti` until `exp` and notify every subscriber."""
        now = self._write_now()
        if exp > now:
            self._revoked.set(jti, exp, exp)
        for sub in list(self._subscribers):
            sub.push((jti, exp))

    async def is_revoked(self, jti: str) -> bool:
        return self._revoked.get(jti, self._now()) is not None

    async def revoked_snapshot(self) -> dict[str, float]:
        """Every jti still revoked, with its expiry."""
        now = self._now()
        self._revoked.sweep(now)
        return dict(self._revoked.live_items(now))

    async def watch_revocations(self) -> AsyncIterator[tuple[str, float]]:
        """Once subscribed: every revoked (jti, exp) of the snapshot, then each new revocation.
        Raises StoreUnavailable when the feed breaks (overflow, close)."""
        now = self._now()
        sub = _Subscriber(self._feed_buffer)
        # Registration and snapshot in one synchronous step: nothing can fall in between.
        self._subscribers.add(sub)
        snapshot = self._revoked.live_items(now)
        try:
            for item in snapshot:
                yield item
            while True:
                got = await sub.queue.get()
                if got is _FEED_BROKEN:
                    raise StoreUnavailable("revocation feed broken; resubscribe")
                yield got
        finally:
            self._subscribers.discard(sub)

    # ------------------------------------------------------------------ MCP sessions

    async def bind_session(self, session_id: str, owner: str, ttl: float) -> str:
        """Bind if unbound and return the owner now bound; the owner's own re-bind slides
        the TTL, another subject's attempt changes nothing."""
        now = self._write_now()
        expires_at = now + check_ttl(ttl)
        current = self._sessions.get(session_id, now)
        if current is None or current == owner:
            self._sessions.set(session_id, owner, expires_at)
            return owner
        return current

    async def session_owner(self, session_id: str) -> str | None:
        return self._sessions.get(session_id, self._now())

    async def drop_session(self, session_id: str) -> None:
        self._now()
        self._sessions.delete(session_id)

    # ------------------------------------------------------------------ sealed blobs

    async def put_blob(self, key: str, sealed: str, ttl: float | None) -> None:
        now = self._write_now()
        self._blobs.set(key, sealed, None if ttl is None else now + check_ttl(ttl))

    async def get_blob(self, key: str) -> str | None:
        return self._blobs.get(key, self._now())

    async def delete_blob(self, key: str) -> None:
        self._now()
        self._blobs.delete(key)
