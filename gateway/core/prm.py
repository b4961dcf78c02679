"""RFC 9728 Protected Resource Metadata documents and their URLs (pure).

The document's `resource` is the canonical resource identifier, identical to the URL the client
requests and to the `aud` of tokens for it (R2, RFC 9728 §3.3); `authorization_servers` names the
gateway first, because MCP clients use the first entry (R1); empty arrays are omitted (R2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def prm_path(resource_path: str) -> str:
    """The well-known path for a resource path: the suffix goes after the well-known string."""
    return WELL_KNOWN if resource_path == "/" else WELL_KNOWN + resource_path


def prm_url(resource_url: str) -> str:
    """`https://gw/mcp` -> `https://gw/.well-known/oauth-protected-resource/mcp` (RFC 9728 §3.1)."""
    parts = urlsplit(resource_url)
    path = parts.path if parts.path not in ("", "/") else "/"
    return f"{parts.scheme}://{parts.netloc}{prm_path(path)}"


def protected_resource_metadata(
    *,
    resource: str,
    authorization_servers: Sequence[str],
    scopes_supported: Sequence[str] = (),
    resource_name: str | None = None,
) -> dict[str, Any]:
    """The JSON document served at `prm_url(resource)`."""
    if not authorization_servers:
        raise ValueError("at least one authorization server is required (R1)")
    doc: dict[str, Any] = {
        "resource": resource,
        "authorization_servers": list(dict.fromkeys(authorization_servers)),
        "bearer_methods_supported": ["header"],
    }
    if scopes_supported:
        doc["scopes_supported"] = list(scopes_supported)
    if resource_name:
        doc["resource_name"] = resource_name
    return doc
