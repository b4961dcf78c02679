"""Fuzzing the parameter parsing of /oauth/authorize, /oauth/token, /oauth/revoke and
/oauth/register, and the authorization flow's input handling (R6-R10, R12, R14, R18, R19, R23).

Whatever the input, only typed `OAuthError`s come out (or the flow's own `NotRedirectable` /
`RedirectableError`); an error to be redirected always goes to a redirect URI registered for
the client and carries the client's verified `state`; attacker text never reaches an
`error_description`; and what is accepted has the shape the later steps rely on.

Supersedes, in `tests/unit/test_params.py`: `TestAuthorizeRequest::test_arbitrary_input_raises_
only_oauth_errors`, `TestTokenRequest::test_arbitrary_token_input_raises_only_oauth_errors` and
`TestBasicCredentials::test_arbitrary_header_raises_only_invalid_client`.
"""

# Properties branch on whether an input was refused, so they assert inside `except` blocks
# (`pytest.raises` cannot say "may raise"): PT017 does not apply to this file.
# ruff: noqa: PT017

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.adapters.memory_store import MemoryStore
from gateway.clock import FixedClock
from gateway.core import pkce
from gateway.core.clients import AUTH_METHODS, parse_client_metadata
from gateway.core.errors import (
    InvalidClient,
    InvalidClientMetadata,
    InvalidRedirectUri,
    InvalidRequest,
    OAuthError,
)
from gateway.core.params import (
    GRANT_TYPES,
    MAX_CLIENT_ID_LENGTH,
    MAX_STATE_LENGTH,
    parse_authorize_request,
    parse_authorize_target,
    parse_basic_credentials,
    parse_revoke_request,
    parse_token_request,
    resolve_scopes,
    scopes_for_resource,
)
from gateway.core.redirects import match_redirect_uri, validate_redirect_uri
from gateway.flows.authorize import NotRedirectable, RedirectableError, start_authorization
from gateway.settings import Settings, load_settings
from tests.fixtures.config import make_config
from tests.fuzz.strategies import (
    CLIENTS,
    FILES,
    MARKER,
    MCP,
    NOW,
    TOKEN_NAMES,
    Pairs,
    authorize_pairs,
    client_metadata,
    hostile_text,
    pairs_of,
)

AUTHORIZE_ERRORS = {
    "invalid_request",
    "unsupported_response_type",
    "invalid_target",
    "invalid_scope",
    "unauthorized_client",
}


@pytest.fixture(scope="module")
def gw_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Two resources and three pre-registered clients (one narrowed to `files:read`)."""
    path = make_config(
        tmp_path_factory.mktemp("fuzz-params"),
        resources=[
            {"path": "/mcp", "upstream": "http://127.0.0.1:9/mcp"},
            {"path": "/files", "upstream": "http://127.0.0.1:9/files", "policy": "files"},
        ],
        policy={
            "registration": {
                "allowed_custom_schemes": ["com.example.app"],
                "clients": [
                    {
                        "client_id": cid,
                        "redirect_uris": list(uris),
                        **({"scopes": ["files:read"]} if cid == "narrow" else {}),
                    }
                    for cid, uris in CLIENTS.items()
                ],
            }
        },
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


def _no_reflection(err: OAuthError, pairs: Sequence[tuple[str, str]]) -> None:
    """Attacker-supplied values never come back in `error_description` (it is redirected)."""
    if any(MARKER in v for _, v in pairs):
        assert MARKER not in err.description


@settings(max_examples=300, deadline=None)
@given(pairs=authorize_pairs())
@example(pairs=[("client_id", "client-1"), ("client_id", "client-1")])
@example(pairs=[("client_id", "client-1"), ("state", "a"), ("state", "b")])
def test_authorize_parsing_raises_only_typed_errors(gw_settings: Settings, pairs: Pairs) -> None:
    """Phase 1 yields a printable client id and a state that is echoed only when it was sent
    once and is printable; phase 2 raises only the authorization endpoint's OAuth errors,
    each carrying phase 1's state, never reflecting input, and accepts only S256 PKCE, a
    served resource and grantable scopes, with no parameter repeated (R6, R9, R12, R14)."""
    try:
        target = parse_authorize_target(pairs)
    except OAuthError as err:
        assert isinstance(err, InvalidRequest)
        _no_reflection(err, pairs)
        return
    assert 0 < len(target.client_id) <= MAX_CLIENT_ID_LENGTH
    assert target.client_id.isascii()
    assert target.client_id.isprintable()
    if target.state is not None:
        assert [v for n, v in pairs if n == "state"] == [target.state]
        assert len(target.state) <= MAX_STATE_LENGTH
        assert target.state.isprintable()
    registered = CLIENTS.get(target.client_id, ("https://app.example.com/cb",))
    redirect = match_redirect_uri(target.redirect_uri or registered[0], registered)
    if redirect is None:
        return
    client_scopes = ("files:read",) if target.client_id == "narrow" else None
    try:
        req = parse_authorize_request(
            pairs,
            target=target,
            redirect_uri=redirect,
            settings=gw_settings,
            client_scopes=client_scopes,
        )
    except OAuthError as err:
        assert err.error in AUTHORIZE_ERRORS
        assert err.state == target.state
        _no_reflection(err, pairs)
        return
    names = [n for n, _ in pairs]
    assert len(names) == len(set(names))
    params = dict(pairs)
    assert params["response_type"] == "code"
    assert params["code_challenge_method"] == "S256"
    assert pkce.is_valid_challenge(req.code_challenge)
    assert req.state == target.state
    assert req.resource in (MCP, FILES)
    assert req.scope
    assert set(req.scope) <= set(scopes_for_resource(gw_settings, req.resource))
    if client_scopes is not None:
        assert set(req.scope) <= set(client_scopes)


@settings(max_examples=200, deadline=None)
@given(
    pairs=pairs_of(
        TOKEN_NAMES,
        st.sampled_from(
            [
                "authorization_code",
                "refresh_token",
                "password",
                "client_credentials",
                "c0de",
                "v" * 43,
                "client-1",
                "https://app.example.com/cb",
                MCP,
                "",
            ]
        ),
    )
)
def test_token_and_revoke_parsing_raise_only_typed_errors(pairs: Pairs) -> None:
    """The token and revocation forms raise only OAuth errors, never echo input, refuse any
    repeated parameter, and what parses has its grant's required parameters (R18, R19)."""
    for parse in (parse_token_request, parse_revoke_request):
        try:
            result = parse(pairs)
        except OAuthError as err:
            assert err.error in {"invalid_request", "unsupported_grant_type", "invalid_client"}
            _no_reflection(err, pairs)
            continue
        names = [n for n, _ in pairs]
        assert len(names) == len(set(names))
        params = dict(pairs)
        if parse is parse_token_request:
            assert params["grant_type"] in GRANT_TYPES
            needed = (
                ("code", "code_verifier")
                if params["grant_type"] == GRANT_TYPES[0]
                else ("refresh_token",)
            )
            assert all(params.get(n) for n in needed)
        else:
            assert params["token"]
        assert result is not None


@settings(max_examples=300, deadline=None)
@given(
    header=st.one_of(
        hostile_text,
        st.builds(lambda raw: "Basic " + base64.b64encode(raw).decode(), st.binary(max_size=60)),
        st.builds(
            lambda a, b: "Basic " + base64.b64encode(f"{a}:{b}".encode()).decode(),
            hostile_text,
            hostile_text,
        ),
    )
)
@example(header="Basic " + base64.b64encode(b"\xff\xfe:secret").decode())
@example(header="Basic " + base64.b64encode(b"%00:secret").decode())
def test_basic_credentials_raise_only_invalid_client(header: str) -> None:
    """`Authorization: Basic` of anything: `invalid_client` or a printable, non-empty client id
    (RFC 6749 §2.3.1, R19)."""
    try:
        client_id, secret = parse_basic_credentials(header)
    except OAuthError as err:
        assert isinstance(err, InvalidClient)
        assert MARKER not in err.description
        return
    assert client_id
    assert client_id.isascii()
    assert client_id.isprintable()
    assert isinstance(secret, str)


@settings(max_examples=120, deadline=None)
@given(doc=client_metadata(), document=st.booleans())
def test_client_metadata_raises_only_registration_errors(doc: Any, document: bool) -> None:
    """RFC 7591 bodies and metadata documents of any shape: `invalid_redirect_uri` or
    `invalid_client_metadata` only; accepted metadata has only registrable redirect URIs,
    `response_types == ["code"]`, an authorization-code grant and, for a metadata document, a
    public client (R23, R24)."""
    try:
        meta = parse_client_metadata(
            doc,
            allowed_custom_schemes=("com.example.app",),
            supported_scopes=("mcp",),
            metadata_document=document,
        )
    except (InvalidRedirectUri, InvalidClientMetadata) as err:
        assert MARKER not in err.description
        return
    assert meta.redirect_uris
    for uri in meta.redirect_uris:
        assert validate_redirect_uri(uri, allowed_custom_schemes=("com.example.app",)) == uri
    assert meta.response_types == ("code",)
    assert "authorization_code" in meta.grant_types
    assert set(meta.grant_types) <= {"authorization_code", "refresh_token"}
    assert meta.token_endpoint_auth_method in AUTH_METHODS
    if document:
        assert meta.token_endpoint_auth_method == "none"


@settings(max_examples=200, deadline=None)
@given(
    requested=st.one_of(
        st.none(),
        hostile_text,
        st.sampled_from(["mcp", "mcp mcp", "admin", " mcp  offline_access ", "files:read\tmcp"]),
    ),
    client=st.one_of(st.none(), st.lists(st.sampled_from(["mcp", "offline_access", "admin"]))),
)
def test_granted_scopes_are_always_allowed_ones(
    requested: str | None, client: list[str] | None
) -> None:
    """Scope resolution never grants a scope that is neither supported nor allowed for the
    client, and never grants nothing: it is `invalid_scope` then (R20 "scope ⊆ original")."""
    supported = ("mcp", "offline_access")
    try:
        granted = resolve_scopes(
            requested, supported=supported, default=("mcp",), client_allowed=client
        )
    except OAuthError as err:
        assert err.error == "invalid_scope"
        return
    assert granted
    assert len(set(granted)) == len(granted)
    assert set(granted) <= set(supported)
    if client is not None:
        assert set(granted) <= set(client)


@settings(max_examples=150, deadline=None)
@given(pairs=authorize_pairs())
def test_the_authorization_flow_redirects_only_to_registered_uris(
    gw_settings: Settings, pairs: Pairs
) -> None:
    """`start_authorization` on any input: `NotRedirectable` (a page, no redirect) or a
    `RedirectableError` whose URI is registered for the named client (exactly, or its loopback
    port variant) with the request's verified state, or a stored transaction in stage
    `consent` that records exactly the validated request (R7, R8, invariant 3)."""

    async def run() -> Any:
        store = MemoryStore(FixedClock(NOW))
        try:
            pending = await start_authorization(store, gw_settings, pairs, fetcher=None, now=NOW)
            return pending, await store.get_transaction(pending.txid)
        finally:
            await store.close()

    try:
        pending, stored = asyncio.run(run())
    except NotRedirectable:
        return
    except RedirectableError as exc:
        registered = CLIENTS[dict(pairs)["client_id"]]
        assert match_redirect_uri(exc.redirect_uri, registered) == exc.redirect_uri
        assert exc.state == parse_authorize_target(pairs).state
        assert isinstance(exc.error, OAuthError)
        _no_reflection(exc.error, pairs)
        return
    client_id = dict(pairs)["client_id"]
    assert pending.client.client_id == client_id
    assert match_redirect_uri(pending.request.redirect_uri, CLIENTS[client_id])
    assert stored == pending.tx
    assert stored["stage"] == "consent"
    assert stored["redirect_uri"] == pending.request.redirect_uri
    assert stored["code_challenge"] == pending.request.code_challenge
    assert stored["state"] == pending.request.state


def test_module_settings_are_what_the_fuzzers_assume(gw_settings: Settings, tmp_path: Path) -> None:
    """Guard: the fixture's clients and resources are the ones the oracles above rely on (R7,
    R12)."""
    clients = {c.client_id: c.redirect_uris for c in gw_settings.global_policy.registration.clients}
    assert clients == CLIENTS
    assert [gw_settings.resource_url(r) for r in gw_settings.resources] == [MCP, FILES]
    del tmp_path
