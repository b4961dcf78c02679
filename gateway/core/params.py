"""Request parameters of the authorization, token and revocation endpoints → frozen requests.

Pure: no I/O; the only exceptions raised are typed `OAuthError`s, whatever the input (a property
test feeds it arbitrary pairs). Parameters must not repeat (OAuth 2.1 §3.1, R14).

The authorization endpoint is parsed in two phases, because an error may be sent back to the
client only once `client_id` and `redirect_uri` are verified (R8):

1. `parse_authorize_target` reads just `client_id`, `redirect_uri` and `state`; its errors are
   shown to the user on an HTML page, never redirected.
2. After the caller has resolved the client and matched the redirect URI,
   `parse_authorize_request` checks everything else; its errors carry the client's `state` and
   are redirected to the verified URI (`response_type=code` only, PKCE S256, `state`,
   `resource`, scopes; R6, R9, R12).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_plus

from gateway.core import pkce
from gateway.core.errors import (
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    UnsupportedGrantType,
    UnsupportedResponseType,
)
from gateway.settings import Settings

Pairs = Iterable[tuple[str, str]]

MAX_VALUE_LENGTH = 4096
MAX_CLIENT_ID_LENGTH = 2048
MAX_STATE_LENGTH = 1024
# Scopes the gateway itself understands, on top of each resource's `mcp.scopes_supported`.
GATEWAY_SCOPES: tuple[str, ...] = ("offline_access", "openid")
GRANT_TYPES: tuple[str, ...] = ("authorization_code", "refresh_token")

# RFC 6749 Appendix A: VSCHAR = %x20-7E; NQCHAR = %x21 / %x23-5B / %x5D-7E.
_VSCHAR = re.compile(r"[\x20-\x7e]+")
_NQCHAR = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def single_values(pairs: Pairs) -> dict[str, str]:
    """The parameters as a dict; `InvalidRequest` if one repeats or is absurdly long (R14)."""
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out:
            raise InvalidRequest(f"parameter {_safe_name(name)} is repeated")
        if len(value) > MAX_VALUE_LENGTH:
            raise InvalidRequest(f"parameter {_safe_name(name)} is too long")
        out[name] = value
    return out


def _safe_name(name: str) -> str:
    """A parameter name fit for an error description (never a value)."""
    cleaned = "".join(c for c in name[:40] if c.isascii() and (c.isalnum() or c in "_-"))
    return cleaned or "(unnamed)"


def _counts(pairs: Sequence[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, _ in pairs:
        counts[name] = counts.get(name, 0) + 1
    return counts


# --------------------------------------------------------------------------- /oauth/authorize


@dataclass(frozen=True)
class AuthorizeTarget:
    """The parameters that decide where (and whether) errors may be redirected."""

    client_id: str
    redirect_uri: str | None
    state: str | None  # echoed only after client and redirect URI are verified


@dataclass(frozen=True)
class AuthorizeRequest:
    """A fully validated authorization request."""

    client_id: str
    redirect_uri: str
    redirect_uri_sent: bool
    state: str
    code_challenge: str
    resource: str
    scope: tuple[str, ...]

    @property
    def scope_string(self) -> str:
        return " ".join(self.scope)


def parse_authorize_target(pairs: Sequence[tuple[str, str]]) -> AuthorizeTarget:
    """Phase 1: `client_id` and `redirect_uri`; errors here are never redirected (R8)."""
    counts = _counts(pairs)
    values = dict(pairs)
    if counts.get("client_id", 0) > 1:
        raise InvalidRequest("client_id is repeated")
    if counts.get("redirect_uri", 0) > 1:
        raise InvalidRequest("redirect_uri is repeated")
    client_id = values.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise InvalidRequest("client_id is missing")
    if len(client_id) > MAX_CLIENT_ID_LENGTH or _VSCHAR.fullmatch(client_id) is None:
        raise InvalidRequest("client_id is malformed")
    redirect_uri = values.get("redirect_uri")
    if redirect_uri is not None and (not redirect_uri or len(redirect_uri) > MAX_VALUE_LENGTH):
        raise InvalidRequest("redirect_uri is malformed")
    state = values.get("state")
    if (
        counts.get("state", 0) != 1
        or not isinstance(state, str)
        or len(state) > MAX_STATE_LENGTH
        or _VSCHAR.fullmatch(state) is None
    ):
        state = None
    return AuthorizeTarget(client_id=client_id, redirect_uri=redirect_uri, state=state)


def parse_authorize_request(
    pairs: Sequence[tuple[str, str]],
    *,
    target: AuthorizeTarget,
    redirect_uri: str,
    settings: Settings,
    client_scopes: Sequence[str] | None = None,
) -> AuthorizeRequest:
    """Phase 2: everything else; every error carries the client's `state` for the redirect."""
    state = target.state
    try:
        params = single_values(pairs)
    except OAuthError as err:
        err.state = state
        raise

    def fail(err: OAuthError) -> OAuthError:
        err.state = state
        return err

    response_type = params.get("response_type")
    if not response_type:
        raise fail(InvalidRequest("response_type is missing"))
    if response_type != "code":
        raise fail(UnsupportedResponseType("only response_type=code is supported"))
    response_mode = params.get("response_mode")
    if response_mode is not None and response_mode != "query":
        raise fail(InvalidRequest("only response_mode=query is supported"))
    if "request" in params or "request_uri" in params:
        raise fail(InvalidRequest("request objects are not supported"))
    if state is None:
        if params.get("state"):
            raise InvalidRequest("state is malformed")
        raise InvalidRequest("state is required")

    challenge = params.get("code_challenge")
    if not challenge:
        raise fail(InvalidRequest("code_challenge is required (PKCE)"))
    method = params.get("code_challenge_method")
    if method not in pkce.SUPPORTED_METHODS:
        raise fail(InvalidRequest("code_challenge_method must be S256"))
    if not pkce.is_valid_challenge(challenge):
        raise fail(InvalidRequest("code_challenge is malformed"))

    resource = resolve_resource(params.get("resource"), settings)
    if resource is None:
        raise fail(InvalidTarget("resource is not served by this gateway"))
    try:
        scope = resolve_scopes(
            params.get("scope"),
            supported=scopes_for_resource(settings, resource),
            default=default_scopes_for_resource(settings, resource),
            client_allowed=client_scopes,
        )
    except OAuthError as err:
        raise fail(err) from None
    return AuthorizeRequest(
        client_id=target.client_id,
        redirect_uri=redirect_uri,
        redirect_uri_sent=target.redirect_uri is not None,
        state=state,
        code_challenge=challenge,
        resource=resource,
        scope=scope,
    )


def resolve_resource(requested: str | None, settings: Settings) -> str | None:
    """The canonical resource URL; the first configured resource when absent (R12)."""
    if requested is None:
        return settings.resource_url(settings.resources[0])
    resource = settings.resource_by_url(requested)
    return None if resource is None else settings.resource_url(resource)


def scopes_for_resource(settings: Settings, resource_url: str) -> tuple[str, ...]:
    """What a client may ask for on this resource: its policy's scopes plus the gateway's."""
    resource = settings.resource_by_url(resource_url)
    if resource is None:
        return ()
    supported = settings.policy_for(resource).mcp.scopes_supported
    return _dedupe((*supported, *GATEWAY_SCOPES))


def default_scopes_for_resource(settings: Settings, resource_url: str) -> tuple[str, ...]:
    """The scopes granted when the request names none that are known."""
    resource = settings.resource_by_url(resource_url)
    if resource is None:
        return ()
    mcp = settings.policy_for(resource).mcp
    return tuple(mcp.default_scopes if mcp.default_scopes is not None else mcp.scopes_supported)


def split_scope(value: str | None) -> tuple[str, ...]:
    """Space-delimited scope tokens (RFC 6749 §3.3), duplicates and malformed tokens dropped."""
    if not value:
        return ()
    return _dedupe(tok for tok in value.split(" ") if tok and _NQCHAR.fullmatch(tok))


def resolve_scopes(
    requested: str | None,
    *,
    supported: Sequence[str],
    default: Sequence[str],
    client_allowed: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Requested scopes filtered by policy (unknown ones dropped); none left → the default.

    `client_allowed` (a registered client's `scope`) narrows both. `InvalidScope` when even the
    default leaves nothing the client may have.
    """
    allowed = [s for s in supported if client_allowed is None or s in client_allowed]
    granted = tuple(s for s in split_scope(requested) if s in allowed)
    if not granted:
        granted = tuple(s for s in default if s in allowed)
    if not granted:
        raise InvalidScope("none of the requested scopes may be granted to this client")
    return granted


def _dedupe(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


# --------------------------------------------------------------------------- /oauth/token


@dataclass(frozen=True)
class TokenRequest:
    """A token endpoint request with its grant's parameters present."""

    grant_type: str
    code: str | None = None
    code_verifier: str | None = None
    redirect_uri: str | None = None
    refresh_token: str | None = None
    scope: str | None = None
    resource: str | None = None
    client_id: str | None = None
    client_secret: str | None = None


def parse_token_request(pairs: Pairs) -> TokenRequest:
    """Validate the form of `/oauth/token` (R18, R19)."""
    params = single_values(pairs)
    grant_type = params.get("grant_type")
    if not grant_type:
        raise InvalidRequest("grant_type is missing")
    if grant_type not in GRANT_TYPES:
        raise UnsupportedGrantType("grant_type must be authorization_code or refresh_token")
    client_id = params.get("client_id") or None
    if client_id is not None and _VSCHAR.fullmatch(client_id) is None:
        raise InvalidClient("client_id is malformed")
    common = {
        "client_id": client_id,
        "client_secret": params.get("client_secret"),
        "resource": params.get("resource"),
    }
    if grant_type == "authorization_code":
        code = params.get("code")
        if not code:
            raise InvalidRequest("code is missing")
        verifier = params.get("code_verifier")
        if not verifier:
            raise InvalidRequest("code_verifier is missing (PKCE)")
        return TokenRequest(
            grant_type=grant_type,
            code=code,
            code_verifier=verifier,
            redirect_uri=params.get("redirect_uri"),
            **common,
        )
    refresh_token = params.get("refresh_token")
    if not refresh_token:
        raise InvalidRequest("refresh_token is missing")
    return TokenRequest(
        grant_type=grant_type,
        refresh_token=refresh_token,
        scope=params.get("scope"),
        **common,
    )


@dataclass(frozen=True)
class RevokeRequest:
    """An RFC 7009 revocation request."""

    token: str
    token_type_hint: str | None
    client_id: str | None
    client_secret: str | None


def parse_revoke_request(pairs: Pairs) -> RevokeRequest:
    """Validate the form of `/oauth/revoke` (RFC 7009 §2.1)."""
    params = single_values(pairs)
    token = params.get("token")
    if not token:
        raise InvalidRequest("token is missing")
    client_id = params.get("client_id") or None
    if client_id is not None and _VSCHAR.fullmatch(client_id) is None:
        raise InvalidClient("client_id is malformed")
    return RevokeRequest(
        token=token,
        token_type_hint=params.get("token_type_hint"),
        client_id=client_id,
        client_secret=params.get("client_secret"),
    )


def parse_basic_credentials(header: str) -> tuple[str, str]:
    """`Authorization: Basic` → (client_id, client_secret), form-decoded (RFC 6749 §2.3.1).

    Raises `InvalidClient` (which the renderer answers with a Basic challenge).
    """
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise InvalidClient("malformed Basic credentials")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise InvalidClient("malformed Basic credentials") from None
    raw_id, sep, raw_secret = decoded.partition(":")
    if not sep:
        raise InvalidClient("malformed Basic credentials")
    client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
    if (
        not client_id
        or len(client_id) > MAX_CLIENT_ID_LENGTH
        or _VSCHAR.fullmatch(client_id) is None
    ):
        raise InvalidClient("malformed Basic credentials")
    return client_id, secret


def form_pairs(items: Iterable[tuple[str, object]]) -> list[tuple[str, str]]:
    """Form fields as text pairs; a file upload is an `InvalidRequest`."""
    out: list[tuple[str, str]] = []
    for name, value in items:
        if not isinstance(value, str):
            raise InvalidRequest("unexpected file upload")
        out.append((name, value))
    return out
