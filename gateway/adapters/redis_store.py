"""Every store port on Redis (redis.asyncio, hiredis parser): state shared by all processes.

The only importer of `redis`. Built from `[store] url` (`redis://`, `rediss://`, `unix://`, or
Sentinel as `redis+sentinel://[[user]:password@]host:port[,host:port]/service_name[/db]`), a key
prefix and `[store] timeout`, which bounds every operation (connect, socket reads, and the whole
call). Every Redis failure (`RedisError`, `OSError`, time-out) becomes `StoreUnavailable`, so
callers fail closed. Connections are never retried automatically: the one-time operations are not
idempotent, and a retried `rotate_refresh` whose first attempt went through would look like reuse.

Key schema (`P` = key prefix; the part in braces is the Redis Cluster hash tag, so all keys one
operation touches live in one slot; within one kind every suffix ends in a different character and
consent keys end in a fixed-length hash, so no two ids can produce the same key):

    P tx:{txid}                 string  transaction JSON, PX ttl; GETDEL to take
    P ustate:{state}            string  txid, PX ttl; GETDEL to take
    P code:{code_hash}          string  code JSON, PX ttl; GETDEL to take
    P code:{code_hash}:used     string  family id that the redeemed code produced, PX ttl
    P client:{client_id}        string  client JSON, PX ttl or persistent
    P totp:{user}               string  TotpRecord JSON (the seed is sealed by the caller)
    P totp:{user}:rc            set     recovery-code hashes; SREM to use one
    P totp:{user}:step          string  last burned TOTP step, PX ttl (Lua: strictly increasing)
    P totp-users:{index}        set     users with a seed (written after, removed after the seed)
    P ctr:{key}                 string  counter; Lua INCR + PEXPIRE on the first hit only
    P lock:{key}                string  "1", PX ttl
    P consent:{subject}:H       string  "1", PX ttl; H = token_hash(client_id)
    P fam:{family_id}           hash    data (JSON), cur (current refresh hash); PX ttl
    P fam:{family_id}:used      set     rotated-out refresh hashes (reuse detection)
    P fam:{family_id}:jti       hash    jti -> exp of access tokens issued from the family
    P rev:{all}                 zset    revoked jti scored by exp (snapshot; trimmed by exp)
    P rev:{all}:jti             string  "1", PEXPIREAT exp (is_revoked)
    P sess:{session_id}         string  owning subject, PX ttl; Lua SET NX then GET
    P blob:{key}                string  sealed blob, PX ttl or persistent
    channel P rev:feed          JSON [jti, exp] published by revoke_jti

A family revoked by reuse loses its `fam:{id}` hash (get_family → None, rotate → INVALID) but keeps
its `:jti` hash until `revoke_family` returns and deletes it. `watch_revocations` subscribes, waits
for the confirmation, then yields the snapshot and the live feed; a PING heartbeat detects a silent
connection, and any break raises `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.adapters.memory_store import check_ttl, dump_json, load_json
from gateway.clock import Clock
from gateway.core.errors import StoreUnavailable
from gateway.crypto import token_hash
from gateway.ports import Json, RotateOutcome, TotpRecord

T = TypeVar("T")

_FAILURES = (RedisError, OSError, TimeoutError)
_SENTINEL_PORT = 26379

_BURN_STEP = """
local last = redis.call('GET', KEYS[1])
if last and tonumber(last) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_INCR_COUNTER = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
"""

_BIND_SESSION = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return ARGV[1] end
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return owner
"""

# KEYS: fam, used, jti; ARGV: presented, new, ttl_ms
_ROTATE_REFRESH = """
local cur = redis.call('HGET', KEYS[1], 'cur')
if not cur then return 'invalid' end
if cur == ARGV[1] then
  redis.call('HSET', KEYS[1], 'cur', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  return 'rotated'
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[1])
  return 'reused'
end
return 'invalid'
"""

_UPDATE_FAMILY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[1])
return 1
"""

# KEYS: fam, jti; ARGV: jti, exp
_ADD_FAMILY_JTI = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

# KEYS: fam, used, jti
_REVOKE_FAMILY = """
local jtis = redis.call('HGETALL', KEYS[3])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return jtis
"""

# KEYS: item, index; ARGV: exp_ms, exp, jti, now, channel, message
_REVOKE_JTI = """
redis.call('SET', KEYS[1], '1')
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""


def _ms(ttl: float) -> int:
    return max(1, math.ceil(check_ttl(ttl) * 1000))


def _num(value: float) -> str:
    return repr(float(value))


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed `redis+sentinel://` URL."""

    hosts: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse `redis+sentinel://[[user]:password@]host:port[,host:port]/service_name[/db]`.
    Error messages never repeat the credentials."""
    parts = urlsplit(url)
    if parts.scheme != "redis+sentinel":
        raise ValueError("not a redis+sentinel:// URL")
    if parts.query or parts.fragment:
        raise ValueError("redis+sentinel:// URLs take no query or fragment")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts: list[tuple[str, int]] = []
    for entry in hostlist.split(","):
        hosts.append(_host_port(entry))
    segments = [s for s in parts.path.split("/") if s]
    if not segments or len(segments) > 2:
        raise ValueError("expected /service_name or /service_name/db after the sentinel hosts")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError(f"db must be a number, got {segments[1]!r}")
        db = int(segments[1])
    return SentinelTarget(tuple(hosts), unquote(segments[0]), db, username, password)


def _host_port(entry: str) -> tuple[str, int]:
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad sentinel address {entry!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        raise ValueError(f"bad sentinel address {entry!r}")
    if not port_text:
        return host, _SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad sentinel port in {entry!r}")
    return host, int(port_text)


class RedisStore:
    """Every store port on one Redis (or a Sentinel-managed master)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        clock: Clock,
        key_prefix: str = "mfagw:",
        timeout: float = 2.0,
        heartbeat: float = 15.0,
        sentinel: Sentinel | None = None,
    ) -> None:
        """Wrap a client made with `decode_responses=True` (use `from_url`)."""
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("the key prefix must not contain '{' or '}' (hash-tag syntax)")
        self._r = client
        self._clock = clock
        self._p = key_prefix
        self._timeout = check_ttl(timeout)
        self._heartbeat = check_ttl(heartbeat)
        self._sentinel = sentinel
        self._channel = f"{key_prefix}rev:feed"
        self._burn_step = client.register_script(_BURN_STEP)
        self._incr_counter = client.register_script(_INCR_COUNTER)
        self._bind_session = client.register_script(_BIND_SESSION)
        self._rotate = client.register_script(_ROTATE_REFRESH)
        self._update_family = client.register_script(_UPDATE_FAMILY)
        self._add_jti = client.register_script(_ADD_FAMILY_JTI)
        self._revoke_family = client.register_script(_REVOKE_FAMILY)
        self._revoke_jti = client.register_script(_REVOKE_JTI)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        clock: Clock,
        key_prefix: str = "mfagw:",
        timeout: float = 2.0,
        heartbeat: float = 15.0,
    ) -> RedisStore:
        """Build from a `redis://`, `rediss://`, `unix://` or `redis+sentinel://` URL. Does not
        connect: call `ping()` to probe."""
        timeout = check_ttl(timeout)
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "mfa-gateway",
        }
        scheme = urlsplit(url).scheme
        if scheme == "redis+sentinel":
            target = parse_sentinel_url(url)
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(target.hosts),
                sentinel_kwargs={k: v for k, v in options.items() if k != "client_name"},
            )
            client = sentinel.master_for(
                target.service_name,
                db=target.db,
                username=target.username,
                password=target.password,
                **options,
            )
            return cls(
                client,
                clock=clock,
                key_prefix=key_prefix,
                timeout=timeout,
                heartbeat=heartbeat,
                sentinel=sentinel,
            )
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL scheme: {scheme!r}")
        client = aioredis.Redis.from_url(url, **options)
        return cls(client, clock=clock, key_prefix=key_prefix, timeout=timeout, heartbeat=heartbeat)

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store writes."""
        return self._p

    # ------------------------------------------------------------------ plumbing

    def _k(self, kind: str, ident: str, suffix: str = "") -> str:
        return f"{self._p}{kind}:{{{ident}}}{suffix}"

    async def _run(self, op: Awaitable[T]) -> T:
        """Await one Redis operation under the store time-out; any failure → StoreUnavailable."""
        try:
            async with asyncio.timeout(self._timeout):
                return await op
        except _FAILURES as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc

    async def _get_json(self, key: str) -> Json | None:
        raw = await self._run(self._r.get(key))
        return None if raw is None else load_json(raw)

    async def _take_json(self, key: str) -> Json | None:
        raw = await self._run(self._r.getdel(key))
        return None if raw is None else load_json(raw)

    async def _transaction(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Run commands in MULTI/EXEC (all keys must share one hash tag)."""

        async def go() -> list[Any]:
            async with self._r.pipeline(transaction=True) as pipe:
                for name, *args in commands:
                    pipe.execute_command(name, *args)
                return await pipe.execute()

        return await self._run(go())

    async def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers within the time-out."""
        await self._run(self._r.ping())

    async def close(self) -> None:
        """Close the connection pool (and the Sentinel connections)."""
        with contextlib.suppress(*_FAILURES):
            await self._r.aclose()
        if self._sentinel is not None:
            with contextlib.suppress(*_FAILURES):
                await self._sentinel.aclose()

    # ------------------------------------------------------------------ transactions

    async def put_transaction(self, txid: str, data: Mapping[str, Any], ttl: float) -> None:
        """Store an authorization transaction for `ttl` seconds."""
        await self._run(self._r.set(self._k("tx", txid), dump_json(data), px=_ms(ttl)))

    async def get_transaction(self, txid: str) -> Json | None:
        return await self._get_json(self._k("tx", txid))

    async def take_transaction(self, txid: str) -> Json | None:
        """GETDEL: read and delete in one step."""
        return await self._take_json(self._k("tx", txid))

    async def bind_upstream_state(self, state: str, txid: str, ttl: float) -> None:
        await self._run(self._r.set(self._k("ustate", state), txid, px=_ms(ttl)))

    async def take_upstream_state(self, state: str) -> str | None:
        """GETDEL: a `state` is accepted at most once (R16)."""
        return cast(str | None, await self._run(self._r.getdel(self._k("ustate", state))))

    # ------------------------------------------------------------------ codes

    async def put_code(self, code_hash: str, data: Mapping[str, Any], ttl: float) -> None:
        await self._run(self._r.set(self._k("code", code_hash), dump_json(data), px=_ms(ttl)))

    async def take_code(self, code_hash: str) -> Json | None:
        """GETDEL: of N concurrent callers exactly one gets the data."""
        return await self._take_json(self._k("code", code_hash))

    async def mark_code_used(self, code_hash: str, family_id: str, ttl: float) -> None:
        key = self._k("code", code_hash, ":used")
        await self._run(self._r.set(key, family_id, px=_ms(ttl)))

    async def code_used_by(self, code_hash: str) -> str | None:
        key = self._k("code", code_hash, ":used")
        return cast(str | None, await self._run(self._r.get(key)))

    # ------------------------------------------------------------------ clients

    async def put_client(self, client_id: str, data: Mapping[str, Any], ttl: float | None) -> None:
        """Store a client; `ttl=None` keeps it (and clears an earlier expiry)."""
        px = None if ttl is None else _ms(ttl)
        await self._run(self._r.set(self._k("client", client_id), dump_json(data), px=px))

    async def get_client(self, client_id: str) -> Json | None:
        return await self._get_json(self._k("client", client_id))

    # ------------------------------------------------------------------ TOTP

    async def put_totp(self, record: TotpRecord) -> None:
        """Write the record, then add the user to the index (`list_totp_users`)."""
        raw = dump_json(
            {
                "user": record.user,
                "sealed_seed": record.sealed_seed,
                "created_at": record.created_at,
                "confirmed": record.confirmed,
            }
        )
        await self._run(self._r.set(self._k("totp", record.user), raw))
        await self._run(self._r.sadd(self._k("totp-users", "index"), record.user))

    async def get_totp(self, user: str) -> TotpRecord | None:
        data = await self._get_json(self._k("totp", user))
        if data is None:
            return None
        try:
            user_name, sealed_seed = data["user"], data["sealed_seed"]
            if not (isinstance(user_name, str) and isinstance(sealed_seed, str)):
                raise TypeError("user and sealed_seed must be strings")
            record = TotpRecord(
                user=user_name,
                sealed_seed=sealed_seed,
                created_at=float(data["created_at"]),
                confirmed=bool(data["confirmed"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreUnavailable("stored TOTP record is malformed") from exc
        return record

    async def delete_totp(self, user: str) -> bool:
        """Remove seed, recovery codes and burned step atomically; then un-index the user."""
        existed, _ = await self._transaction(
            ("EXISTS", self._k("totp", user)),
            (
                "DEL",
                self._k("totp", user),
                self._k("totp", user, ":rc"),
                self._k("totp", user, ":step"),
            ),
        )
        await self._run(self._r.srem(self._k("totp-users", "index"), user))
        return bool(existed)

    async def list_totp_users(self) -> list[str]:
        """Indexed users whose record exists, sorted."""
        index = self._k("totp-users", "index")
        users = sorted(cast(set[str], await self._run(self._r.smembers(index))))
        if not users:
            return []

        async def go() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for user in users:
                    pipe.exists(self._k("totp", user))
                return await pipe.execute()

        exists = await self._run(go())
        return [u for u, e in zip(users, exists, strict=True) if e]

    async def set_recovery_codes(self, user: str, code_hashes: list[str]) -> None:
        """Replace the user's recovery codes atomically."""
        key = self._k("totp", user, ":rc")
        commands: list[tuple[Any, ...]] = [("DEL", key)]
        if code_hashes:
            commands.append(("SADD", key, *code_hashes))
        await self._transaction(*commands)

    async def use_recovery_code(self, user: str, code_hash: str) -> bool:
        """SREM: True exactly once per stored code."""
        removed = await self._run(self._r.srem(self._k("totp", user, ":rc"), code_hash))
        return removed == 1

    async def count_recovery_codes(self, user: str) -> int:
        return int(await self._run(self._r.scard(self._k("totp", user, ":rc"))))

    async def burn_step(self, user: str, step: int, ttl: float) -> bool:
        """Lua: record `step` only if it is newer than the last burned one (R34)."""
        result = await self._run(
            self._burn_step(keys=[self._k("totp", user, ":step")], args=[int(step), _ms(ttl)])
        )
        return int(result) == 1

    # ------------------------------------------------------------------ counters and locks

    async def incr_counter(self, key: str, window: float) -> int:
        """Lua: INCR, and PEXPIRE only on the first hit (the window is never extended)."""
        result = await self._run(self._incr_counter(keys=[self._k("ctr", key)], args=[_ms(window)]))
        return int(result)

    async def get_counter(self, key: str) -> int:
        raw = await self._run(self._r.get(self._k("ctr", key)))
        return 0 if raw is None else int(raw)

    async def clear_counter(self, key: str) -> None:
        await self._run(self._r.delete(self._k("ctr", key)))

    async def set_lock(self, key: str, ttl: float) -> None:
        await self._run(self._r.set(self._k("lock", key), "1", px=_ms(ttl)))

    async def is_locked(self, key: str) -> bool:
        return bool(await self._run(self._r.exists(self._k("lock", key))))

    # ------------------------------------------------------------------ consent

    def _consent_key(self, subject: str, client_id: str) -> str:
        return self._k("consent", subject, ":" + token_hash(client_id))

    async def put_consent(self, subject: str, client_id: str, ttl: float) -> None:
        await self._run(self._r.set(self._consent_key(subject, client_id), "1", px=_ms(ttl)))

    async def has_consent(self, subject: str, client_id: str) -> bool:
        return bool(await self._run(self._r.exists(self._consent_key(subject, client_id))))

    # ------------------------------------------------------------------ refresh families

    def _family_keys(self, family_id: str) -> list[str]:
        return [
            self._k("fam", family_id),
            self._k("fam", family_id, ":used"),
            self._k("fam", family_id, ":jti"),
        ]

    async def create_family(
        self, family_id: str, token_hash: str, data: Mapping[str, Any], ttl: float
    ) -> None:
        """Start a family whose current refresh token is `token_hash` (replaces any old one)."""
        fam, used, jti = self._family_keys(family_id)
        await self._transaction(
            ("DEL", fam, used, jti),
            ("HSET", fam, "data", dump_json(data), "cur", token_hash),
            ("PEXPIRE", fam, _ms(ttl)),
        )

    async def get_family(self, family_id: str) -> Json | None:
        raw = await self._run(self._r.hget(self._k("fam", family_id), "data"))
        return None if raw is None else load_json(raw)

    async def rotate_refresh(
        self, family_id: str, presented_hash: str, new_hash: str, ttl: float
    ) -> RotateOutcome:
        """Lua: ROTATED if current (the family lives `ttl` more); a rotated-out hash deletes the
        family (REUSED, its jtis kept for `revoke_family`); anything else INVALID."""
        result = await self._run(
            self._rotate(
                keys=self._family_keys(family_id), args=[presented_hash, new_hash, _ms(ttl)]
            )
        )
        return RotateOutcome(result)

    async def update_family(self, family_id: str, data: Mapping[str, Any]) -> None:
        """Replace a live family's data keeping its TTL; a missing family stays missing."""
        await self._run(
            self._update_family(keys=[self._k("fam", family_id)], args=[dump_json(data)])
        )

    async def add_family_jti(self, family_id: str, jti: str, exp: float) -> None:
        """Remember an access token of the family; if the family is already gone (revoked or
        expired), the token is revoked at once instead (fail closed)."""
        fam, _, jtis = self._family_keys(family_id)
        added = await self._run(self._add_jti(keys=[fam, jtis], args=[jti, _num(exp)]))
        if added != 1:
            await self.revoke_jti(jti, exp)

    async def revoke_family(self, family_id: str) -> list[tuple[str, float]]:
        """Lua: delete the family; return the (jti, exp) pairs it issued (also after a reuse)."""
        flat = cast(
            list[str], await self._run(self._revoke_family(keys=self._family_keys(family_id)))
        )
        return sorted((flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2))

    # ------------------------------------------------------------------ revocations

    async def revoke_jti(self, jti: str, exp: float) -> None:
        """Lua: deny key with PEXPIREAT exp, snapshot entry, and PUBLISH on the feed."""
        now = self._clock.now()
        message = orjson.dumps([jti, float(exp)])
        await self._run(
            self._revoke_jti(
                keys=[self._k("rev", "all", ":" + jti), self._k("rev", "all")],
                args=[math.ceil(exp * 1000), _num(exp), jti, _num(now), self._channel, message],
            )
        )

    async def is_revoked(self, jti: str) -> bool:
        return bool(await self._run(self._r.exists(self._k("rev", "all", ":" + jti))))

    async def revoked_snapshot(self) -> dict[str, float]:
        """Every jti still revoked (entries with exp <= now are dropped first)."""
        index = self._k("rev", "all")
        _, pairs = await self._transaction(
            ("ZREMRANGEBYSCORE", index, "-inf", _num(self._clock.now())),
            ("ZRANGE", index, 0, -1, "WITHSCORES"),
        )
        return _pairs(pairs)

    async def watch_revocations(self) -> AsyncIterator[tuple[str, float]]:
        """Once subscribed: every revoked (jti, exp) of the snapshot, then each new revocation.
        Raises StoreUnavailable when the connection breaks or stops answering the heartbeat."""
        pubsub = self._r.pubsub()
        try:
            await self._run(self._subscribe(pubsub))
            snapshot = await self.revoked_snapshot()
            for item in snapshot.items():
                yield item
            awaiting_pong = False
            while True:
                message = await self._run_unbounded(
                    pubsub.get_message(ignore_subscribe_messages=True, timeout=self._heartbeat)
                )
                if message is None:
                    if awaiting_pong:
                        raise StoreUnavailable("redis: the revocation feed stopped answering")
                    await self._run(pubsub.ping())
                    awaiting_pong = True
                    continue
                awaiting_pong = False
                if message.get("type") != "message":
                    continue
                yield _feed_item(message.get("data"))
        finally:
            with contextlib.suppress(*_FAILURES):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _subscribe(self, pubsub: Any) -> None:
        """SUBSCRIBE and wait for the confirmation, so the snapshot read next misses nothing."""
        await pubsub.subscribe(self._channel)
        while True:
            message = await pubsub.get_message(timeout=self._timeout)
            if message is not None and message.get("type") == "subscribe":
                return

    async def _run_unbounded(self, op: Awaitable[T]) -> T:
        """Like `_run` for a call that bounds its own wait (a pub/sub read)."""
        try:
            return await op
        except _FAILURES as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc

    # ------------------------------------------------------------------ MCP sessions

    async def bind_session(self, session_id: str, owner: str, ttl: float) -> str:
        """Lua SET NX then GET: the owner now bound; the owner's own re-bind slides the TTL."""
        result = await self._run(
            self._bind_session(keys=[self._k("sess", session_id)], args=[owner, _ms(ttl)])
        )
        return cast(str, result)

    async def session_owner(self, session_id: str) -> str | None:
        return cast(str | None, await self._run(self._r.get(self._k("sess", session_id))))

    async def drop_session(self, session_id: str) -> None:
        await self._run(self._r.delete(self._k("sess", session_id)))

    # ------------------------------------------------------------------ sealed blobs

    async def put_blob(self, key: str, sealed: str, ttl: float | None) -> None:
        px = None if ttl is None else _ms(ttl)
        await self._run(self._r.set(self._k("blob", key), sealed, px=px))

    async def get_blob(self, key: str) -> str | None:
        return cast(str | None, await self._run(self._r.get(self._k("blob", key))))

    async def delete_blob(self, key: str) -> None:
        await self._run(self._r.delete(self._k("blob", key)))


def _pairs(value: Any) -> dict[str, float]:
    """ZRANGE WITHSCORES as a dict (redis-py gives [(member, score), ...])."""
    out: dict[str, float] = {}
    for member, score in value:
        out[str(member)] = float(score)
    return out


def _feed_item(data: Any) -> tuple[str, float]:
    """Parse one feed message; anything unexpected breaks the feed (fail closed)."""
    try:
        jti, exp = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise StoreUnavailable("redis: malformed revocation message") from exc
    if not isinstance(jti, str) or isinstance(exp, bool) or not isinstance(exp, int | float):
        raise StoreUnavailable("redis: malformed revocation message")
    return jti, float(exp)
