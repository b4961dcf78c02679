"""The RFC 8414 authorization server metadata document, built from settings.

Pure: no I/O. The `issuer` is exactly `server.public_url` (R4), and every endpoint hangs off it,
so what a client fetches from `/.well-known/oauth-authorization-server` (and, for clients that
only try OpenID discovery, `/.well-known/openid-configuration`) names this gateway and nothing
else. Only what the gateway enforces is advertised: `code` only, PKCE S256 only, `iss` in
authorization responses (R11), metadata documents and dynamic registration as the policy says
(R5). The protected resource documents (RFC 9728) are built by the proxy package.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from gateway.core.params import GATEWAY_SCOPES
from gateway.settings import Settings

AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_PATH = "/oauth/token"  # noqa: S105 - a path, not a secret
REVOKE_PATH = "/oauth/revoke"
REGISTER_PATH = "/oauth/register"
JWKS_PATH = "/oauth/jwks.json"
CONSENT_PATH = "/oauth/consent"
AS_METADATA_PATH = "/.well-known/oauth-authorization-server"
OIDC_DISCOVERY_PATH = "/.well-known/openid-configuration"

TOKEN_AUTH_METHODS: tuple[str, ...] = ("none", "client_secret_basic", "client_secret_post")


def supported_scopes(settings: Settings) -> list[str]:
    """Every resource policy's `mcp.scopes_supported`, then `offline_access` (deduplicated).

    `openid` is accepted in requests but not advertised: the gateway issues no ID tokens.
    """
    scopes: dict[str, None] = {}
    for resource in settings.resources:
        for scope in settings.policy_for(resource).mcp.scopes_supported:
            scopes[scope] = None
    scopes.update(dict.fromkeys(s for s in GATEWAY_SCOPES if s != "openid"))
    return list(scopes)


def metadata_paths(settings: Settings) -> list[str]:
    """The well-known paths the document is served on (RFC 8414 §3.1 for an issuer path)."""
    issuer_path = urlsplit(settings.issuer).path.rstrip("/")
    paths = [AS_METADATA_PATH, OIDC_DISCOVERY_PATH]
    if issuer_path:
        paths.append(AS_METADATA_PATH + issuer_path)
        paths.append(OIDC_DISCOVERY_PATH + issuer_path)
    return paths


def authorization_server_metadata(settings: Settings) -> dict[str, Any]:
    """The RFC 8414 document; `issuer` is exactly `public_url` (R4, R5, R11)."""
    issuer = settings.issuer
    registration = settings.global_policy.registration
    doc: dict[str, Any] = {
        "issuer": issuer,
        "authorization_endpoint": issuer + AUTHORIZE_PATH,
        "token_endpoint": issuer + TOKEN_PATH,
        "revocation_endpoint": issuer + REVOKE_PATH,
        "jwks_uri": issuer + JWKS_PATH,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": list(TOKEN_AUTH_METHODS),
        "revocation_endpoint_auth_methods_supported": list(TOKEN_AUTH_METHODS),
        "scopes_supported": supported_scopes(settings),
        "authorization_response_iss_parameter_supported": True,
        "client_id_metadata_document_supported": registration.client_id_metadata_documents,
    }
    if registration.dynamic:
        doc["registration_endpoint"] = issuer + REGISTER_PATH
    return doc
