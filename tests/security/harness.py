"""The attacker's and the victim's side of the protocol, for the black-box attack suite.

Everything here speaks to a running gateway over real HTTP (httpx, or the scripted browser
`tests.e2e.useragent.UserAgent` for the pages), with the real legacy provider for the first
factor and the SDK MCP server behind the gateway. A `Target` bundles one running gateway and
the provider, hands each test its own enrolled user (TOTP steps and lockouts are per user, so
tests sharing a gateway must not share users) and drives the legitimate flow up to any point an
attack starts from: the consent page, the TOTP page, an authorization code, a token pair.

The only in-process handles used are the ones an administrator has: enrolling users (the
`totp enroll` command) and, for forged-token tests, the gateway's own signing key (a token that
is correctly signed but wrong in one claim is the only way to prove a claim check exists).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import jwt
import pyotp
from prometheus_client.parser import text_string_to_metric_families

from gateway.clock import Clock, SystemClock
from gateway.core.tokens import SigningKey, build_access_claims, mint_access_token
from gateway.web.appkeys import KEYS
from tests.e2e.useragent import Page, UserAgent, at_form_with
from tests.fixtures.gateway import RunningGateway, running_gateway
from tests.fixtures.peers import E2E_USERS, TEST_ACCOUNTS, LegacyIdp

REDIRECT_URI = "http://127.0.0.1:33418/callback"
HTTP_TIMEOUT = 15.0
ALL_USERS: tuple[str, ...] = (*TEST_ACCOUNTS, *E2E_USERS)
JSON_RPC_ACCEPT = "application/json, text/event-stream"
MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
# The per-request envelope a 2026-07-28 client puts in every request's params.
MODERN_META: Mapping[str, Any] = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
}

# The headers DESIGN §7.5 / R13 / R14 demand on every interactive page.
PAGE_HEADERS: Mapping[str, str] = {
    "x-frame-options": "DENY",
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}


class OffsetClock:
    """The system clock plus an offset the test moves forward (time travel without sleeping)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        """Seconds since the epoch, shifted."""
        return SystemClock().now() + self.offset

    def advance(self, seconds: float) -> None:
        """Move this clock `seconds` forward."""
        self.offset += seconds


@dataclass(frozen=True)
class Pkce:
    """An RFC 7636 S256 pair."""

    verifier: str
    challenge: str


def new_pkce() -> Pkce:
    """A fresh 64-character verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return Pkce(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


def new_state() -> str:
    """A fresh client `state`."""
    return "st-" + secrets.token_urlsafe(12)


@dataclass(frozen=True)
class RegisteredClient:
    """A client as its owner knows it (the secret only for confidential clients)."""

    client_id: str
    redirect_uri: str
    client_secret: str | None = None


@dataclass(frozen=True)
class User:
    """An account at the legacy provider, enrolled for TOTP at the gateway."""

    name: str
    password: str
    secret: str
    clock: Clock
    recovery_codes: tuple[str, ...] = ()

    def code(self, steps: int = 0) -> str:
        """The code an authenticator shows `steps` time steps from now (gateway time)."""
        totp = pyotp.TOTP(self.secret)
        return str(totp.at(int(self.clock.now()) + 30 * steps))


@dataclass(frozen=True)
class Grant:
    """What the client received at its redirect URI, and what it needs to redeem it."""

    code: str
    state: str | None
    iss: str | None
    client: RegisteredClient
    pkce: Pkce
    resource: str


@dataclass(frozen=True)
class Tokens:
    """A token response and the grant it came from."""

    access_token: str
    refresh_token: str | None
    grant: Grant
    body: Mapping[str, Any]


@dataclass(frozen=True)
class AtTotp:
    """A browser that passed consent and the upstream login and now shows the TOTP form."""

    ua: UserAgent
    page: Page
    tx: str
    csrf: str
    client: RegisteredClient
    pkce: Pkce
    state: str
    resource: str


def query_of(url: str) -> dict[str, str]:
    """The query parameters of `url` (last value wins)."""
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def hidden_fields(page: Page) -> dict[str, str]:
    """The hidden inputs of the page's POST form."""
    form = page.form()
    assert form is not None, f"no POST form on {page.url} ({page.status})"
    return form.hidden


def assert_page_headers(page: Page | httpx.Response) -> None:
    """The interactive-page headers of DESIGN §7.5, R13 and R14, exactly."""
    headers = page.headers
    for name, value in PAGE_HEADERS.items():
        assert headers.get(name) == value, (name, headers.get(name))
    csp = headers.get("content-security-policy", "")
    directives = {d.strip().split(" ", 1)[0]: d.strip() for d in csp.split(";") if d.strip()}
    assert directives["frame-ancestors"] == "frame-ancestors 'none'"
    assert directives["default-src"] == "default-src 'none'"
    assert directives["base-uri"] == "base-uri 'none'"
    assert "script-src" not in directives
    assert not any(k.lower().startswith("access-control-") for k in headers)


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT without checking it."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    return header, claims


def b64url(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Mapping[str, Any]) -> str:
    """A JWS segment: compact JSON, base64url."""
    return b64url(json.dumps(dict(value), separators=(",", ":")).encode("utf-8"))


def challenge_params(header: str) -> dict[str, str]:
    """The auth-params of `WWW-Authenticate: Bearer k="v", ...` (the gateway quotes every one)."""
    scheme, _, rest = header.partition(" ")
    assert scheme == "Bearer", header
    out: dict[str, str] = {}
    for part in rest.split('", '):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip().strip('"')
    return out


# One TLS context for every client: httpx builds a new one (~0.1 s) per client otherwise.
_TLS = ssl.create_default_context()


@asynccontextmanager
async def http_client(**kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client that never follows redirects (each hop is asserted)."""
    async with httpx.AsyncClient(
        timeout=HTTP_TIMEOUT, follow_redirects=False, verify=_TLS, **kwargs
    ) as client:
        yield client


class Browser(UserAgent):
    """`UserAgent` with the suite's shared TLS context (a fresh cookie jar per browser)."""

    def __init__(self, *, redirect_uri: str, answers: Mapping[str, str]) -> None:
        self.redirect_uri = redirect_uri
        self.answers = dict(answers)
        self.max_steps = 30
        self.pages = []
        self.client = httpx.AsyncClient(follow_redirects=False, timeout=HTTP_TIMEOUT, verify=_TLS)


@dataclass
class Target:
    """One running gateway in front of the legacy provider, as the suite attacks it."""

    gw: RunningGateway
    idp: LegacyIdp
    _users: Iterator[str] = field(default_factory=lambda: iter(ALL_USERS))

    # ------------------------------------------------------------------ basics

    @property
    def url(self) -> str:
        """The gateway's public URL (its issuer)."""
        return self.gw.url

    def resource(self, path: str = "/mcp") -> str:
        """The canonical resource URL of `path`."""
        return self.gw.resource_url(path)

    def prm(self, path: str = "/mcp") -> str:
        """The RFC 9728 metadata URL of the resource at `path`."""
        return f"{self.url}/.well-known/oauth-protected-resource{path}"

    @property
    def clock(self) -> Clock:
        """The gateway's clock (TOTP codes and minted tokens use its time)."""
        return self.gw.clock

    @property
    def signing_key(self) -> SigningKey:
        """The gateway's active signing key (the administrator's key file)."""
        return self.gw.app[KEYS].active

    async def wait_ready(self) -> None:
        """Wait until the MCP routes serve (the revocation feed is current: fail closed before)."""
        from gateway.web.mcp_routes import MCP_STATE

        async with asyncio.timeout(10):
            await self.gw.app[MCP_STATE].revocations.wait_current()

    async def new_user(self) -> User:
        """The next account nobody in this module used yet, enrolled with a fresh seed."""
        name = next(self._users)
        secret = pyotp.random_base32(32)
        enrolled = await self.gw.enroll(name, secret)
        return User(
            name, self.idp.accounts[name], secret, self.gw.clock, tuple(enrolled.recovery_codes)
        )

    async def register(
        self,
        *,
        redirect_uris: Sequence[str] = (REDIRECT_URI,),
        auth_method: str = "none",
        name: str = "attack-suite client",
    ) -> RegisteredClient:
        """RFC 7591 registration; returns the client (with its secret if confidential)."""
        async with http_client() as http:
            resp = await http.post(
                self.url + "/oauth/register",
                json={
                    "redirect_uris": list(redirect_uris),
                    "token_endpoint_auth_method": auth_method,
                    "grant_types": ["authorization_code", "refresh_token"],
                    "response_types": ["code"],
                    "client_name": name,
                },
            )
        assert resp.status_code == 201, resp.text
        body = resp.json()
        return RegisteredClient(body["client_id"], redirect_uris[0], body.get("client_secret"))

    def authorize_url(
        self,
        client: RegisteredClient,
        *,
        pkce: Pkce | None = None,
        state: str | None = None,
        resource: str | None = None,
        redirect_uri: str | None = None,
        scope: str = "mcp",
        pairs: Sequence[tuple[str, str]] | None = None,
        drop: Sequence[str] = (),
        extra: Mapping[str, str] | None = None,
        **overrides: str,
    ) -> str:
        """`/oauth/authorize?...` as a client builds it; `overrides` (and `extra`) replace or
        add parameters, `drop` removes them and `pairs` replaces the whole query (repeated
        names allowed)."""
        if pairs is None:
            params = {
                "response_type": "code",
                "client_id": client.client_id,
                "redirect_uri": redirect_uri or client.redirect_uri,
                "state": new_state() if state is None else state,
                "code_challenge": (pkce or new_pkce()).challenge,
                "code_challenge_method": "S256",
                "scope": scope,
                "resource": resource or self.resource(),
            }
            params.update(overrides)
            params.update(extra or {})
            pairs = [(k, v) for k, v in params.items() if k not in drop]
        return f"{self.url}/oauth/authorize?{urlencode(list(pairs))}"

    # ------------------------------------------------------------------ the browser

    def browser(self, user: User | None, client: RegisteredClient) -> UserAgent:
        """A fresh browser (own cookie jar) whose user approves consent and logs in upstream."""
        answers: dict[str, str] = {"decision": "approve"}
        if user is not None:
            answers.update(username=user.name, password=user.password)
        return Browser(redirect_uri=client.redirect_uri, answers=answers)

    async def to_totp(
        self,
        ua: UserAgent,
        client: RegisteredClient,
        *,
        pkce: Pkce | None = None,
        state: str | None = None,
        resource: str | None = None,
    ) -> AtTotp:
        """Authorize → consent (approve) → upstream login → the TOTP page of this browser."""
        pkce = pkce or new_pkce()
        state = state or new_state()
        resource = resource or self.resource()
        url = self.authorize_url(client, pkce=pkce, state=state, resource=resource)
        outcome = await ua.run(url, stop=at_form_with("code"))
        page = outcome.page
        assert page is not None, f"reached the client without a TOTP step: {outcome.response}"
        assert page.status == 200, (page.url, page.status, page.html[:300])
        assert page.url.startswith(self.url + "/oauth/totp?"), page.url
        fields = hidden_fields(page)
        return AtTotp(ua, page, fields["tx"], fields["csrf"], client, pkce, state, resource)

    async def submit_totp(
        self, at: AtTotp, code: str, *, csrf: str | None = None, tx: str | None = None
    ) -> Page:
        """POST the TOTP form of `at` (its own hidden fields unless told otherwise)."""
        data = [
            ("csrf", at.csrf if csrf is None else csrf),
            ("tx", at.tx if tx is None else tx),
            ("code", code),
        ]
        return await at.ua.request("POST", self.url + "/oauth/totp", data=data)

    def grant_from(self, at: AtTotp, page: Page) -> Grant:
        """The authorization response a 303 after the TOTP step carries."""
        assert page.status == 303, (page.status, page.html[:300])
        location = page.location
        assert location is not None
        assert location.startswith(at.client.redirect_uri + "?"), location
        params = query_of(location)
        return Grant(
            code=params["code"],
            state=params.get("state"),
            iss=params.get("iss"),
            client=at.client,
            pkce=at.pkce,
            resource=at.resource,
        )

    async def grant(
        self,
        user: User,
        client: RegisteredClient,
        *,
        resource: str | None = None,
        steps: int = 0,
    ) -> Grant:
        """A whole legitimate flow up to the authorization code (TOTP `steps` ahead of now)."""
        async with self.browser(user, client) as ua:
            at = await self.to_totp(ua, client, resource=resource)
            page = await self.submit_totp(at, user.code(steps))
            return self.grant_from(at, page)

    # ------------------------------------------------------------------ back channel

    async def token(
        self, form: Mapping[str, str], *, auth: tuple[str, str] | None = None
    ) -> httpx.Response:
        """POST `form` to `/oauth/token` (with HTTP Basic client credentials if given)."""
        async with http_client() as http:
            if auth is None:
                return await http.post(self.url + "/oauth/token", data=dict(form))
            return await http.post(self.url + "/oauth/token", data=dict(form), auth=auth)

    def redeem_form(self, grant: Grant, **overrides: str) -> dict[str, str]:
        """The authorization_code grant's form for `grant` (with `overrides`)."""
        form = {
            "grant_type": "authorization_code",
            "code": grant.code,
            "code_verifier": grant.pkce.verifier,
            "client_id": grant.client.client_id,
            "redirect_uri": grant.client.redirect_uri,
            "resource": grant.resource,
        }
        form.update(overrides)
        return form

    async def redeem(self, grant: Grant, **overrides: str) -> httpx.Response:
        """Redeem `grant`'s code as its client would (parameters replaced by `overrides`)."""
        return await self.token(self.redeem_form(grant, **overrides))

    async def tokens(
        self,
        user: User,
        client: RegisteredClient,
        *,
        resource: str | None = None,
        steps: int = 0,
    ) -> Tokens:
        """A whole legitimate flow up to a token response."""
        grant = await self.grant(user, client, resource=resource, steps=steps)
        resp = await self.redeem(grant)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        return Tokens(body["access_token"], body.get("refresh_token"), grant, body)

    async def refresh(self, refresh_token: str, client: RegisteredClient) -> httpx.Response:
        """The refresh_token grant for a public `client`."""
        return await self.token(
            {
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": client.client_id,
            }
        )

    # ------------------------------------------------------------------ MCP

    async def mcp(
        self,
        message: Mapping[str, Any] | None = None,
        *,
        token: str | None,
        path: str = "/mcp",
        headers: Mapping[str, str] | None = None,
        method: str = "POST",
        body: bytes | None = None,
        url: str | None = None,
        protocol: str = MODERN,
    ) -> httpx.Response:
        """One request to an MCP path as an SDK client of `protocol` sends it (2026-07-28:
        `Mcp-Method`/`Mcp-Name` headers and the `_meta` envelope); `headers` are added last
        (an empty value removes a header)."""
        msg = dict(message if message is not None else rpc("tools/list"))
        sent: dict[str, str] = {
            "Accept": JSON_RPC_ACCEPT,
            "Content-Type": "application/json",
            "MCP-Protocol-Version": protocol,
        }
        if protocol == MODERN:
            params = dict(msg.get("params") or {})
            params.setdefault("_meta", dict(MODERN_META))
            msg["params"] = params
            sent["Mcp-Method"] = str(msg.get("method", ""))
            if msg.get("method") == "tools/call":
                sent["Mcp-Name"] = str(params.get("name", ""))
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        content = body if body is not None else _json_bytes(msg)
        async with http_client() as http:
            return await http.request(
                method,
                url or self.url + path,
                content=content if method == "POST" else None,
                headers={k: v for k, v in sent.items() if v != ""},
            )

    def mint(self, **claims: Any) -> dict[str, Any]:
        """Claims of a valid access token for `/mcp` (override or delete with None)."""
        now = self.clock.now()
        base = build_access_claims(
            issuer=self.url,
            sub="forged-subject",
            audience=self.resource(),
            client_id="forged-client",
            scope="mcp",
            auth_time=now - 60,
            amr=["pwd", "otp", "mfa"],
            acr="urn:mfa-gateway:totp",
            gid="forged-grant",
            now=now,
            ttl=300,
        )
        for name, value in claims.items():
            if value is None:
                base.pop(name, None)
            else:
                base[name] = value
        return base

    def sign(self, claims: Mapping[str, Any], **header: Any) -> str:
        """`claims` signed with the gateway's real key; extra `header` members (None deletes)."""
        key = self.signing_key
        if not header:
            return mint_access_token(claims, key)
        hdr: dict[str, Any] = {"kid": key.kid, "typ": "at+jwt"}
        hdr.update(header)
        hdr = {k: v for k, v in hdr.items() if v is not None}
        return jwt.encode(dict(claims), key.private_key, algorithm=key.alg, headers=hdr)

    def sign_raw(self, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
        """A JWS built by hand and signed with the gateway's real key: `header` exactly as given
        (pyjwt would rewrite some members, such as `b64`)."""
        key = self.signing_key
        signing_input = f"{b64json(header)}.{b64json(claims)}".encode("ascii")
        signature = jwt.get_algorithm_by_name(key.alg).sign(signing_input, key.private_key)
        return f"{signing_input.decode('ascii')}.{b64url(signature)}"

    async def metric(self, name: str, **labels: str) -> float:
        """One sample of `/metrics` (0.0 when the labelled series does not exist yet)."""
        async with http_client() as http:
            resp = await http.get(self.url + "/metrics")
        assert resp.status_code == 200
        total = 0.0
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += float(sample.value)
        return total


def rpc(method: str, id: int = 1, **params: Any) -> dict[str, Any]:
    """A JSON-RPC request."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params:
        msg["params"] = params
    return msg


def tool_call(name: str, id: int = 1, **arguments: Any) -> dict[str, Any]:
    """A `tools/call` request."""
    return rpc("tools/call", id, name=name, arguments=arguments)


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(value)).encode("utf-8")


def tool_result(resp: httpx.Response) -> dict[str, Any]:
    """The `result` of a JSON-RPC answer (plain JSON or the one SSE `data:` event)."""
    assert resp.status_code == 200, (resp.status_code, resp.text[:300])
    text = resp.text
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        messages = [json.loads(d) for d in data if d]
        final = [m for m in messages if "result" in m or "error" in m]
        assert final, text[:300]
        msg = final[-1]
    else:
        msg = json.loads(text)
    assert "result" in msg, msg
    result = msg["result"]
    assert isinstance(result, dict)
    return result


@asynccontextmanager
async def serve_target(
    directory: Path,
    *,
    idp: LegacyIdp,
    port: int,
    resources: Sequence[Mapping[str, Any]],
    store_url: str = "memory://",
    clock: Clock | None = None,
    **overrides: Any,
) -> AsyncIterator[Target]:
    """A gateway (`tests.fixtures.gateway.running_gateway`) on `port`, as a `Target`."""
    async with running_gateway(
        directory,
        idp=idp,
        port=port,
        resources=resources,
        store_url=store_url,
        clock=clock,
        **overrides,
    ) as gw:
        target = Target(gw, idp)
        await target.wait_ready()
        yield target
