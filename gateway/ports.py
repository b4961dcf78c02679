"""Small typed ports (protocols) between the flows and the state store.

Two adapters implement every port: `adapters.memory_store.MemoryStore` (embedded, one process)
and `adapters.redis_store.RedisStore` (shared by all processes and replicas). Both pass the same
contract suite in `tests/stores/`. Every one-time operation is atomic. TTLs are seconds (floats
allowed; adapters round up to milliseconds). Payloads are JSON-able dicts; secrets inside them are
already sealed by `gateway.crypto` before they reach a store. Any adapter failure raises
`gateway.core.errors.StoreUnavailable` so that callers fail closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

Json = dict[str, Any]


class TransactionStore(Protocol):
    """Authorization transactions (DESIGN §2.6): random id → state, ~10 min TTL."""

    async def put_transaction(self, txid: str, data: Mapping[str, Any], ttl: float) -> None: ...

    async def get_transaction(self, txid: str) -> Json | None: ...

    async def take_transaction(self, txid: str) -> Json | None:
        """Atomically read and delete (single use)."""
        ...

    async def bind_upstream_state(self, state: str, txid: str, ttl: float) -> None:
        """Remember which transaction an upstream `state` belongs to."""
        ...

    async def take_upstream_state(self, state: str) -> str | None:
        """Atomically read and delete: a `state` is accepted at most once (R16)."""
        ...


class CodeStore(Protocol):
    """The gateway's authorization codes, stored under a hash of the code (DESIGN §2.9/§2.10)."""

    async def put_code(self, code_hash: str, data: Mapping[str, Any], ttl: float) -> None: ...

    async def take_code(self, code_hash: str) -> Json | None:
        """Atomically read and delete: of N concurrent callers exactly one gets the data."""
        ...

    async def mark_code_used(self, code_hash: str, family_id: str, ttl: float) -> None:
        """Remember that a redeemed code produced `family_id`, to revoke it on replay."""
        ...

    async def code_used_by(self, code_hash: str) -> str | None: ...


class ClientStore(Protocol):
    """Dynamically registered clients and cached client-ID metadata documents."""

    async def put_client(
        self, client_id: str, data: Mapping[str, Any], ttl: float | None
    ) -> None: ...

    async def get_client(self, client_id: str) -> Json | None: ...


@dataclass(frozen=True)
class TotpRecord:
    """A user's TOTP enrolment; `sealed_seed` is AES-GCM ciphertext from `gateway.crypto`."""

    user: str
    sealed_seed: str
    created_at: float
    confirmed: bool = True


class TotpStore(Protocol):
    """TOTP seeds and recovery codes (only their hashes)."""

    async def put_totp(self, record: TotpRecord) -> None: ...

    async def get_totp(self, user: str) -> TotpRecord | None: ...

    async def delete_totp(self, user: str) -> bool:
        """Remove the seed, recovery codes and burned steps; True if a seed existed."""
        ...

    async def list_totp_users(self) -> list[str]: ...

    async def set_recovery_codes(self, user: str, code_hashes: list[str]) -> None:
        """Replace the user's recovery codes (hashes only)."""
        ...

    async def use_recovery_code(self, user: str, code_hash: str) -> bool:
        """Atomically remove one recovery code; True exactly once per code."""
        ...

    async def count_recovery_codes(self, user: str) -> int: ...


class StepReplayGuard(Protocol):
    """Burned TOTP time steps (R34): accepted steps strictly increase per user."""

    async def burn_step(self, user: str, step: int, ttl: float) -> bool:
        """Atomically: if `step` > the last burned step, record it and return True; else False."""
        ...


class AttemptCounter(Protocol):
    """Sliding failure counters, lockouts and rate limits (atomic across replicas)."""

    async def incr_counter(self, key: str, window: float) -> int:
        """Increment and return; the counter expires `window` seconds after its first hit."""
        ...

    async def get_counter(self, key: str) -> int: ...

    async def clear_counter(self, key: str) -> None: ...

    async def set_lock(self, key: str, ttl: float) -> None: ...

    async def is_locked(self, key: str) -> bool: ...


class ConsentStore(Protocol):
    """Server-side record of a subject's approval of a client (besides the signed cookie)."""

    async def put_consent(self, subject: str, client_id: str, ttl: float) -> None: ...

    async def has_consent(self, subject: str, client_id: str) -> bool: ...


class RotateOutcome(Enum):
    ROTATED = "rotated"
    REUSED = "reused"  # a rotated-out token came back: the family is now revoked
    INVALID = "invalid"  # unknown/expired/revoked family or a token never issued


class RefreshStore(Protocol):
    """Refresh-token families (DESIGN §2.11): rotation with reuse detection."""

    async def create_family(
        self, family_id: str, token_hash: str, data: Mapping[str, Any], ttl: float
    ) -> None: ...

    async def get_family(self, family_id: str) -> Json | None:
        """The family's data, or None if unknown, expired or revoked."""
        ...

    async def rotate_refresh(
        self, family_id: str, presented_hash: str, new_hash: str, ttl: float
    ) -> RotateOutcome:
        """Atomically: if `presented_hash` is current, make `new_hash` current (ROTATED);
        if it was current before, revoke the family (REUSED); otherwise INVALID."""
        ...

    async def update_family(self, family_id: str, data: Mapping[str, Any]) -> None:
        """Replace the family's data (e.g. refreshed upstream tokens), keeping its TTL."""
        ...

    async def add_family_jti(self, family_id: str, jti: str, exp: float) -> None:
        """Remember an access token issued from this family, for revocation."""
        ...

    async def revoke_family(self, family_id: str) -> list[tuple[str, float]]:
        """Delete the family; return the (jti, exp) pairs of access tokens it issued."""
        ...


class RevocationStore(Protocol):
    """Revoked access-token ids (`jti` deny-list) with change notification."""

    async def revoke_jti(self, jti: str, exp: float) -> None:
        """Deny `jti` until `exp` (epoch seconds) and notify watchers."""
        ...

    async def is_revoked(self, jti: str) -> bool: ...

    async def revoked_snapshot(self) -> dict[str, float]:
        """Every currently revoked jti with its expiry."""
        ...

    def watch_revocations(self) -> AsyncIterator[tuple[str, float]]:
        """Once subscribed, yield every currently revoked (jti, exp) (the snapshot, so nothing
        falls between snapshot and subscription), then (jti, exp) as revocations happen
        anywhere; raises StoreUnavailable when the feed breaks so the caller can fail closed
        and resubscribe."""
        ...


class SessionStore(Protocol):
    """MCP `Mcp-Session-Id` bound to the subject that created it (R32)."""

    async def bind_session(self, session_id: str, owner: str, ttl: float) -> str:
        """Atomically bind if unbound (SET NX); return the owner now bound (maybe another)."""
        ...

    async def session_owner(self, session_id: str) -> str | None: ...

    async def drop_session(self, session_id: str) -> None: ...


class SecretBlobStore(Protocol):
    """Sealed upstream tokens and other encrypted blobs, by key."""

    async def put_blob(self, key: str, sealed: str, ttl: float | None) -> None: ...

    async def get_blob(self, key: str) -> str | None: ...

    async def delete_blob(self, key: str) -> None: ...


class Store(
    TransactionStore,
    CodeStore,
    ClientStore,
    TotpStore,
    StepReplayGuard,
    AttemptCounter,
    ConsentStore,
    RefreshStore,
    RevocationStore,
    SessionStore,
    SecretBlobStore,
    Protocol,
):
    """Everything the gateway keeps; one adapter object implements all ports."""

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store does not answer."""
        ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- upstream provider


@dataclass(frozen=True)
class UpstreamTokens:
    """Tokens the upstream provider issued to the gateway (sealed before they reach a store)."""

    access_token: str
    refresh_token: str | None = None
    expires_at: float | None = None  # epoch seconds; None when the provider did not say
    token_type: str = "Bearer"  # noqa: S105 - a token type name, not a secret
    scope: str | None = None

    def to_json(self) -> Json:
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_at": self.expires_at,
            "token_type": self.token_type,
            "scope": self.scope,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UpstreamTokens:
        """Raise ValueError unless `data` has the shape `to_json` writes."""
        access = data.get("access_token")
        refresh = data.get("refresh_token")
        expires = data.get("expires_at")
        ttype = data.get("token_type", "Bearer")
        scope = data.get("scope")
        if not isinstance(access, str) or not access:
            raise ValueError("access_token missing")
        if refresh is not None and not isinstance(refresh, str):
            raise ValueError("refresh_token is not a string")
        if expires is not None and (
            isinstance(expires, bool) or not isinstance(expires, int | float)
        ):
            raise ValueError("expires_at is not a number")
        if not isinstance(ttype, str) or (scope is not None and not isinstance(scope, str)):
            raise ValueError("token_type/scope are not strings")
        return cls(
            access_token=access,
            refresh_token=refresh,
            expires_at=None if expires is None else float(expires),
            token_type=ttype,
            scope=scope,
        )


@dataclass(frozen=True)
class UpstreamIdentity:
    """Who logged in upstream: the verified subject and first-factor facts."""

    subject: str
    amr: tuple[str, ...]  # never contains "mfa"/"otp": only the gateway's step-up adds those
    auth_time: float


class UpstreamIdP(Protocol):
    """The legacy provider, seen by the flows (`adapters.upstream_oidc.UpstreamClient`).

    Every method raises `core.errors.UpstreamUnavailable` (down, time-out, garbage) or its
    subclass `UpstreamRejected` (an OAuth error answer, or an ID token that failed checks).
    """

    async def authorization_url(
        self, *, redirect_uri: str, state: str, nonce: str, code_challenge: str
    ) -> str: ...

    async def accepts_response_issuer(self, iss: str | None) -> bool:
        """RFC 9207 mix-up defence: is this `iss` of an authorization response acceptable?"""
        ...

    async def login(
        self, code: str, *, redirect_uri: str, code_verifier: str, nonce: str
    ) -> tuple[UpstreamIdentity, UpstreamTokens]:
        """Exchange the code and establish the identity (ID token or userinfo)."""
        ...

    async def refresh(self, refresh_token: str) -> UpstreamTokens: ...
