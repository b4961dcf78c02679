"""`gateway.crypto`: sealing secrets at rest (DESIGN §7.10) and hashing one-time values."""

from __future__ import annotations

import base64
import secrets

import pytest

from gateway.crypto import (
    Sealer,
    SealError,
    generate_encryption_key,
    keyed_hash,
    new_token,
    token_hash,
)

KEY = bytes(range(32))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def flip_first_char(part: str) -> str:
    """Change the first character: unlike the last one of unpadded base64url, it always
    carries data bits, so the decoded bytes really change."""
    return ("A" if part[0] != "A" else "B") + part[1:]


class TestSealer:
    @pytest.mark.parametrize("plaintext", [b"", b"JBSWY3DPEHPK3PXP", bytes(range(256)) * 4])
    def test_round_trip(self, plaintext: bytes) -> None:
        """What is sealed under a key and binding opens under the same (DESIGN §7.10)."""
        sealer = Sealer(KEY)
        assert sealer.open(sealer.seal(plaintext, "totp:alice"), "totp:alice") == plaintext

    def test_output_hides_plaintext(self) -> None:
        """The sealed form carries neither the plaintext nor its base64 (secrets at rest)."""
        seed = b"JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
        sealed = Sealer(KEY).seal(seed, "totp:alice")
        assert seed.decode() not in sealed
        assert b64url(seed) not in sealed
        assert sealed.startswith("v1.")

    def test_wrong_key_fails(self) -> None:
        """A value sealed under one key does not open under another."""
        sealed = Sealer(KEY).seal(b"secret", "totp:alice")
        with pytest.raises(SealError):
            Sealer(secrets.token_bytes(32)).open(sealed, "totp:alice")

    def test_wrong_binding_fails(self) -> None:
        """A blob copied to another user's or purpose's slot does not open there."""
        sealer = Sealer(KEY)
        sealed = sealer.seal(b"secret", "totp:alice")
        for binding in ("totp:bob", "upstream:alice", "totp:alice ", ""):
            with pytest.raises(SealError):
                sealer.open(sealed, binding)

    @pytest.mark.parametrize("part", [1, 2])
    def test_tampered_fails(self, part: int) -> None:
        """Changing the nonce or the ciphertext (incl. tag) is detected."""
        sealer = Sealer(KEY)
        pieces = sealer.seal(b"secret", "b").split(".")
        pieces[part] = flip_first_char(pieces[part])
        with pytest.raises(SealError):
            sealer.open(".".join(pieces), "b")

    @pytest.mark.parametrize(
        "sealed",
        [
            "",
            "garbage",
            "v1.abc",
            "v1.a.b.c",
            "v2.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
            "v1.é.é",
        ],
    )
    def test_malformed_fails(self, sealed: str) -> None:
        """Malformed or foreign-version input raises SealError, nothing else."""
        with pytest.raises(SealError):
            Sealer(KEY).open(sealed, "b")

    def test_truncated_fails(self) -> None:
        """A ciphertext cut short (tag missing) does not open."""
        sealer = Sealer(KEY)
        sealed = sealer.seal(b"secret", "b")
        with pytest.raises(SealError):
            sealer.open(sealed[:-4], "b")

    def test_nonces_differ(self) -> None:
        """Sealing the same value twice gives different nonces and ciphertexts."""
        sealer = Sealer(KEY)
        outputs = {sealer.seal(b"same", "b") for _ in range(50)}
        assert len(outputs) == 50
        assert len({o.split(".")[1] for o in outputs}) == 50

    @pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
    def test_key_must_be_32_bytes(self, size: int) -> None:
        """Only an AES-256 key is accepted."""
        with pytest.raises(ValueError, match="32 bytes"):
            Sealer(bytes(size))

    def test_derived_keys(self) -> None:
        """Subkeys are 32 bytes, stable, distinct per purpose and per master key, and not the
        master key itself."""
        sealer = Sealer(KEY)
        recovery = sealer.derive_key("recovery-codes")
        assert len(recovery) == 32
        assert recovery == Sealer(KEY).derive_key("recovery-codes")
        assert recovery != sealer.derive_key("other")
        assert recovery != Sealer(secrets.token_bytes(32)).derive_key("recovery-codes")
        assert recovery != KEY


class TestHashes:
    def test_token_hash_known_value(self) -> None:
        """token_hash is base64url SHA-256 without padding (stable across processes)."""
        assert token_hash("abc") == "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
        assert token_hash("abc") == token_hash("abc")
        assert token_hash("abd") != token_hash("abc")

    def test_keyed_hash_known_value(self) -> None:
        """keyed_hash is HMAC-SHA256 (RFC 4231 test case 2), base64url."""
        expected = bytes.fromhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        assert keyed_hash(b"Jefe", "what do ya want for nothing?") == b64url(expected)

    def test_keyed_hash_depends_on_key(self) -> None:
        """Without the key a recovery code's hash cannot be recomputed."""
        assert keyed_hash(b"k1" * 16, "4821-9930") != keyed_hash(b"k2" * 16, "4821-9930")
        assert keyed_hash(b"k1" * 16, "4821-9930") != token_hash("4821-9930")


class TestRandomValues:
    def test_new_token_entropy(self) -> None:
        """Default tokens carry 256 bits (≥128 required for codes, R10) and never repeat."""
        tokens = {new_token() for _ in range(200)}
        assert len(tokens) == 200
        for token in tokens:
            assert len(token) == 43
            assert len(base64.urlsafe_b64decode(token + "=")) == 32

    def test_generate_encryption_key(self) -> None:
        """A generated [store] encryption_key decodes to 32 random bytes that Sealer accepts."""
        keys = {generate_encryption_key() for _ in range(20)}
        assert len(keys) == 20
        for key in keys:
            raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
            assert len(raw) == 32
            Sealer(raw)
