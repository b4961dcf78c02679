"""Access-token minting and verification: every forged token is refused (R25-R28, R31)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.errors import InvalidToken
from gateway.core.tokens import (
    ALLOWED_ALGS,
    MAX_TOKEN_LENGTH,
    SigningKey,
    TokenVerifier,
    VerificationKey,
    VerifiedToken,
    build_access_claims,
    mint_access_token,
    mint_identity_token,
    peek,
)
from gateway.keys import KeyRing, generate_private_key_pem, load_private_key_pem

ISSUER = "https://gw.example"
AUD = "https://gw.example/mcp"
NOW = 1_800_000_000.0


def _key(kid: str, alg: str = "ES256") -> SigningKey:
    return SigningKey(kid, alg, load_private_key_pem(generate_private_key_pem(alg), alg))


KEY = _key("k1")
ED_KEY = _key("k2", "EdDSA")
RING = KeyRing(ISSUER, [KEY, ED_KEY], "k1")
OTHER = _key("k1")  # same kid, another key: an attacker's


def _verifier(leeway: float = 30.0) -> TokenVerifier:
    def resolve(issuer: str, kid: str) -> VerificationKey | None:
        return RING.verification_key(kid) if issuer == ISSUER else None

    return TokenVerifier(resolve, leeway=leeway)


def _claims(**changes: Any) -> dict[str, Any]:
    claims = build_access_claims(
        issuer=ISSUER,
        sub="alice",
        audience=AUD,
        client_id="client-1",
        scope="mcp tools",
        auth_time=NOW - 60,
        amr=["pwd", "otp", "mfa"],
        acr="urn:mfa-gateway:totp",
        gid="grant-1",
        now=NOW,
        ttl=600,
    )
    for name, value in changes.items():
        if value is _DROP:
            del claims[name]
        else:
            claims[name] = value
    return claims


_DROP = object()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], key: SigningKey | None) -> str:
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    sig = (
        b"" if key is None else ALLOWED_ALGS[key.alg].sign(signing_input.encode(), key.private_key)
    )
    return signing_input + "." + _b64(sig)


def _header(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": "ES256", "typ": "at+jwt", "kid": "k1"}
    for name, value in changes.items():
        if value is _DROP:
            del header[name]
        else:
            header[name] = value
    return header


def _refused(token: str, reason: str, *, now: float = NOW, audience: str = AUD) -> None:
    with pytest.raises(InvalidToken) as info:
        _verifier().verify(token, audience=audience, now=now)
    err = info.value
    assert (err.status, err.error) == (401, "invalid_token")
    assert err.description == "The access token is invalid"
    assert err.log_reason == reason


class TestMintAndVerify:
    def test_round_trip(self) -> None:
        """A minted access token verifies and yields its facts (R27)."""
        token = mint_access_token(_claims(), KEY)
        v = _verifier().verify(token, audience=AUD, now=NOW)
        assert isinstance(v, VerifiedToken)
        assert (v.issuer, v.subject, v.client_id, v.audience) == (ISSUER, "alice", "client-1", AUD)
        assert v.scopes == frozenset({"mcp", "tools"})
        assert v.amr == ("pwd", "otp", "mfa")
        assert v.auth_time == NOW - 60
        assert v.acr == "urn:mfa-gateway:totp"
        assert v.gid == "grant-1"
        assert v.expires_at == NOW + 600
        assert v.kid == "k1"

    def test_header_is_typed(self) -> None:
        """Access tokens carry `typ: at+jwt` and the signing `kid` (RFC 9068 §2.1)."""
        token = mint_access_token(_claims(), ED_KEY)
        header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
        assert header == {"alg": "EdDSA", "kid": "k2", "typ": "at+jwt"}
        assert _verifier().verify(token, audience=AUD, now=NOW).kid == "k2"

    def test_claims_are_fresh(self) -> None:
        """Every token gets its own 128-bit jti; iat/nbf = now; exp = now + ttl."""
        a, b = _claims(), _claims()
        assert a["jti"] != b["jti"]
        assert len(a["jti"]) >= 22
        assert (a["iat"], a["nbf"], a["exp"]) == (int(NOW), int(NOW), int(NOW + 600))

    def test_application_at_jwt_typ_accepted(self) -> None:
        """`application/at+jwt` is the same media type (RFC 9068 §4)."""
        token = _forge(_header(typ="application/at+jwt"), _claims(), KEY)
        assert _verifier().verify(token, audience=AUD, now=NOW).subject == "alice"

    def test_audience_array_containing_resource(self) -> None:
        """An `aud` array that contains this resource is accepted (RFC 9068 §4)."""
        token = _forge(_header(), _claims(aud=["https://other", AUD]), KEY)
        assert _verifier().verify(token, audience=AUD, now=NOW).audience == AUD

    def test_peek_reads_only_routing_facts(self) -> None:
        """`peek` gives iss and kid, nothing verified."""
        hint = peek(_forge(_header(kid="zz"), _claims(iss="https://idp"), None))
        assert (hint.issuer, hint.kid) == ("https://idp", "zz")


class TestForgedTokens:
    def test_alg_none(self) -> None:
        """An unsigned `alg: none` token is refused (R27, R28)."""
        _refused(_forge(_header(alg="none"), _claims(), None), "alg not allowed")

    def test_hmac_signed_with_public_key(self) -> None:
        """HS256 keyed with the gateway's public key (key confusion) is refused (R28)."""
        public_pem = KEY.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = _header(alg="HS256")
        signing_input = (
            _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(_claims()).encode())
        )
        sig = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        _refused(signing_input + "." + _b64(sig), "alg not allowed")

    def test_alg_other_than_the_keys(self) -> None:
        """A token naming EdDSA for an ES256 kid is refused: one algorithm per key (R28)."""
        token = _forge(_header(alg="EdDSA", kid="k1"), _claims(), ED_KEY)
        _refused(token, "alg does not match the key")

    def test_unknown_kid(self) -> None:
        """A kid the gateway never published is refused."""
        _refused(_forge(_header(kid="nope"), _claims(), KEY), "unknown kid")

    @pytest.mark.parametrize("kid", [_DROP, "", "../../k1", "k1\n", "k1 ", "é"])
    def test_missing_or_malformed_kid(self, kid: object) -> None:
        """A missing, empty or unsanitary kid is refused (R28)."""
        _refused(_forge(_header(kid=kid), _claims(), KEY), "kid missing or malformed")

    def test_non_string_kid(self) -> None:
        """A kid that is not a string is refused as malformed."""
        _refused(_forge(_header(kid=7), _claims(), KEY), "malformed token")

    def test_signed_by_another_key_with_known_kid(self) -> None:
        """An attacker's key under the gateway's kid fails the signature check."""
        _refused(_forge(_header(), _claims(), OTHER), "bad signature")

    def test_tampered_claim(self) -> None:
        """Changing one claim after signing breaks the signature (here: amr upgraded)."""
        token = mint_access_token(_claims(amr=["pwd"]), KEY)
        head, _, sig = token.split(".")
        payload = _b64(json.dumps(_claims(amr=["pwd", "otp", "mfa"])).encode())
        _refused(f"{head}.{payload}.{sig}", "bad signature")

    def test_typ_jwt(self) -> None:
        """`typ: JWT` (e.g. an ID token) is not an access token (R27, R28)."""
        _refused(_forge(_header(typ="JWT"), _claims(), KEY), "typ is not at+jwt")

    def test_typ_missing(self) -> None:
        """Explicit typing is required."""
        _refused(_forge(_header(typ=_DROP), _claims(), KEY), "typ is not at+jwt")

    def test_identity_token_is_not_an_access_token(self) -> None:
        """The gateway's own identity tokens never pass as access tokens (R28)."""
        token = mint_identity_token(
            key=KEY,
            issuer=ISSUER,
            audience=AUD,
            sub="alice",
            client_id="c",
            amr=["mfa"],
            auth_time=NOW,
            acr=None,
            scope="mcp",
            now=NOW,
            ttl=60,
        )
        _refused(token, "typ is not at+jwt")

    def test_issuer_must_own_the_key(self) -> None:
        """A key of one issuer never verifies tokens claiming another (resolver mix-up)."""

        def sloppy(issuer: str, kid: str) -> VerificationKey | None:
            return RING.verification_key(kid)

        token = _forge(_header(), _claims(iss="https://evil.example"), KEY)
        with pytest.raises(InvalidToken) as info:
            TokenVerifier(sloppy).verify(token, audience=AUD, now=NOW)
        assert info.value.log_reason == "iss does not match the key's issuer"

    def test_foreign_issuer_has_no_keys(self) -> None:
        """Tokens of an unconfigured issuer find no key."""
        _refused(_forge(_header(), _claims(iss="https://evil.example"), KEY), "unknown kid")

    @pytest.mark.parametrize(
        "aud", ["https://gw.example/other", ["https://gw.example/other"], 5, None, []]
    )
    def test_wrong_audience(self, aud: object) -> None:
        """A token for another resource is refused (R25, R27)."""
        _refused(_forge(_header(), _claims(aud=aud), KEY), "aud is not this resource")

    def test_expired(self) -> None:
        """Past `exp` plus the leeway, the token is refused."""
        token = mint_access_token(_claims(), KEY)
        _refused(token, "expired", now=NOW + 600 + 30)

    def test_expiry_leeway(self) -> None:
        """Within the small leeway after `exp` a token still verifies (clock skew)."""
        token = mint_access_token(_claims(), KEY)
        assert _verifier().verify(token, audience=AUD, now=NOW + 600 + 29).subject == "alice"

    def test_not_yet_valid(self) -> None:
        """`nbf` beyond the leeway in the future is refused."""
        _refused(_forge(_header(), _claims(nbf=NOW + 31), KEY), "not yet valid")

    def test_issued_in_the_future(self) -> None:
        """`iat` beyond the leeway in the future is refused."""
        _refused(_forge(_header(), _claims(iat=NOW + 31, nbf=_DROP), KEY), "issued in the future")

    def test_auth_time_in_the_future(self) -> None:
        """An `auth_time` in the future cannot buy fresher MFA (R31)."""
        _refused(_forge(_header(), _claims(auth_time=NOW + 3600), KEY), "auth_time in the future")

    @pytest.mark.parametrize("crit", [["b64"], ["exp"], ["urn:x"]])
    def test_crit_refused(self, crit: list[str]) -> None:
        """Any `crit` extension, even one pyjwt knows, is refused (RFC 7515 §4.1.11)."""
        reason = "unknown crit extension" if crit == ["b64"] else "malformed token"
        _refused(_forge(_header(crit=crit, b64=True), _claims(), KEY), reason)

    @pytest.mark.parametrize("name", ["jku", "x5u"])
    def test_key_url_headers_refused(self, name: str) -> None:
        """`jku`/`x5u` are refused; the verifier has no way to fetch them (R28)."""
        token = _forge(_header(**{name: "http://127.0.0.1:9/keys"}), _claims(), KEY)
        _refused(token, f"{name} header refused")

    def test_embedded_jwk_refused(self) -> None:
        """A key embedded in the header (`jwk`) is never trusted."""
        jwk = json.loads(ALLOWED_ALGS["ES256"].to_jwk(OTHER.private_key.public_key()))
        _refused(_forge(_header(jwk=jwk), _claims(), KEY), "jwk header refused")

    @pytest.mark.parametrize("claim", ["sub", "client_id", "jti", "iat", "exp", "iss", "aud"])
    def test_required_claim_missing(self, claim: str) -> None:
        """RFC 9068 §2.2 claims are required."""
        reasons = {
            "iat": "iat missing",
            "exp": "exp missing",
            "iss": "iss missing",
            "aud": "aud is not this resource",
        }
        token = _forge(_header(), _claims(**{claim: _DROP}), KEY)
        _refused(token, reasons.get(claim, f"{claim} missing"))

    @pytest.mark.parametrize(
        ("claim", "value", "reason"),
        [
            ("exp", "soon", "exp is not a number"),
            ("exp", True, "exp is not a number"),
            ("sub", "", "sub is not a non-empty string"),
            ("sub", 42, "sub is not a non-empty string"),
            ("scope", ["mcp"], "scope is not a string"),
        ],
    )
    def test_claim_types(self, claim: str, value: object, reason: str) -> None:
        """Claims of the wrong JSON type are refused."""
        _refused(_forge(_header(), _claims(**{claim: value}), KEY), reason)

    def test_duplicate_claim_refused(self) -> None:
        """A payload with a claim twice (parser differential) is refused."""
        head = _b64(json.dumps(_header()).encode())
        body = json.dumps(_claims())[:-1] + ', "sub": "mallory"}'
        signing_input = head + "." + _b64(body.encode())
        sig = ALLOWED_ALGS["ES256"].sign(signing_input.encode(), KEY.private_key)
        _refused(signing_input + "." + _b64(sig), "claims are not valid JSON")

    @pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c.d", "!!.??.**", "e30.e30.e30"])
    def test_malformed(self, token: str) -> None:
        """Garbage is refused as malformed."""
        with pytest.raises(InvalidToken):
            _verifier().verify(token, audience=AUD, now=NOW)

    def test_too_long(self) -> None:
        """Oversized tokens are refused before any parsing."""
        _refused("a" * (MAX_TOKEN_LENGTH + 1), "token too long")


class TestAmrFacts:
    @pytest.mark.parametrize(
        ("amr", "expected"),
        [
            (["pwd", "otp", "mfa"], ("pwd", "otp", "mfa")),
            ("mfa", None),
            (["mfa", 1], None),
            ({"mfa": True}, None),
            (_DROP, None),
        ],
    )
    def test_amr_only_as_array_of_strings(self, amr: object, expected: object) -> None:
        """`amr` counts only as a JSON array of strings; a string is not an amr list (R31)."""
        v = _verifier().verify(_forge(_header(), _claims(amr=amr), KEY), audience=AUD, now=NOW)
        assert v.amr == expected


class TestIdentityToken:
    def test_identity_token_contents(self) -> None:
        """Identity tokens name subject, client and amr for the MCP server, `typ: identity+jwt`."""
        token = mint_identity_token(
            key=KEY,
            issuer=ISSUER,
            audience="http://mcp.internal/mcp",
            sub="alice",
            client_id="client-1",
            amr=["pwd", "otp", "mfa"],
            auth_time=NOW - 5,
            acr="urn:x",
            scope=frozenset({"mcp"}),
            now=NOW,
            ttl=60,
        )
        head, payload, _ = token.split(".")
        header = json.loads(base64.urlsafe_b64decode(head + "=="))
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        assert header == {"alg": "ES256", "kid": "k1", "typ": "identity+jwt"}
        assert claims["aud"] == "http://mcp.internal/mcp"
        assert (claims["sub"], claims["client_id"], claims["amr"]) == (
            "alice",
            "client-1",
            ["pwd", "otp", "mfa"],
        )
        assert claims["exp"] - claims["iat"] == 60


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_MINTED = mint_access_token(_claims(), KEY)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from([*sorted(_claims()), "extra", "cnf"]), value=_json_values)
def test_any_single_claim_change_fails(name: str, value: object) -> None:
    """Changing (or adding) any one claim of a minted token makes it fail verification."""
    head, payload, sig = _MINTED.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    if name in claims and claims[name] == value:
        value = [value, "changed"]
    claims[name] = value
    forged = f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"
    with pytest.raises(InvalidToken):
        _verifier().verify(forged, audience=AUD, now=NOW)
    assert _verifier().verify(_MINTED, audience=AUD, now=NOW).subject == "alice"
