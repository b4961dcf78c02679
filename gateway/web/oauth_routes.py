"""Every route the MCP client and the browser talk to at the authorization server.

`add_oauth_routes(app)` registers discovery (RFC 8414 document at both well-known names), the
JWKS, dynamic registration, the authorization endpoint (GET and POST, never CORS: a preflight
is refused and no `Access-Control-*` header is ever set), the consent POST, the token and
revocation endpoints, and, through `gateway.web.stepup_handlers.add_stepup_routes`, the
upstream callback and the TOTP step-up.

Handlers are thin: request → flow → response. Protocol errors are rendered only by
`gateway.web.errors` (JSON on the back-channel endpoints; on the authorization endpoint an HTML
page until client and redirect URI are verified, a 303 with `error`/`state`/`iss` after).
Store, key and upstream failures escape to the error middleware, which answers 503: fail closed.
Browser binding: the transaction id travels in the signed `tx` cookie; the consent decision is
a CSRF-protected POST; an approval is remembered per client in a signed cookie bound to the
client id (docs/ARCHITECTURE.md "Browser binding").
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

import structlog
from aiohttp import web

from gateway.adapters.cimd import CimdFetcher
from gateway.core.errors import (
    AccessDenied,
    InvalidClientMetadata,
    InvalidRequest,
    MalformedBody,
    OAuthError,
    SlowDown,
)
from gateway.core.metadata import (
    AUTHORIZE_PATH,
    CONSENT_PATH,
    JWKS_PATH,
    REGISTER_PATH,
    REVOKE_PATH,
    TOKEN_PATH,
    authorization_server_metadata,
    metadata_paths,
)
from gateway.core.params import (
    TokenRequest,
    form_pairs,
    parse_basic_credentials,
    parse_revoke_request,
    parse_token_request,
)
from gateway.core.redirects import is_loopback_redirect, redirect_host
from gateway.crypto import token_hash
from gateway.flows.authorize import (
    NotRedirectable,
    PendingAuthorization,
    RedirectableError,
    approve_consent,
    deny_consent,
    start_authorization,
)
from gateway.flows.clients import DocumentFetcher
from gateway.flows.register import register_client
from gateway.flows.revoke import revoke_token
from gateway.flows.token import TokenService, authenticate_client
from gateway.flows.upstream_tokens import refresh_upstream
from gateway.web.appkeys import CLOCK, COOKIES, HTTP, KEYS, METRICS, SEALER, SETTINGS, STORE
from gateway.web.bodies import read_capped, read_form
from gateway.web.context import client_ip
from gateway.web.errors import html_error, oauth_json_error, redirect_error
from gateway.web.pages import html_page, render_page, safe
from gateway.web.stepup_handlers import UPSTREAM, add_stepup_routes

log = structlog.get_logger(__name__)

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_PUBLIC_DOC = {"Cache-Control": "public, max-age=300"}
_FORM = "application/x-www-form-urlencoded"
MAX_REGISTRATION_BYTES = 16 * 1024
_MAX_TXID = 128
TX_COOKIE = "tx"


def add_oauth_routes(app: web.Application) -> None:
    """Register every `/oauth/*` route and the authorization server's well-known documents."""
    settings = app[SETTINGS]
    for path in metadata_paths(settings):
        app.router.add_get(path, server_metadata)
    app.router.add_get(JWKS_PATH, jwks)
    app.router.add_post(REGISTER_PATH, register)
    app.router.add_get(AUTHORIZE_PATH, authorize, allow_head=False)
    app.router.add_post(AUTHORIZE_PATH, authorize)
    app.router.add_route("OPTIONS", AUTHORIZE_PATH, authorize_preflight)
    app.router.add_post(CONSENT_PATH, consent)
    app.router.add_post(TOKEN_PATH, token)
    app.router.add_post(REVOKE_PATH, revoke)
    add_stepup_routes(app)


# --------------------------------------------------------------------------- helpers


def _fetcher(app: web.Application) -> DocumentFetcher:
    return CimdFetcher(app[HTTP], app[SETTINGS].global_policy.registration)


def consent_cookie_base(client_id: str) -> str:
    """One consent cookie per client: `c_` + a hash prefix of the client id."""
    return "c_" + token_hash(client_id)[:16]


def consent_purpose(client_id: str) -> str:
    """The signing purpose that binds a consent cookie to exactly one client id (R15)."""
    return "consent:" + client_id


def _remembered_consent(request: web.Request, client_id: str, now: float) -> bool:
    if request.app[SETTINGS].global_policy.consent.remember <= 0:
        return False
    value = request.app[COOKIES].get(
        request, consent_cookie_base(client_id), purpose=consent_purpose(client_id), now=now
    )
    return value == client_id


def _set_consent_cookie(
    request: web.Request, resp: web.StreamResponse, client_id: str, now: float
) -> None:
    remember = request.app[SETTINGS].global_policy.consent.remember
    if remember > 0:
        request.app[COOKIES].set(
            resp,
            consent_cookie_base(client_id),
            client_id,
            purpose=consent_purpose(client_id),
            now=now,
            max_age=remember,
        )


def _see_other(location: str) -> web.Response:
    return web.Response(
        status=303, headers={"Location": location, "Referrer-Policy": "no-referrer", **_NO_STORE}
    )


def _is_form(request: web.Request) -> bool:
    return request.content_type == _FORM


async def _form(request: web.Request) -> list[tuple[str, str]]:
    """The urlencoded body as pairs; no parameters in the query string (R14, OAuth 2.1 §3.2)."""
    if not _is_form(request):
        raise InvalidRequest("the body must be application/x-www-form-urlencoded")
    if request.query_string:
        raise InvalidRequest("parameters must be sent in the body, not the query string")
    try:
        return form_pairs(await read_form(request))
    except MalformedBody:
        raise InvalidRequest("the form body could not be decoded") from None


async def _read_capped(request: web.Request, limit: int) -> bytes:
    """The whole body, or `InvalidClientMetadata` once it grows past `limit` bytes."""
    body = await read_capped(request, limit)
    if body is None:
        raise InvalidClientMetadata("the registration request is too large")
    return body


def _refused_page(request: web.Request, message: str, status: int = 400) -> web.Response:
    return html_error(request, "Authorization request refused", message, status)


# --------------------------------------------------------------------------- discovery


async def server_metadata(request: web.Request) -> web.Response:
    """RFC 8414 authorization server metadata (also served as OpenID discovery)."""
    doc = authorization_server_metadata(request.app[SETTINGS])
    return web.json_response(doc, headers=_PUBLIC_DOC)


async def jwks(request: web.Request) -> web.Response:
    """The public keys of every signing key (`/oauth/jwks.json`)."""
    return web.json_response(request.app[KEYS].jwks(), headers=_PUBLIC_DOC)


# --------------------------------------------------------------------------- registration


async def register(request: web.Request) -> web.Response:
    """RFC 7591 `POST /oauth/register`: 201 with the client's metadata (and secret, once)."""
    app = request.app
    settings = app[SETTINGS]
    body: object = None
    try:
        if settings.global_policy.registration.dynamic:
            length = request.content_length
            if length is not None and length > MAX_REGISTRATION_BYTES:
                raise InvalidClientMetadata("the registration request is too large")
            if request.content_type == "application/json":
                raw = await _read_capped(request, MAX_REGISTRATION_BYTES)
                try:
                    body = json.loads(raw)
                except (ValueError, RecursionError):
                    body = None  # counted against the rate limit, then refused as metadata
        _, response = await register_client(
            app[STORE],
            settings,
            body,
            ip=client_ip(request),
            now=app[CLOCK].now(),
            metrics=app[METRICS],
        )
    except SlowDown as err:
        resp = oauth_json_error(err)
        resp.headers["Retry-After"] = "3600"
        return resp
    except OAuthError as err:
        return oauth_json_error(err)
    return web.json_response(response, status=201, headers=_NO_STORE)


# --------------------------------------------------------------------------- authorize


async def authorize_preflight(request: web.Request) -> web.Response:
    """No CORS on the authorization endpoint (R14): a preflight is refused, without ACAO."""
    return web.Response(status=405, headers={"Allow": "GET, POST", **_NO_STORE})


async def authorize(request: web.Request) -> web.StreamResponse:
    """`/oauth/authorize`: validate, store the transaction, then consent or the upstream hop."""
    app = request.app
    settings = app[SETTINGS]
    now = app[CLOCK].now()
    if request.method == "POST":
        if not _is_form(request):
            return _refused_page(request, "The request could not be read.")
        try:
            pairs = form_pairs(await read_form(request))
        except OAuthError:
            return _refused_page(request, "The request could not be read.")
    else:
        pairs = list(request.query.items())
    try:
        pending = await start_authorization(
            app[STORE], settings, pairs, fetcher=_fetcher(app), now=now, metrics=app[METRICS]
        )
    except NotRedirectable as exc:
        log.info("authorize_rejected", reason=exc.reason, redirected=False)
        return _refused_page(request, exc.message)
    except RedirectableError as exc:
        log.info(
            "authorize_rejected",
            reason=exc.error.log_reason,
            error=exc.error.error,
            redirected=True,
        )
        return redirect_error(exc.redirect_uri, exc.error, state=exc.state, iss=settings.issuer)

    client_id = pending.client.client_id
    if _remembered_consent(request, client_id, now):
        url, _ = await approve_consent(
            app[STORE], app[UPSTREAM], settings, pending.txid, now=now, remembered=True
        )
        resp = _see_other(url)
    else:
        resp = await _consent_page(request, pending)
    app[COOKIES].set(resp, TX_COOKIE, pending.txid, purpose="tx", now=now, max_age=pending.ttl)
    return resp


def _scope_list(scopes: tuple[str, ...]) -> str:
    return "<ul>" + "".join(f"<li><code>{escape(s)}</code></li>" for s in scopes) + "</ul>"


async def _consent_page(request: web.Request, pending: PendingAuthorization) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    client = pending.client
    req = pending.request
    resource = settings.resource_by_url(req.resource)
    resource_name = resource.name if resource is not None and resource.name else req.resource
    warning = ""
    if all(is_loopback_redirect(u) for u in client.redirect_uris):
        warning = (
            '<p class="warn" role="note">This application returns only to this computer '
            "(localhost). Any program running on this computer could receive the access. "
            "Continue only if you started this yourself.</p>"
        )
    body = render_page(
        "consent",
        title="Allow access?",
        client_name=client.display_name,
        client_id=client.client_id,
        redirect_host=redirect_host(req.redirect_uri),
        redirect_uri=req.redirect_uri,
        resource_name=resource_name,
        resource_url=req.resource,
        scopes=safe(_scope_list(req.scope)),
        warning_block=safe(warning),
        csrf=app[COOKIES].csrf_token("consent:" + pending.txid),
        tx=pending.txid,
    )
    upstream_meta = await app[UPSTREAM].metadata()
    targets = [
        str(upstream_meta.get("authorization_endpoint", settings.upstream.issuer)),
        req.redirect_uri,
    ]
    return html_page(body, form_action=targets)


async def consent(request: web.Request) -> web.StreamResponse:
    """`POST /oauth/consent` (`csrf`, `tx`, `decision=approve|deny`) from the consent page."""
    app = request.app
    settings = app[SETTINGS]
    cookies = app[COOKIES]
    now = app[CLOCK].now()
    if not _is_form(request):
        return _refused_page(request, "The form could not be read.")
    form = await read_form(request)
    fields: dict[str, str] = {}
    for name in ("tx", "csrf", "decision"):
        values = [v for k, v in form if k == name]
        if len(values) != 1:
            log.info("authorize_rejected", reason=f"consent form field {name} missing/repeated")
            return _refused_page(request, "The form could not be read.")
        fields[name] = values[0]
    txid = fields["tx"]
    if not txid or len(txid) > _MAX_TXID:
        return _refused_page(request, "The form could not be read.")
    if cookies.get(request, TX_COOKIE, purpose="tx", now=now) != txid:
        log.info("authorize_rejected", reason="consent from another browser")
        return _refused_page(
            request, "This sign-in was started in another browser or has expired.", 403
        )
    if not cookies.check_csrf("consent:" + txid, fields["csrf"]):
        log.info("authorize_rejected", reason="consent csrf")
        return _refused_page(request, "This form has expired or was not sent from this site.", 403)
    decision = fields["decision"]
    try:
        if decision == "approve":
            url, tx = await approve_consent(app[STORE], app[UPSTREAM], settings, txid, now=now)
            resp = _see_other(url)
            _set_consent_cookie(request, resp, str(tx["client_id"]), now)
            return resp
        if decision == "deny":
            tx = await deny_consent(app[STORE], txid, now=now)
            resp = redirect_error(
                str(tx["redirect_uri"]),
                AccessDenied("the user denied the request"),
                state=tx.get("state") if isinstance(tx.get("state"), str) else None,
                iss=settings.issuer,
            )
            cookies.clear(resp, TX_COOKIE)
            return resp
    except NotRedirectable as exc:
        log.info("authorize_rejected", reason=exc.reason, redirected=False)
        return _refused_page(request, exc.message)
    return _refused_page(request, "The form could not be read.")


# --------------------------------------------------------------------------- token, revoke


async def token(request: web.Request) -> web.Response:
    """`POST /oauth/token`: authorization_code and refresh_token grants (JSON, no-store)."""
    app = request.app
    settings = app[SETTINGS]
    now = app[CLOCK].now()
    store = app[STORE]
    authorization = request.headers.get("Authorization")
    req: TokenRequest | None = None
    try:
        req = parse_token_request(await _form(request))
        auth = await authenticate_client(
            store,
            settings,
            authorization=authorization,
            form_client_id=req.client_id,
            form_secret=req.client_secret,
            fetcher=_fetcher(app),
            now=now,
        )
    except OAuthError as err:
        # The grant flows audit their own refusals; a request refused before them (malformed,
        # or a failed client authentication) is audited here (R35: ASVS 16.3.1, 16.3.2).
        log.info(
            "token_rejected",
            client_id=_claimed_client_id(req, authorization),
            reason=err.log_reason,
            error=err.error,
        )
        return oauth_json_error(err, basic_auth_used=authorization is not None)
    try:
        sealer = app[SEALER]

        async def upstream_refresh(gid: str) -> None:
            await refresh_upstream(store, sealer, app[UPSTREAM], gid, now)

        service = TokenService(
            store=store,
            settings=settings,
            keys=app[KEYS],
            sealer=sealer,
            metrics=app[METRICS],
            refresh_upstream=upstream_refresh,
        )
        body: dict[str, Any] = await service.grant(auth.client, req, now)
    except OAuthError as err:
        return oauth_json_error(err, basic_auth_used=authorization is not None)
    return web.json_response(body, headers=_NO_STORE)


def _claimed_client_id(req: TokenRequest | None, authorization: str | None) -> str | None:
    """The client id a refused token request claimed, for the audit log only."""
    if authorization is not None:
        try:
            return parse_basic_credentials(authorization)[0]
        except OAuthError:
            return None
    return req.client_id if req is not None else None


async def revoke(request: web.Request) -> web.Response:
    """`POST /oauth/revoke` (RFC 7009): 200 whether or not the token was known (R22)."""
    app = request.app
    settings = app[SETTINGS]
    now = app[CLOCK].now()
    authorization = request.headers.get("Authorization")
    try:
        req = parse_revoke_request(await _form(request))
        auth = await authenticate_client(
            app[STORE],
            settings,
            authorization=authorization,
            form_client_id=req.client_id,
            form_secret=req.client_secret,
            fetcher=_fetcher(app),
            now=now,
        )
        await revoke_token(
            app[STORE], settings, app[KEYS], auth.client, req, now=now, metrics=app[METRICS]
        )
    except OAuthError as err:
        return oauth_json_error(err, basic_auth_used=authorization is not None)
    return web.Response(status=200, headers=_NO_STORE)
