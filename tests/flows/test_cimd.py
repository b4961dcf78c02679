"""Client-ID metadata documents: the fetch's SSRF defences, then their use as clients (R24).

A tiny loopback aiohttp server serves the documents. Fetches that should succeed turn on the
test-only `cimd_allow_private_addresses` / `cimd_allow_http`; the refusals run with them off and
check that the server never saw a request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.adapters.cimd import CimdFetcher, is_forbidden_address
from gateway.core.clients import CimdError
from gateway.ports import Store
from gateway.settings import RegistrationPolicy
from tests.flows.conftest import REDIRECT, DocumentServer, HarnessFactory

OPEN = RegistrationPolicy(cimd_allow_private_addresses=True, cimd_allow_http=True, cimd_timeout=1.0)
STRICT = RegistrationPolicy(cimd_timeout=1.0)


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def fetch(
    session: aiohttp.ClientSession, url: str, policy: RegistrationPolicy = OPEN, **kw: Any
) -> dict[str, Any]:
    return await CimdFetcher(session, policy, **kw).fetch(url)


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "::1",
        "::",
        "0.0.0.0",  # noqa: S104 - an address under test, nothing binds to it
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "2001:db8::1",
    ],
)
def test_special_addresses_are_forbidden(address: str) -> None:
    """Loopback, private, link-local, multicast, reserved, unspecified, CGNAT, documentation,
    and IPv4 hidden in IPv6 (mapped, NAT64, 6to4) are all refused (R24)."""
    assert is_forbidden_address(ipaddress.ip_address(address)) is True


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700:4700::1111", "8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    """Global unicast addresses pass."""
    assert is_forbidden_address(ipaddress.ip_address(address)) is False


# --------------------------------------------------------------------------- SSRF refusals


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "10.0.0.7", "169.254.169.254", "[::1]", "localhost"],
)
async def test_special_addresses_are_never_fetched(
    http: aiohttp.ClientSession, doc_server: DocumentServer, host: str
) -> None:
    """With the test-only setting off, URLs on (or resolving to) special-use addresses are
    refused before any connection is made (R24)."""
    port = doc_server.url.rsplit(":", 1)[1]
    doc_server.client_document("/client.json")
    with pytest.raises(CimdError) as info:
        await fetch(http, f"https://{host}:{port}/client.json", STRICT)
    assert str(info.value) == "the host resolves to a non-public address"
    assert doc_server.seen == []


async def test_a_name_resolving_to_private_is_refused(http: aiohttp.ClientSession) -> None:
    """A public-looking name whose DNS answer includes a private address is refused, even
    when another answer is public (R24)."""
    asked: list[str] = []

    async def resolver(host: str, port: int) -> Sequence[str]:
        asked.append(host)
        return ["93.184.215.14", "10.0.0.5"]

    with pytest.raises(CimdError) as info:
        await fetch(http, "https://docs.example.com/client.json", STRICT, resolver=resolver)
    assert str(info.value) == "the host resolves to a non-public address"
    assert asked == ["docs.example.com"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://docs.example.com/c.json", "client_id URL must be https"),
        ("https://docs.example.com", "client_id URL must have a path"),
        ("https://docs.example.com/", "client_id URL must have a path"),
        ("https://docs.example.com/c.json#x", "client_id URL must not have a fragment"),
        ("https://user@docs.example.com/c.json", "client_id URL must not have userinfo"),
        ("https://docs.example.com/a/../c.json", "client_id URL must not have dot segments"),
        ("https://docs.example.com/a/%2e%2e/c.json", "client_id URL must not have dot segments"),
        ("https://docs.example.com/./c.json", "client_id URL must not have dot segments"),
    ],
)
async def test_url_shape_is_checked_first(
    http: aiohttp.ClientSession, url: str, reason: str
) -> None:
    """https, a path, no fragment, userinfo or dot segments (R24), before any DNS query."""

    async def resolver(host: str, port: int) -> Sequence[str]:
        raise AssertionError("resolved although the URL is refused")

    with pytest.raises(CimdError) as info:
        await fetch(http, url, STRICT, resolver=resolver)
    assert str(info.value) == reason


# --------------------------------------------------------------------------- fetch rules


async def test_fetch_pins_the_checked_address_and_keeps_the_host(
    http: aiohttp.ClientSession, doc_server: DocumentServer
) -> None:
    """The connection goes to the resolved address; `Host` stays the URL's host."""
    port = doc_server.url.rsplit(":", 1)[1]
    url = f"http://localhost:{port}/client.json"
    doc_server.document("/client.json", {"client_id": url, "redirect_uris": [REDIRECT]})
    calls: list[str] = []

    async def resolver(host: str, p: int) -> Sequence[str]:
        calls.append(host)
        return ["127.0.0.1"]

    doc = await fetch(http, url, resolver=resolver)
    assert doc["client_id"] == url
    assert calls == ["localhost"]
    assert doc_server.seen == [("/client.json", f"localhost:{port}")]


async def test_redirects_are_not_followed(
    http: aiohttp.ClientSession, doc_server: DocumentServer
) -> None:
    """A 3xx is a failure, never followed (R24)."""
    target = doc_server.client_document("/real.json")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound(target)

    doc_server.routes["/moved.json"] = moved
    with pytest.raises(CimdError) as info:
        await fetch(http, doc_server.url + "/moved.json")
    assert str(info.value) == "status 302"
    assert [p for p, _ in doc_server.seen] == ["/moved.json"]


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversize_documents_are_refused(
    http: aiohttp.ClientSession, doc_server: DocumentServer, chunked: bool
) -> None:
    """Past `cimd_max_bytes` (5 KB) the fetch fails, with or without Content-Length (R24)."""
    url = doc_server.url + "/big.json"
    big = json.dumps(
        {"client_id": url, "redirect_uris": [REDIRECT], "client_name": "x" * 6000}
    ).encode()

    async def serve(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=big, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(big), 1000):
            await resp.write(big[i : i + 1000])
        await resp.write_eof()
        return resp

    doc_server.routes["/big.json"] = serve
    with pytest.raises(CimdError) as info:
        await fetch(http, url)
    assert str(info.value) == "the document is too large"


@pytest.mark.parametrize(
    ("status", "ctype", "body", "reason"),
    [
        (404, "application/json", b"{}", "status 404"),
        (200, "text/html", b"{}", "not a JSON response"),
        (200, "application/json", b"[1, 2]", "the document is not a JSON object"),
        (200, "application/json", b"{oops", "the document is not JSON"),
    ],
)
async def test_only_200_json_objects(
    http: aiohttp.ClientSession,
    doc_server: DocumentServer,
    status: int,
    ctype: str,
    body: bytes,
    reason: str,
) -> None:
    """Only a 200 with a JSON object is a document (R24)."""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})

    doc_server.routes["/c.json"] = serve
    with pytest.raises(CimdError) as info:
        await fetch(http, doc_server.url + "/c.json")
    assert str(info.value) == reason


async def test_slow_server_times_out(
    http: aiohttp.ClientSession, doc_server: DocumentServer
) -> None:
    """The whole fetch has a time-out (`cimd_timeout`)."""

    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({})

    doc_server.routes["/slow.json"] = stall
    policy = RegistrationPolicy(
        cimd_allow_private_addresses=True, cimd_allow_http=True, cimd_timeout=0.2
    )
    with pytest.raises(CimdError) as info:
        await fetch(http, doc_server.url + "/slow.json", policy)
    assert str(info.value) == "time-out fetching the metadata document"


# --------------------------------------------------------------------------- as clients


OPEN_POLICY = {"registration": {"cimd_allow_private_addresses": True, "cimd_allow_http": True}}


async def test_document_client_is_shown_and_cached(
    make_harness: HarnessFactory, store: Store
) -> None:
    """A valid document makes a public client named by its URL; it is cached and not fetched
    again while the cache lives (R24)."""
    gw = await make_harness(store, policy=OPEN_POLICY)
    url = gw.docs.client_document("/client.json", client_name="Doc client")
    resp = await gw.authorize(url)
    assert resp.status == 200
    html = await resp.text()
    assert "Doc client" in html
    assert url in html
    again = await gw.authorize(url)
    assert again.status == 200
    assert [p for p, _ in gw.docs.seen] == ["/client.json"]
    record = await store.get_client(url)
    assert record is not None
    assert record["kind"] == "cimd"
    assert gw.metric("mfagw_client_registrations_total", kind="cimd") == 1


@pytest.mark.parametrize(
    "doc",
    [
        {"client_id": "https://other.example/client.json", "redirect_uris": [REDIRECT]},
        {"redirect_uris": [REDIRECT]},
        {"client_id": "SELF", "redirect_uris": ["http://evil.example/cb"]},
        {"client_id": "SELF", "redirect_uris": [REDIRECT], "client_secret": "s"},
        {
            "client_id": "SELF",
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "client_secret_basic",
        },
    ],
)
async def test_bad_documents_are_refused_and_not_cached(
    make_harness: HarnessFactory, store: Store, doc: dict[str, Any]
) -> None:
    """client_id must equal the URL, redirect URIs must be valid, no shared secrets; a bad
    document is an unknown client (HTML page, no redirect) and is never cached (R8, R24)."""
    gw = await make_harness(store, policy=OPEN_POLICY)
    url = gw.docs.url + "/client.json"
    gw.docs.document("/client.json", {k: (url if v == "SELF" else v) for k, v in doc.items()})
    resp = await gw.authorize(url, response_type="token")
    assert resp.status == 400
    assert "Location" not in resp.headers
    assert await store.get_client(url) is None
    await gw.authorize(url)
    assert len(gw.docs.seen) == 2  # fetched again: the failure was not cached


async def test_documents_off_by_policy(make_harness: HarnessFactory, store: Store) -> None:
    """With `client_id_metadata_documents = false` a URL client_id is unknown, never fetched."""
    gw = await make_harness(
        store,
        policy={
            "registration": {**OPEN_POLICY["registration"], "client_id_metadata_documents": False}
        },
    )
    url = gw.docs.client_document("/client.json")
    resp = await gw.authorize(url)
    assert resp.status == 400
    assert gw.docs.seen == []


async def test_private_document_refused_without_test_setting(
    make_harness: HarnessFactory, store: Store
) -> None:
    """In the default policy a document on loopback is never fetched: unknown client (R24)."""
    gw = await make_harness(store)
    port = gw.docs.url.rsplit(":", 1)[1]
    url = f"https://127.0.0.1:{port}/client.json"
    gw.docs.document("/client.json", {"client_id": url, "redirect_uris": [REDIRECT]})
    resp = await gw.authorize(url)
    assert resp.status == 400
    assert gw.docs.seen == []
