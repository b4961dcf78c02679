"""Pick the store adapter from `[store] url`: the one place that maps a URL scheme to a class.

`memory://` gives the embedded `MemoryStore` (one process); `redis://`, `rediss://`, `unix://`,
`redis+sentinel://` and `redis+cluster://` give a `RedisStore` with the configured key prefix and
time-out. Nothing is connected here: the caller probes with `await store.ping()` before serving.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from gateway.adapters.memory_store import MemoryStore
from gateway.adapters.redis_store import RedisStore
from gateway.clock import Clock
from gateway.ports import Store
from gateway.settings import Settings

_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+sentinel", "redis+cluster"})


def open_store(settings: Settings, clock: Clock) -> Store:
    """The store named by `settings.store.url`; `ValueError` for an unknown scheme."""
    url = settings.store.url
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryStore(clock)
    if scheme in _REDIS_SCHEMES:
        return RedisStore.from_url(
            url,
            clock=clock,
            key_prefix=settings.store.key_prefix,
            timeout=settings.store.timeout,
        )
    raise ValueError(f"unsupported store URL scheme {scheme!r}")
