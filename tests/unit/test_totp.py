"""`gateway.core.totp`: RFC 6238 verification returning the matched step (R34)."""

from __future__ import annotations

import base64
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import totp

SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = 1_800_000_000.0  # a step boundary for period 30

seeds = st.binary(min_size=16, max_size=40).map(lambda b: base64.b32encode(b).decode().rstrip("="))


def rfc6238(seed: str, step: int, digits: int, digest: str) -> str:
    """Reference implementation (RFC 4226 §5.3) to check pyotp's use against."""
    key = base64.b32decode(seed + "=" * (-len(seed) % 8))
    mac = hmac.new(key, struct.pack(">Q", step), digest).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def test_rfc6238_test_vectors() -> None:
    """RFC 6238 Appendix B vectors (SHA1, 8 digits, T = 59 s and 1111111109 s)."""
    seed = base64.b32encode(b"12345678901234567890").decode()
    assert totp.verify(seed, "94287082", 59, digits=8, period=30, window=0, algorithm="SHA1") == 1
    assert (
        totp.verify(seed, "07081804", 1111111109, digits=8, period=30, window=0, algorithm="SHA1")
        == 37037036
    )


@pytest.mark.parametrize("algorithm", ["SHA1", "SHA256", "SHA512"])
@pytest.mark.parametrize("digits", [6, 7, 8])
def test_current_code_returns_its_step(algorithm: totp.Algorithm, digits: int) -> None:
    """The code of the current step verifies and names that step, for every digits/hash."""
    step = int(NOW // 30)
    code = rfc6238(SEED, step, digits, algorithm.lower())
    assert totp.code_at_step(SEED, step, digits=digits, algorithm=algorithm) == code
    assert (
        totp.verify(SEED, code, NOW + 29, digits=digits, period=30, window=0, algorithm=algorithm)
        == step
    )


def test_window_bounds() -> None:
    """±window steps are accepted, one more is not (RFC 6238 §5.2, §6)."""
    step = int(NOW // 30)
    for offset, expected in ((-2, None), (-1, step - 1), (1, step + 1), (2, None)):
        code = totp.code_at_step(SEED, step + offset)
        assert (
            totp.verify(SEED, code, NOW, digits=6, period=30, window=1, algorithm="SHA1")
            == expected
        )
    assert (
        totp.verify(
            SEED,
            totp.code_at_step(SEED, step - 1),
            NOW,
            digits=6,
            period=30,
            window=0,
            algorithm="SHA1",
        )
        is None
    )


def test_period_is_honoured() -> None:
    """A 60 s period maps `now` to step now // 60."""
    step = int(NOW // 60)
    code = totp.code_at_step(SEED, step)
    assert (
        totp.verify(SEED, code, NOW + 59, digits=6, period=60, window=0, algorithm="SHA1") == step
    )


@pytest.mark.parametrize(
    "code", ["", "12345", "1234567", "12345a", "١٢٣٤٥٦", " 123456", "123456\n"]
)
def test_malformed_codes_never_verify(code: str) -> None:
    """Only exactly `digits` ASCII digits are considered (no unicode digits, no spaces)."""
    assert totp.verify(SEED, code, NOW, digits=6, period=30, window=2, algorithm="SHA1") is None


@settings(max_examples=200, deadline=None)
@given(
    seed=seeds,
    now=st.floats(min_value=1e6, max_value=4e9),
    offset=st.integers(-4, 4),
    window=st.integers(0, 2),
)
def test_verify_names_the_step_of_the_code(seed: str, now: float, offset: int, window: int) -> None:
    """Property: the returned step's code is the submitted code; inside the window the
    result is the code's own step or a later step with the same code (never an earlier one,
    so burning it also burns the code's step); outside, None unless such a collision."""
    step = int(now // 30) + offset
    code = totp.code_at_step(seed, step)
    got = totp.verify(seed, code, now, digits=6, period=30, window=window, algorithm="SHA1")
    if got is not None:
        assert totp.code_at_step(seed, got) == code
        assert abs(got - int(now // 30)) <= window
    if abs(offset) <= window:
        assert got is not None
        assert got >= step


def test_normalize_seed() -> None:
    """Admin-supplied seeds: base32 of at least 128 bits; spaces/case/padding tolerated."""
    assert totp.normalize_seed("jbsw y3dp ehpk 3pxp jbsw y3dp ehpk 3pxp") == SEED
    assert totp.normalize_seed(SEED + "====") == SEED
    for bad in ("", "JBSWY3DPEHPK3PXP", "JBSWY3DPEHPK3PX0JBSWY3DPEHPK3PXP", "ÄBC"):
        with pytest.raises(totp.SeedError):
            totp.normalize_seed(bad)


def test_new_seed_is_160_random_bits() -> None:
    """CSPRNG seeds (R34), 160 bits, base32 without padding, all different."""
    seeds_seen = {totp.new_seed() for _ in range(50)}
    assert len(seeds_seen) == 50
    for s in seeds_seen:
        assert len(s) == 32
        assert totp.normalize_seed(s) == s


def test_provisioning_uri() -> None:
    """The otpauth URI names issuer and account and carries the policy's parameters."""
    uri = totp.provisioning_uri(
        SEED, account="alice@example.com", issuer="My GW", digits=6, period=30, algorithm="SHA1"
    )
    assert uri == (
        "otpauth://totp/My%20GW%3Aalice%40example.com?secret="
        + SEED
        + "&issuer=My%20GW&algorithm=SHA1&digits=6&period=30"
    )
