"""Parsing of authorize/token/revoke parameters: typed OAuth errors only, strict rules (R6-R14)."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from gateway.core.errors import (
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    UnsupportedGrantType,
    UnsupportedResponseType,
)
from gateway.core.params import (
    AuthorizeRequest,
    AuthorizeTarget,
    parse_authorize_request,
    parse_authorize_target,
    parse_basic_credentials,
    parse_revoke_request,
    parse_token_request,
    resolve_scopes,
    single_values,
    split_scope,
)
from gateway.settings import Settings, load_settings
from tests.fixtures.config import make_config

CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
REDIRECT = "http://127.0.0.1:5555/callback"
MCP = "http://127.0.0.1:8080/mcp"
FILES = "http://127.0.0.1:8080/files"

Pairs = list[tuple[str, str]]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Two resources: /mcp (default policy, scope `mcp`) and /files (its own scopes)."""
    path = make_config(
        tmp_path_factory.mktemp("params"),
        resources=[
            {"path": "/mcp", "upstream": "http://127.0.0.1:9/mcp"},
            {"path": "/files", "upstream": "http://127.0.0.1:9/files", "policy": "files"},
        ],
        policies={
            "files": {
                "mcp": {
                    "scopes_supported": ["files:read", "files:write"],
                    "default_scopes": ["files:read"],
                }
            }
        },
    )
    return load_settings(path)


def authorize_pairs(**overrides: str | None) -> Pairs:
    base: dict[str, str | None] = {
        "response_type": "code",
        "client_id": "client-1",
        "redirect_uri": REDIRECT,
        "code_challenge": CHALLENGE,
        "code_challenge_method": "S256",
        "state": "st-123",
    }
    base.update(overrides)
    return [(k, v) for k, v in base.items() if v is not None]


def parse(
    settings: Settings, pairs: Sequence[tuple[str, str]], client_scopes: Sequence[str] | None = None
) -> AuthorizeRequest:
    target = parse_authorize_target(pairs)
    return parse_authorize_request(
        pairs,
        target=target,
        redirect_uri=REDIRECT,
        settings=settings,
        client_scopes=client_scopes,
    )


class TestAuthorizeTarget:
    def test_reads_client_redirect_and_state(self) -> None:
        """Phase 1 returns exactly the three values that decide about redirects (R8)."""
        assert parse_authorize_target(authorize_pairs()) == AuthorizeTarget(
            client_id="client-1", redirect_uri=REDIRECT, state="st-123"
        )

    @pytest.mark.parametrize(
        "pairs",
        [
            [("redirect_uri", REDIRECT)],
            [("client_id", ""), ("redirect_uri", REDIRECT)],
            [("client_id", "a"), ("client_id", "b")],
            [("client_id", "a"), ("redirect_uri", REDIRECT), ("redirect_uri", REDIRECT)],
            [("client_id", "a"), ("redirect_uri", "")],
            [("client_id", "bad\nid")],
        ],
    )
    def test_client_and_redirect_problems_are_invalid_request(self, pairs: Pairs) -> None:
        """Missing/repeated client_id or redirect_uri: not redirectable (R8, R14)."""
        with pytest.raises(InvalidRequest):
            parse_authorize_target(pairs)

    def test_repeated_or_odd_state_is_never_echoed(self) -> None:
        """A repeated or non-VSCHAR state is dropped: it is never reflected (R10)."""
        assert parse_authorize_target([*authorize_pairs(), ("state", "x")]).state is None
        assert parse_authorize_target(authorize_pairs(state="a\x00b")).state is None

    def test_redirect_uri_may_be_absent(self) -> None:
        """The caller decides about an absent redirect_uri (one registered URI)."""
        assert parse_authorize_target(authorize_pairs(redirect_uri=None)).redirect_uri is None


class TestAuthorizeRequest:
    def test_valid_request_with_defaults(self, settings: Settings) -> None:
        """Without resource and scope: the first resource and its default scopes (R12)."""
        req = parse(settings, authorize_pairs())
        assert req.resource == MCP
        assert req.scope == ("mcp",)
        assert req.code_challenge == CHALLENGE
        assert req.state == "st-123"
        assert req.redirect_uri_sent is True

    @pytest.mark.parametrize("rtype", ["token", "id_token", "code id_token", "code token", "none"])
    def test_only_response_type_code(self, settings: Settings, rtype: str) -> None:
        """Implicit and hybrid flows are refused with `unsupported_response_type` (R9)."""
        with pytest.raises(UnsupportedResponseType) as info:
            parse(settings, authorize_pairs(response_type=rtype))
        assert info.value.state == "st-123"

    def test_missing_response_type(self, settings: Settings) -> None:
        """A missing response_type is `invalid_request`, with the state for the redirect."""
        with pytest.raises(InvalidRequest) as info:
            parse(settings, authorize_pairs(response_type=None))
        assert info.value.state == "st-123"

    def test_pkce_challenge_required(self, settings: Settings) -> None:
        """No code_challenge → `invalid_request` (R6)."""
        with pytest.raises(InvalidRequest) as info:
            parse(settings, authorize_pairs(code_challenge=None))
        assert info.value.description == "code_challenge is required (PKCE)"

    @pytest.mark.parametrize("method", ["plain", None, "s256", "S512", ""])
    def test_pkce_method_must_be_s256(self, settings: Settings, method: str | None) -> None:
        """`plain`, a missing method (defaults to plain) or anything but S256 is refused (R6)."""
        with pytest.raises(InvalidRequest) as info:
            parse(settings, authorize_pairs(code_challenge_method=method))
        assert info.value.description == "code_challenge_method must be S256"

    def test_malformed_challenge(self, settings: Settings) -> None:
        """A challenge that is not 43-128 unreserved characters is refused."""
        with pytest.raises(InvalidRequest):
            parse(settings, authorize_pairs(code_challenge="short"))

    def test_state_required(self, settings: Settings) -> None:
        """`state` is required; the error then carries no state."""
        with pytest.raises(InvalidRequest) as info:
            parse(settings, authorize_pairs(state=None))
        assert info.value.description == "state is required"
        assert info.value.state is None

    @pytest.mark.parametrize("name", ["scope", "response_type", "code_challenge", "resource"])
    def test_repeated_parameters_refused(self, settings: Settings, name: str) -> None:
        """Any repeated parameter is `invalid_request` (OAuth 2.1 §3.1, R14)."""
        pairs = [*authorize_pairs(resource=MCP, scope="mcp"), (name, "x")]
        with pytest.raises(InvalidRequest) as info:
            parse(settings, pairs)
        assert info.value.description == f"parameter {name} is repeated"
        assert info.value.state == "st-123"

    @pytest.mark.parametrize(
        "resource",
        ["https://evil.example/mcp", MCP + "/", "http://127.0.0.1:8080", MCP + "#x", "mcp"],
    )
    def test_unknown_resource_is_invalid_target(self, settings: Settings, resource: str) -> None:
        """Only the configured resource URLs, exactly (RFC 8707 §2, R12)."""
        with pytest.raises(InvalidTarget) as info:
            parse(settings, authorize_pairs(resource=resource))
        assert info.value.state == "st-123"

    def test_second_resource_with_its_scopes(self, settings: Settings) -> None:
        """The scopes come from the named resource's policy."""
        req = parse(settings, authorize_pairs(resource=FILES, scope="files:write mcp bogus"))
        assert req.resource == FILES
        assert req.scope == ("files:write",)

    def test_unknown_scopes_dropped_known_kept(self, settings: Settings) -> None:
        """Unknown scopes are dropped; offline_access and openid are gateway scopes."""
        req = parse(settings, authorize_pairs(scope="bogus mcp offline_access openid mcp"))
        assert req.scope == ("mcp", "offline_access", "openid")

    def test_only_unknown_scopes_fall_back_to_default(self, settings: Settings) -> None:
        """Nothing known left → the resource's default scopes."""
        req = parse(settings, authorize_pairs(resource=FILES, scope="admin root"))
        assert req.scope == ("files:read",)

    def test_client_scopes_narrow(self, settings: Settings) -> None:
        """A client registered with `scope` gets no more than that."""
        req = parse(
            settings, authorize_pairs(scope="mcp offline_access"), client_scopes=["offline_access"]
        )
        assert req.scope == ("offline_access",)

    def test_client_scopes_leaving_nothing(self, settings: Settings) -> None:
        """If even the default is outside the client's scopes: `invalid_scope`."""
        with pytest.raises(InvalidScope) as info:
            parse(settings, authorize_pairs(), client_scopes=["other"])
        assert info.value.state == "st-123"

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("response_mode", "fragment"),
            ("response_mode", "form_post"),
            ("request_uri", "urn:x"),
            ("request", "eyJ..."),
        ],
    )
    def test_response_modes_and_request_objects_refused(
        self, settings: Settings, name: str, value: str
    ) -> None:
        """Only the query response mode; no request objects."""
        with pytest.raises(InvalidRequest):
            parse(settings, authorize_pairs(**{name: value}))

    @hsettings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "client_id",
                        "redirect_uri",
                        "state",
                        "response_type",
                        "scope",
                        "code_challenge",
                        "code_challenge_method",
                        "resource",
                        "response_mode",
                        "x",
                    ]
                )
                | st.text(max_size=8),
                st.text(max_size=80) | st.sampled_from(["code", "S256", CHALLENGE, MCP, REDIRECT]),
            ),
            max_size=12,
        )
    )
    def test_arbitrary_input_raises_only_oauth_errors(
        self, settings: Settings, pairs: Pairs
    ) -> None:
        """Property: any input either parses or raises an `OAuthError`, nothing else."""
        try:
            target = parse_authorize_target(pairs)
            parse_authorize_request(pairs, target=target, redirect_uri=REDIRECT, settings=settings)
        except OAuthError:
            pass


class TestScopes:
    def test_split_drops_duplicates_and_malformed(self) -> None:
        """Scope tokens are NQCHAR; duplicates and empty tokens go."""
        assert split_scope('a  b a "q" c\\d') == ("a", "b")

    def test_resolve_without_request(self) -> None:
        """No scope asked → the default."""
        assert resolve_scopes(None, supported=["a", "b"], default=["a"]) == ("a",)

    def test_resolve_nothing_grantable(self) -> None:
        """Nothing in the default either → `invalid_scope`."""
        with pytest.raises(InvalidScope):
            resolve_scopes("x", supported=["a"], default=[])


class TestTokenRequest:
    def test_authorization_code(self) -> None:
        """code and code_verifier are read; redirect_uri and resource optional."""
        req = parse_token_request(
            [
                ("grant_type", "authorization_code"),
                ("code", "c"),
                ("code_verifier", "v"),
                ("client_id", "cl"),
            ]
        )
        assert (req.code, req.code_verifier, req.client_id, req.redirect_uri) == (
            "c",
            "v",
            "cl",
            None,
        )

    def test_refresh(self) -> None:
        """refresh_token and an optional scope are read."""
        req = parse_token_request(
            [("grant_type", "refresh_token"), ("refresh_token", "r"), ("scope", "mcp")]
        )
        assert (req.refresh_token, req.scope) == ("r", "mcp")

    @pytest.mark.parametrize(
        ("pairs", "error"),
        [
            ([], InvalidRequest),
            ([("grant_type", "password")], UnsupportedGrantType),
            ([("grant_type", "client_credentials")], UnsupportedGrantType),
            ([("grant_type", "implicit")], UnsupportedGrantType),
            ([("grant_type", "authorization_code"), ("code_verifier", "v")], InvalidRequest),
            ([("grant_type", "authorization_code"), ("code", "c")], InvalidRequest),
            ([("grant_type", "refresh_token")], InvalidRequest),
            (
                [
                    ("grant_type", "authorization_code"),
                    ("code", "c"),
                    ("code", "d"),
                    ("code_verifier", "v"),
                ],
                InvalidRequest,
            ),
            (
                [("grant_type", "refresh_token"), ("refresh_token", "r"), ("client_id", "a\x01")],
                InvalidClient,
            ),
        ],
    )
    def test_errors(self, pairs: Pairs, error: type[OAuthError]) -> None:
        """Each malformed request gets its RFC 6749 §5.2 error (R18, R19)."""
        with pytest.raises(error):
            parse_token_request(pairs)

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "grant_type",
                        "code",
                        "code_verifier",
                        "refresh_token",
                        "client_id",
                        "client_secret",
                        "scope",
                        "resource",
                    ]
                )
                | st.text(max_size=6),
                st.text(max_size=40) | st.sampled_from(["authorization_code", "refresh_token"]),
            ),
            max_size=10,
        )
    )
    def test_arbitrary_token_input_raises_only_oauth_errors(self, pairs: Pairs) -> None:
        """Property: token and revocation parsing raise only `OAuthError`."""
        for parser in (parse_token_request, parse_revoke_request):
            with contextlib.suppress(OAuthError):
                parser(pairs)


class TestBasicCredentials:
    def test_form_encoded_parts(self) -> None:
        """RFC 6749 §2.3.1: id and secret are form-urlencoded before base64."""
        header = "Basic " + base64.b64encode(b"my%3Aclient:p%40ss+word").decode()
        assert parse_basic_credentials(header) == ("my:client", "p@ss word")

    @pytest.mark.parametrize(
        "header",
        [
            "Bearer abc",
            "Basic",
            "Basic !!!",
            "Basic " + base64.b64encode(b"nocolon").decode(),
            "Basic " + base64.b64encode(b":secret").decode(),
            "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
        ],
    )
    def test_malformed_is_invalid_client(self, header: str) -> None:
        """Anything that is not Basic credentials is `invalid_client` (401)."""
        with pytest.raises(InvalidClient) as info:
            parse_basic_credentials(header)
        assert info.value.status == 401

    @given(st.text(max_size=60))
    def test_arbitrary_header_raises_only_invalid_client(self, header: str) -> None:
        """Property: a header either parses or is `invalid_client`."""
        with contextlib.suppress(InvalidClient):
            parse_basic_credentials(header)


def test_single_values_refuses_repeats() -> None:
    """A repeated name is refused and named in the description, never its value."""
    with pytest.raises(InvalidRequest) as info:
        single_values([("a", "secret1"), ("a", "secret2")])
    assert info.value.description == "parameter a is repeated"
