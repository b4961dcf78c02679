"""Every store port on Redis (redis.asyncio, hiredis parser): state shared by all processes.

The only importer of `redis`. Built from `[store] url`, a key prefix and `[store] timeout`, which
bounds every operation (connect, socket reads, and the whole call). URLs:

- `redis://`, `rediss://`, `unix://`: one Redis server.
- `redis+sentinel://[[user]:password@]host:port[,host:port]/service_name[/db][?replica_acks=N]`:
  the primary that the Sentinels name. Every write is followed, on the same connection, by
  `WAIT N` (default N = 1): a write that fewer than N replicas acknowledged raises
  `StoreUnavailable`, and the store asks Sentinel again and drops its connections if the primary
  changed. Without that, a primary that Sentinel has just deposed keeps accepting writes (~10 s,
  until Sentinel reconfigures it) that are then thrown away: a code or TOTP step "used" there
  would be usable again on the new primary. Only N = the number of replicas makes every
  acknowledged write survive any promotion (Sentinel may promote a replica that had not
  acknowledged); the price is that writes stay unavailable after a failover until the old
  primary has rejoined as a replica. `replica_acks=0` turns the wait off. Reads are not
  checked: until this store's next write, reads may still reach a deposed primary.
- `redis+cluster://[[user]:password@]host:port[,host:port...]/`: a Redis Cluster (the listed
  nodes are only the start-up nodes; the client learns the slot map and follows MOVED/ASK
  redirections, which are safe to follow because the command did not run).

Every Redis failure (`RedisError`, cluster errors, `OSError`, time-out) becomes
`StoreUnavailable`, so callers fail closed. Connections are never retried automatically: the
one-time operations are not idempotent, and a retried `rotate_refresh` whose first attempt went
through would look like reuse.

Key schema (`P` = key prefix; the part in braces is the Redis Cluster hash tag, so all keys one
operation touches live in one slot, and every Lua script and MULTI runs on one cluster node;
within one kind every suffix ends in a different character and consent keys end in a
fixed-length hash, so no two ids can produce the same key):

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
connection, and any break raises `StoreUnavailable`. The feed is a plain PUBLISH from the
revocation script: on a cluster the node that runs the script delivers it to its own subscribers
and broadcasts it over the cluster bus, and the store subscribes on the primary that owns
`rev:{all}` (so delivery does not depend on the bus). With Sentinel the heartbeat also checks that
the feed's server is still the primary Sentinel names.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.typing import EncodableT

from gateway.adapters.memory_store import check_ttl, dump_json, load_json
from gateway.clock import Clock
from gateway.core.errors import StoreUnavailable
from gateway.crypto import token_hash
from gateway.ports import Json, RotateOutcome, TotpRecord

T = TypeVar("T")

# RedisClusterException (slots not covered, cross-slot) is not a RedisError.
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
_SENTINEL_PORT = 26379
_REDIS_PORT = 6379
_MAX_REPLICA_ACKS = 16

# A write queued on a client (run now) or on a pipeline (run at execute()).
Write = Callable[[Any], Awaitable[object]]

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

# KEYS: totp, rc, step
_DELETE_TOTP = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return existed
"""

# KEYS: rc; ARGV: the code hashes
_SET_RECOVERY_CODES = """
redis.call('DEL', KEYS[1])
if #ARGV > 0 then redis.call('SADD', KEYS[1], unpack(ARGV)) end
return 1
"""

# KEYS: fam, used, jti; ARGV: data, current hash, ttl_ms
_CREATE_FAMILY = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'cur', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
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
    replica_acks: int = 1


@dataclass(frozen=True)
class ClusterTarget:
    """A parsed `redis+cluster://` URL: the start-up nodes and the credentials."""

    hosts: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse `redis+sentinel://[[user]:password@]host:port[,host:port]/service_name[/db]` with an
    optional `?replica_acks=N` (0-16, default 1). Error messages never repeat the credentials."""
    parts = urlsplit(url)
    if parts.scheme != "redis+sentinel":
        raise ValueError("not a redis+sentinel:// URL")
    if parts.fragment:
        raise ValueError("redis+sentinel:// URLs take no fragment")
    try:
        params = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError("malformed query in a redis+sentinel:// URL") from None
    if any(name != "replica_acks" for name, _ in params) or len(params) > 1:
        raise ValueError("the only query parameter of redis+sentinel:// is replica_acks, once")
    acks = 1
    for _, value in params:
        if not (value.isascii() and value.isdigit()) or int(value) > _MAX_REPLICA_ACKS:
            raise ValueError(f"replica_acks must be a number from 0 to {_MAX_REPLICA_ACKS}")
        acks = int(value)
    hosts, username, password = _netloc(parts.netloc, _SENTINEL_PORT, "sentinel")
    segments = [s for s in parts.path.split("/") if s]
    if not segments or len(segments) > 2:
        raise ValueError("expected /service_name or /service_name/db after the sentinel hosts")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError("the db after the service name must be a number")
        db = int(segments[1])
    return SentinelTarget(hosts, unquote(segments[0]), db, username, password, acks)


def parse_cluster_url(url: str) -> ClusterTarget:
    """Parse `redis+cluster://[[user]:password@]host:port[,host:port...]/` (default port 6379;
    a cluster has no databases, so the path is empty or `/`). Errors never repeat credentials."""
    parts = urlsplit(url)
    if parts.scheme != "redis+cluster":
        raise ValueError("not a redis+cluster:// URL")
    if parts.query or parts.fragment:
        raise ValueError("redis+cluster:// URLs take no query or fragment")
    if parts.path not in ("", "/"):
        raise ValueError("redis+cluster:// URLs take no path (a cluster has only database 0)")
    hosts, username, password = _netloc(parts.netloc, _REDIS_PORT, "cluster node")
    return ClusterTarget(hosts, username, password)


def _netloc(
    netloc: str, default_port: int, what: str
) -> tuple[tuple[tuple[str, int], ...], str | None, str | None]:
    """`[[user]:password@]host[:port][,host[:port]...]` → hosts, username, password."""
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts = tuple(
        _host_port(entry, default_port, what, i)
        for i, entry in enumerate(hostlist.split(","), start=1)
    )
    return hosts, username, password


def _host_port(entry: str, default_port: int, what: str, index: int) -> tuple[str, int]:
    """One `host[:port]` or `[v6]:port`; errors never repeat the text (a malformed URL may have
    put part of a password here)."""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad {what} address (number {index}): expected host:port")
        port_text = rest[1:]
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        raise ValueError(f"bad {what} address (number {index}): expected host:port")
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad {what} port (address number {index})")
    return host, int(port_text)


class RedisStore:
    """Every store port on one Redis, a Sentinel-managed primary, or a Redis Cluster."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        clock: Clock,
        key_prefix: str = "mfagw:",
        timeout: float = 2.0,
        heartbeat: float = 15.0,
        sentinel: Sentinel | None = None,
        service_name: str | None = None,
        replica_acks: int = 0,
    ) -> None:
        """Wrap a client made with `decode_responses=True` (use `from_url`). With
        `replica_acks > 0` every write waits for that many replica acknowledgements; with
        `sentinel` and `service_name` the store re-asks Sentinel for the primary when a write
        is not acknowledged, and the revocation feed checks it on every heartbeat."""
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("the key prefix must not contain '{' or '}' (hash-tag syntax)")
        if isinstance(client, RedisCluster) and replica_acks:
            raise ValueError("replica_acks is not supported on Redis Cluster")
        if not 0 <= replica_acks <= _MAX_REPLICA_ACKS:
            raise ValueError(f"replica_acks must be from 0 to {_MAX_REPLICA_ACKS}")
        self._r = client
        self._cluster = isinstance(client, RedisCluster)
        self._clock = clock
        self._p = key_prefix
        self._timeout = check_ttl(timeout)
        self._heartbeat = check_ttl(heartbeat)
        self._sentinel = sentinel
        self._service = service_name
        self._acks = replica_acks
        # WAIT must answer before the store time-out cuts the call, so a shortfall is seen.
        self._wait_ms = max(1, int(self._timeout * 500))
        self._channel = f"{key_prefix}rev:feed"
        self._burn_step = client.register_script(_BURN_STEP)
        self._incr_counter = client.register_script(_INCR_COUNTER)
        self._bind_session = client.register_script(_BIND_SESSION)
        self._delete_totp = client.register_script(_DELETE_TOTP)
        self._set_codes = client.register_script(_SET_RECOVERY_CODES)
        self._create_family = client.register_script(_CREATE_FAMILY)
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
        """Build from a `redis://`, `rediss://`, `unix://`, `redis+sentinel://` or
        `redis+cluster://` URL. Does not connect: call `ping()` to probe."""
        timeout = check_ttl(timeout)
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "mfa-gateway",
        }
        common: dict[str, Any] = {
            "clock": clock,
            "key_prefix": key_prefix,
            "timeout": timeout,
            "heartbeat": heartbeat,
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
                sentinel=sentinel,
                service_name=target.service_name,
                replica_acks=target.replica_acks,
                **common,
            )
        if scheme == "redis+cluster":
            cluster = parse_cluster_url(url)
            cluster_client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in cluster.hosts],
                username=cluster.username,
                password=cluster.password,
                **options,
            )
            return cls(cluster_client, **common)
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL scheme: {scheme!r}")
        return cls(aioredis.Redis.from_url(url, **options), **common)

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store writes."""
        return self._p

    @property
    def replica_acks(self) -> int:
        """How many replicas must acknowledge each write (0: none waited for)."""
        return self._acks

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

    async def _write(self, write: Write) -> Any:
        """Run one write command. With `replica_acks`, WAIT follows it on the same connection
        (one pipeline); too few acknowledgements → StoreUnavailable, because the write may be
        lost when a replica takes over (the caller must not rely on it)."""
        if not self._acks:
            return await self._run(write(self._r))

        async def go() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                await write(pipe)
                pipe.execute_command("WAIT", self._acks, self._wait_ms)
                return await pipe.execute()

        result, acked = await self._run(go())
        await self._check_acks(acked)
        return result

    async def _check_acks(self, acked: Any) -> None:
        if isinstance(acked, int) and acked >= self._acks:
            return
        await self._refresh_primary()
        raise StoreUnavailable("redis: a write was not acknowledged by enough replicas")

    async def _refresh_primary(self) -> None:
        """Ask Sentinel for the primary again; if it changed, drop every connection (also those
        in use) so that none keeps talking to the deposed one."""
        pool = getattr(self._r, "connection_pool", None)
        if not isinstance(pool, SentinelConnectionPool):
            return
        before = pool.master_address
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(self._timeout):
                await pool.get_master_address()  # type: ignore[no-untyped-call]
                if pool.master_address != before:
                    await pool.disconnect()

    async def _get_json(self, key: str) -> Json | None:
        raw = await self._run(self._r.get(key))
        return None if raw is None else load_json(raw)

    async def _take_json(self, key: str) -> Json | None:
        raw = await self._write(lambda c: c.getdel(key))
        return None if raw is None else load_json(raw)

    async def _transaction(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Run commands in MULTI/EXEC (all keys must share one hash tag). Not followed by WAIT:
        only for reads (and trimming that may be lost harmlessly)."""

        async def go() -> list[Any]:
            async with self._r.pipeline(transaction=True) as pipe:
                for name, *args in commands:
                    pipe.execute_command(name, *args)
                return await pipe.execute()

        return await self._run(go())

    async def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers within the time-out (and, with
        `replica_acks`, unless enough replicas are connected to acknowledge writes)."""
        if not self._acks:
            await self._run(self._r.ping())
            return

        async def go() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.ping()
                pipe.execute_command("WAIT", self._acks, self._wait_ms)
                return await pipe.execute()

        _, acked = await self._run(go())
        await self._check_acks(acked)

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
        key, raw, px = self._k("tx", txid), dump_json(data), _ms(ttl)
        await self._write(lambda c: c.set(key, raw, px=px))

    async def get_transaction(self, txid: str) -> Json | None:
        return await self._get_json(self._k("tx", txid))

    async def take_transaction(self, txid: str) -> Json | None:
        """GETDEL: read and delete in one step."""
        return await self._take_json(self._k("tx", txid))

    async def bind_upstream_state(self, state: str, txid: str, ttl: float) -> None:
        key, px = self._k("ustate", state), _ms(ttl)
        await self._write(lambda c: c.set(key, txid, px=px))

    async def take_upstream_state(self, state: str) -> str | None:
        """GETDEL: a `state` is accepted at most once (R16)."""
        key = self._k("ustate", state)
        return cast(str | None, await self._write(lambda c: c.getdel(key)))

    # ------------------------------------------------------------------ codes

    async def put_code(self, code_hash: str, data: Mapping[str, Any], ttl: float) -> None:
        key, raw, px = self._k("code", code_hash), dump_json(data), _ms(ttl)
        await self._write(lambda c: c.set(key, raw, px=px))

    async def take_code(self, code_hash: str) -> Json | None:
        """GETDEL: of N concurrent callers exactly one gets the data."""
        return await self._take_json(self._k("code", code_hash))

    async def mark_code_used(self, code_hash: str, family_id: str, ttl: float) -> None:
        key, px = self._k("code", code_hash, ":used"), _ms(ttl)
        await self._write(lambda c: c.set(key, family_id, px=px))

    async def code_used_by(self, code_hash: str) -> str | None:
        key = self._k("code", code_hash, ":used")
        return cast(str | None, await self._run(self._r.get(key)))

    # ------------------------------------------------------------------ clients

    async def put_client(self, client_id: str, data: Mapping[str, Any], ttl: float | None) -> None:
        """Store a client; `ttl=None` keeps it (and clears an earlier expiry)."""
        key, raw = self._k("client", client_id), dump_json(data)
        px = None if ttl is None else _ms(ttl)
        await self._write(lambda c: c.set(key, raw, px=px))

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
        key, index = self._k("totp", record.user), self._k("totp-users", "index")
        await self._write(lambda c: c.set(key, raw))
        await self._write(lambda c: c.sadd(index, record.user))

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
        """Lua: remove seed, recovery codes and burned step atomically; then un-index the user."""
        keys = [self._k("totp", user), self._k("totp", user, ":rc"), self._k("totp", user, ":step")]
        existed = await self._write(lambda c: self._delete_totp(keys=keys, client=c))
        index = self._k("totp-users", "index")
        await self._write(lambda c: c.srem(index, user))
        return int(existed) == 1

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
        """Lua: replace the user's recovery codes atomically."""
        keys, hashes = [self._k("totp", user, ":rc")], list(code_hashes)
        await self._write(lambda c: self._set_codes(keys=keys, args=hashes, client=c))

    async def use_recovery_code(self, user: str, code_hash: str) -> bool:
        """SREM: True exactly once per stored code."""
        key = self._k("totp", user, ":rc")
        removed = await self._write(lambda c: c.srem(key, code_hash))
        return int(removed) == 1

    async def count_recovery_codes(self, user: str) -> int:
        return int(await self._run(self._r.scard(self._k("totp", user, ":rc"))))

    async def burn_step(self, user: str, step: int, ttl: float) -> bool:
        """Lua: record `step` only if it is newer than the last burned one (R34)."""
        keys, args = [self._k("totp", user, ":step")], [int(step), _ms(ttl)]
        result = await self._write(lambda c: self._burn_step(keys=keys, args=args, client=c))
        return int(result) == 1

    # ------------------------------------------------------------------ counters and locks

    async def incr_counter(self, key: str, window: float) -> int:
        """Lua: INCR, and PEXPIRE only on the first hit (the window is never extended)."""
        keys, args = [self._k("ctr", key)], [_ms(window)]
        result = await self._write(lambda c: self._incr_counter(keys=keys, args=args, client=c))
        return int(result)

    async def get_counter(self, key: str) -> int:
        raw = await self._run(self._r.get(self._k("ctr", key)))
        return 0 if raw is None else int(raw)

    async def clear_counter(self, key: str) -> None:
        name = self._k("ctr", key)
        await self._write(lambda c: c.delete(name))

    async def set_lock(self, key: str, ttl: float) -> None:
        name, px = self._k("lock", key), _ms(ttl)
        await self._write(lambda c: c.set(name, "1", px=px))

    async def is_locked(self, key: str) -> bool:
        return bool(await self._run(self._r.exists(self._k("lock", key))))

    # ------------------------------------------------------------------ consent

    def _consent_key(self, subject: str, client_id: str) -> str:
        return self._k("consent", subject, ":" + token_hash(client_id))

    async def put_consent(self, subject: str, client_id: str, ttl: float) -> None:
        key, px = self._consent_key(subject, client_id), _ms(ttl)
        await self._write(lambda c: c.set(key, "1", px=px))

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
        """Lua: start a family whose current refresh token is `token_hash` (replaces any old
        one, with its rotated-out tokens and jtis)."""
        keys = self._family_keys(family_id)
        args: list[EncodableT] = [dump_json(data), token_hash, _ms(ttl)]
        await self._write(lambda c: self._create_family(keys=keys, args=args, client=c))

    async def get_family(self, family_id: str) -> Json | None:
        raw = await self._run(self._r.hget(self._k("fam", family_id), "data"))
        return None if raw is None else load_json(raw)

    async def rotate_refresh(
        self, family_id: str, presented_hash: str, new_hash: str, ttl: float
    ) -> RotateOutcome:
        """Lua: ROTATED if current (the family lives `ttl` more); a rotated-out hash deletes the
        family (REUSED, its jtis kept for `revoke_family`); anything else INVALID."""
        keys = self._family_keys(family_id)
        args: list[EncodableT] = [presented_hash, new_hash, _ms(ttl)]
        result = await self._write(lambda c: self._rotate(keys=keys, args=args, client=c))
        return RotateOutcome(result)

    async def update_family(self, family_id: str, data: Mapping[str, Any]) -> None:
        """Replace a live family's data keeping its TTL; a missing family stays missing."""
        keys, args = [self._k("fam", family_id)], [dump_json(data)]
        await self._write(lambda c: self._update_family(keys=keys, args=args, client=c))

    async def add_family_jti(self, family_id: str, jti: str, exp: float) -> None:
        """Remember an access token of the family; if the family is already gone (revoked or
        expired), the token is revoked at once instead (fail closed)."""
        fam, _, jtis = self._family_keys(family_id)
        keys, args = [fam, jtis], [jti, _num(exp)]
        added = await self._write(lambda c: self._add_jti(keys=keys, args=args, client=c))
        if added != 1:
            await self.revoke_jti(jti, exp)

    async def revoke_family(self, family_id: str) -> list[tuple[str, float]]:
        """Lua: delete the family; return the (jti, exp) pairs it issued (also after a reuse)."""
        keys = self._family_keys(family_id)
        flat = cast(
            list[str], await self._write(lambda c: self._revoke_family(keys=keys, client=c))
        )
        return sorted((flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2))

    # ------------------------------------------------------------------ revocations

    async def revoke_jti(self, jti: str, exp: float) -> None:
        """Lua: deny key with PEXPIREAT exp, snapshot entry, and PUBLISH on the feed."""
        now = self._clock.now()
        message = orjson.dumps([jti, float(exp)])
        keys = [self._k("rev", "all", ":" + jti), self._k("rev", "all")]
        args: list[EncodableT] = [
            math.ceil(exp * 1000),
            _num(exp),
            jti,
            _num(now),
            self._channel,
            message,
        ]
        await self._write(lambda c: self._revoke_jti(keys=keys, args=args, client=c))

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
        Raises StoreUnavailable when the connection breaks, stops answering the heartbeat, or
        (Sentinel) no longer is the primary."""
        pubsub = await self._feed_pubsub()
        loop = asyncio.get_running_loop()
        try:
            await self._run(self._subscribe(pubsub))
            snapshot = await self.revoked_snapshot()
            for item in snapshot.items():
                yield item
            awaiting_pong = False
            checked_at = loop.time()
            while True:
                # After a heartbeat PING the answer is due within the store time-out. Subscribe-
                # type messages are not ignored: with RESP3 redis-py mis-parses the PONG of a
                # subscribed connection into one, and any reply proves the link live.
                wait = self._timeout if awaiting_pong else self._heartbeat
                message = await self._run_unbounded(pubsub.get_message(timeout=wait))
                if loop.time() - checked_at >= self._heartbeat:
                    await self._check_feed_primary(pubsub)
                    checked_at = loop.time()
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
                await pubsub.aclose()

    async def _feed_pubsub(self) -> Any:
        """A pub/sub object for the feed. On a cluster: on the primary that owns `rev:{all}`
        (the node whose revocation script publishes), found after a keyed command so that a
        stale slot map is refreshed first."""
        if not isinstance(self._r, RedisCluster):
            return self._r.pubsub()
        index = self._k("rev", "all")
        await self._run(self._r.exists(index))
        node = self._r.get_node_from_key(index)
        if node is None:
            raise StoreUnavailable("redis: no cluster node owns the revocation index")
        return self._r.pubsub(node=node)

    async def _check_feed_primary(self, pubsub: Any) -> None:
        """With Sentinel: the feed's server must still be the primary; a deposed one no longer
        receives the revocations written on the new primary."""
        if self._sentinel is None or self._service is None:
            return
        primary = await self._run(self._sentinel.discover_master(self._service))
        conn = pubsub.connection
        if conn is None or (conn.host, int(conn.port)) != (primary[0], int(primary[1])):
            raise StoreUnavailable("redis: the primary changed under the revocation feed")

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
        keys = [self._k("sess", session_id)]
        args: list[EncodableT] = [owner, _ms(ttl)]
        result = await self._write(lambda c: self._bind_session(keys=keys, args=args, client=c))
        return cast(str, result)

    async def session_owner(self, session_id: str) -> str | None:
        return cast(str | None, await self._run(self._r.get(self._k("sess", session_id))))

    async def drop_session(self, session_id: str) -> None:
        key = self._k("sess", session_id)
        await self._write(lambda c: c.delete(key))

    # ------------------------------------------------------------------ sealed blobs

    async def put_blob(self, key: str, sealed: str, ttl: float | None) -> None:
        name = self._k("blob", key)
        px = None if ttl is None else _ms(ttl)
        await self._write(lambda c: c.set(name, sealed, px=px))

    async def get_blob(self, key: str) -> str | None:
        return cast(str | None, await self._run(self._r.get(self._k("blob", key))))

    async def delete_blob(self, key: str) -> None:
        name = self._k("blob", key)
        await self._write(lambda c: c.delete(name))


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
