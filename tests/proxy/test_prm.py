"""RFC 9728 Protected Resource Metadata for every resource (R1, R2, R3)."""

from __future__ import annotations

import pytest

from gateway.core.prm import prm_path, prm_url, protected_resource_metadata
from tests.proxy.conftest import PRM, MakeGateway, challenge


class TestDocuments:
    async def test_document_per_resource(self, make_gateway: MakeGateway) -> None:
        """Each resource has its document at the well-known path + its own path (R2)."""
        gw = await make_gateway(
            resources=[
                {"path": "/mcp", "upstream": "http://127.0.0.1:9/mcp", "name": "Tools"},
                {"path": "/team/mcp", "upstream": "http://127.0.0.1:9/mcp"},
            ]
        )
        resp = await gw.client.get("/.well-known/oauth-protected-resource/mcp")
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == {
            "resource": "http://127.0.0.1:8080/mcp",
            "authorization_servers": ["http://127.0.0.1:8080"],
            "bearer_methods_supported": ["header"],
            "scopes_supported": ["mcp"],
            "resource_name": "Tools",
        }
        other = await gw.client.get("/.well-known/oauth-protected-resource/team/mcp")
        assert (await other.json())["resource"] == "http://127.0.0.1:8080/team/mcp"

    async def test_challenge_points_at_the_document(self, make_gateway: MakeGateway) -> None:
        """The 401's resource_metadata is exactly the document's URL, whose `resource` is the
        URL the client requested (R2, R3, RFC 9728 §3.3)."""
        gw = await make_gateway()
        resp = await gw.client.post("/mcp", json={})
        assert resp.headers["WWW-Authenticate"] == challenge()
        doc = await (await gw.client.get(PRM.removeprefix("http://127.0.0.1:8080"))).json()
        assert doc["resource"] == "http://127.0.0.1:8080/mcp"

    async def test_trusted_issuers_listed_after_gateway(self, make_gateway: MakeGateway) -> None:
        """Trusted issuers are further authorization servers; the gateway stays first (R1)."""
        gw = await make_gateway(
            keys={
                "trusted_issuers": [
                    {"issuer": "https://idp.example", "jwks_uri": "https://idp.example/jwks"}
                ]
            }
        )
        doc = await (await gw.client.get("/.well-known/oauth-protected-resource/mcp")).json()
        assert doc["authorization_servers"] == ["http://127.0.0.1:8080", "https://idp.example"]


class TestBuilder:
    def test_empty_arrays_omitted(self) -> None:
        """Empty scopes_supported is left out (R2)."""
        doc = protected_resource_metadata(
            resource="https://gw/mcp", authorization_servers=["https://gw"]
        )
        assert doc == {
            "resource": "https://gw/mcp",
            "authorization_servers": ["https://gw"],
            "bearer_methods_supported": ["header"],
        }

    def test_needs_an_authorization_server(self) -> None:
        """R1: at least one authorization server."""
        with pytest.raises(ValueError, match="at least one"):
            protected_resource_metadata(resource="https://gw/mcp", authorization_servers=[])

    @pytest.mark.parametrize(
        ("resource", "url"),
        [
            (
                "https://gw.example/mcp",
                "https://gw.example/.well-known/oauth-protected-resource/mcp",
            ),
            (
                "https://gw.example/a/b",
                "https://gw.example/.well-known/oauth-protected-resource/a/b",
            ),
            ("https://gw.example/", "https://gw.example/.well-known/oauth-protected-resource"),
        ],
    )
    def test_url_insertion(self, resource: str, url: str) -> None:
        """The well-known string goes between host and path (RFC 9728 §3.1)."""
        assert prm_url(resource) == url

    def test_root_path(self) -> None:
        """A resource at `/` has the bare well-known path."""
        assert prm_path("/") == "/.well-known/oauth-protected-resource"
