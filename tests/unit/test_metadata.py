"""The RFC 8414 authorization server metadata document (R4, R5, R11)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.core.metadata import authorization_server_metadata, metadata_paths
from gateway.settings import Settings, load_settings
from tests.fixtures.config import make_config


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(make_config(tmp_path, **overrides))


def test_issuer_is_exactly_public_url(tmp_path: Path) -> None:
    """`issuer` is `server.public_url` byte for byte, endpoints hang off it (R4)."""
    doc = authorization_server_metadata(settings_for(tmp_path))
    issuer = "http://127.0.0.1:8080"
    assert doc["issuer"] == issuer
    assert doc["authorization_endpoint"] == issuer + "/oauth/authorize"
    assert doc["token_endpoint"] == issuer + "/oauth/token"
    assert doc["revocation_endpoint"] == issuer + "/oauth/revoke"
    assert doc["jwks_uri"] == issuer + "/oauth/jwks.json"
    assert doc["registration_endpoint"] == issuer + "/oauth/register"


def test_advertises_only_what_is_enforced(tmp_path: Path) -> None:
    """code only, S256 only, the three client auth methods, `iss` in responses (R4, R6, R11)."""
    doc = authorization_server_metadata(settings_for(tmp_path))
    assert doc["response_types_supported"] == ["code"]
    assert doc["response_modes_supported"] == ["query"]
    assert doc["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["token_endpoint_auth_methods_supported"] == [
        "none",
        "client_secret_basic",
        "client_secret_post",
    ]
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert doc["client_id_metadata_document_supported"] is True


def test_policy_switches(tmp_path: Path) -> None:
    """No registration endpoint when dynamic registration is off; CIMD flag per policy (R5)."""
    doc = authorization_server_metadata(
        settings_for(
            tmp_path,
            policy={"registration": {"dynamic": False, "client_id_metadata_documents": False}},
        )
    )
    assert "registration_endpoint" not in doc
    assert doc["client_id_metadata_document_supported"] is False


def test_scopes_of_every_resource_plus_offline_access(tmp_path: Path) -> None:
    """`scopes_supported` unites the resources' policies and adds `offline_access`."""
    settings = settings_for(
        tmp_path,
        resources=[
            {"path": "/mcp", "upstream": "http://127.0.0.1:9/mcp"},
            {"path": "/files", "upstream": "http://127.0.0.1:9/f", "policy": "files"},
        ],
        policies={"files": {"mcp": {"scopes_supported": ["files:read", "mcp"]}}},
    )
    doc = authorization_server_metadata(settings)
    assert doc["scopes_supported"] == ["mcp", "files:read", "offline_access"]


def test_metadata_paths_with_issuer_path(tmp_path: Path) -> None:
    """An issuer with a path is also served at the RFC 8414 §3.1 path-suffixed name."""
    settings = settings_for(tmp_path, server={"public_url": "http://127.0.0.1:8080/gw"})
    assert metadata_paths(settings) == [
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server/gw",
        "/.well-known/openid-configuration/gw",
    ]
    assert authorization_server_metadata(settings)["issuer"] == "http://127.0.0.1:8080/gw"
