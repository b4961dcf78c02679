"""Typed protocol errors that know their wire form (RFC 6749, 6750, 7591, 8707, 9470).

Handlers raise these; `gateway.web.errors` renders them in exactly one place. The
`description` is what the client sees, so it must never carry secrets; `log_reason` is
what the audit log records and is never sent.
"""

from __future__ import annotations

import re
from typing import ClassVar

# RFC 6749 §5.2: error_description is %x20-21 / %x23-5B / %x5D-7E (no '"' and no '\').
_DESCRIPTION_ALLOWED = re.compile(r"^[\x20-\x21\x23-\x5b\x5d-\x7e]*$")


class GatewayError(Exception):
    """Base of every error the gateway renders to a client."""

    status: ClassVar[int] = 500


class OAuthError(GatewayError):
    """An RFC 6749 style error with a wire `error` code."""

    error: ClassVar[str] = "server_error"
    status: ClassVar[int] = 400

    def __init__(
        self,
        description: str = "",
        *,
        state: str | None = None,
        log_reason: str | None = None,
    ) -> None:
        if not _DESCRIPTION_ALLOWED.match(description):
            description = "".join(c for c in description if _DESCRIPTION_ALLOWED.match(c))
        super().__init__(description or self.error)
        self.description = description
        self.state = state
        self.log_reason = log_reason or description or self.error

    def to_json(self) -> dict[str, str]:
        body = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        return body


class InvalidRequest(OAuthError):
    error = "invalid_request"


class InvalidClient(OAuthError):
    error = "invalid_client"
    status = 401


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class UnsupportedResponseType(OAuthError):
    error = "unsupported_response_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class InvalidTarget(OAuthError):
    """RFC 8707 §2: the `resource` is invalid or unknown."""

    error = "invalid_target"


class AccessDenied(OAuthError):
    error = "access_denied"
    status = 403


class ServerError(OAuthError):
    error = "server_error"
    status = 500


class TemporarilyUnavailable(OAuthError):
    """Fail closed: the store, a key or the upstream provider is unavailable."""

    error = "temporarily_unavailable"
    status = 503


class InvalidRedirectUri(OAuthError):
    """RFC 7591 §3.2.2."""

    error = "invalid_redirect_uri"


class InvalidClientMetadata(OAuthError):
    """RFC 7591 §3.2.2."""

    error = "invalid_client_metadata"


class SlowDown(OAuthError):
    """Too many requests (registration rate limit)."""

    error = "slow_down"
    status = 429


# --- Resource-side (bearer) errors: rendered as WWW-Authenticate challenges ---------------


class BearerError(OAuthError):
    """RFC 6750 §3 challenge errors; `scope`, `max_age`, `acr_values` go into the header."""

    def __init__(
        self,
        description: str = "",
        *,
        scope: str | None = None,
        max_age: int | None = None,
        acr_values: str | None = None,
        log_reason: str | None = None,
    ) -> None:
        super().__init__(description, log_reason=log_reason)
        self.scope = scope
        self.max_age = max_age
        self.acr_values = acr_values


class MissingToken(BearerError):
    """No credentials at all: the challenge carries no `error` (RFC 6750 §3.1)."""

    error = ""
    status = 401


class InvalidToken(BearerError):
    error = "invalid_token"
    status = 401


class InsufficientScope(BearerError):
    error = "insufficient_scope"
    status = 403


class InsufficientUserAuthentication(BearerError):
    """RFC 9470 §3: a step-up (fresher or stronger authentication) is needed."""

    error = "insufficient_user_authentication"
    status = 401


class UpstreamUnavailable(Exception):
    """An outbound call to the upstream provider failed (down, time-out, garbage)."""


class UpstreamRejected(UpstreamUnavailable):
    """The upstream answered, but said no: an OAuth error response (`error` holds its code,
    e.g. `invalid_grant`) or an ID token / userinfo answer that failed verification
    (`error` = "invalid_id_token"). A subclass, so callers that only fail closed on
    `UpstreamUnavailable` still do; `str()` is a log reason and never holds a secret."""

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason


class StoreUnavailable(Exception):
    """The state store (Redis) did not answer; callers fail closed."""


class RequestTimeout(GatewayError):
    """The client did not deliver its request (headers or body) within `server.request_timeout`."""

    status = 408


class MalformedBody(GatewayError):
    """The request body could not be decoded (not UTF-8, broken encoding)."""

    status = 400
