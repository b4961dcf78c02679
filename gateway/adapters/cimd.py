"""Fetching client-ID metadata documents without becoming an SSRF tool (CIMD draft, R24).

A client may name itself by an https URL; the gateway fetches the JSON document behind it with
the app's pooled `ClientSession`, and every rule of the draft's "SSRF Attacks" section applies:

- the URL shape is checked first (`core.clients.check_cimd_url`);
- the host name is resolved *before* connecting, and the fetch is refused when any resolved
  address is loopback, private, link-local, multicast, reserved, unspecified or otherwise not
  global (IPv4-mapped, 6to4, Teredo and NAT64 addresses are judged by the IPv4 inside);
- the connection then goes to the checked address itself (`Host` header and TLS server name
  stay the original host), so a second DNS answer cannot swap in another address (rebinding);
- no redirect is followed, only `200` with a JSON content type is accepted, the body is capped
  while it streams (policy `cimd_max_bytes`, 5 KB by default) and the whole fetch, DNS
  included, has a time-out (`cimd_timeout`).

`cimd_allow_private_addresses` and `cimd_allow_http` exist for tests on loopback only.
Every failure is a `CimdError` whose message is a log reason (never document content).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from yarl import URL

from gateway.core.clients import CimdError, CimdUrlError, check_cimd_url
from gateway.settings import RegistrationPolicy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# IANA special-purpose ranges that Python 3.11's `is_global` still calls global (its table
# predates them); listed here so the refusal does not depend on the interpreter's version (R24).
_SPECIAL_PURPOSE = tuple(
    ipaddress.ip_network(n)
    for n in (
        "192.0.0.0/24",  # IETF protocol assignments (RFC 6890)
        "192.88.99.0/24",  # deprecated 6to4 relay anycast (RFC 7526)
        "3fff::/20",  # documentation (RFC 9637)
        "2001:db8::/32",  # documentation (RFC 3849)
        "2001::/23",  # IETF protocol assignments (RFC 2928)
        "5f00::/16",  # SRv6 SIDs (RFC 9602)
        "64:ff9b:1::/48",  # local-use IPv4/IPv6 translation (RFC 8215)
    )
)
_JSON_TYPES = ("application/json",)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address carried inside an IPv6 one (mapped, 6to4, Teredo, NAT64), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_forbidden_address(ip: IPAddress) -> bool:
    """True for every address a metadata document must not be fetched from."""
    inner = embedded_ipv4(ip)
    if inner is not None and is_forbidden_address(inner):
        return True
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
        or not ip.is_global
        or any(ip.version == net.version and ip in net for net in _SPECIAL_PURPOSE)
    )


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """Every address `host` resolves to (the event loop's `getaddrinfo`)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


class CimdFetcher:
    """Fetches and parses one metadata document per call; knows nothing about caching."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        policy: RegistrationPolicy,
        *,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._session = session
        self._policy = policy
        self._resolver = resolver

    async def fetch(self, url: str) -> dict[str, Any]:
        """The document at `url` as a JSON object; `CimdError` for any failure."""
        try:
            check_cimd_url(url, allow_http=self._policy.cimd_allow_http)
        except CimdUrlError as exc:
            raise CimdError(f"client_id URL {exc}") from None
        try:
            async with asyncio.timeout(self._policy.cimd_timeout):
                return await self._fetch(URL(url, encoded=True))
        except TimeoutError:
            raise CimdError("time-out fetching the metadata document") from None
        except aiohttp.ClientError as exc:
            raise CimdError(f"fetch failed: {type(exc).__name__}") from None
        except OSError as exc:
            raise CimdError(f"fetch failed: {type(exc).__name__}") from None

    async def _address(self, url: URL) -> str:
        host = url.host or ""
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            candidates: Sequence[str] = [str(literal)]
        else:
            try:
                candidates = await self._resolver(host, port)
            except OSError:
                raise CimdError("the host name does not resolve") from None
        addresses: list[IPAddress] = []
        for text in candidates:
            try:
                addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
            except ValueError:
                raise CimdError("the resolver returned a malformed address") from None
        if not addresses:
            raise CimdError("the host name does not resolve")
        if not self._policy.cimd_allow_private_addresses and any(
            is_forbidden_address(a) for a in addresses
        ):
            raise CimdError("the host resolves to a non-public address")
        return str(addresses[0])

    async def _fetch(self, url: URL) -> dict[str, Any]:
        address = await self._address(url)
        host = url.host or ""
        target = url.with_host(address)
        host_header = url.raw_host or host
        if ":" in host_header:
            host_header = f"[{host_header}]"
        if url.explicit_port is not None:
            host_header = f"{host_header}:{url.explicit_port}"
        limit = self._policy.cimd_max_bytes
        async with self._session.get(
            target,
            allow_redirects=False,
            headers={"Host": host_header, "Accept": "application/json"},
            server_hostname=host if url.scheme == "https" else None,
            timeout=aiohttp.ClientTimeout(total=self._policy.cimd_timeout),
        ) as resp:
            if resp.status != 200:
                raise CimdError(f"status {resp.status}")
            if resp.content_type not in _JSON_TYPES:
                raise CimdError("not a JSON response")
            if resp.content_length is not None and resp.content_length > limit:
                raise CimdError("the document is too large")
            body = bytearray()
            while True:
                chunk = await resp.content.read(limit + 1 - len(body))
                if not chunk:
                    break
                body.extend(chunk)
                if len(body) > limit:
                    raise CimdError("the document is too large")
        try:
            doc = json.loads(bytes(body))
        except (ValueError, RecursionError):
            raise CimdError("the document is not JSON") from None
        if not isinstance(doc, dict):
            raise CimdError("the document is not a JSON object")
        return doc
