"""Enrolment functions used by the CLI (`totp enroll|list|reset`), on both stores (R34)."""

from __future__ import annotations

import base64
from urllib.parse import parse_qsl, urlsplit

import pytest

from gateway.crypto import Sealer, generate_encryption_key
from gateway.flows.enrollment import (
    EnrollmentError,
    enroll_user,
    hash_recovery_code,
    list_users,
    open_seed,
    reset_user,
)
from gateway.ports import Store
from gateway.settings import StepUpPolicy

NOW = 1_800_000_000.0


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(base64.urlsafe_b64decode(generate_encryption_key() + "="))


async def test_enroll_generates_a_csprng_seed_stored_sealed(store: Store, sealer: Sealer) -> None:
    """R34/invariant 10: a 160-bit seed from the CSPRNG, stored only sealed (binding
    `totp:<user>`), with an otpauth URI of the policy's parameters."""
    policy = StepUpPolicy(digits=8, period=60, algorithm="SHA256", issuer_label="ACME GW")
    enrolled = await enroll_user(store, sealer, policy, "alice", secret=None, now=NOW)
    assert len(base64.b32decode(enrolled.secret + "=" * (-len(enrolled.secret) % 8))) == 20
    record = await store.get_totp("alice")
    assert record is not None
    assert record.created_at == NOW
    assert record.confirmed
    assert enrolled.secret not in record.sealed_seed
    assert open_seed(sealer, record) == enrolled.secret
    uri = urlsplit(enrolled.otpauth_uri)
    assert (uri.scheme, uri.netloc, uri.path) == ("otpauth", "totp", "/ACME%20GW%3Aalice")
    assert dict(parse_qsl(uri.query)) == {
        "secret": enrolled.secret,
        "issuer": "ACME GW",
        "algorithm": "SHA256",
        "digits": "8",
        "period": "60",
    }
    other = await enroll_user(store, sealer, policy, "bob", secret=None, now=NOW)
    assert other.secret != enrolled.secret


async def test_recovery_codes_are_stored_only_as_keyed_hashes(store: Store, sealer: Sealer) -> None:
    """Recovery codes: `policy.recovery_codes` of them, xxxx-xxxx-xxxx, distinct, stored as
    HMACs that a store without the key cannot verify; each usable once."""
    enrolled = await enroll_user(
        store, sealer, StepUpPolicy(recovery_codes=4), "alice", secret=None, now=NOW
    )
    assert len(enrolled.recovery_codes) == len(set(enrolled.recovery_codes)) == 4
    assert all(len(c) == 14 and c[4] == c[9] == "-" for c in enrolled.recovery_codes)
    assert await store.count_recovery_codes("alice") == 4
    code = enrolled.recovery_codes[0]
    other_key = Sealer(base64.urlsafe_b64decode(generate_encryption_key() + "="))
    assert not await store.use_recovery_code("alice", hash_recovery_code(other_key, code) or "")
    assert await store.use_recovery_code("alice", hash_recovery_code(sealer, code) or "")
    assert not await store.use_recovery_code("alice", hash_recovery_code(sealer, code) or "")


async def test_given_secret_is_validated(store: Store, sealer: Sealer) -> None:
    """`--secret`: base32 (spaces and lower case tolerated) of at least 128 bits."""
    policy = StepUpPolicy()
    good = "jbsw y3dp ehpk 3pxp jbsw y3dp ehpk 3pxp"
    enrolled = await enroll_user(store, sealer, policy, "alice", secret=good, now=NOW)
    assert enrolled.secret == "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    for bad in ("JBSWY3DPEHPK3PXP", "not base32!", "", "JBSWY3DPEHPK3PX1JBSWY3DPEHPK3PXP"):
        with pytest.raises(EnrollmentError):
            await enroll_user(store, sealer, policy, "bob", secret=bad, now=NOW)
    assert await store.get_totp("bob") is None


async def test_reenrolment_needs_replace(store: Store, sealer: Sealer) -> None:
    """R34 (ASVS 7.5.1): an enrolled user is not silently re-seeded; `replace=True` does."""
    policy = StepUpPolicy()
    first = await enroll_user(store, sealer, policy, "alice", secret=None, now=NOW)
    with pytest.raises(EnrollmentError, match="already enrolled"):
        await enroll_user(store, sealer, policy, "alice", secret=None, now=NOW)
    second = await enroll_user(store, sealer, policy, "alice", secret=None, now=NOW, replace=True)
    record = await store.get_totp("alice")
    assert record is not None
    assert open_seed(sealer, record) == second.secret != first.secret


async def test_reset_and_list(store: Store, sealer: Sealer) -> None:
    """`reset_user` removes seed and recovery codes (True once); `list_users` is sorted."""
    policy = StepUpPolicy()
    for user in ("carol", "alice", "bob"):
        await enroll_user(store, sealer, policy, user, secret=None, now=NOW)
    assert await list_users(store) == ["alice", "bob", "carol"]
    assert await reset_user(store, "bob") is True
    assert await reset_user(store, "bob") is False
    assert await store.get_totp("bob") is None
    assert await store.count_recovery_codes("bob") == 0
    assert await list_users(store) == ["alice", "carol"]


@pytest.mark.parametrize("user", ["", " alice", "a\nb", "x" * 256])
async def test_bad_user_names_are_refused(store: Store, sealer: Sealer, user: str) -> None:
    """User names are what the identity claim yields: printable, trimmed, 1-255 chars."""
    with pytest.raises(EnrollmentError):
        await enroll_user(store, sealer, StepUpPolicy(), user, secret=None, now=NOW)
