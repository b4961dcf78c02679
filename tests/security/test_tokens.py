"""Attacks on the token and revocation endpoints: code replay and injection, PKCE at redemption,
client confusion, refresh theft and reuse, revocation, and what a token response reveals.

Black box: a legitimate user completes the whole flow (real legacy provider, real TOTP) and
the attacker then replays, swaps or steals what the client received. Whether a token still
works is asked where it matters: at the MCP proxy. One gateway per module (a clock the tests
can move forward instead of sleeping); each test has its own user and clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
import pytest_asyncio

from tests.fixtures.peers import LegacyIdp, McpServer
from tests.security.harness import (
    OffsetClock,
    RegisteredClient,
    Target,
    Tokens,
    http_client,
    new_pkce,
    serve_target,
    tool_call,
    unverified,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


def resources(mcp: McpServer) -> list[dict[str, str]]:
    """Two resources in front of the same SDK MCP server."""
    return [
        {"path": "/mcp", "upstream": mcp.url, "name": "Demo MCP"},
        {"path": "/mcp-b", "upstream": mcp.url},
    ]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(
    tmp_path_factory: pytest.TempPathFactory,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
) -> AsyncIterator[Target]:
    """The module's gateway, on a clock the tests can move forward."""
    async with serve_target(
        tmp_path_factory.mktemp("tokens"),
        idp=legacy_idp,
        port=gateway_ports[0],
        resources=resources(mcp_server),
        clock=OffsetClock(),
    ) as t:
        yield t


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(target: Target) -> RegisteredClient:
    """A public client registered for the module."""
    return await target.register(name="Token-suite client")


def assert_oauth_error(resp: httpx.Response, status: int, error: str) -> dict[str, str]:
    """RFC 6749 §5.2 JSON error, never cached (R19)."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert body["error"] == error, body
    assert set(body) <= {"error", "error_description"}
    return dict(body)


async def works(target: Target, token: str, path: str = "/mcp") -> int:
    """The status of a `tools/list` with this token (200 while it is honoured)."""
    return (await target.mcp(token=token, path=path)).status_code


async def refused_within(target: Target, token: str, seconds: float = 3.0) -> bool:
    """True once the proxy refuses `token` with 401 (revocations propagate through a feed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        resp = await target.mcp(token=token)
        if resp.status_code == 401:
            assert 'error="invalid_token"' in resp.headers["www-authenticate"]
            return True
        await asyncio.sleep(0.05)
    return False


class TestCodeRedemption:
    async def test_token_response_is_uncached_and_reveals_nothing_upstream(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R19, DESIGN §2.7/§3: a token response is `no-store`, holds only the gateway's own
        tokens (no upstream or ID token) and the access token is an RFC 9068 JWT bound to the
        resource, proving the step-up (`amr` otp + mfa)."""
        user = await target.new_user()
        grant = await target.grant(user, client)
        resp = await target.redeem(grant)
        assert resp.status_code == 200, resp.text
        assert resp.headers["cache-control"] == "no-store"
        assert resp.headers["pragma"] == "no-cache"
        body = resp.json()
        assert set(body) == {"access_token", "token_type", "expires_in", "scope", "refresh_token"}
        assert body["token_type"] == "Bearer"
        header, claims = unverified(body["access_token"])
        assert header["typ"] == "at+jwt"
        assert header["alg"] == "ES256"
        assert claims["aud"] == target.resource()
        assert claims["iss"] == target.url
        assert claims["sub"] == user.name
        assert claims["client_id"] == client.client_id
        assert {"otp", "mfa"} <= set(claims["amr"])
        assert grant.iss == target.url
        assert await works(target, body["access_token"]) == 200

    async def test_replayed_code_is_refused_and_revokes_what_it_issued(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R17, invariant 4: a code works once; a second (otherwise valid) redemption is
        `invalid_grant` and revokes the access and refresh tokens the first one produced."""
        user = await target.new_user()
        grant = await target.grant(user, client)
        first = await target.redeem(grant)
        assert first.status_code == 200
        tokens = first.json()
        assert await works(target, tokens["access_token"]) == 200
        assert_oauth_error(await target.redeem(grant), 400, "invalid_grant")
        assert await refused_within(target, tokens["access_token"])
        assert_oauth_error(
            await target.refresh(tokens["refresh_token"], client), 400, "invalid_grant"
        )

    async def test_replay_with_wrong_verifier_is_refused_without_revoking(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R17: a replay that is itself invalid (wrong PKCE verifier, as an attacker holding
        only the code would send) is refused but does not revoke the legitimate grant."""
        user = await target.new_user()
        grant = await target.grant(user, client)
        tokens = (await target.redeem(grant)).json()
        replay = await target.redeem(grant, code_verifier=new_pkce().verifier)
        assert_oauth_error(replay, 400, "invalid_grant")
        await asyncio.sleep(0.2)  # a revocation, had there been one, would have arrived
        assert await works(target, tokens["access_token"]) == 200
        assert (await target.refresh(tokens["refresh_token"], client)).status_code == 200

    async def test_code_of_one_client_is_refused_to_another(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R18 (code injection): client B redeeming client A's code, with A's verifier and
        redirect URI, gets `invalid_grant` and no token."""
        other = await target.register(name="Another client")
        user = await target.new_user()
        grant = await target.grant(user, client)
        resp = await target.redeem(grant, client_id=other.client_id)
        body = assert_oauth_error(resp, 400, "invalid_grant")
        assert body["error_description"] == "the code was not issued to this client"

    async def test_wrong_verifier_is_invalid_grant(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R18, invariant 2: PKCE is verified at redemption; a verifier that does not hash to
        the challenge is `invalid_grant` (and the code is then spent)."""
        user = await target.new_user()
        grant = await target.grant(user, client)
        wrong = await target.redeem(grant, code_verifier=new_pkce().verifier)
        body = assert_oauth_error(wrong, 400, "invalid_grant")
        assert body["error_description"] == "code_verifier does not match the code_challenge"
        # The challenge itself is not a verifier (a "plain" downgrade at the token endpoint).
        user2 = await target.new_user()
        grant2 = await target.grant(user2, client)
        plain = await target.redeem(grant2, code_verifier=grant2.pkce.challenge)
        assert_oauth_error(plain, 400, "invalid_grant")

    async def test_missing_verifier_is_invalid_request(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R18: a code redemption without `code_verifier` is `invalid_request`."""
        user = await target.new_user()
        grant = await target.grant(user, client)
        form = target.redeem_form(grant)
        del form["code_verifier"]
        body = assert_oauth_error(await target.token(form), 400, "invalid_request")
        assert body["error_description"] == "code_verifier is missing (PKCE)"
        # Refusing the request did not spend the code: the genuine redemption still works.
        assert (await target.redeem(grant)).status_code == 200

    async def test_redirect_uri_and_resource_must_match_the_code(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R21, R12: a `redirect_uri` sent at the token endpoint must equal the authorization
        request's (`invalid_grant`); a `resource` must be the code's (`invalid_target`)."""
        user = await target.new_user()
        grant = await target.grant(user, client)
        other_uri = await target.redeem(grant, redirect_uri="http://127.0.0.1:9999/callback")
        assert_oauth_error(other_uri, 400, "invalid_grant")
        grant2 = await target.grant(user, client, steps=1)
        other_resource = await target.redeem(grant2, resource=target.resource("/mcp-b"))
        assert_oauth_error(other_resource, 400, "invalid_target")

    async def test_unknown_and_expired_codes_are_invalid_grant(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R10: a guessed code is `invalid_grant`; a real one is dead after its 60 s."""
        user = await target.new_user()
        grant = await target.grant(user, client)
        guessed = await target.redeem(grant, code="A" * 43)
        assert_oauth_error(guessed, 400, "invalid_grant")
        assert isinstance(target.clock, OffsetClock)
        target.clock.advance(61)
        assert_oauth_error(await target.redeem(grant), 400, "invalid_grant")

    async def test_parameters_in_the_query_string_are_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """OAuth 2.1 §3.2: token requests carry parameters in the body only (a query string
        ends up in logs and referrers)."""
        user = await target.new_user()
        grant = await target.grant(user, client)
        async with http_client() as http:
            resp = await http.post(
                target.url + "/oauth/token",
                params={"code": grant.code},
                data={k: v for k, v in target.redeem_form(grant).items() if k != "code"},
            )
            as_json = await http.post(target.url + "/oauth/token", json=target.redeem_form(grant))
        assert_oauth_error(resp, 400, "invalid_request")
        assert_oauth_error(as_json, 400, "invalid_request")

    async def test_repeated_token_parameters_are_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R14: a token request with a parameter twice is `invalid_request`."""
        user = await target.new_user()
        grant = await target.grant(user, client)
        pairs = [*target.redeem_form(grant).items(), ("code_verifier", new_pkce().verifier)]
        async with http_client() as http:
            resp = await http.post(
                target.url + "/oauth/token",
                content=urlencode(pairs).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        assert_oauth_error(resp, 400, "invalid_request")
        assert (await target.redeem(grant)).status_code == 200

    @pytest.mark.parametrize(
        "grant_type",
        [
            "password",
            "client_credentials",
            "implicit",
            "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "urn:ietf:params:oauth:grant-type:device_code",
            "token",
        ],
    )
    async def test_other_grant_types_are_unsupported(
        self, target: Target, client: RegisteredClient, grant_type: str
    ) -> None:
        """R9, R19: only authorization_code and refresh_token exist."""
        resp = await target.token(
            {
                "grant_type": grant_type,
                "client_id": client.client_id,
                "username": "alice",
                "password": "correct horse",
            }
        )
        assert_oauth_error(resp, 400, "unsupported_grant_type")


class TestClientAuthentication:
    async def test_confidential_client_needs_its_secret(self, target: Target) -> None:
        """R19: a confidential client with a wrong secret, or none, is `invalid_client` (401);
        with HTTP Basic the answer carries a Basic challenge."""
        conf = await target.register(auth_method="client_secret_basic", name="Confidential")
        assert conf.client_secret
        form = {
            "grant_type": "authorization_code",
            "code": "x" * 43,
            "code_verifier": new_pkce().verifier,
        }
        wrong = await target.token(form, auth=(conf.client_id, conf.client_secret + "x"))
        assert_oauth_error(wrong, 401, "invalid_client")
        assert wrong.headers["www-authenticate"] == 'Basic realm="mfa-gateway"'
        none = await target.token({**form, "client_id": conf.client_id})
        assert_oauth_error(none, 401, "invalid_client")
        assert "www-authenticate" not in none.headers
        other_method = await target.token(
            {**form, "client_id": conf.client_id, "client_secret": conf.client_secret}
        )
        assert_oauth_error(other_method, 401, "invalid_client")
        right = await target.token(form, auth=(conf.client_id, conf.client_secret))
        assert_oauth_error(right, 400, "invalid_grant")  # authenticated; the code is made up

    async def test_public_client_presenting_a_secret_and_unknown_clients_are_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R19: a public client that sends a secret, or a client id nobody registered, is
        `invalid_client`."""
        form = {
            "grant_type": "authorization_code",
            "code": "x" * 43,
            "code_verifier": new_pkce().verifier,
        }
        secret = await target.token(
            {**form, "client_id": client.client_id, "client_secret": "guess"}
        )
        assert_oauth_error(secret, 401, "invalid_client")
        unknown = await target.token({**form, "client_id": "nobody"})
        assert_oauth_error(unknown, 401, "invalid_client")
        anonymous = await target.token(form)
        assert_oauth_error(anonymous, 401, "invalid_client")


class TestRefresh:
    async def test_rotation_and_reuse_revokes_the_family(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R20, invariant 4: each refresh rotates the refresh token; presenting a rotated-out
        one is `invalid_grant` and revokes the whole family: the newest refresh token and
        every access token of the grant stop working."""
        user = await target.new_user()
        tokens = await target.tokens(user, client)
        assert tokens.refresh_token is not None
        rotated = await target.refresh(tokens.refresh_token, client)
        assert rotated.status_code == 200
        assert rotated.headers["cache-control"] == "no-store"
        new = rotated.json()
        assert new["refresh_token"] != tokens.refresh_token
        assert await works(target, new["access_token"]) == 200
        reuse = await target.refresh(tokens.refresh_token, client)
        assert_oauth_error(reuse, 400, "invalid_grant")
        assert_oauth_error(await target.refresh(new["refresh_token"], client), 400, "invalid_grant")
        assert await refused_within(target, new["access_token"])
        assert await refused_within(target, tokens.access_token)

    async def test_refresh_token_of_another_client_is_refused(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R20: a stolen refresh token presented by another client is `invalid_grant`, and
        does not burn the owner's token."""
        thief = await target.register(name="Thief")
        user = await target.new_user()
        tokens = await target.tokens(user, client)
        assert tokens.refresh_token is not None
        stolen = await target.refresh(tokens.refresh_token, thief)
        assert_oauth_error(stolen, 400, "invalid_grant")
        assert (await target.refresh(tokens.refresh_token, client)).status_code == 200

    async def test_refresh_cannot_widen_scope_or_change_resource(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R20, R12: a refresh may only narrow the scope and keeps its resource."""
        user = await target.new_user()
        tokens = await target.tokens(user, client)
        assert tokens.refresh_token is not None
        form = {
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh_token,
            "client_id": client.client_id,
        }
        wider = await target.token({**form, "scope": "mcp admin"})
        assert_oauth_error(wider, 400, "invalid_scope")
        other = await target.token({**form, "resource": target.resource("/mcp-b")})
        assert_oauth_error(other, 400, "invalid_target")
        forged = await target.token({**form, "refresh_token": tokens.refresh_token + "x"})
        assert_oauth_error(forged, 400, "invalid_grant")

    async def test_refresh_keeps_the_step_up_facts(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R31, DESIGN §2.11: a refresh never extends MFA: `auth_time`, `amr` and `acr` of the
        new access token are those of the step-up."""
        user = await target.new_user()
        tokens = await target.tokens(user, client)
        assert tokens.refresh_token is not None
        assert isinstance(target.clock, OffsetClock)
        target.clock.advance(120)
        new = (await target.refresh(tokens.refresh_token, client)).json()
        _, before = unverified(tokens.access_token)
        _, after = unverified(new["access_token"])
        assert after["iat"] >= before["iat"] + 120
        assert (after["auth_time"], after["amr"], after["acr"]) == (
            before["auth_time"],
            before["amr"],
            before["acr"],
        )


async def test_refresh_after_mfa_max_age_is_refused(
    tmp_path: Path,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
) -> None:
    """R31, DESIGN §2.11: past the policy's `mfa_max_age` since the step-up, a refresh is
    `invalid_grant`, however fresh the refresh token."""
    clock = OffsetClock()
    async with serve_target(
        tmp_path / "max-age",
        idp=legacy_idp,
        port=gateway_ports[1],
        resources=resources(mcp_server),
        clock=clock,
        policy={"tokens": {"mfa_max_age": "10m"}},
    ) as short:
        client = await short.register()
        user = await short.new_user()
        tokens = await short.tokens(user, client)
        assert tokens.refresh_token is not None
        clock.advance(300)
        ok = await short.refresh(tokens.refresh_token, client)
        assert ok.status_code == 200
        clock.advance(301)
        late = await short.refresh(ok.json()["refresh_token"], client)
    body = assert_oauth_error(late, 400, "invalid_grant")
    assert body["error_description"] == "the second-factor authentication is too old; sign in again"


class TestRevocation:
    async def revoke(
        self, target: Target, token: str, client: RegisteredClient, **extra: str
    ) -> httpx.Response:
        """POST `token` to the revocation endpoint as `client`."""
        async with http_client() as http:
            return await http.post(
                target.url + "/oauth/revoke",
                data={"token": token, "client_id": client.client_id, **extra},
            )

    async def test_revoking_the_refresh_token_kills_the_grant(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R22: revoking a refresh token (200, empty) also invalidates the grant's access
        tokens at the proxy."""
        user = await target.new_user()
        tokens = await target.tokens(user, client)
        assert tokens.refresh_token is not None
        resp = await self.revoke(target, tokens.refresh_token, client)
        assert resp.status_code == 200
        assert resp.content == b""
        assert resp.headers["cache-control"] == "no-store"
        assert_oauth_error(await target.refresh(tokens.refresh_token, client), 400, "invalid_grant")
        assert await refused_within(target, tokens.access_token)

    async def test_revoking_an_access_token_denies_it_at_the_proxy(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R22, DESIGN §2.12: a revoked access token's `jti` is denied by the proxy."""
        user = await target.new_user()
        tokens = await target.tokens(user, client)
        assert await works(target, tokens.access_token) == 200
        resp = await self.revoke(
            target, tokens.access_token, client, token_type_hint="access_token"
        )
        assert resp.status_code == 200
        assert await refused_within(target, tokens.access_token)

    async def test_another_clients_token_and_garbage_are_ignored_with_200(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R22: revocation answers 200 for unknown tokens and for tokens of another client,
        and revokes only the caller's own tokens (a thief cannot revoke its victim's)."""
        thief = await target.register(name="Revoker")
        user = await target.new_user()
        tokens = await target.tokens(user, client)
        assert tokens.refresh_token is not None
        for token in (tokens.refresh_token, tokens.access_token, "garbage", "a.b", "a.b.c"):
            assert (await self.revoke(target, token, thief)).status_code == 200
        await asyncio.sleep(0.2)
        assert await works(target, tokens.access_token) == 200
        assert (await target.refresh(tokens.refresh_token, client)).status_code == 200

    async def test_revocation_needs_client_authentication(
        self, target: Target, client: RegisteredClient
    ) -> None:
        """R22, R19: an anonymous revocation request is `invalid_client` (401)."""
        async with http_client() as http:
            resp = await http.post(target.url + "/oauth/revoke", data={"token": "x.y"})
        assert_oauth_error(resp, 401, "invalid_client")


async def test_access_token_for_one_resource_is_refused_by_another(
    target: Target, client: RegisteredClient
) -> None:
    """R12, R25 (audience confusion): a token issued for `/mcp` is refused on `/mcp-b` with
    `invalid_token`, although both resources front the same MCP server."""
    user = await target.new_user()
    tokens: Tokens = await target.tokens(user, client)
    assert await works(target, tokens.access_token, "/mcp") == 200
    resp = await target.mcp(tool_call("echo", text="x"), token=tokens.access_token, path="/mcp-b")
    assert resp.status_code == 401
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
