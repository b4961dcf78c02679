"""MCP paths: RFC 9728 metadata documents and the enforcing proxy for every `[[resources]]`.

`add_mcp_routes(app)` serves, for each resource path `<p>`:
`GET /.well-known/oauth-protected-resource<p>` (R1, R2) and `GET|POST|DELETE <p>` and
`<p>/{tail}` through `McpProxy.handle`, which applies, in this order (DESIGN §4):

1. `Origin`, when present, on the allow-list (403, R32); the path confined to the prefix (400);
2. bearer token fully verified, then MFA (`amr`) — `web.bearer` (401/400/503);
3. for `POST`: `Content-Type: application/json` (415), body read up to `max_body` (413),
   JSON-RPC inspection and `Mcp-Method`/`Mcp-Name` agreement (400), policy rules: deny (403 with
   a JSON-RPC error; the call never reaches the server), required scopes (403
   `insufficient_scope`), a recent step-up (401 RFC 9470 with `max_age`);
4. `Mcp-Session-Id` bound to the subject that created it (404 for anyone else, R32);
5. the forwarded credential per `forward_token` (`none` / `upstream` / `identity`);
6. the streaming relay of `web.proxy`.

Every request ends in one audit event (`mcp_allowed` / `mcp_denied` with reason, method and
tool name, never arguments) and one `Metrics.mcp` count. State owned here (pooled upstream
sessions, revocation set, JWKS cache, token and session caches) lives under `MCP_STATE` and
is opened and closed with the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from gateway.adapters.jwks import JwksCache
from gateway.core.errors import (
    BearerError,
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidToken,
    MissingToken,
    StoreUnavailable,
    TemporarilyUnavailable,
    UpstreamUnavailable,
)
from gateway.core.policy import (
    HEADER_MISMATCH,
    INVALID_REQUEST,
    Decision,
    Effect,
    JsonRpcBody,
    JsonRpcError,
    check_routing_headers,
    evaluate_body,
    inspect_jsonrpc,
)
from gateway.core.prm import prm_path, prm_url, protected_resource_metadata
from gateway.core.tokens import VerifiedToken, mint_identity_token
from gateway.revocations import RevocationSet
from gateway.settings import McpPolicy, ResourceSettings, Settings
from gateway.web.appkeys import CLOCK, KEYS, METRICS, SEALER, SETTINGS, STORE
from gateway.web.bearer import BearerAuth, extract_bearer
from gateway.web.context import client_ip
from gateway.web.errors import bearer_challenge, jsonrpc_error
from gateway.web.proxy import (
    DISCONNECT_POLL,
    SESSION_HEADER,
    ProxyError,
    StreamRegistry,
    Timeouts,
    confine_path,
    forward_request_headers,
    new_upstream_session,
    open_upstream,
    relay,
    upstream_origin,
    upstream_url,
    valid_session_id,
)

log = structlog.get_logger(__name__)
_K = TypeVar("_K")
_V = TypeVar("_V")

# JSON-RPC error codes of the gateway (implementation-defined band, MCP 2026-07-28).
POLICY_DENIED = -32003
GATEWAY_ERROR = -32603
_ROUTING_HEADERS = ("MCP-Protocol-Version", "Mcp-Method", "Mcp-Name")
_SESSION_CACHE_SECONDS = 10.0
_SESSION_CACHE_SIZE = 10_000
_IDENTITY_CACHE_SIZE = 10_000
_METHODS = ("GET", "POST", "DELETE")


class _Refusal(Exception):
    """A request refused with a plain JSON-RPC error (not a bearer challenge)."""

    def __init__(self, status: int, code: int, message: str, reason: str, *, id: object = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.id = id


@dataclass(frozen=True)
class ResourceRuntime:
    """A resource's settings, resolved once."""

    settings: ResourceSettings
    policy: McpPolicy
    audience: str
    metadata_url: str
    metadata: dict[str, object]
    challenge_scope: str | None
    origin: str
    timeouts: Timeouts
    client_timeout: aiohttp.ClientTimeout
    forwarded_proto: str
    forwarded_host: str
    base_url: URL


@dataclass
class McpState:
    """Everything the MCP routes keep between requests (one per app)."""

    resources: dict[str, ResourceRuntime]
    allowed_origins: frozenset[str]
    revocations: RevocationSet
    bearer: BearerAuth | None = None
    jwks: JwksCache | None = None
    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    session_owners: dict[str, tuple[str, float]] = field(default_factory=dict)
    identity_tokens: dict[tuple[bytes, str], tuple[str, float]] = field(default_factory=dict)
    streams: StreamRegistry = field(default_factory=StreamRegistry)


MCP_STATE = web.AppKey("mcp_state", McpState)


def _origin_of(url: str) -> str:
    parts = urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower()


def allowed_origins(settings: Settings) -> frozenset[str]:
    """`public_url`'s origin plus `server.allowed_origins` (compared case-insensitively)."""
    return frozenset({_origin_of(settings.server.public_url)}) | {
        _origin_of(o) for o in settings.server.allowed_origins
    }


def _runtime(settings: Settings, resource: ResourceSettings) -> ResourceRuntime:
    policy = settings.policy_for(resource).mcp
    audience = settings.resource_url(resource)
    scopes = policy.default_scopes or policy.scopes_supported
    authorization_servers = [settings.issuer, *(t.issuer for t in settings.keys.trusted_issuers)]
    timeouts = Timeouts(
        connect=resource.connect_timeout,
        headers=settings.server.request_timeout,
        body=settings.server.request_timeout,
        idle=resource.read_timeout,
    )
    public = urlsplit(settings.server.public_url)
    base_url = upstream_url(resource.upstream, "", "")
    assert base_url is not None
    return ResourceRuntime(
        settings=resource,
        policy=policy,
        audience=audience,
        metadata_url=prm_url(audience),
        metadata=protected_resource_metadata(
            resource=audience,
            authorization_servers=authorization_servers,
            scopes_supported=policy.scopes_supported,
            resource_name=resource.name,
        ),
        challenge_scope=" ".join(scopes) if scopes else None,
        origin=upstream_origin(resource.upstream),
        timeouts=timeouts,
        client_timeout=timeouts.client,
        forwarded_proto=public.scheme,
        forwarded_host=public.netloc,
        base_url=base_url,
    )


def add_mcp_routes(app: web.Application) -> None:
    """PRM documents and the proxy for every `[[resources]]` path.

    Needs `SETTINGS`, `STORE`, `CLOCK`, `KEYS`, `SEALER`, `METRICS` set on `app` first.
    """
    settings = app[SETTINGS]
    resources = {r.path: _runtime(settings, r) for r in settings.resources}
    app[MCP_STATE] = McpState(
        resources=resources,
        allowed_origins=allowed_origins(settings),
        revocations=RevocationSet(app[STORE], app[CLOCK]),
    )
    for path, rt in resources.items():
        app.router.add_get(prm_path(path), _metadata_handler(rt))
        proxy = McpProxy(rt)
        below = "/{tail:.*}" if path == "/" else path + "/{tail:.*}"
        for method in _METHODS:
            if path != "/":
                app.router.add_route(method, path, proxy.handle)
            app.router.add_route(method, below, proxy.handle)
    app.cleanup_ctx.append(_mcp_context)


async def _mcp_context(app: web.Application) -> AsyncIterator[None]:
    state = app[MCP_STATE]
    settings = app[SETTINGS]
    jwks_http: aiohttp.ClientSession | None = None
    if settings.keys.trusted_issuers:
        jwks_http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        state.jwks = JwksCache(settings.keys.trusted_issuers, jwks_http)
    state.bearer = BearerAuth(app[KEYS], state.revocations, app[CLOCK], trusted=state.jwks)
    for rt in state.resources.values():
        if rt.origin not in state.sessions:
            state.sessions[rt.origin] = new_upstream_session()
    follower = asyncio.ensure_future(state.revocations.run())
    sweeper = asyncio.ensure_future(state.streams.run(DISCONNECT_POLL))
    try:
        yield
    finally:
        for task in (follower, sweeper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for session in state.sessions.values():
            await session.close()
        if jwks_http is not None:
            await jwks_http.close()


def _metadata_handler(rt: ResourceRuntime) -> Handler:
    async def metadata(request: web.Request) -> web.Response:
        """RFC 9728 §3.2: the resource's metadata, public and cacheable."""
        return web.json_response(
            rt.metadata,
            headers={"Cache-Control": "public, max-age=3600", "Access-Control-Allow-Origin": "*"},
        )

    return metadata


def _token_key(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class McpProxy:
    """The handler for one resource's paths."""

    def __init__(self, rt: ResourceRuntime) -> None:
        self.rt = rt
        # Metric children by (outcome, reason): a bounded set of fixed strings.
        self._counters: dict[tuple[str, str], Any] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Authenticate, authorize and relay one request (see the module docstring)."""
        rt = self.rt
        state = request.app[MCP_STATE]
        facts = _Audit(method=request.method)
        try:
            response = await self._handle(request, state, facts)
        except BearerError as err:
            if isinstance(err, MissingToken | InvalidToken) and rt.challenge_scope:
                err.scope = err.scope or rt.challenge_scope
            reason = _bearer_reason(err)
            self._audit(request, facts, allowed=False, reason=reason, detail=err.log_reason)
            return bearer_challenge(err, resource_metadata=rt.metadata_url)
        except _Refusal as ref:
            self._audit(request, facts, allowed=False, reason=ref.reason)
            return jsonrpc_error(ref.status, ref.code, ref.message, id=ref.id)
        except JsonRpcError as err:
            reason = "header_mismatch" if err.code == HEADER_MISMATCH else "invalid_jsonrpc"
            self._audit(request, facts, allowed=False, reason=reason)
            return jsonrpc_error(400, err.code, err.message, id=err.id)
        except ProxyError as err:
            if facts.audited:  # allowed already; the answer broke off before it was relayed
                log.warning("proxy_stream_closed", resource=rt.settings.path, reason=err.reason)
            else:
                self._audit(request, facts, allowed=False, reason=err.reason, outcome="error")
            return jsonrpc_error(err.status, GATEWAY_ERROR, err.message, id=facts.id)
        except ConnectionResetError:
            # The client went away (e.g. in the middle of its body): its problem, not a fault.
            self._audit(request, facts, allowed=False, reason="client_gone")
            return jsonrpc_error(400, INVALID_REQUEST, "Connection lost", id=facts.id)
        except (TemporarilyUnavailable, StoreUnavailable, UpstreamUnavailable) as err:
            reason = getattr(err, "log_reason", None) or type(err).__name__
            self._audit(
                request, facts, allowed=False, reason="unavailable", outcome="error", detail=reason
            )
            return jsonrpc_error(
                503, GATEWAY_ERROR, "The service is temporarily unavailable", id=facts.id
            )
        return response

    async def _handle(
        self, request: web.Request, state: McpState, facts: _Audit
    ) -> web.StreamResponse:
        # Everything up to the upstream's response headers happens in `_open`, so that its
        # locals (token, forwarded headers, body) are gone while a long stream is relayed.
        upstream = await self._open(request, state, facts)
        self._audit(request, facts, allowed=True, reason="allowed")
        facts.audited = True
        return await relay(request, upstream, timeouts=self.rt.timeouts, streams=state.streams)

    async def _open(
        self, request: web.Request, state: McpState, facts: _Audit
    ) -> aiohttp.ClientResponse:
        rt = self.rt
        # 1. Origin and path
        origin = request.headers.getall("Origin", [])
        if origin and (len(origin) > 1 or _origin_of(origin[0]) not in state.allowed_origins):
            raise _Refusal(403, INVALID_REQUEST, "Origin not allowed", "origin_refused")
        raw_path, _, query = request.raw_path.partition("?")
        rest = confine_path(raw_path, rt.settings.path)
        if rest == "" and not query:
            url: URL | None = rt.base_url
        else:
            url = upstream_url(rt.settings.upstream, rest, query) if rest is not None else None
        if url is None:
            raise _Refusal(400, INVALID_REQUEST, "Invalid request path", "path_refused")
        # 2. token, fully verified, then MFA
        assert state.bearer is not None, "MCP routes used before app start-up"
        token = extract_bearer(request.headers, request.query)
        verified = await state.bearer.authenticate(
            token, audience=rt.audience, required_amr=rt.policy.required_amr
        )
        facts.token = verified
        # 3. body and policy
        body: bytes | None = None
        if request.method == "POST":
            body = await self._read_body(request)
            parsed = inspect_jsonrpc(body)
            facts.set_body(parsed)
            for name in _ROUTING_HEADERS:
                if len(request.headers.getall(name, [])) > 1:
                    raise JsonRpcError(HEADER_MISMATCH, f"{name} header repeated", id=facts.id)
            check_routing_headers(
                parsed,
                protocol_version=request.headers.get("MCP-Protocol-Version"),
                mcp_method=request.headers.get("Mcp-Method"),
                mcp_name=request.headers.get("Mcp-Name"),
            )
            decision = evaluate_body(
                parsed,
                scopes=verified.scopes,
                auth_time=verified.auth_time,
                acr=verified.acr,
                policy=rt.policy,
                now=request.app[CLOCK].now(),
            )
            self._enforce(decision, facts)
        # 4. session binding
        session_ids = request.headers.getall(SESSION_HEADER, [])
        if len(session_ids) > 1 or (session_ids and not valid_session_id(session_ids[0])):
            raise _Refusal(
                400, INVALID_REQUEST, "Invalid Mcp-Session-Id", "bad_session_id", id=facts.id
            )
        session_id = session_ids[0] if session_ids else None
        owner = _owner(verified)
        if session_id is not None:
            await self._check_session(request, state, session_id, owner, facts)
        # 5. credential for the MCP server
        headers = forward_request_headers(
            request.headers,
            client_ip=client_ip(request),
            proto=rt.forwarded_proto,
            host=rt.forwarded_host,
        )
        credential = await self._credential(request, state, token, verified)
        if credential is not None:
            headers["Authorization"] = "Bearer " + credential
        # 6. relay
        upstream = await open_upstream(
            state.sessions[rt.origin],
            method=request.method,
            url=url,
            headers=headers,
            body=body,
            timeouts=rt.timeouts,
            client_timeout=rt.client_timeout,
        )
        try:
            await self._after_upstream(request, state, upstream, session_id, owner, facts)
        except BaseException:
            upstream.close()
            raise
        return upstream

    async def _read_body(self, request: web.Request) -> bytes:
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise _Refusal(
                415,
                INVALID_REQUEST,
                "Content-Type must be application/json",
                "unsupported_media_type",
            )
        cap = self.rt.policy.max_body
        declared = request.content_length
        if declared is not None and declared > cap:
            raise _Refusal(413, INVALID_REQUEST, "Request body too large", "body_too_large")
        chunks: list[bytes] = []
        size = 0
        try:
            # A body that never completes must not hold the request (slow clients).
            async with asyncio.timeout(self.rt.timeouts.body):
                while True:
                    chunk = await request.content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > cap:
                        raise _Refusal(
                            413, INVALID_REQUEST, "Request body too large", "body_too_large"
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise _Refusal(
                408, INVALID_REQUEST, "Request body not received in time", "body_timeout"
            ) from None
        return b"".join(chunks)

    def _enforce(self, decision: Decision, facts: _Audit) -> None:
        if decision.effect is Effect.ALLOW:
            return
        facts.method_name = decision.method or facts.method_name
        facts.tool = decision.tool or facts.tool
        if decision.effect is Effect.DENY:
            raise _Refusal(
                403,
                POLICY_DENIED,
                "Forbidden by the gateway's policy",
                decision.reason,
                id=facts.id,
            )
        if decision.effect is Effect.INSUFFICIENT_SCOPE:
            raise InsufficientScope(
                "The access token lacks a required scope",
                scope=decision.scope,
                log_reason=decision.reason,
            )
        raise InsufficientUserAuthentication(
            "A more recent authentication is required",
            max_age=decision.max_age,
            acr_values=decision.acr_values,
            log_reason=decision.reason,
        )

    async def _check_session(
        self, request: web.Request, state: McpState, session_id: str, owner: str, facts: _Audit
    ) -> None:
        now = request.app[CLOCK].now()
        cached = state.session_owners.get(session_id)
        bound: str | None
        if cached is not None and cached[1] > now:
            bound = cached[0]
        else:
            bound = await request.app[STORE].session_owner(session_id)
            if bound is not None:
                _remember(
                    state.session_owners,
                    session_id,
                    (bound, now + _SESSION_CACHE_SECONDS),
                    _SESSION_CACHE_SIZE,
                )
        if bound is None:
            raise _Refusal(
                404, INVALID_REQUEST, "Session not found", "unknown_session", id=facts.id
            )
        if bound != owner:
            log.warning(
                "session_hijack_refused",
                resource=self.rt.settings.path,
                sub=facts.token.subject if facts.token else None,
            )
            raise _Refusal(
                404, INVALID_REQUEST, "Session not found", "session_other_subject", id=facts.id
            )

    async def _after_upstream(
        self,
        request: web.Request,
        state: McpState,
        upstream: aiohttp.ClientResponse,
        session_id: str | None,
        owner: str,
        facts: _Audit,
    ) -> None:
        """Bind a session id the MCP server just issued; forget one it just ended."""
        store = request.app[STORE]
        if request.method == "DELETE" and session_id is not None and 200 <= upstream.status < 300:
            state.session_owners.pop(session_id, None)
            await store.drop_session(session_id)
            return
        issued = upstream.headers.getall(SESSION_HEADER, [])
        if not issued or not 200 <= upstream.status < 300:
            return
        if len(issued) > 1 or not valid_session_id(issued[0]):
            raise ProxyError(
                502, "The MCP server sent an invalid session id", "bad_upstream_session"
            )
        if issued[0] == session_id:
            return
        bound = await store.bind_session(issued[0], owner, self.rt.policy.session_ttl)
        if bound != owner:
            raise ProxyError(502, "The MCP server reused a session id", "upstream_session_clash")
        now = request.app[CLOCK].now()
        _remember(
            state.session_owners,
            issued[0],
            (owner, now + _SESSION_CACHE_SECONDS),
            _SESSION_CACHE_SIZE,
        )

    async def _credential(
        self, request: web.Request, state: McpState, token: str, verified: VerifiedToken
    ) -> str | None:
        mode = self.rt.settings.forward_token
        if mode == "none":
            return None
        now = request.app[CLOCK].now()
        if mode == "upstream":
            if verified.gid is None:
                raise InvalidToken("The access token is invalid", log_reason="no grant id")
            from gateway.flows.upstream_tokens import upstream_access_token
            from gateway.web.stepup_handlers import UPSTREAM

            app = request.app
            return await upstream_access_token(
                app[STORE], app[SEALER], app[UPSTREAM], verified.gid, now
            )
        key = (_token_key(token), self.rt.audience)
        cached = state.identity_tokens.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        ttl = self.rt.policy.identity_token_ttl
        minted = mint_identity_token(
            key=request.app[KEYS].active,
            issuer=request.app[SETTINGS].issuer,
            audience=self.rt.settings.upstream,
            sub=verified.subject,
            client_id=verified.client_id,
            amr=verified.amr or (),
            auth_time=verified.auth_time,
            acr=verified.acr,
            scope=verified.scopes,
            now=now,
            ttl=ttl,
        )
        _remember(state.identity_tokens, key, (minted, now + ttl / 2), _IDENTITY_CACHE_SIZE)
        return minted

    def _audit(
        self,
        request: web.Request,
        facts: _Audit,
        *,
        allowed: bool,
        reason: str,
        outcome: str | None = None,
        detail: str | None = None,
    ) -> None:
        outcome = outcome or ("allowed" if allowed else "denied")
        counter = self._counters.get((outcome, reason))
        if counter is None:
            metrics = request.app.get(METRICS)
            if metrics is not None:
                counter = metrics.mcp.labels(self.rt.settings.path, outcome, reason)
                self._counters[(outcome, reason)] = counter
        if counter is not None:
            counter.inc()
        token = facts.token
        fields: dict[str, object] = {
            "resource": self.rt.settings.path,
            "method": facts.method_name or facts.method,
            "reason": reason,
        }
        if facts.tool is not None:
            fields["tool"] = facts.tool
        if token is not None:
            fields["sub"] = token.subject
            fields["client_id"] = token.client_id
        if detail is not None and detail != reason:
            fields["detail"] = detail
        if allowed:
            log.info("mcp_allowed", **fields)
        else:
            log.info("mcp_denied", **fields)


@dataclass
class _Audit:
    """What is known about a request so far, for the audit line (never arguments)."""

    method: str
    method_name: str | None = None
    tool: str | None = None
    id: str | int | None = None
    token: VerifiedToken | None = None
    audited: bool = False

    def set_body(self, body: JsonRpcBody) -> None:
        if body.batch:
            self.method_name = "batch"
            return
        msg = body.messages[0]
        self.method_name = msg.method or "response"
        self.tool = msg.tool
        self.id = msg.id


def _owner(token: VerifiedToken) -> str:
    """The subject a session is bound to: issuer and subject (R32 `<user_id>:<session_id>`)."""
    return f"{token.issuer}#{token.subject}"


def _bearer_reason(err: BearerError) -> str:
    if isinstance(err, MissingToken):
        return "missing_token"
    if isinstance(err, InsufficientUserAuthentication):
        return "step_up_required" if err.max_age or err.acr_values else "mfa_required"
    return err.error or "invalid_token"


def _remember(cache: dict[_K, _V], key: _K, value: _V, limit: int) -> None:
    if key not in cache and len(cache) >= limit:
        del cache[next(iter(cache))]
    cache[key] = value
