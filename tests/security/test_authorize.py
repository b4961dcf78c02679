"""Attacks on the authorization endpoint: grant types, PKCE, state, redirects, CORS, framing.

Black box: httpx against one gateway on a real port in front of the real legacy provider,
shared by every test of this module (each test registers its own clients). No test here needs
to log in: every refusal happens before the upstream hop, which is itself the point (R8, R15).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio

from tests.fixtures.peers import LegacyIdp, McpServer
from tests.security.harness import (
    REDIRECT_URI,
    RegisteredClient,
    Target,
    assert_page_headers,
    http_client,
    new_pkce,
    query_of,
    serve_target,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

HTTPS_REDIRECT = "https://client.example/cb"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(
    tmp_path_factory: pytest.TempPathFactory,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
) -> AsyncIterator[Target]:
    """The module's gateway: two resources in front of the SDK MCP server."""
    async with serve_target(
        tmp_path_factory.mktemp("authorize"),
        idp=legacy_idp,
        port=gateway_ports[0],
        resources=[
            {"path": "/mcp", "upstream": mcp_server.url, "name": "Demo MCP"},
            {"path": "/mcp-b", "upstream": mcp_server.url},
        ],
    ) as t:
        yield t


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(target: Target) -> RegisteredClient:
    """A public client with a loopback and an https redirect URI (loopback first)."""
    return await target.register(redirect_uris=(REDIRECT_URI, HTTPS_REDIRECT))


async def get(url: str, **headers: str) -> httpx.Response:
    """GET `url` without following redirects."""
    async with http_client() as http:
        return await http.get(url, headers=headers)


def assert_refused_page(resp: httpx.Response) -> None:
    """R8: an HTML page for the user, never a redirect anywhere."""
    assert resp.status_code == 400, resp.text[:300]
    assert "location" not in resp.headers
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    assert_page_headers(resp)


def assert_error_redirect(
    resp: httpx.Response, target: Target, redirect_uri: str, error: str, state: str | None
) -> dict[str, str]:
    """303 to the verified redirect URI with `error`, the client's `state` and `iss` (R8, R11)."""
    assert resp.status_code == 303, resp.text[:300]
    location = resp.headers["location"]
    assert location.startswith(redirect_uri + "?"), location
    params = query_of(location)
    assert params["error"] == error, params
    assert params["iss"] == target.url
    assert params.get("state") == state
    assert "code" not in params
    assert "access_token" not in params
    assert urlsplit(location).fragment == ""
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["referrer-policy"] == "no-referrer"
    return params


class TestResponseTypes:
    async def test_implicit_grant_is_refused_with_an_error_redirect(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R9: `response_type=token` (implicit) → `unsupported_response_type` at the verified
        redirect URI; no token in the query or a fragment."""
        resp = await get(target.authorize_url(client, state="s1", response_type="token"))
        assert_error_redirect(resp, target, REDIRECT_URI, "unsupported_response_type", "s1")

    @pytest.mark.parametrize(
        "response_type",
        [
            "code id_token",
            "code token",
            "code id_token token",
            "id_token",
            "id_token token",
            "none",
            "CODE",
            "code code",
        ],
    )
    async def test_hybrid_and_other_response_types_are_refused(
        self, target: Target, client: RegisteredClient, response_type: str
    ) -> None:
        """R9, invariant 2: only `response_type=code`; hybrid flows would put tokens in the
        front channel before the step-up."""
        resp = await get(target.authorize_url(client, state="s2", response_type=response_type))
        assert_error_redirect(resp, target, REDIRECT_URI, "unsupported_response_type", "s2")

    async def test_missing_response_type_is_invalid_request(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R6: a request without `response_type` is `invalid_request`."""
        resp = await get(target.authorize_url(client, state="s3", drop=["response_type"]))
        assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", "s3")

    @pytest.mark.parametrize("mode", ["fragment", "form_post", "web_message"])
    async def test_response_modes_other_than_query_are_refused(
        self, target: Target, client: RegisteredClient, mode: str
    ) -> None:
        """Only the query response mode: a fragment or a form post is not an OAuth 2.1 flow."""
        resp = await get(target.authorize_url(client, state="s4", response_mode=mode))
        assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", "s4")

    @pytest.mark.parametrize("name", ["request", "request_uri"])
    async def test_request_objects_are_refused(
        self, target: Target, client: RegisteredClient, name: str
    ) -> None:
        """A request object could smuggle a second set of parameters past validation."""
        url = target.authorize_url(client, state="s5", extra={name: "eyJhbGciOiJub25lIn0"})
        resp = await get(url)
        assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", "s5")


class TestPkce:
    async def test_missing_code_challenge_is_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R6, invariant 2: PKCE is mandatory; no `code_challenge` → `invalid_request`."""
        resp = await get(
            target.authorize_url(
                client, state="p1", drop=["code_challenge", "code_challenge_method"]
            )
        )
        params = assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", "p1")
        assert params["error_description"] == "code_challenge is required (PKCE)"

    async def test_plain_method_is_refused(self, target: Target, client: RegisteredClient) -> None:
        """R6, invariant 2: `code_challenge_method=plain` → `invalid_request` (S256 only)."""
        verifier = new_pkce().verifier
        resp = await get(
            target.authorize_url(
                client, state="p2", code_challenge=verifier, code_challenge_method="plain"
            )
        )
        params = assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", "p2")
        assert params["error_description"] == "code_challenge_method must be S256"

    @pytest.mark.parametrize("method", [None, "", "s256", "S512", "SHA256", "S256 "])
    async def test_absent_or_unknown_methods_are_refused(
        self, target: Target, client: RegisteredClient, method: str | None
    ) -> None:
        """R6: a missing method would mean `plain` (RFC 7636 §4.3); any other spelling than
        exactly `S256` is `invalid_request`."""
        if method is None:
            url = target.authorize_url(client, state="p3", drop=["code_challenge_method"])
        else:
            url = target.authorize_url(client, state="p3", code_challenge_method=method)
        resp = await get(url)
        assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", "p3")

    @pytest.mark.parametrize(
        "challenge", ["short", "a" * 42, "a" * 129, "+" * 43, "=" * 43, "a" * 42 + "/"]
    )
    async def test_malformed_challenges_are_refused(
        self, target: Target, client: RegisteredClient, challenge: str
    ) -> None:
        """R6: an S256 challenge is 43 base64url characters; anything else is refused."""
        resp = await get(target.authorize_url(client, state="p4", code_challenge=challenge))
        params = assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", "p4")
        assert params["error_description"] == "code_challenge is malformed"


class TestState:
    async def test_missing_state_is_refused(self, target: Target, client: RegisteredClient) -> None:
        """Invariant 2: `state` is required (the client's CSRF defence); the error goes to the
        verified redirect URI without a `state`."""
        resp = await get(target.authorize_url(client, drop=["state"]))
        params = assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", None)
        assert params["error_description"] == "state is required"

    @pytest.mark.parametrize("state", ["", "a\nb", "é"])
    async def test_empty_or_non_ascii_state_is_refused(
        self, target: Target, client: RegisteredClient, state: str
    ) -> None:
        """A state that cannot be echoed exactly (RFC 6749 VSCHAR) is refused, not mangled."""
        resp = await get(target.authorize_url(client, state=state))
        params = assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", None)
        assert params["error_description"] in ("state is required", "state is malformed")

    async def test_state_is_echoed_exactly_in_error_redirects(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R10: the state comes back byte for byte, special characters included."""
        state = "a b&c=d?e/f%25g+h~"
        resp = await get(target.authorize_url(client, state=state, response_type="token"))
        assert_error_redirect(resp, target, REDIRECT_URI, "unsupported_response_type", state)


class TestRepeatedParameters:
    @pytest.mark.parametrize(
        "name", ["response_type", "code_challenge", "code_challenge_method", "scope", "resource"]
    )
    async def test_repeated_parameter_is_invalid_request(
        self, target: Target, client: RegisteredClient, name: str
    ) -> None:
        """R14, invariant 2: a parameter sent twice is `invalid_request` (no first-wins or
        last-wins that two parsers could disagree on)."""
        pkce = new_pkce()
        pairs = [
            ("response_type", "code"),
            ("client_id", client.client_id),
            ("redirect_uri", REDIRECT_URI),
            ("state", "r1"),
            ("code_challenge", pkce.challenge),
            ("code_challenge_method", "S256"),
            ("scope", "mcp"),
            ("resource", target.resource()),
        ]
        value = dict(pairs)[name]
        pairs.append((name, value if name != "resource" else target.resource("/mcp-b")))
        resp = await get(target.authorize_url(client, pairs=pairs))
        params = assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", "r1")
        assert params["error_description"] == f"parameter {name} is repeated"

    @pytest.mark.parametrize("name", ["client_id", "redirect_uri"])
    async def test_repeated_client_or_redirect_uri_is_a_page_not_a_redirect(
        self, target: Target, client: RegisteredClient, name: str
    ) -> None:
        """R8, R14: with `client_id` or `redirect_uri` repeated nothing is verified, so the user
        gets a page and nobody is redirected."""
        pairs = [
            ("client_id", client.client_id),
            ("redirect_uri", REDIRECT_URI),
            ("response_type", "code"),
            ("state", "r2"),
            ("code_challenge", new_pkce().challenge),
            ("code_challenge_method", "S256"),
        ]
        pairs.append((name, dict(pairs)[name] if name == "client_id" else HTTPS_REDIRECT))
        assert_refused_page(await get(target.authorize_url(client, pairs=pairs)))

    async def test_repeated_state_is_dropped_from_the_error(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R14: two `state`s are refused and neither is echoed (which one would be right?)."""
        pairs = [
            ("client_id", client.client_id),
            ("redirect_uri", REDIRECT_URI),
            ("response_type", "code"),
            ("state", "one"),
            ("state", "two"),
            ("code_challenge", new_pkce().challenge),
            ("code_challenge_method", "S256"),
        ]
        resp = await get(target.authorize_url(client, pairs=pairs))
        assert_error_redirect(resp, target, REDIRECT_URI, "invalid_request", None)


class TestRedirectUris:
    async def test_unknown_client_gets_a_page(self, target: Target) -> None:
        """R8: an unknown `client_id` is never redirected anywhere."""
        ghost = RegisteredClient("no-such-client", "https://evil.example/cb")
        assert_refused_page(await get(target.authorize_url(ghost)))

    async def test_missing_client_id_gets_a_page(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R8: without `client_id` the user gets a page."""
        assert_refused_page(await get(target.authorize_url(client, drop=["client_id"])))

    @pytest.mark.parametrize(
        "redirect_uri",
        [
            # unregistered, or registered with a twist
            "https://evil.example/cb",
            "https://client.example/cb/",
            "https://client.example/cb?x=1",
            "https://client.example/cb#frag",
            "https://client.example/CB",
            "https://CLIENT.example/cb",
            "https://client.example:443/cb",
            "https://client.example/cb/../evil",
            "https://client.example/cb%2f..%2fevil",
            "http://client.example/cb",
            # userinfo tricks
            "https://client.example@evil.example/cb",
            "https://evil.example@client.example/cb",
            "https://client.example%40evil.example/cb",
            "https://client.example:443@evil.example/cb",
            # encoded hosts
            "https://client%2eexample/cb",
            "https://client.example%2f@evil.example/cb",
            "https://evil.example%23@client.example/cb",
            "https://client.example%00.evil.example/cb",
            "https://%63lient.example/cb",
            # backslashes
            "https://evil.example\\@client.example/cb",
            "https://client.example\\.evil.example/cb",
            "https:\\\\evil.example/cb",
            "/\\evil.example/cb",
            "//evil.example/cb",
            # other schemes
            "javascript:alert(1)//client.example/cb",
            "data:text/html,client.example/cb",
        ],
    )
    async def test_open_redirect_attempts_get_a_page(
        self, target: Target, client: RegisteredClient, redirect_uri: str
    ) -> None:
        """R7, R8, invariant 3: only an exactly registered URI is a redirect target; every
        lookalike gets an HTML page and no `Location`."""
        assert_refused_page(await get(target.authorize_url(client, redirect_uri=redirect_uri)))

    @pytest.mark.parametrize(
        "redirect_uri",
        [
            "https://127.0.0.1:33418/callback",  # other scheme, same loopback port
            "http://localhost:33418/callback",  # other loopback host
            "http://[::1]:33418/callback",
            "http://127.0.0.2:33418/callback",
            "http://localhost.evil.com:33418/callback",
            "http://127.0.0.1.evil.com:33418/callback",
            "http://evil.com:33418/callback",
            "http://127.0.0.1:33418@evil.com/callback",
            "http://evil.com@127.0.0.1:33418/callback",
            "http://127.0.0.1:33418/callbackx",
            "http://127.0.0.1:33418/callback/../evil",
            "http://127.0.0.1:33418/callback?next=https://evil.example",
            "http://127.0.0.1:0/callback",
            "http://127.0.0.1:99999/callback",
            "http://127.0.0.1:33418\\@evil.com/callback",
            "http://0x7f000001:33418/callback",
            "http://2130706433:33418/callback",
        ],
    )
    async def test_loopback_port_rule_cannot_be_stretched(
        self, target: Target, client: RegisteredClient, redirect_uri: str
    ) -> None:
        """R7: the loopback exception (RFC 8252 §7.3) lets only the port vary; another scheme,
        host, path or query with the "same" loopback port is an unregistered URI."""
        assert_refused_page(await get(target.authorize_url(client, redirect_uri=redirect_uri)))

    async def test_loopback_port_may_vary(self, target: Target, client: RegisteredClient) -> None:
        """R7 (positive control for the test above): the registered loopback URI on another
        port is accepted and the consent page shows it."""
        other = "http://127.0.0.1:9999/callback"
        resp = await get(target.authorize_url(client, redirect_uri=other))
        assert resp.status_code == 200, resp.text[:300]
        assert "http://127.0.0.1:9999/callback" in resp.text

    async def test_missing_redirect_uri_with_two_registered_gets_a_page(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R8: with several registered URIs and none named, the server must not pick one."""
        assert_refused_page(await get(target.authorize_url(client, drop=["redirect_uri"])))

    async def test_errors_are_redirected_only_to_the_uri_that_was_verified(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R8: once the https URI is verified, an error for the request goes there (not to the
        first registered URI)."""
        resp = await get(
            target.authorize_url(
                client, redirect_uri=HTTPS_REDIRECT, state="v1", response_type="token"
            )
        )
        assert_error_redirect(resp, target, HTTPS_REDIRECT, "unsupported_response_type", "v1")


class TestResource:
    @pytest.mark.parametrize(
        "resource",
        [
            "https://evil.example/mcp",
            "{url}/mcp/",
            "{url}/MCP",
            "{url}/mcp-c",
            "{url}/mcp?x=1",
            "{url}/mcp#f",
            "{url}",
        ],
    )
    async def test_unknown_resource_is_invalid_target(
        self, target: Target, client: RegisteredClient, resource: str
    ) -> None:
        """R12: a `resource` the gateway does not serve, exactly, is `invalid_target`."""
        url = target.authorize_url(client, state="t1", resource=resource.format(url=target.url))
        resp = await get(url)
        assert_error_redirect(resp, target, REDIRECT_URI, "invalid_target", "t1")


class TestCors:
    async def test_preflight_is_refused_without_cors_headers(self, target: Target) -> None:
        """R14, invariant 2: no CORS on the authorization endpoint: a preflight gets 405 and no
        `Access-Control-*` header."""
        async with http_client() as http:
            resp = await http.options(
                target.url + "/oauth/authorize",
                headers={
                    "Origin": "https://evil.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            )
        assert resp.status_code == 405
        assert resp.headers["allow"] == "GET, POST"
        assert not [h for h in resp.headers if h.lower().startswith("access-control-")]

    @pytest.mark.parametrize("method", ["GET", "POST"])
    async def test_cross_origin_request_gets_no_cors_headers(
        self, target: Target, client: RegisteredClient, method: str
    ) -> None:
        """R14: a cross-origin GET or form POST gets the page, but never an
        `Access-Control-Allow-*` header a script could use to read it."""
        url = target.authorize_url(client)
        async with http_client() as http:
            if method == "GET":
                resp = await http.get(url, headers={"Origin": "https://evil.example"})
            else:
                base, _, query = url.partition("?")
                resp = await http.post(
                    base,
                    content=query.encode(),
                    headers={
                        "Origin": "https://evil.example",
                        "Content-Type": "application/x-www-form-urlencoded",
                    },
                )
        assert resp.status_code == 200, resp.text[:300]
        assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
        assert_page_headers(resp)


class TestPages:
    async def test_consent_page_is_unframeable_and_uncached(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R13, R14, invariant 5: the consent page forbids framing (XFO and CSP), caching and
        referrers, runs no script and loads nothing from a third party."""
        resp = await get(target.authorize_url(client))
        assert resp.status_code == 200
        assert_page_headers(resp)
        html = resp.text.lower()
        assert "<script" not in html
        assert "<link" not in html
        assert 'src="http' not in html
        assert "@import" not in html

    async def test_error_page_is_unframeable(self, target: Target) -> None:
        """R13: the error page of the authorization endpoint has the same headers."""
        ghost = RegisteredClient("no-such-client", "https://evil.example/cb")
        assert_refused_page(await get(target.authorize_url(ghost)))

    async def test_consent_page_names_client_redirect_host_resource_and_scopes(
        self, target: Target
    ) -> None:
        """R15, R24: the consent page names the client, the host it returns to, the resource
        and the scopes, and warns when the client returns only to localhost."""
        named = await target.register(name="Suspicious Tool")
        resp = await get(target.authorize_url(named, scope="mcp"))
        assert resp.status_code == 200
        text = resp.text
        assert "Suspicious Tool" in text
        assert '<strong class="mono">127.0.0.1</strong>' in text
        assert "Demo MCP" in text
        assert "<code>mcp</code>" in text
        assert "returns only to this computer" in text

    async def test_client_name_is_escaped_on_the_consent_page(self, target: Target) -> None:
        """A client's self-chosen name cannot inject markup into the consent page."""
        evil = await target.register(name='<img src=x onerror=alert(1)>"')
        resp = await get(target.authorize_url(evil))
        assert resp.status_code == 200
        assert "<img src=x" not in resp.text
        assert "&lt;img src=x onerror=alert(1)&gt;&quot;" in resp.text

    async def test_first_answer_is_consent_not_the_upstream(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R15 (confused deputy): a new client never goes straight to the upstream provider;
        the first answer is the consent page, with no redirect."""
        resp = await get(target.authorize_url(client))
        assert resp.status_code == 200
        assert "location" not in resp.headers
        assert target.idp.issuer not in resp.headers.get("location", "")
        assert 'name="decision" value="approve"' in resp.text


class TestDiscovery:
    @pytest.mark.parametrize(
        "path", ["/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"]
    )
    async def test_metadata_offers_only_code_with_s256(self, target: Target, path: str) -> None:
        """R4, R9, R11: the authorization server metadata offers only `code`, the query
        response mode, PKCE S256 and the two grants, and announces `iss` in responses."""
        resp = await get(target.url + path)
        assert resp.status_code == 200
        meta = resp.json()
        assert meta["issuer"] == target.url
        assert meta["response_types_supported"] == ["code"]
        assert meta["response_modes_supported"] == ["query"]
        assert meta["code_challenge_methods_supported"] == ["S256"]
        assert meta["grant_types_supported"] == ["authorization_code", "refresh_token"]
        assert meta["authorization_response_iss_parameter_supported"] is True
        assert not any(
            k.startswith("request") and k.endswith("supported") and meta[k]
            for k in meta
            if k.startswith("request_")
        )

    async def test_jwks_publishes_no_private_material(self, target: Target) -> None:
        """R28: the published keys are public keys with one `alg` each (no `d`, no secret)."""
        resp = await get(target.url + "/oauth/jwks.json")
        keys = resp.json()["keys"]
        assert keys
        for key in keys:
            assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(key)
            assert key["alg"] in ("ES256", "EdDSA")
            assert key["use"] == "sig"

    async def test_protected_resource_metadata_names_the_gateway(self, target: Target) -> None:
        """R1, R2: each resource's PRM names exactly that resource and the gateway first."""
        for path in ("/mcp", "/mcp-b"):
            doc = (await get(target.prm(path))).json()
            assert doc["resource"] == target.resource(path)
            assert doc["authorization_servers"][0] == target.url
            assert doc["bearer_methods_supported"] == ["header"]


class TestRegistration:
    async def register_raw(self, target: Target, body: object) -> httpx.Response:
        """POST `body` as JSON to the registration endpoint."""
        async with http_client() as http:
            return await http.post(target.url + "/oauth/register", json=body)

    @pytest.mark.parametrize(
        "uri",
        [
            "http://evil.example/cb",
            "http://localhost.evil.com/cb",
            "http://127.0.0.1.evil.com/cb",
            "javascript:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "file:///etc/passwd",
            "https://client.example/cb#fragment",
            "https://user@client.example/cb",
            "https://client.example\\@evil.example/cb",
            "https://client%2eexample/cb",
            "https://CLIENT.example/cb",
            "myapp:/callback",
            "/relative/cb",
            "",
        ],
    )
    async def test_unsafe_redirect_uris_cannot_be_registered(
        self, target: Target, uri: str
    ) -> None:
        """R23, R36: only https, loopback http and policy-listed custom schemes, without
        fragment, userinfo or a host that needs decoding → else `invalid_redirect_uri`."""
        resp = await self.register_raw(
            target, {"redirect_uris": [uri], "token_endpoint_auth_method": "none"}
        )
        assert resp.status_code == 400
        assert resp.json()["error"] == "invalid_redirect_uri"
        assert resp.headers["cache-control"] == "no-store"

    @pytest.mark.parametrize(
        "body",
        [
            ["not", "an", "object"],
            {"redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": "private_key_jwt"},
            {"redirect_uris": [REDIRECT_URI], "grant_types": ["implicit"]},
            {"redirect_uris": [REDIRECT_URI], "grant_types": ["authorization_code", "password"]},
            {"redirect_uris": [REDIRECT_URI], "response_types": ["token"]},
            {"redirect_uris": [REDIRECT_URI], "response_types": ["code", "id_token"]},
        ],
    )
    async def test_unsafe_client_metadata_is_refused(self, target: Target, body: object) -> None:
        """R23, R9: no implicit or password grant, no token response type, no client
        authentication method the gateway does not implement → `invalid_client_metadata`."""
        resp = await self.register_raw(target, body)
        assert resp.status_code == 400
        assert resp.json()["error"] == "invalid_client_metadata"

    async def test_public_clients_get_no_secret_and_confidential_ones_get_one_once(
        self, target: Target
    ) -> None:
        """RFC 7591: a public client has no secret; a confidential one gets its secret in the
        201 response only (`no-store`)."""
        public = await self.register_raw(
            target, {"redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": "none"}
        )
        confidential = await self.register_raw(
            target,
            {
                "redirect_uris": [HTTPS_REDIRECT],
                "token_endpoint_auth_method": "client_secret_basic",
            },
        )
        assert public.status_code == confidential.status_code == 201
        assert "client_secret" not in public.json()
        assert len(confidential.json()["client_secret"]) >= 43
        assert confidential.headers["cache-control"] == "no-store"


async def test_registration_is_rate_limited_per_ip(
    tmp_path: Path, legacy_idp: LegacyIdp, gateway_ports: tuple[int, int], mcp_server: McpServer
) -> None:
    """R23 (abuse of open registration): past `registrations_per_ip_per_hour`, even valid
    registrations get 429 `slow_down` with `Retry-After`; invalid ones count too."""
    async with (
        serve_target(
            tmp_path / "rate",
            idp=legacy_idp,
            port=gateway_ports[1],
            resources=[{"path": "/mcp", "upstream": mcp_server.url}],
            policy={"registration": {"registrations_per_ip_per_hour": 2}},
        ) as limited,
        http_client() as http,
    ):
        statuses: list[int] = []
        last: httpx.Response | None = None
        for body in (
            {"redirect_uris": ["http://evil.example/cb"]},
            {"redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": "none"},
            {"redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": "none"},
        ):
            last = await http.post(limited.url + "/oauth/register", json=body)
            statuses.append(last.status_code)
    assert statuses == [400, 201, 429]
    assert last is not None
    assert last.json()["error"] == "slow_down"
    assert last.headers["retry-after"] == "3600"
