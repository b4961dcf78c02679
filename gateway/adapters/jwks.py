"""Keys of configured trusted issuers (`[[keys.trusted_issuers]]`), fetched from their JWKS.

Only the configured `jwks_uri` is ever fetched: never a URL named by a token (`jku`/`x5u`,
R28). Each fetch has a time-out, a size cap and no redirects. Keys are cached for `cache_ttl`;
an unknown `kid` triggers at most one refresh per `min_refresh_interval`, so forged `kid`s cannot
make the gateway hammer the issuer. Fail closed: when the cache is stale and a refresh fails,
`ensure` raises `UpstreamUnavailable` (503) rather than trusting keys it can no longer confirm.
Every key goes through `gateway.keys.verification_key_from_jwk` (one algorithm per key, the
issuer's allow-list, no private material).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import structlog

from gateway.core.errors import UpstreamUnavailable
from gateway.core.tokens import VerificationKey
from gateway.keys import verification_key_from_jwk
from gateway.settings import TrustedIssuerSettings, is_loopback_host

log = structlog.get_logger(__name__)

MAX_JWKS_BYTES = 256 * 1024


@dataclass
class _IssuerKeys:
    config: TrustedIssuerSettings
    keys: dict[str, VerificationKey] = field(default_factory=dict)
    fetched_at: float | None = None
    last_attempt: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def fresh(self, now: float) -> bool:
        return self.fetched_at is not None and now - self.fetched_at < self.config.cache_ttl


class JwksCache:
    """Verification keys of trusted issuers, by (issuer, kid)."""

    def __init__(
        self,
        issuers: Sequence[TrustedIssuerSettings],
        session: aiohttp.ClientSession,
        *,
        timeout: float = 5.0,
        max_bytes: int = MAX_JWKS_BYTES,
    ) -> None:
        for cfg in issuers:
            parts = urlsplit(cfg.jwks_uri)
            secure = parts.scheme == "https" or (
                parts.scheme == "http" and is_loopback_host(parts.hostname)
            )
            if not secure or not parts.hostname:
                raise ValueError(f"jwks_uri of {cfg.issuer} must be https, got {cfg.jwks_uri!r}")
        self._issuers = {cfg.issuer: _IssuerKeys(cfg) for cfg in issuers}
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_bytes = max_bytes

    def is_trusted(self, issuer: str) -> bool:
        return issuer in self._issuers

    def get(self, issuer: str, kid: str, now: float) -> VerificationKey | None:
        """A cached, fresh key; never fetches."""
        entry = self._issuers.get(issuer)
        if entry is None or not entry.fresh(now):
            return None
        return entry.keys.get(kid)

    async def ensure(self, issuer: str, kid: str, now: float) -> None:
        """Make `get(issuer, kid)` answer from a fresh key set if the issuer publishes `kid`.

        Refreshes when the set is stale or lacks `kid`, at most once per
        `min_refresh_interval`; raises `UpstreamUnavailable` when no fresh set can be had.
        """
        entry = self._issuers.get(issuer)
        if entry is None:
            return
        if entry.fresh(now) and kid in entry.keys:
            return
        async with entry.lock:
            # Another request may have refreshed while this one waited.
            if entry.fresh(now) and kid in entry.keys:
                return
            throttled = (
                entry.last_attempt is not None
                and now - entry.last_attempt < entry.config.min_refresh_interval
            )
            if not throttled:
                entry.last_attempt = now
                try:
                    entry.keys = await self._fetch(entry.config)
                    entry.fetched_at = now
                    log.info("jwks_refreshed", issuer=issuer, keys=len(entry.keys))
                except UpstreamUnavailable as exc:
                    log.warning("upstream_unavailable", issuer=issuer, reason=str(exc))
            if not entry.fresh(now):
                raise UpstreamUnavailable(f"no current keys for trusted issuer {issuer}")

    async def _fetch(self, cfg: TrustedIssuerSettings) -> dict[str, VerificationKey]:
        try:
            async with self._session.get(
                cfg.jwks_uri,
                timeout=self._timeout,
                allow_redirects=False,
                headers={"Accept": "application/json"},
            ) as resp:
                if resp.status != 200:
                    raise UpstreamUnavailable(f"jwks answered {resp.status}")
                if (resp.content_length or 0) > self._max_bytes:
                    raise UpstreamUnavailable("jwks too large")
                body = await resp.content.read(self._max_bytes + 1)
                if len(body) > self._max_bytes:
                    raise UpstreamUnavailable("jwks too large")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"jwks fetch failed: {type(exc).__name__}") from None
        try:
            doc = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            raise UpstreamUnavailable("jwks is not JSON") from None
        raw_keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(raw_keys, list):
            raise UpstreamUnavailable("jwks has no keys array")
        keys: dict[str, VerificationKey] = {}
        ambiguous: set[str] = set()
        for jwk in raw_keys:
            if not isinstance(jwk, dict):
                continue
            key = verification_key_from_jwk(jwk, issuer=cfg.issuer, allowed_algs=cfg.algs)
            if key is None:
                continue
            if key.kid in keys:
                ambiguous.add(key.kid)  # two keys, one kid: use neither
            keys[key.kid] = key
        for kid in ambiguous:
            del keys[kid]
        return keys
