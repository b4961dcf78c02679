"""SSRF through client-ID metadata documents (CIMD draft "SSRF Attacks", R24).

A client may name itself by an https URL, which the gateway fetches: an attacker then chooses
where the gateway connects. The strict gateway (the production defaults) must never connect to
loopback, private, link-local or cloud-metadata addresses, whatever spelling or DNS name leads
there: each test listens on the loopback address it names and proves that no connection
arrived. The relaxed gateway (test-only switches allowing plain http on loopback) serves the
rules that remain once an address is allowed: no redirects, a size cap, JSON only, `200` only,
the document's own `client_id`, a time-out, and failures never cached.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiohttp import web
from structlog.testing import capture_logs

from tests.fixtures.peers import LegacyIdp, McpServer
from tests.security.harness import (
    REDIRECT_URI,
    RegisteredClient,
    Target,
    assert_page_headers,
    http_client,
    serve_target,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

NON_PUBLIC = "the host resolves to a non-public address"


def resources(mcp: McpServer) -> list[dict[str, str]]:
    """One resource in front of the SDK MCP server."""
    return [{"path": "/mcp", "upstream": mcp.url}]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def strict(
    tmp_path_factory: pytest.TempPathFactory,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
) -> AsyncIterator[Target]:
    """Production defaults: https only, public addresses only."""
    async with serve_target(
        tmp_path_factory.mktemp("cimd-strict"),
        idp=legacy_idp,
        port=gateway_ports[0],
        resources=resources(mcp_server),
        policy={"registration": {"cimd_allow_private_addresses": False}},
    ) as t:
        yield t


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def relaxed(
    tmp_path_factory: pytest.TempPathFactory,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
) -> AsyncIterator[Target]:
    """TEST ONLY switches: documents on plain-http loopback, so the other rules can be shown."""
    async with serve_target(
        tmp_path_factory.mktemp("cimd-relaxed"),
        idp=legacy_idp,
        port=gateway_ports[1],
        resources=resources(mcp_server),
        policy={
            "registration": {
                "cimd_allow_private_addresses": True,
                "cimd_allow_http": True,
                "cimd_timeout": "1s",
                "cimd_max_bytes": 5120,
            }
        },
    ) as t:
        yield t


@dataclass
class Listener:
    """A TCP listener that counts connections (and answers nothing useful)."""

    host: str
    port: int = 0
    connections: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> Listener:
        """Listen (on a free port unless one was given)."""

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accept, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def ipv6_loopback() -> bool:
    """True if this machine can listen on `::1`."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def listener4() -> AsyncIterator[Listener]:
    """A connection-counting listener on 127.0.0.1 for the module."""
    listener = await Listener("127.0.0.1").start()
    yield listener
    await listener.stop()


async def authorize(target: Target, client_id: str) -> httpx.Response:
    """Start an authorization for the client id `client_id`."""
    client = RegisteredClient(client_id, REDIRECT_URI)
    async with http_client() as http:
        return await http.get(target.authorize_url(client))


def assert_unknown_client(resp: httpx.Response) -> None:
    """R8: an unusable client id is an unknown client: a page, never a redirect."""
    assert resp.status_code == 400, resp.text[:300]
    assert "location" not in resp.headers
    assert "The application is not known to this server." in resp.text
    assert_page_headers(resp)


def refusal_reasons(logs: list[MutableMapping[str, Any]]) -> list[object]:
    """The reasons of the `client_metadata_refused` events captured."""
    return [e.get("reason") for e in logs if e.get("event") == "client_metadata_refused"]


class TestAddresses:
    @pytest.mark.parametrize(
        "url",
        [
            "https://127.0.0.1:{port}/client.json",
            "https://localhost:{port}/client.json",
            "https://127.1:{port}/client.json",
            "https://2130706433:{port}/client.json",
            "https://0x7f.0.0.1:{port}/client.json",
            "https://[::ffff:127.0.0.1]:{port}/client.json",
            "https://0.0.0.0:{port}/client.json",
        ],
    )
    async def test_loopback_in_any_spelling_is_never_contacted(
        self, strict: Target, listener4: Listener, url: str
    ) -> None:
        """R24, MCP-SBP "SSRF": a client id naming loopback (literal, DNS name, short,
        decimal, hex, IPv4-mapped IPv6, unspecified) is refused before any connection: the
        listener on that address sees none."""
        before = listener4.connections
        with capture_logs() as logs:
            resp = await authorize(strict, url.format(port=listener4.port))
        assert_unknown_client(resp)
        assert listener4.connections == before
        reasons = refusal_reasons(logs)
        assert reasons in ([NON_PUBLIC], ["the host name does not resolve"]), reasons

    async def test_ipv6_loopback_is_never_contacted(self, strict: Target) -> None:
        """R24: `[::1]` is loopback too."""
        listener = await Listener("::1").start() if ipv6_loopback() else None
        try:
            port = listener.port if listener is not None else 8443
            with capture_logs() as logs:
                resp = await authorize(strict, f"https://[::1]:{port}/client.json")
        finally:
            if listener is not None:
                await listener.stop()
        assert_unknown_client(resp)
        assert listener is None or listener.connections == 0
        assert refusal_reasons(logs) == [NON_PUBLIC]

    @pytest.mark.parametrize(
        "host",
        [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",  # cloud metadata service
            "100.100.100.200",  # Alibaba metadata (shared address space)
            "100.64.0.1",
            "198.18.0.1",
            "192.0.0.1",
            "0.1.2.3",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "[fe80::1]",
            "[fd00:ec2::254]",  # AWS metadata over IPv6
            "[fc00::1]",
            "[::]",
            "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
            "[2002:a9fe:a9fe::]",  # 6to4 of 169.254.169.254
            "[::ffff:169.254.169.254]",
        ],
    )
    async def test_private_link_local_and_metadata_addresses_are_refused_unfetched(
        self, strict: Target, host: str
    ) -> None:
        """R24: private, shared, link-local, multicast, reserved and cloud-metadata addresses
        (and IPv6 forms that embed them) are refused before connecting, at once."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        with capture_logs() as logs:
            resp = await authorize(strict, f"https://{host}/.well-known/client.json")
        assert_unknown_client(resp)
        assert refusal_reasons(logs) == [NON_PUBLIC]
        assert loop.time() - started < 1.0  # refused, not timed out connecting

    @pytest.mark.parametrize(
        "host",
        [
            "192.0.0.192",  # IETF protocol assignments (RFC 6890): not globally reachable
            "[3fff::1]",  # documentation (RFC 9637): not globally reachable
        ],
    )
    async def test_special_purpose_ranges_outside_pythons_table_are_refused(
        self, strict: Target, host: str
    ) -> None:
        """R24 ("MUST NOT fetch URLs resolving to special-use IPs"): the IANA special-purpose
        ranges that Python 3.11's `ipaddress.is_global` still calls global are refused too."""
        with capture_logs() as logs:
            resp = await authorize(strict, f"https://{host}/.well-known/client.json")
        assert_unknown_client(resp)
        assert refusal_reasons(logs) == [NON_PUBLIC]

    @pytest.mark.parametrize(
        ("url", "reason"),
        [
            ("http://127.0.0.1:{port}/client.json", "client_id URL must be https"),
            ("https://user@127.0.0.1:{port}/client.json", "client_id URL must not have userinfo"),
            ("https://127.0.0.1:{port}/", "client_id URL must have a path"),
            ("https://127.0.0.1:{port}", "client_id URL must have a path"),
            (
                "https://127.0.0.1:{port}/a/../client.json",
                "client_id URL must not have dot segments",
            ),
            (
                "https://127.0.0.1:{port}/a/%2e%2e/client.json",
                "client_id URL must not have dot segments",
            ),
        ],
    )
    async def test_malformed_client_id_urls_are_refused_unfetched(
        self, strict: Target, listener4: Listener, url: str, reason: str
    ) -> None:
        """R24: the client id URL must be https, with a path, without userinfo or dot
        segments; otherwise it is refused without a fetch."""
        before = listener4.connections
        with capture_logs() as logs:
            resp = await authorize(strict, url.format(port=listener4.port))
        assert_unknown_client(resp)
        assert listener4.connections == before
        assert refusal_reasons(logs) == [reason]


# --------------------------------------------------------------------------- documents


@dataclass
class DocServer:
    """A client's web server: scripted answers per path, every request recorded."""

    base: str = ""
    hits: list[str] = field(default_factory=list)
    flaky_failures: int = 1

    def url(self, path: str) -> str:
        """The document URL of `path` on this server."""
        return self.base + path

    def document(self, path: str, **extra: object) -> dict[str, object]:
        """A valid client metadata document for `path` (with `extra`)."""
        doc: dict[str, object] = {
            "client_id": self.url(path),
            "client_name": "CIMD client " + path.strip("/"),
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none",
        }
        doc.update(extra)
        return doc

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer per path (see each branch) and record the request."""
        path = request.path
        self.hits.append(path)
        if path == "/good.json":
            return web.json_response(self.document(path))
        if path == "/redirect.json":
            raise web.HTTPFound(self.url("/good.json"))
        if path == "/big.json":
            return web.json_response(self.document(path, padding="x" * 6000))
        if path == "/big-chunked.json":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            body = json.dumps(self.document(path, padding="x" * 6000)).encode()
            for i in range(0, len(body), 1000):
                await resp.write(body[i : i + 1000])
            await resp.write_eof()
            return resp
        if path == "/html.json":
            return web.Response(text=json.dumps(self.document(path)), content_type="text/html")
        if path == "/created.json":
            return web.json_response(self.document(path), status=201)
        if path == "/other-id.json":
            return web.json_response(self.document(path, client_id=self.url("/good.json")))
        if path == "/array.json":
            return web.json_response([self.document(path)])
        if path == "/slow.json":
            await asyncio.sleep(3)
            return web.json_response(self.document(path))
        if path == "/secret-client.json":
            return web.json_response(
                self.document(
                    path,
                    token_endpoint_auth_method="none",
                    redirect_uris=["https://other.example/cb"],
                )
            )
        if path == "/flaky.json":
            if self.flaky_failures > 0:
                self.flaky_failures -= 1
                return web.json_response({"error": "busy"}, status=503)
            return web.json_response(self.document(path))
        raise web.HTTPNotFound()


@pytest.fixture(scope="module")
def doc_server_port() -> int:
    """A free loopback port for the document server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def docs(doc_server_port: int) -> AsyncIterator[DocServer]:
    """The client's document server on plain-http loopback."""
    server = DocServer(base=f"http://127.0.0.1:{doc_server_port}")
    app = web.Application()
    app.router.add_get("/{tail:.*}", server.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", doc_server_port).start()
    yield server
    await runner.cleanup()


class TestDocuments:
    async def test_a_valid_document_is_accepted(self, relaxed: Target, docs: DocServer) -> None:
        """Positive control: where the address is allowed, a proper document works (so the
        refusals below are the rules', not the setup's)."""
        resp = await authorize(relaxed, docs.url("/good.json"))
        assert resp.status_code == 200, resp.text[:300]
        assert "CIMD client good.json" in resp.text

    @pytest.mark.parametrize(
        ("path", "reason"),
        [
            ("/redirect.json", "status 302"),
            ("/big.json", "the document is too large"),
            ("/big-chunked.json", "the document is too large"),
            ("/html.json", "not a JSON response"),
            ("/created.json", "status 201"),
            ("/missing.json", "status 404"),
            ("/other-id.json", "the document's client_id is not its URL"),
            ("/array.json", "the document is not a JSON object"),
            ("/slow.json", "time-out fetching the metadata document"),
        ],
    )
    async def test_documents_breaking_a_rule_are_refused(
        self, relaxed: Target, docs: DocServer, path: str, reason: str
    ) -> None:
        """R24: no redirect is followed (only the first URL is requested), the size cap holds
        for declared and chunked bodies, only `200` + JSON, the document's `client_id` must be
        its own URL, and the fetch has a time-out."""
        docs.hits.clear()
        with capture_logs() as logs:
            resp = await authorize(relaxed, docs.url(path))
        assert_unknown_client(resp)
        assert refusal_reasons(logs) == [reason]
        assert docs.hits == [path]

    async def test_redirect_uris_come_from_the_document(
        self, relaxed: Target, docs: DocServer
    ) -> None:
        """R24: the redirect URI must be one the document lists; another is never used."""
        resp = await authorize(relaxed, docs.url("/secret-client.json"))
        assert resp.status_code == 400
        assert "location" not in resp.headers
        assert "The return address is not registered for this application." in resp.text

    async def test_failures_are_not_cached(self, relaxed: Target, docs: DocServer) -> None:
        """R24 (MUST NOT cache errors): a failed fetch is retried next time, and the document
        then works."""
        docs.hits.clear()
        first = await authorize(relaxed, docs.url("/flaky.json"))
        second = await authorize(relaxed, docs.url("/flaky.json"))
        assert_unknown_client(first)
        assert second.status_code == 200
        assert docs.hits == ["/flaky.json", "/flaky.json"]
