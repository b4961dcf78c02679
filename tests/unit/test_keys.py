"""KeyRing: signing keys from PEM files, one algorithm per key, a public-only JWKS (R28)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.core.tokens import SigningKey
from gateway.keys import (
    KeyRing,
    generate_private_key_pem,
    load_private_key_pem,
    verification_key_from_jwk,
)
from gateway.settings import ConfigError, load_settings
from tests.fixtures.config import make_config

ISSUER = "https://gw.example"


def _ring(*algs: str) -> KeyRing:
    keys = [
        SigningKey(
            kid=f"k{i}",
            alg=alg,
            private_key=load_private_key_pem(generate_private_key_pem(alg), alg),
        )
        for i, alg in enumerate(algs)
    ]
    return KeyRing(ISSUER, keys, keys[0].kid)


class TestGenerateAndLoad:
    def test_es256_round_trip(self) -> None:
        """An ES256 key is a P-256 key in PKCS#8 PEM and loads back as ES256."""
        pem = generate_private_key_pem("ES256")
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
        key = load_private_key_pem(pem, "ES256")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)

    def test_eddsa_round_trip(self) -> None:
        """An EdDSA key is Ed25519."""
        key = load_private_key_pem(generate_private_key_pem("EdDSA"), "EdDSA")
        assert isinstance(key, ed25519.Ed25519PrivateKey)

    @pytest.mark.parametrize("alg", ["HS256", "none", "RS256", "ES384"])
    def test_other_algorithms_refused(self, alg: str) -> None:
        """Only ES256 and EdDSA keys are generated or loaded for signing (R28)."""
        with pytest.raises(ValueError, match="unsupported signing algorithm"):
            generate_private_key_pem(alg)
        with pytest.raises(ValueError, match="unsupported signing algorithm"):
            load_private_key_pem(generate_private_key_pem("ES256"), alg)

    def test_key_type_must_fit_alg(self) -> None:
        """An Ed25519 key configured as ES256 is refused: one algorithm per key (R28)."""
        with pytest.raises(ValueError, match="not a ES256 key"):
            load_private_key_pem(generate_private_key_pem("EdDSA"), "ES256")

    def test_wrong_curve_refused(self) -> None:
        """A P-384 key is not an ES256 key."""
        pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with pytest.raises(ValueError, match="P-256"):
            load_private_key_pem(pem, "ES256")

    def test_garbage_refused(self) -> None:
        """Bytes that are not a PEM private key are refused with a ValueError."""
        with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
            load_private_key_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n", "ES256")


class TestKeyRing:
    def test_jwks_is_public_only(self) -> None:
        """The JWKS lists every key with kid, alg and use, and never private members (R28)."""
        ring = _ring("ES256", "EdDSA")
        jwks = ring.jwks()
        assert [k["kid"] for k in jwks["keys"]] == ["k0", "k1"]
        es, ed = jwks["keys"]
        assert es["kty"] == "EC"
        assert es["crv"] == "P-256"
        assert es["alg"] == "ES256"
        assert ed["kty"] == "OKP"
        assert ed["crv"] == "Ed25519"
        assert ed["alg"] == "EdDSA"
        for jwk in jwks["keys"]:
            assert jwk["use"] == "sig"
            assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & jwk.keys()

    def test_jwks_returns_a_copy(self) -> None:
        """Mutating a returned JWKS does not change the ring's."""
        ring = _ring("ES256")
        ring.jwks()["keys"][0]["kid"] = "evil"
        assert ring.jwks()["keys"][0]["kid"] == "k0"

    def test_active_and_verification_keys(self) -> None:
        """`active` signs; every kid verifies, bound to the gateway's issuer; unknown is None."""
        ring = _ring("ES256", "EdDSA")
        assert ring.active.kid == "k0"
        vk = ring.verification_key("k1")
        assert vk is not None
        assert (vk.kid, vk.alg, vk.issuer) == ("k1", "EdDSA", ISSUER)
        assert ring.verification_key("k9") is None

    def test_alg_mismatch_refused(self) -> None:
        """A SigningKey whose key does not fit its alg cannot enter a ring."""
        private = load_private_key_pem(generate_private_key_pem("EdDSA"), "EdDSA")
        with pytest.raises(ValueError, match="not a ES256 key"):
            KeyRing(ISSUER, [SigningKey("k", "ES256", private)], "k")

    def test_unknown_active_kid_refused(self) -> None:
        """The active kid must be one of the keys."""
        private = load_private_key_pem(generate_private_key_pem("ES256"), "ES256")
        with pytest.raises(ValueError, match="active kid"):
            KeyRing(ISSUER, [SigningKey("k", "ES256", private)], "other")


class TestFromSettings:
    def test_loads_configured_keys(self, tmp_path: Path) -> None:
        """Every `[[keys.signing]]` file is loaded; `active_kid` picks the signing key."""
        (tmp_path / "keys").mkdir()
        (tmp_path / "keys" / "ed.pem").write_bytes(generate_private_key_pem("EdDSA"))
        path = make_config(
            tmp_path,
            keys={
                "signing": [
                    {"kid": "es256-1", "file": "keys/es256-1.pem", "alg": "ES256"},
                    {"kid": "ed-1", "file": "keys/ed.pem", "alg": "EdDSA"},
                ],
                "active_kid": "ed-1",
            },
        )
        ring = KeyRing.from_settings(load_settings(path))
        assert ring.active.kid == "ed-1"
        assert ring.active.alg == "EdDSA"
        assert ring.issuer == "http://127.0.0.1:8080"
        assert sorted(k["kid"] for k in ring.jwks()["keys"]) == ["ed-1", "es256-1"]

    def test_wrong_key_type_is_a_config_error(self, tmp_path: Path) -> None:
        """A file holding another key type than its `alg` names the key in a ConfigError."""
        (tmp_path / "keys").mkdir()
        (tmp_path / "keys" / "ed.pem").write_bytes(generate_private_key_pem("EdDSA"))
        path = make_config(
            tmp_path,
            keys={"signing": [{"kid": "x", "file": "keys/ed.pem", "alg": "ES256"}]},
        )
        settings = load_settings(path)
        with pytest.raises(ConfigError) as info:
            KeyRing.from_settings(settings)
        assert info.value.problems == [f"{path}: keys.signing[0].file: the key is not a ES256 key"]

    def test_dev_generate_makes_an_in_memory_key(self, tmp_path: Path) -> None:
        """With `dev_generate` and no keys, an ES256 key is generated (never written)."""
        path = make_config(tmp_path, keys={"signing": [], "dev_generate": True})
        ring = KeyRing.from_settings(load_settings(path))
        assert ring.active.alg == "ES256"
        assert ring.active.kid.startswith("dev-")
        assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["es256-1.pem"]


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _ec_jwk(**extra: Any) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {**ECAlgorithm.to_jwk(key, as_dict=True), "kid": "t1", **extra}


def _rsa_jwk(bits: int = 2048, **extra: Any) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    return {**RSAAlgorithm.to_jwk(key, as_dict=True), "kid": "r1", **extra}


class TestTrustedJwk:
    ALL = ("ES256", "RS256", "PS256", "EdDSA")

    def test_ec_key_with_alg(self) -> None:
        """A P-256 key marked ES256 verifies ES256 tokens of its issuer."""
        vk = verification_key_from_jwk(
            _ec_jwk(alg="ES256", use="sig"), issuer="https://idp", allowed_algs=self.ALL
        )
        assert vk is not None
        assert (vk.kid, vk.alg, vk.issuer) == ("t1", "ES256", "https://idp")

    def test_ec_key_alg_inferred(self) -> None:
        """Without `alg`, a P-256 key can only be ES256."""
        vk = verification_key_from_jwk(_ec_jwk(), issuer="https://idp", allowed_algs=self.ALL)
        assert vk is not None
        assert vk.alg == "ES256"

    def test_eddsa_key(self) -> None:
        """An Ed25519 OKP key is EdDSA."""
        key = ed25519.Ed25519PrivateKey.generate().public_key()
        jwk = {**OKPAlgorithm.to_jwk(key, as_dict=True), "kid": "e1"}
        vk = verification_key_from_jwk(jwk, issuer="https://idp", allowed_algs=self.ALL)
        assert vk is not None
        assert vk.alg == "EdDSA"

    @pytest.mark.parametrize("alg", ["HS256", "none", "RS256", "ES384"])
    def test_alg_inconsistent_with_key_refused(self, alg: str) -> None:
        """An EC key claiming HMAC, none or an RSA algorithm is unusable (no key confusion)."""
        assert (
            verification_key_from_jwk(_ec_jwk(alg=alg), issuer="https://idp", allowed_algs=self.ALL)
            is None
        )

    def test_alg_outside_issuer_allow_list_refused(self) -> None:
        """The issuer's `algs` allow-list is enforced per key."""
        assert (
            verification_key_from_jwk(
                _ec_jwk(alg="ES256"), issuer="https://idp", allowed_algs=("RS256",)
            )
            is None
        )

    def test_private_material_refused(self) -> None:
        """A JWK carrying a private member (`d`) is never used."""
        assert (
            verification_key_from_jwk(
                _ec_jwk(d="AAAA"), issuer="https://idp", allowed_algs=self.ALL
            )
            is None
        )

    @pytest.mark.parametrize("extra", [{"use": "enc"}, {"key_ops": ["encrypt"]}])
    def test_non_signature_keys_refused(self, extra: dict[str, Any]) -> None:
        """Encryption keys are not signature keys."""
        assert (
            verification_key_from_jwk(_ec_jwk(**extra), issuer="https://idp", allowed_algs=self.ALL)
            is None
        )

    @pytest.mark.parametrize("kid", [None, "", "a/../b", "x" * 200, "new\nline"])
    def test_malformed_kid_refused(self, kid: str | None) -> None:
        """Keys without a sane `kid` are skipped (R28: kid sanitised)."""
        jwk = _ec_jwk()
        jwk["kid"] = kid
        assert verification_key_from_jwk(jwk, issuer="https://idp", allowed_algs=self.ALL) is None

    def test_rsa_without_alg_is_ambiguous(self) -> None:
        """An RSA key without `alg` is refused while both RS256 and PS256 are allowed."""
        jwk = _rsa_jwk()
        assert verification_key_from_jwk(jwk, issuer="https://idp", allowed_algs=self.ALL) is None
        vk = verification_key_from_jwk(jwk, issuer="https://idp", allowed_algs=("RS256",))
        assert vk is not None
        assert vk.alg == "RS256"

    def test_short_rsa_key_refused(self) -> None:
        """RSA keys under 2048 bits are refused."""
        jwk = _rsa_jwk(1024, alg="RS256")
        assert verification_key_from_jwk(jwk, issuer="https://idp", allowed_algs=self.ALL) is None

    def test_wrong_curve_refused(self) -> None:
        """A P-384 EC key has no allowed algorithm."""
        key = ec.generate_private_key(ec.SECP384R1()).public_key()
        jwk = {**ECAlgorithm.to_jwk(key, as_dict=True), "kid": "p384"}
        assert verification_key_from_jwk(jwk, issuer="https://idp", allowed_algs=self.ALL) is None
