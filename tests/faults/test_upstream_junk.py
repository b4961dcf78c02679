"""The upstream provider down or answering junk, under a real gateway process (DESIGN §2.7, §7.8).

`TinyIdp` stands in for the legacy provider and switches its discovery or token answers to junk:
a dropped connection, HTML, truncated JSON, a 5xx, a JSON error, an ID token without signature
or without a token at all, a wrong issuer, or silence until the gateway's `upstream.timeout`
(1 s here) fires. Whatever it does, the browser gets a clean page or the client an RFC 6749 error
redirect (`error`, `state`, `iss`; never a code), `/readyz` reports the upstream, nothing of the
junk is echoed to anyone or logged, and a failed login is never retried from the same callback.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.mcp_oauth import DEFAULT_REDIRECT_URI
from tests.e2e.useragent import Page, UserAgent
from tests.faults.flow import (
    ALICE_SECRET,
    TotpDevice,
    browser,
    register_client,
    tokens_for,
)
from tests.faults.junk_peers import JUNK_MARKER, PeerLoop, TinyIdp, peer_loop
from tests.faults.procs import (
    GatewayLauncher,
    GatewayProcess,
    config_for,
    enroll,
    wait_ready,
)
from tests.fixtures.config import TEST_CLIENT_SECRET
from tests.fixtures.peers import free_port

__all__ = ["peer_loop"]

UPSTREAM_TIMEOUT = 1.0
READY_CACHE = 2.0  # `/readyz` reuses an upstream verdict for 2 s (gateway.app)


@dataclass
class Deployment:
    """A gateway process in front of a scriptable provider."""

    gateway: GatewayProcess
    idp: TinyIdp
    # The process probed the provider when it started: that verdict is reused for 2 s too.
    last_ready: list[float] = field(default_factory=lambda: [time.monotonic()])

    async def readyz(self) -> httpx.Response:
        """`GET /readyz` once the previous upstream verdict can no longer be reused."""
        wait = self.last_ready[-1] + READY_CACHE + 0.1 - time.monotonic()
        await asyncio.sleep(max(0.0, wait))
        async with httpx.AsyncClient(timeout=10.0) as http:
            resp = await http.get(self.gateway.url + "/readyz")
        self.last_ready.append(time.monotonic())
        return resp

    def assert_nothing_leaked(self) -> None:
        log = self.gateway.log_text()
        assert JUNK_MARKER not in log
        assert TEST_CLIENT_SECRET not in log
        assert self.gateway.events("unhandled_error") == []


def _deployment(
    tmp_path_factory: pytest.TempPathFactory, loop: PeerLoop, name: str, **config: Any
) -> Iterator[Deployment]:
    idp = TinyIdp().start(loop)
    directory = tmp_path_factory.mktemp(name)
    path = config_for(
        directory / "config",
        port=free_port(),
        upstream={
            "issuer": idp.url,
            "client_id": idp.client_id,
            "timeout": f"{UPSTREAM_TIMEOUT:g}s",
        },
        **config,
    )
    launcher = GatewayLauncher(directory)
    try:
        yield Deployment(launcher.start(path), idp)
    finally:
        launcher.stop_all()
        idp.stop()


@pytest.fixture(scope="module")
def junk_discovery(
    tmp_path_factory: pytest.TempPathFactory, peer_loop: PeerLoop
) -> Iterator[Deployment]:
    """A gateway (memory store) whose provider never serves a usable discovery document."""
    yield from _deployment(tmp_path_factory, peer_loop, "junk-discovery")


@pytest.fixture(scope="module")
def junk_tokens(
    tmp_path_factory: pytest.TempPathFactory, peer_loop: PeerLoop, redis_url: str
) -> Iterator[Deployment]:
    """A gateway (Redis, alice enrolled) whose provider's token endpoint misbehaves."""
    yield from _deployment(
        tmp_path_factory,
        peer_loop,
        "junk-tokens",
        store_url=redis_url,
        key_prefix=f"faults-junk-{secrets.token_hex(4)}:",
    )


def _ua() -> UserAgent:
    return browser(UserAgent(redirect_uri=DEFAULT_REDIRECT_URI))


def _clean_page(page: Page, status: int, heading: str) -> None:
    assert page.status == status
    assert page.location is None
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert f"<h1>{heading}</h1>" in page.html
    assert JUNK_MARKER not in page.html
    assert "Traceback" not in page.html


# --------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("mode", ["drop", "stall", "html"])
async def test_provider_down_or_garbled_discovery(junk_discovery: Deployment, mode: str) -> None:
    """The provider drops the connection, stalls past `upstream.timeout` or serves HTML for its
    discovery document: `/readyz` is 503 naming the upstream, and a user who opens an
    authorization link gets the clean "temporarily unavailable" page, in bounded time and
    without being sent anywhere (DESIGN §6, §7.8)."""
    d = junk_discovery
    d.idp.discovery = mode
    ready = await d.readyz()
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "unavailable",
        "checks": {"store": "ok", "upstream": "unavailable"},
    }
    client = await register_client(d.gateway.url)
    async with _ua() as ua:
        start = time.monotonic()
        page = await ua.get(client.authorization(d.gateway.url).url)
        elapsed = time.monotonic() - start
    _clean_page(page, 503, "Temporarily unavailable")
    # OpenID discovery, then the RFC 8414 fallback: at most two upstream time-outs.
    assert elapsed < 2 * UPSTREAM_TIMEOUT + 1.5
    d.assert_nothing_leaked()


async def test_discovery_of_another_issuer_is_not_ready(junk_discovery: Deployment) -> None:
    """A provider serving a well-formed discovery document for another issuer cannot log
    anyone in (the gateway refuses the document, R4 "identical issuer"): the authorization link
    ends on the "temporarily unavailable" page, and `/readyz` must say 503 too, not report a
    provider ready that no login can use."""
    d = junk_discovery
    d.idp.discovery = "wrong_issuer"
    client = await register_client(d.gateway.url)
    async with _ua() as ua:
        page = await ua.get(client.authorization(d.gateway.url).url)
    _clean_page(page, 503, "Temporarily unavailable")
    ready = await d.readyz()
    assert ready.json()["checks"]["upstream"] == "unavailable"
    assert ready.status_code == 503
    d.assert_nothing_leaked()


# --------------------------------------------------------------------------- token endpoint


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("drop", "temporarily_unavailable"),
        ("stall", "temporarily_unavailable"),
        ("html", "temporarily_unavailable"),
        ("truncated", "temporarily_unavailable"),
        ("status_500", "temporarily_unavailable"),
        ("error_json", "access_denied"),
        ("no_id_token", "access_denied"),
        ("forged", "access_denied"),
    ],
)
async def test_junk_token_answer_ends_in_an_error_redirect(
    junk_tokens: Deployment, mode: str, error: str
) -> None:
    """The code exchange at the provider fails (connection dropped, silence past the
    time-out, HTML, truncated JSON, 500: the provider is unavailable; an OAuth error, no ID
    token or a forged one: the user is not confirmed). The client gets a 303 to its verified
    redirect URI with exactly `error`, `error_description`, `state` and `iss`, never a code;
    the same callback cannot be replayed, and the provider's code was exchanged once
    (DESIGN §2.7, R8, R11, R16)."""
    d = junk_tokens
    d.idp.reset()
    d.idp.token = mode
    client = await register_client(d.gateway.url)
    auth = client.authorization(d.gateway.url)
    async with _ua() as ua:
        start = time.monotonic()
        response = await ua.authorize(auth.url, answers={"decision": "approve"})
        elapsed = time.monotonic() - start
        callback = next(p for p in ua.pages if urlsplit(p.url).path == "/oauth/callback")
        replay = await ua.get(callback.url)
    assert callback.status == 303
    assert set(response.params) == {"error", "error_description", "state", "iss"}
    assert response.error == error
    assert response.state == auth.state
    assert response.iss == d.gateway.url
    assert JUNK_MARKER not in response.url
    assert elapsed < UPSTREAM_TIMEOUT + 2.0
    _clean_page(replay, 400, "Sign-in could not be completed")
    assert d.idp.token_requests == 1
    d.assert_nothing_leaked()


async def test_the_provider_back_to_normal_completes_a_login(junk_tokens: Deployment) -> None:
    """After all that junk the same gateway process, unchanged, logs alice in with her TOTP
    code and the client redeems its code: nothing was left broken (DESIGN §7.8)."""
    d = junk_tokens
    d.idp.reset()
    await enroll(d.gateway.config_path, "alice", ALICE_SECRET)
    device = TotpDevice(ALICE_SECRET)
    client = await register_client(d.gateway.url)
    auth = client.authorization(d.gateway.url)
    async with _ua() as ua:
        response = await ua.authorize(
            auth.url, answers={"decision": "approve", "code": device.code}
        )
    tokens = await tokens_for(d.gateway.url, client, auth, response)
    assert set(tokens) >= {"access_token", "refresh_token", "token_type", "expires_in"}
    assert (await wait_ready(d.gateway.url))["checks"] == {"store": "ok", "upstream": "ok"}
    d.assert_nothing_leaked()
