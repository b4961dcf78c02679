"""Browser steps between consent and the authorization code: `/oauth/callback`, `/oauth/totp`.

Thin handlers over `flows.upstream_login` and `flows.stepup`: they read the request, check the
browser binding (signed `tx` cookie) and the CSRF token of every POST, call the flow, and turn
its verdict into a page, a redirect, an audit event and a metric. The TOTP page follows the
HTML contract of DESIGN §2.8 (one `<form method="post">`, a text input `code`,
`autocomplete="one-time-code"`, hidden `csrf` and `tx`), server-rendered, without JavaScript.
Every failure of a submitted code renders the same page with the same status and message;
only the log says why. This module also owns the upstream client (`UPSTREAM`), created from
the shared `HTTP` session on start-up and released on cleanup.
"""

from __future__ import annotations

import base64
import html
from collections.abc import AsyncIterator
from typing import Any

import qrcode
import qrcode.image.svg
import structlog
from aiohttp import web

from gateway.adapters.upstream_oidc import UpstreamClient
from gateway.crypto import SealError
from gateway.flows.enrollment import PendingEnrollment, otpauth_uri
from gateway.flows.stepup import (
    GENERIC_FAILURE,
    StepUpNotReady,
    StepUpResult,
    check_stage,
    verify_stepup,
)
from gateway.flows.upstream_login import (
    CallbackClientError,
    CallbackRefused,
    complete_upstream_login,
    stepup_policy,
)
from gateway.web.appkeys import CLOCK, COOKIES, HTTP, METRICS, SEALER, SETTINGS, STORE
from gateway.web.bodies import FORM, read_form
from gateway.web.context import client_ip
from gateway.web.errors import html_error, redirect_error
from gateway.web.pages import html_page, render_page, safe

log = structlog.get_logger(__name__)

UPSTREAM = web.AppKey("upstream", UpstreamClient)

#: What the `code` field accepts in the browser: a TOTP code, or a recovery code.
CODE_PATTERN = "[0-9]{6,8}|[A-Za-z0-9]{4}-?[A-Za-z0-9]{4}-?[A-Za-z0-9]{4}"
ENROLL_PATTERN = "[0-9]{6,8}"
_MAX_TXID = 128
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache", "Referrer-Policy": "no-referrer"}


def add_stepup_routes(app: web.Application) -> None:
    """Register `/oauth/callback` and `/oauth/totp` and the upstream client's lifetime.

    Must be called after the cleanup context that sets `HTTP` was appended (it is used at
    start-up).
    """
    app.router.add_get("/oauth/callback", callback)
    app.router.add_get("/oauth/totp", totp_page)
    app.router.add_post("/oauth/totp", totp_submit)
    app.cleanup_ctx.append(_upstream_client)


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    client = UpstreamClient(app[SETTINGS].upstream, app[HTTP], app[CLOCK])
    app[UPSTREAM] = client
    try:
        yield
    finally:
        await client.close()


# --------------------------------------------------------------------------- helpers


def _single(request: web.Request, name: str) -> str | None:
    """A query parameter that appears at most once (None if absent; repeated → refused)."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise _Repeated(name)
    return values[0] if values else None


class _Repeated(Exception):
    pass


def _bad_link(request: web.Request, status: int = 400) -> web.Response:
    return html_error(
        request,
        "Sign-in could not be completed",
        "This sign-in link is invalid, was already used, or has expired. Go back to the "
        "application and start signing in again.",
        status,
    )


def _other_browser(request: web.Request) -> web.Response:
    return html_error(
        request,
        "Sign-in could not be completed",
        "This sign-in was started in another browser or the page has expired. Go back to the "
        "application and start signing in again.",
        403,
    )


def _cookie_txid(request: web.Request) -> str | None:
    return request.app[COOKIES].get(request, "tx", purpose="tx", now=request.app[CLOCK].now())


def _names(request: web.Request, tx: dict[str, Any]) -> tuple[str, str]:
    """(client display name, resource display name) for the page."""
    client_id = str(tx.get("client_id", ""))
    client_name = tx.get("client_name")
    shown_client = client_name if isinstance(client_name, str) and client_name else client_id
    settings = request.app[SETTINGS]
    resource_url = str(tx.get("resource", ""))
    resource = settings.resource_by_url(resource_url)
    shown_resource = resource.name if resource is not None and resource.name else resource_url
    return shown_client, shown_resource or settings.issuer


def _qr_data_uri(uri: str) -> str:
    image = qrcode.make(uri, image_factory=qrcode.image.svg.SvgPathFillImage, box_size=10)
    svg: bytes = image.to_string()
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii")


def _error_block(message: str | None) -> str:
    if not message:
        return safe("")
    return safe(render_inline_error(message))


def render_inline_error(message: str) -> str:
    """The alert paragraph above the form (escaped)."""
    return f'<p class="warn" role="alert">{html.escape(message)}</p>'


def _stepup_page(
    request: web.Request, txid: str, tx: dict[str, Any], *, error: str | None, status: int
) -> web.Response:
    """The TOTP (or first-login enrolment) page for `tx`."""
    cookies = request.app[COOKIES]
    settings = request.app[SETTINGS]
    policy = stepup_policy(settings)
    client_name, resource_name = _names(request, tx)
    account = str(tx.get("sub", ""))
    redirect_uri = str(tx.get("redirect_uri", ""))
    if tx.get("stage") == "enroll":
        pending = PendingEnrollment.open(
            request.app[SEALER], txid, str(tx.get("pending_seed_sealed", ""))
        )
        uri = otpauth_uri(policy, account, pending.seed)
        recovery = ""
        if pending.recovery_codes:
            items = "".join(
                f"<li><code>{html.escape(c)}</code></li>" for c in pending.recovery_codes
            )
            recovery = (
                "<p>Recovery codes (each works once if you lose your device; keep "
                f"them somewhere safe):</p><ul>{items}</ul>"
            )
        body = render_page(
            "enroll",
            title="Set up two-step verification",
            client_name=client_name,
            resource_name=resource_name,
            account=account,
            qr_data_uri=_qr_data_uri(uri),
            secret=pending.seed,
            digits=str(policy.digits),
            period=str(policy.period),
            recovery_block=safe(recovery),
            error_block=_error_block(error),
            pattern=ENROLL_PATTERN,
            csrf=cookies.csrf_token(f"enroll:{txid}"),
            tx=txid,
        )
    else:
        body = render_page(
            "totp",
            title="Two-step verification",
            client_name=client_name,
            resource_name=resource_name,
            account=account,
            error_block=_error_block(error),
            pattern=CODE_PATTERN,
            csrf=cookies.csrf_token(f"totp:{txid}"),
            tx=txid,
        )
    # A successful POST redirects to the client: its origin must be a CSP form-action source.
    return html_page(body, status=status, form_action=[redirect_uri])


def _csrf_form(tx: dict[str, Any]) -> str:
    return "enroll" if tx.get("stage") == "enroll" else "totp"


# --------------------------------------------------------------------------- handlers


async def callback(request: web.Request) -> web.StreamResponse:
    """`GET /oauth/callback?code&state[&iss]` from the upstream provider (DESIGN §2.7)."""
    app = request.app
    settings = app[SETTINGS]
    now = app[CLOCK].now()
    try:
        params = {
            name: value
            for name in ("state", "code", "error", "iss")
            if (value := _single(request, name)) is not None
        }
    except _Repeated as rep:
        log.info("upstream_login_failed", reason=f"repeated_parameter:{rep}")
        return _bad_link(request)
    try:
        done = await complete_upstream_login(
            app[STORE], app[SEALER], app[UPSTREAM], settings, params, _cookie_txid(request), now
        )
    except CallbackRefused as refused:
        log.info(
            "upstream_login_failed",
            reason=refused.reason,
            client_id=refused.client_id,
            sub=refused.subject,
        )
        return html_error(request, refused.title, refused.message, refused.status)
    except CallbackClientError as failed:
        log.info(
            "upstream_login_failed",
            reason=failed.reason,
            client_id=failed.client_id,
            error=failed.error.error,
        )
        return redirect_error(
            failed.redirect_uri, failed.error, state=failed.state, iss=settings.issuer
        )
    log.info(
        "upstream_login_completed", client_id=done.client_id, sub=done.subject, stage=done.stage
    )
    app[METRICS].stepups.labels(outcome="started").inc()
    return web.Response(status=303, headers={"Location": done.next_url, **_NO_STORE})


async def _load(
    request: web.Request, txid: str | None
) -> tuple[str, dict[str, Any]] | web.Response:
    """The transaction bound to this browser and waiting for a code, or the error page."""
    if not txid or len(txid) > _MAX_TXID:
        return _bad_link(request)
    cookie = _cookie_txid(request)
    if cookie is None or cookie != txid:
        log.info("totp_failed", reason="browser_mismatch")
        return _other_browser(request)
    try:
        tx = check_stage(await request.app[STORE].get_transaction(txid))
    except StepUpNotReady as exc:
        log.info("totp_failed", reason=exc.reason)
        return _bad_link(request)
    return txid, tx


async def totp_page(request: web.Request) -> web.StreamResponse:
    """`GET /oauth/totp?tx=…`: the step-up (or enrolment) form."""
    try:
        txid = _single(request, "tx")
    except _Repeated:
        return _bad_link(request)
    loaded = await _load(request, txid)
    if isinstance(loaded, web.Response):
        return loaded
    txid, tx = loaded
    try:
        return _stepup_page(request, txid, tx, error=None, status=200)
    except (SealError, ValueError):  # a pending enrolment that does not open
        log.info("totp_failed", reason="pending_enrollment_unreadable")
        return _bad_link(request)


async def totp_submit(request: web.Request) -> web.StreamResponse:
    """`POST /oauth/totp` (`code`, `csrf`, `tx`): verify, then 303 to the client with a code."""
    app = request.app
    if request.content_type != FORM:
        log.info("totp_failed", reason="form_not_urlencoded")
        return _bad_link(request)
    form = await read_form(request)
    fields: dict[str, str] = {}
    for name in ("tx", "csrf", "code"):
        values = [v for k, v in form if k == name]
        if len(values) != 1:
            log.info("totp_failed", reason=f"form_field_{name}_missing_or_repeated")
            return _bad_link(request)
        fields[name] = values[0]
    loaded = await _load(request, fields["tx"])
    if isinstance(loaded, web.Response):
        return loaded
    txid, tx = loaded
    if not app[COOKIES].check_csrf(f"{_csrf_form(tx)}:{txid}", fields["csrf"]):
        log.info("totp_failed", reason="csrf", client_id=tx.get("client_id"), sub=tx.get("sub"))
        return html_error(
            request,
            "Sign-in could not be completed",
            "This form has expired or was not sent from this site. Go back to the application "
            "and start signing in again.",
            403,
        )
    try:
        result = await verify_stepup(
            app[STORE],
            app[SEALER],
            app[SETTINGS],
            txid,
            tx,
            fields["code"],
            client_ip(request),
            app[CLOCK].now(),
            metrics=app[METRICS],
        )
    except StepUpNotReady as exc:
        log.info("totp_failed", reason=exc.reason, client_id=tx.get("client_id"), sub=tx.get("sub"))
        return _bad_link(request)
    _audit(request, result)
    if result.accepted and result.redirect_to is not None:
        resp = web.Response(status=303, headers={"Location": result.redirect_to, **_NO_STORE})
        app[COOKIES].clear(resp, "tx")
        return resp
    try:
        return _stepup_page(request, txid, tx, error=GENERIC_FAILURE, status=400)
    except (SealError, ValueError):
        return _bad_link(request)


def _audit(request: web.Request, result: StepUpResult) -> None:
    """Security events and counters for one verdict (never the code itself)."""
    metrics = request.app[METRICS]
    ip = client_ip(request)
    ctx = {"client_id": result.client_id, "sub": result.subject, "ip": ip}
    if result.accepted:
        if result.method == "recovery_code":
            log.warning("recovery_code_used", **ctx)
        elif result.method == "enrollment":
            log.info("totp_enrolled", **ctx)
        log.info("totp_accepted", method=result.method, **ctx)
        metrics.stepups.labels(outcome="succeeded").inc()
        return
    if result.replayed:
        log.warning("totp_replay_rejected", reason=result.reason, **ctx)
        metrics.stepups.labels(outcome="replayed").inc()
    else:
        log.info("totp_failed", reason=result.reason, **ctx)
        metrics.stepups.labels(outcome="failed").inc()
    for scope in result.locked:
        log.warning("account_locked", scope=scope, reason="too_many_failures", **ctx)
        metrics.lockouts.labels(scope=scope).inc()
