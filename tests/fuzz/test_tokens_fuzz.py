"""Fuzzing access-token verification (`gateway.core.tokens`): a minted token changed in any
way no longer verifies (DESIGN §3, §4.2, R27, R28).

Supersedes `tests/unit/test_tokens.py::test_any_single_claim_change_fails` (which changes or
adds one claim and keeps the signature): here any claim is changed, added or removed, the same
claims are re-serialised differently, any header parameter is changed, added or removed, any
character of the compact token or any bit of the signature is altered, and the classic forgeries
(`alg: none`, HMAC keyed with the public key, a stranger's key under our `kid`) are tried on
arbitrary claims. The untouched token verifies every time, so each refusal is the change's doing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.errors import InvalidToken
from gateway.core.tokens import (
    SigningKey,
    TokenVerifier,
    VerificationKey,
    build_access_claims,
    mint_access_token,
)
from gateway.keys import load_private_key_pem
from tests.fixtures.config import es256_pem
from tests.fuzz.strategies import NOW, json_text, json_values

ISSUER = "https://gw.example"
AUD = ISSUER + "/mcp"
_PRIVATE = load_private_key_pem(es256_pem(), "ES256")
KEY = SigningKey("k1", "ES256", _PRIVATE)
_PUBLIC = VerificationKey("k1", "ES256", ISSUER, _PRIVATE.public_key())
CLAIMS = build_access_claims(
    issuer=ISSUER, sub="alice", audience=AUD, client_id="client-1", scope="mcp",
    auth_time=NOW - 60, amr=["pwd", "otp", "mfa"], acr="urn:mfa-gateway:totp", gid="g-1",
    now=NOW, ttl=600,
)  # fmt: skip
TOKEN = mint_access_token(CLAIMS, KEY)
HEAD, PAYLOAD, SIG = TOKEN.split(".")
HEADER = json.loads(base64.urlsafe_b64decode(HEAD + "=="))
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _verifier() -> TokenVerifier:
    return TokenVerifier(lambda iss, kid: _PUBLIC if (iss, kid) == (ISSUER, "k1") else None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _refused(token: str) -> None:
    with pytest.raises(InvalidToken) as info:
        _verifier().verify(token, audience=AUD, now=NOW)
    assert info.value.error == "invalid_token"
    assert info.value.description == "The access token is invalid"


def test_the_untouched_token_verifies() -> None:
    """Control: the minted token itself is valid, so every refusal below is a change's doing
    (R27)."""
    verified = _verifier().verify(TOKEN, audience=AUD, now=NOW)
    assert (verified.subject, verified.amr) == ("alice", ("pwd", "otp", "mfa"))


_claim_names = st.one_of(
    st.sampled_from([*sorted(CLAIMS), "nonce", "cnf", "act"]), st.text(max_size=6)
)


@settings(max_examples=150, deadline=None)
@given(name=_claim_names, value=json_values(), remove=st.booleans(), style=st.integers(0, 3))
def test_changing_adding_or_removing_any_claim_breaks_the_token(
    name: str, value: Any, remove: bool, style: int
) -> None:
    """Any claim set other than the minted one, under the original signature, is refused
    (R27: the signature covers every claim)."""
    claims = dict(CLAIMS)
    if remove:
        claims.pop(name, None)
    else:
        claims[name] = value
    if claims == CLAIMS:
        return
    text = [
        json.dumps(claims),
        json.dumps(claims, sort_keys=True),
        json.dumps(claims, separators=(",", ":")),
        json.dumps(claims, indent=2),
    ][style]
    _refused(f"{HEAD}.{_b64(text.encode())}.{SIG}")


@settings(max_examples=100, deadline=None)
@given(text=json_text(st.just(CLAIMS)))
def test_the_same_claims_serialised_differently_do_not_verify(text: str) -> None:
    """The signature is over the exact bytes: the very same claims in another legal JSON
    spelling (spacing, key order, escapes) are refused, so nothing parses twice differently
    (R28)."""
    payload = _b64(text.encode())
    if payload == PAYLOAD:
        return
    _refused(f"{HEAD}.{payload}.{SIG}")


_header_names = st.one_of(
    st.sampled_from(
        ["alg", "kid", "typ", "crit", "jku", "x5u", "jwk", "x5c", "cty", "b64", "zip", "enc"]
    ),
    st.text(max_size=5),
)


@settings(max_examples=150, deadline=None)
@given(name=_header_names, value=json_values(), remove=st.booleans())
def test_changing_adding_or_removing_any_header_parameter_breaks_the_token(
    name: str, value: Any, remove: bool
) -> None:
    """Any header other than the minted one, with the original payload and signature, is
    refused: no algorithm switch, no key reference, no `crit`, no `typ` change (R28)."""
    header = dict(HEADER)
    if remove:
        header.pop(name, None)
    else:
        header[name] = value
    if header == HEADER:
        return
    _refused(f"{_b64(json.dumps(header).encode())}.{PAYLOAD}.{SIG}")


@settings(max_examples=400, deadline=None)
@given(position=st.integers(0, len(TOKEN) - 1), char=st.sampled_from(B64URL + ".=+/ \x00é"))
def test_any_single_character_change_breaks_the_token(position: int, char: str) -> None:
    """Replacing any one character of the compact token (header, payload or signature) by
    anything else is refused, including changes that only touch base64 padding bits (R27)."""
    if TOKEN[position] == char:
        return
    _refused(TOKEN[:position] + char + TOKEN[position + 1 :])


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 63), bit=st.integers(0, 7), cut=st.integers(0, 3))
def test_any_bit_flip_or_truncation_of_the_signature_breaks_the_token(
    index: int, bit: int, cut: int
) -> None:
    """Any flipped bit of the 64-byte ES256 signature, or a signature cut short or extended,
    is refused (R27, R28)."""
    raw = bytearray(base64.urlsafe_b64decode(SIG + "=="))
    raw[index] ^= 1 << bit
    _refused(f"{HEAD}.{PAYLOAD}.{_b64(bytes(raw))}")
    original = base64.urlsafe_b64decode(SIG + "==")
    shortened = original[: len(original) - 1 - cut]
    _refused(f"{HEAD}.{PAYLOAD}.{_b64(shortened)}")
    _refused(f"{HEAD}.{PAYLOAD}.{_b64(original + bytes(cut + 1))}")


_PUBLIC_PEM = _PRIVATE.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
_STRANGER = ec.generate_private_key(ec.SECP256R1())


@settings(max_examples=80, deadline=None)
@given(
    changes=st.dictionaries(
        st.sampled_from(["sub", "scope", "amr", "exp", "aud"]), json_values(), max_size=2
    ),
    forgery=st.sampled_from(["none", "HS256", "HS512", "stranger", "empty"]),
)
def test_forgeries_never_verify(changes: dict[str, Any], forgery: str) -> None:
    """Whatever the claims, a token with `alg: none`, an HMAC keyed with our public key (key
    confusion), an empty signature, or an ES256 signature by a stranger's key under our `kid`
    is refused (R28, invariant 6)."""
    claims = {**CLAIMS, **changes}
    if forgery == "stranger":
        stranger = SigningKey("k1", "ES256", _STRANGER)
        _refused(mint_access_token(claims, stranger))
        return
    alg = {"none": "none", "empty": "ES256"}.get(forgery, forgery)
    head = _b64(json.dumps({**HEADER, "alg": alg}).encode())
    body = _b64(json.dumps(claims).encode())
    signing_input = f"{head}.{body}".encode()
    if forgery.startswith("HS"):
        digest = hashlib.sha256 if forgery == "HS256" else hashlib.sha512
        sig = _b64(hmac.new(_PUBLIC_PEM, signing_input, digest).digest())
    else:
        sig = ""
    _refused(f"{head}.{body}.{sig}")
