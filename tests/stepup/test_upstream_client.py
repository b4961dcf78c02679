"""`UpstreamClient` against a loopback provider: discovery, client auth, ID tokens, faults."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from gateway.adapters.upstream_oidc import UpstreamClient, carried_amr
from gateway.clock import FixedClock
from gateway.core.errors import UpstreamRejected, UpstreamUnavailable
from tests.stepup.conftest import PUBLIC_URL, make_settings
from tests.stepup.fake_idp import FakeIdp, SigningKey

CALLBACK = PUBLIC_URL + "/oauth/callback"
MakeClient = Callable[..., UpstreamClient]


@pytest.fixture
async def make_client(idp: FakeIdp, clock: FixedClock) -> AsyncIterator[MakeClient]:
    session = aiohttp.ClientSession()

    def factory(**upstream: Any) -> UpstreamClient:
        settings = make_settings(idp.issuer, upstream=upstream)
        return UpstreamClient(settings.upstream, session, clock, jwks_min_refresh=60.0)

    yield factory
    await session.close()


async def _login(idp: FakeIdp, client: UpstreamClient, nonce: str = "n" * 43) -> Any:
    url = await client.authorization_url(
        redirect_uri=CALLBACK, state="s" * 43, nonce=nonce, code_challenge=_challenge()
    )
    params = idp.login_redirect(url)
    return await client.login(
        params["code"], redirect_uri=CALLBACK, code_verifier="v" * 64, nonce=nonce
    )


def _challenge() -> str:
    import hashlib

    digest = hashlib.sha256(b"v" * 64).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# --------------------------------------------------------------------------- discovery


async def test_discovery_is_cached(
    idp: FakeIdp, make_client: MakeClient, clock: FixedClock
) -> None:
    """Discovery is fetched once per TTL, then again."""
    client = make_client()
    await client.metadata()
    await client.metadata()
    assert idp.hits == {"oidc": 1}
    clock.advance(3601)
    await client.metadata()
    assert idp.hits == {"oidc": 2}


async def test_discovery_falls_back_to_rfc8414(idp: FakeIdp, make_client: MakeClient) -> None:
    """A plain OAuth 2.0 provider without OIDC discovery is found at the RFC 8414 URL."""
    idp.discovery = "oidc_404"
    meta = await make_client().metadata()
    assert meta["issuer"] == idp.issuer
    assert idp.hits == {"oidc": 1, "oauth": 1}


@pytest.mark.parametrize("mode", ["wrong_issuer", "garbage", "500", "stall", "huge"])
async def test_discovery_failures_are_upstream_unavailable(
    idp: FakeIdp, make_client: MakeClient, mode: str
) -> None:
    """Invariant 8: a wrong issuer (exact match required), garbage, 5xx, a stall (time-out) or
    a body over the cap raise `UpstreamUnavailable`, never anything else."""
    idp.discovery = mode
    with pytest.raises(UpstreamUnavailable) as info:
        await make_client(timeout=0.3).metadata()
    assert type(info.value) is UpstreamUnavailable
    if mode == "wrong_issuer":
        assert idp.hits == {"oidc": 1}  # a mismatch is fatal, not a reason to fall back


async def test_discovery_refuses_plain_http_endpoints_of_an_https_style_config(
    idp: FakeIdp, make_client: MakeClient
) -> None:
    """DESIGN §5: http endpoints only with `allow_insecure_http_loopback`."""
    client = make_client()
    object.__setattr__(
        client,
        "_settings",
        client._settings.model_copy(update={"allow_insecure_http_loopback": False}),
    )
    with pytest.raises(UpstreamUnavailable):
        await client.metadata()


# --------------------------------------------------------------------------- token endpoint


async def test_client_secret_basic(idp: FakeIdp, make_client: MakeClient) -> None:
    """RFC 6749 §2.3.1: Basic with form-urlencoded id and secret; no secret in the body; PKCE
    verifier and redirect URI sent."""
    identity, tokens = await _login(idp, make_client())
    form, headers = idp.token_requests[-1]
    expected = base64.b64encode(b"gw:s3cret").decode()
    assert headers["Authorization"] == f"Basic {expected}"
    assert "client_secret" not in form
    assert form["code_verifier"] == "v" * 64
    assert form["redirect_uri"] == CALLBACK
    assert identity.subject == "alice"
    assert tokens.refresh_token is not None


async def test_client_secret_post(idp: FakeIdp, make_client: MakeClient) -> None:
    """`client_secret_post`: id and secret in the form, no Authorization header."""
    await _login(idp, make_client(token_endpoint_auth_method="client_secret_post"))
    form, headers = idp.token_requests[-1]
    assert form["client_id"] == "gw"
    assert form["client_secret"] == "s3cret"
    assert "Authorization" not in headers


async def test_error_answer_is_rejected_with_its_code(
    idp: FakeIdp, make_client: MakeClient
) -> None:
    """An OAuth error answer is `UpstreamRejected` carrying the upstream's error code."""
    idp.token = "error"
    with pytest.raises(UpstreamRejected) as info:
        await _login(idp, make_client())
    assert info.value.error == "invalid_grant"


async def test_token_stall_times_out(idp: FakeIdp, make_client: MakeClient) -> None:
    """Invariant 8: every outbound call has a time-out."""
    client = make_client(timeout=0.3)
    await client.metadata()
    idp.token = "stall"
    with pytest.raises(UpstreamUnavailable, match="time-out"):
        await _login(idp, client)


async def test_refresh_keeps_the_old_refresh_token_when_none_is_returned(
    idp: FakeIdp, make_client: MakeClient, clock: FixedClock
) -> None:
    """A refresh answer without `refresh_token` keeps the one we had."""
    client = make_client()
    _, tokens = await _login(idp, client)
    assert tokens.refresh_token is not None
    idp.issue_refresh_tokens = False
    idp.refresh_tokens[tokens.refresh_token] = "alice"
    new = await client.refresh(tokens.refresh_token)
    assert new.access_token != tokens.access_token
    assert new.refresh_token == tokens.refresh_token
    assert new.expires_at == clock.now() + 3600


# --------------------------------------------------------------------------- ID token


async def test_unknown_kid_refetches_the_jwks_at_most_once_per_interval(
    idp: FakeIdp, make_client: MakeClient, clock: FixedClock
) -> None:
    """Key rotation works (unknown kid → one JWKS refetch), but a flood of unknown kids does
    not make the gateway hammer the provider."""
    client = make_client()
    await _login(idp, client)
    assert idp.hits["jwks"] == 1
    clock.advance(61)
    rotated = SigningKey("k2")
    idp.published = [idp.key, rotated]
    idp.key = rotated
    identity, _ = await _login(idp, client)
    assert identity.subject == "alice"
    assert idp.hits["jwks"] == 2
    idp.sign_with = SigningKey("k3")
    for _ in range(3):
        with pytest.raises(UpstreamRejected):
            await _login(idp, client)
    assert idp.hits["jwks"] == 2


async def test_algorithm_allow_list(idp: FakeIdp, make_client: MakeClient) -> None:
    """R28: an ID token whose alg is not in `id_token_algs` is refused even if it verifies."""
    with pytest.raises(UpstreamRejected, match="algorithm not allowed"):
        await _login(idp, make_client(id_token_algs=("RS256",)))


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"iat": 1_800_000_000 + 600}, "issued in the future"),
        ({"nbf": 1_800_000_000 + 600}, "not yet valid"),
        ({"aud": ["gw", "other"]}, "azp"),
        ({"azp": "other"}, "azp"),
        ({"sub": None}, "MissingRequiredClaimError"),
    ],
)
async def test_id_token_claim_checks(
    idp: FakeIdp, make_client: MakeClient, claims: dict[str, Any], why: str
) -> None:
    """OIDC Core §3.1.3.7: iat, nbf, azp for several audiences, sub required."""
    idp.id_token_claims.update(claims)
    with pytest.raises(UpstreamRejected, match=why):
        await _login(idp, make_client())


async def test_crit_header_is_refused(idp: FakeIdp, make_client: MakeClient) -> None:
    """R28: an unknown `crit` extension makes the token invalid."""
    idp.id_token_header = {"crit": ["exp"]}
    with pytest.raises(UpstreamRejected, match=r"id_token: (malformed|unsupported crit)"):
        await _login(idp, make_client())


async def test_identity_claim_is_configurable(idp: FakeIdp, make_client: MakeClient) -> None:
    """`identity_claim` names the user; a missing claim is rejected."""
    identity, _ = await _login(idp, make_client(identity_claim="email"))
    assert identity.subject == "alice@example.test"
    with pytest.raises(UpstreamRejected, match="identity claim"):
        await _login(idp, make_client(identity_claim="employee_id"))


async def test_userinfo_mode(idp: FakeIdp, make_client: MakeClient, clock: FixedClock) -> None:
    """Plain OAuth 2.0 provider (`use_userinfo`): the subject comes from userinfo, amr pwd."""
    client = make_client(use_userinfo=True, identity_claim="preferred_username")
    identity, _ = await _login(idp, client)
    assert (identity.subject, identity.amr, identity.auth_time) == ("alice", ("pwd",), clock.now())
    assert idp.hits["userinfo"] == 1
    idp.use_userinfo_status = 401
    with pytest.raises(UpstreamRejected):
        await _login(idp, client)


async def test_response_issuer_check(idp: FakeIdp, make_client: MakeClient) -> None:
    """RFC 9207: `iss` must match; missing is fine only when not advertised."""
    client = make_client()
    assert await client.accepts_response_issuer(idp.issuer)
    assert not await client.accepts_response_issuer(idp.issuer + "/")
    assert not await client.accepts_response_issuer(None)
    idp.advertise_iss = False
    assert await make_client().accepts_response_issuer(None)


async def test_authorization_url_keeps_extra_params_but_not_over_ours(
    idp: FakeIdp, make_client: MakeClient
) -> None:
    """`extra_authorize_params` are added; they cannot replace the protocol parameters."""
    client = make_client(extra_authorize_params={"prompt": "login", "state": "evil"})
    url = await client.authorization_url(
        redirect_uri=CALLBACK, state="s" * 43, nonce="n", code_challenge="c" * 43
    )
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["prompt"] == "login"
    assert query["state"] == "s" * 43


def test_carried_amr() -> None:
    """The upstream amr keeps short strings but never mfa/otp; default ["pwd"] (R31)."""
    assert carried_amr(["pwd", "mfa", "otp"]) == ("pwd",)
    assert carried_amr(["mfa"]) == ("pwd",)
    assert carried_amr("pwd mfa") == ("pwd",)
    assert carried_amr(None) == ("pwd",)
    assert carried_amr(["pwd", "pwd", "hwk", 3, "x" * 40]) == ("pwd", "hwk")


@pytest.mark.parametrize("extra", [{"alg": "ES384"}, {"use": "enc"}, {"kty": "RSA"}])
async def test_keys_of_another_algorithm_or_use_are_not_used(
    idp: FakeIdp, make_client: MakeClient, extra: dict[str, str]
) -> None:
    """R28: one algorithm per key; encryption keys and keys of another type never verify."""
    idp.jwk_extra = extra
    with pytest.raises(UpstreamRejected, match="no matching signing key"):
        await _login(idp, make_client())
