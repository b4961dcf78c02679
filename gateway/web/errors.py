"""The one place where errors become HTTP responses (STYLE §4.2).

- `oauth_json_error`: RFC 6749 §5.2 JSON for the token, registration and revocation endpoints.
- `redirect_error`: RFC 6749 §4.1.2.1 error redirect, only to an already verified redirect URI,
  with `iss` (RFC 9207).
- `html_error`: a page for the user when there is no verified redirect URI (R8: never redirect).
- `bearer_challenge`: RFC 6750 §3 / RFC 9470 §3 / RFC 9728 §5.1 `WWW-Authenticate` on MCP paths.
- `jsonrpc_error`: a JSON-RPC 2.0 error body for MCP clients.
- `error_middleware`: typed errors that escape a handler are rendered; faults are a generic 500
  or 503 with no detail (R35), logged with the traceback.
"""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.core.errors import (
    BearerError,
    InvalidClient,
    MalformedBody,
    OAuthError,
    RequestTimeout,
    StoreUnavailable,
    TemporarilyUnavailable,
    UpstreamUnavailable,
)
from gateway.core.redirects import authorization_response
from gateway.web.appkeys import SETTINGS
from gateway.web.context import request_id
from gateway.web.pages import html_page, render_page

log = structlog.get_logger(__name__)

JSON_RPC_AUTH_ERROR = -32001
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def oauth_json_error(err: OAuthError, *, basic_auth_used: bool = False) -> web.Response:
    """RFC 6749 §5.2 JSON error with `Cache-Control: no-store` (R19)."""
    resp = web.json_response(err.to_json(), status=err.status, headers=_NO_STORE)
    if isinstance(err, InvalidClient) and basic_auth_used:
        resp.headers["WWW-Authenticate"] = 'Basic realm="mfa-gateway"'
    return resp


def redirect_error(
    redirect_uri: str, err: OAuthError, *, state: str | None, iss: str
) -> web.Response:
    """303 to an already verified `redirect_uri` with `error`, `error_description`, `state`, `iss`.

    Callers must have verified the client and the exact redirect URI first (R8).
    """
    location = authorization_response(
        redirect_uri,
        error=err.error or "server_error",
        error_description=err.description or None,
        state=state,
        iss=iss,
    )
    return web.Response(
        status=303,
        headers={"Location": location, "Referrer-Policy": "no-referrer", **_NO_STORE},
    )


def html_error(request: web.Request, title: str, message: str, status: int) -> web.Response:
    """An HTML error page with the interactive-page security headers; never a redirect."""
    body = render_page("error", title=title, message=message, request_id=request_id(request))
    return html_page(body, status=status)


def _quote(value: str) -> str:
    """An RFC 9110 quoted-string (our values never carry `"` or `\\`; escape them anyway)."""
    cleaned = "".join(c for c in value if c == "\t" or 0x20 <= ord(c) < 0x7F)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def www_authenticate(err: BearerError, *, resource_metadata: str) -> str:
    """The `WWW-Authenticate: Bearer ...` value for `err` (no `error` for a missing token)."""
    params: list[tuple[str, str]] = []
    if err.error:
        params.append(("error", err.error))
        if err.description:
            params.append(("error_description", err.description))
    if err.scope:
        params.append(("scope", err.scope))
    if err.max_age is not None:
        params.append(("max_age", str(int(err.max_age))))
    if err.acr_values:
        params.append(("acr_values", err.acr_values))
    params.append(("resource_metadata", resource_metadata))
    return "Bearer " + ", ".join(f"{k}={_quote(v)}" for k, v in params)


def bearer_challenge(err: BearerError, *, resource_metadata: str) -> web.Response:
    """401/403 with an RFC 6750 / RFC 9470 challenge and a JSON-RPC-shaped body (R3, R29, R30)."""
    message = err.description or err.error or "authentication required"
    resp = jsonrpc_error(err.status, JSON_RPC_AUTH_ERROR, message)
    resp.headers["WWW-Authenticate"] = www_authenticate(err, resource_metadata=resource_metadata)
    return resp


def jsonrpc_error(status: int, code: int, message: str, *, id: object = None) -> web.Response:
    """A JSON-RPC 2.0 error response (`id` null unless the request's id is known)."""
    body = {"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}
    return web.json_response(body, status=status, headers=_NO_STORE)


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def _prm_url(request: web.Request) -> str | None:
    settings = request.config_dict.get(SETTINGS)
    if settings is None:
        return None
    resource = settings.resource_by_path(request.path)
    if resource is None:
        return None
    return f"{settings.server.public_url}/.well-known/oauth-protected-resource{resource.path}"


def _unavailable(request: web.Request) -> web.Response:
    if _wants_html(request):
        return html_error(
            request,
            "Temporarily unavailable",
            "The sign-in service is temporarily unavailable. Please try again in a moment.",
            503,
        )
    return oauth_json_error(TemporarilyUnavailable("the service is temporarily unavailable"))


def _already_sent(request: web.Request) -> bool:
    """True once a response (a stream) has written bytes: nothing else can be sent then."""
    return request.writer.output_size > 0


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render typed errors; turn store/upstream failures into 503 and faults into a bare 500."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except BearerError as err:
        log.info("token_rejected", reason=err.log_reason, error=err.error or "missing_token")
        prm = _prm_url(request)
        if prm is not None and not _already_sent(request):
            return bearer_challenge(err, resource_metadata=prm)
        if _already_sent(request):
            raise
        return oauth_json_error(err)
    except OAuthError as err:
        log.info("request_rejected", error=err.error, reason=err.log_reason)
        if _already_sent(request):
            raise
        return oauth_json_error(err)
    except StoreUnavailable:
        log.error("store_unavailable")
        if _already_sent(request):
            raise
        return _unavailable(request)
    except UpstreamUnavailable as exc:
        log.error("upstream_unavailable", reason=str(exc))
        if _already_sent(request):
            raise
        return _unavailable(request)
    except (RequestTimeout, MalformedBody) as err:
        # The client's fault (a body never completed, or one that does not decode): a 4xx in
        # the protocol's shape, never a 500 and never a traceback in the log.
        log.info("request_rejected", reason=str(err), status=err.status)
        if _already_sent(request):
            raise
        error = "invalid_request"
        if _wants_html(request):
            resp = html_error(
                request, "Request refused", "The request could not be read.", err.status
            )
        else:
            resp = web.json_response(
                {"error": error, "error_description": str(err)},
                status=err.status,
                headers=_NO_STORE,
            )
        if isinstance(err, RequestTimeout):
            resp.force_close()
        return resp
    except ConnectionResetError:
        transport = request.transport
        if transport is not None and not transport.is_closing():
            log.exception("unhandled_error")  # not the client leaving: a real fault
            raise
        # The client hung up (mid-body or before its answer): nobody to answer, not a fault.
        log.info("client_gone")
        return web.Response(status=400)
    except Exception:
        log.exception("unhandled_error")
        if _already_sent(request):
            raise
        if _wants_html(request):
            return html_error(
                request, "Something went wrong", "The request could not be completed.", 500
            )
        return web.json_response(
            {"error": "server_error", "error_description": "internal error"},
            status=500,
            headers=_NO_STORE,
        )
