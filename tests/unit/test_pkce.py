"""PKCE S256 (RFC 7636): the challenge format check and the constant-time verifier check."""

from __future__ import annotations

import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import pkce

# RFC 7636 Appendix B.
RFC_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RFC_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
verifiers = st.text(alphabet=UNRESERVED, min_size=43, max_size=128)


class TestS256:
    def test_rfc7636_appendix_b_vector(self) -> None:
        """S256 of the RFC's verifier is the RFC's challenge (R6)."""
        assert pkce.s256(RFC_VERIFIER) == RFC_CHALLENGE
        assert pkce.verify_s256(RFC_VERIFIER, RFC_CHALLENGE) is True

    def test_wrong_verifier_fails(self) -> None:
        """A verifier that does not hash to the challenge is refused (R18)."""
        assert pkce.verify_s256(RFC_VERIFIER[:-1] + "l", RFC_CHALLENGE) is False

    def test_plain_method_is_not_accepted(self) -> None:
        """`plain` (verifier == challenge) never verifies: only S256 exists (R6)."""
        assert pkce.SUPPORTED_METHODS == ("S256",)
        assert pkce.verify_s256(RFC_CHALLENGE, RFC_CHALLENGE) is False

    def test_malformed_verifier_is_refused_even_if_it_hashes(self) -> None:
        """A verifier shorter than 43 characters fails although its hash matches (RFC 7636 §4.1)."""
        short = "a" * 42
        assert pkce.verify_s256(short, pkce.s256(short)) is False

    def test_verifier_with_bad_characters_is_refused(self) -> None:
        """Characters outside the unreserved set are refused before hashing."""
        bad = "a" * 42 + "!"
        assert pkce.verify_s256(bad, pkce.s256(bad)) is False

    def test_comparison_is_constant_time(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The final comparison goes through `hmac.compare_digest` (no early exit)."""
        calls: list[tuple[bytes, bytes]] = []
        real = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return real(a, b)

        monkeypatch.setattr(hmac, "compare_digest", spy)
        assert pkce.verify_s256(RFC_VERIFIER, RFC_CHALLENGE) is True
        assert calls == [(RFC_CHALLENGE.encode(), RFC_CHALLENGE.encode())]

    @given(verifiers)
    def test_any_valid_verifier_round_trips(self, verifier: str) -> None:
        """Every well-formed verifier verifies against its own S256 challenge."""
        assert pkce.verify_s256(verifier, pkce.s256(verifier)) is True

    @given(verifiers, verifiers)
    def test_distinct_verifiers_do_not_cross(self, a: str, b: str) -> None:
        """A challenge accepts no other verifier."""
        if a != b:
            assert pkce.verify_s256(b, pkce.s256(a)) is False


class TestChallengeFormat:
    @pytest.mark.parametrize(
        ("challenge", "valid"),
        [
            ("a" * 42, False),
            ("a" * 43, True),
            ("a" * 128, True),
            ("a" * 129, False),
            (RFC_CHALLENGE, True),
            ("a" * 42 + "=", False),
            ("a" * 42 + "+", False),
            ("a" * 42 + "/", False),
            ("a" * 42 + " ", False),
            ("a" * 42 + "é", False),
            ("", False),
        ],
    )
    def test_43_to_128_unreserved_characters(self, challenge: str, valid: bool) -> None:
        """A challenge is 43-128 characters of [A-Za-z0-9-._~] (RFC 7636 §4.2)."""
        assert pkce.is_valid_challenge(challenge) is valid
