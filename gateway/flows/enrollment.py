"""TOTP enrolment: provisioning a user's seed and recovery codes (R34, DESIGN §2.8, §5).

Used by the CLI (`mfa-gateway totp enroll|list|reset`, enrolment mode `admin`) and by the
step-up flow for enrolment at first login. Seeds come from `secrets` (or an administrator's
base32 secret of at least 128 bits), are sealed with `gateway.crypto.Sealer` under the binding
`totp:<user>` before they reach the store, and are shown exactly once. Recovery codes are
stored only as keyed hashes (HMAC-SHA256 under a subkey derived from the encryption key): a
store dump can neither reveal them nor be used to test guesses offline without that key.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from gateway.core import totp
from gateway.crypto import Sealer, keyed_hash
from gateway.ports import Store, TotpRecord
from gateway.settings import StepUpPolicy

# No 0/o, 1/l/i: codes are read off paper. 31 symbols, 12 of them: about 59 bits per code.
RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
_RECOVERY = re.compile(r"^[a-z0-9]{4}-?[a-z0-9]{4}-?[a-z0-9]{4}$")
_MAX_USER = 255


class EnrollmentError(ValueError):
    """The user name or the secret cannot be enrolled; the message is safe to print."""


@dataclass(frozen=True)
class Enrollment:
    """What an administrator hands to the user, once: the seed and the recovery codes."""

    user: str
    secret: str
    otpauth_uri: str
    recovery_codes: list[str]


def seed_binding(user: str) -> str:
    """The Sealer binding of a user's seed: a sealed seed copied to another user does not open."""
    return f"totp:{user}"


def seal_seed(sealer: Sealer, user: str, seed_b32: str) -> str:
    return sealer.seal(seed_b32.encode("ascii"), seed_binding(user))


def open_seed(sealer: Sealer, record: TotpRecord) -> str:
    """The base32 seed of `record`; raises `gateway.crypto.SealError` if it does not open."""
    return sealer.open(record.sealed_seed, seed_binding(record.user)).decode("ascii")


def recovery_key(sealer: Sealer) -> bytes:
    """The HMAC key of recovery-code hashes, derived from the store encryption key."""
    return sealer.derive_key("recovery-codes")


def normalize_recovery_code(text: str) -> str | None:
    """`ABCD-efgh-2345` / `abcd efgh 2345` → `abcdefgh2345`; None unless recovery-code shaped."""
    compact = "".join(text.split()).lower()
    if not _RECOVERY.match(compact):
        return None
    return compact.replace("-", "")


def hash_recovery_code(sealer: Sealer, code: str) -> str | None:
    """The stored form of a recovery code (None if `code` is not recovery-code shaped)."""
    normalized = normalize_recovery_code(code)
    if normalized is None:
        return None
    return keyed_hash(recovery_key(sealer), normalized)


def new_recovery_codes(count: int) -> list[str]:
    """`count` fresh codes `xxxx-xxxx-xxxx` from the CSPRNG."""
    codes = []
    for _ in range(count):
        raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(12))
        codes.append(f"{raw[:4]}-{raw[4:8]}-{raw[8:]}")
    return codes


def check_user(user: str) -> str:
    """Validate a user name as the upstream identity claim would produce it."""
    if not user or len(user) > _MAX_USER or not user.isprintable() or user != user.strip():
        raise EnrollmentError("the user name must be 1-255 printable characters")
    return user


def otpauth_uri(policy: StepUpPolicy, user: str, seed_b32: str) -> str:
    return totp.provisioning_uri(
        seed_b32,
        account=user,
        issuer=policy.issuer_label,
        digits=policy.digits,
        period=policy.period,
        algorithm=policy.algorithm,
    )


async def store_enrollment(
    store: Store, sealer: Sealer, user: str, seed_b32: str, recovery_codes: list[str], now: float
) -> None:
    """Persist a confirmed enrolment: the sealed seed and the recovery codes' hashes."""
    hashes = [h for c in recovery_codes if (h := hash_recovery_code(sealer, c)) is not None]
    await store.put_totp(
        TotpRecord(user=user, sealed_seed=seal_seed(sealer, user, seed_b32), created_at=now)
    )
    await store.set_recovery_codes(user, hashes)


async def enroll_user(
    store: Store,
    sealer: Sealer,
    policy: StepUpPolicy,
    user: str,
    *,
    secret: str | None,
    now: float,
    replace: bool = False,
) -> Enrollment:
    """Provision `user` with a new (or the given) seed and `policy.recovery_codes` codes.

    Refuses a user who is already enrolled unless `replace` (then the old seed, recovery codes
    and burned steps are removed first). Raises `EnrollmentError` for a bad user or secret.
    """
    check_user(user)
    try:
        seed = totp.normalize_seed(secret) if secret is not None else totp.new_seed()
    except totp.SeedError as exc:
        raise EnrollmentError(str(exc)) from None
    if await store.get_totp(user) is not None:
        if not replace:
            raise EnrollmentError(f"{user!r} is already enrolled; reset it first")
        await store.delete_totp(user)
    codes = new_recovery_codes(policy.recovery_codes)
    await store_enrollment(store, sealer, user, seed, codes, now)
    return Enrollment(
        user=user, secret=seed, otpauth_uri=otpauth_uri(policy, user, seed), recovery_codes=codes
    )


async def reset_user(store: Store, user: str) -> bool:
    """Remove the user's seed, recovery codes and burned steps; True if a seed existed."""
    return await store.delete_totp(user)


async def list_users(store: Store) -> list[str]:
    """Every enrolled user, sorted."""
    return sorted(await store.list_totp_users())


# --------------------------------------------------------------------------- first login


@dataclass(frozen=True)
class PendingEnrollment:
    """A seed (and recovery codes) shown at first login, not yet confirmed by a valid code."""

    seed: str
    recovery_codes: list[str]

    def seal(self, sealer: Sealer, txid: str) -> str:
        """Sealed into the transaction, bound to it (`enroll:<txid>`)."""
        payload = json.dumps({"seed": self.seed, "recovery": self.recovery_codes})
        return sealer.seal(payload.encode("utf-8"), f"enroll:{txid}")

    @classmethod
    def open(cls, sealer: Sealer, txid: str, sealed: str) -> PendingEnrollment:
        """Raises `SealError` or `ValueError` if the value does not open or is malformed."""
        data = json.loads(sealer.open(sealed, f"enroll:{txid}"))
        seed, codes = data.get("seed"), data.get("recovery")
        if not isinstance(seed, str) or not isinstance(codes, list):
            raise ValueError("malformed pending enrolment")
        return cls(seed=totp.normalize_seed(seed), recovery_codes=[str(c) for c in codes])

    @classmethod
    def new(cls, policy: StepUpPolicy) -> PendingEnrollment:
        return cls(seed=totp.new_seed(), recovery_codes=new_recovery_codes(policy.recovery_codes))
