"""RFC 7591 dynamic client registration (`POST /oauth/register`).

Policy decides whether the endpoint exists at all (`registration.dynamic`; off → 404
`invalid_request`) and how many registrations one IP may make per hour (counted atomically in
the store before anything else is looked at, so invalid requests count too). The metadata is
validated by `core.clients.parse_client_metadata` (R23). A confidential client gets a generated
secret exactly once, in the 201 response; the store keeps only its hash.
"""

from __future__ import annotations

from typing import Any

import structlog

from gateway.core.clients import PUBLIC, Client, parse_client_metadata
from gateway.core.errors import InvalidRequest, OAuthError, SlowDown
from gateway.core.metadata import supported_scopes
from gateway.crypto import new_token, token_hash
from gateway.metrics import Metrics
from gateway.ports import Store
from gateway.settings import Settings

log = structlog.get_logger(__name__)

RATE_WINDOW = 3600.0


class RegistrationDisabled(InvalidRequest):
    """Dynamic registration is switched off by policy: the endpoint does not exist."""

    status = 404


def rate_key(ip: str) -> str:
    """The counter that limits registrations per client IP."""
    return f"register:{ip}"


async def register_client(
    store: Store,
    settings: Settings,
    body: object,
    *,
    ip: str,
    now: float,
    metrics: Metrics | None = None,
) -> tuple[Client, dict[str, Any]]:
    """Register a client; return it and the RFC 7591 §3.2.1 response body (with the secret).

    Raises `RegistrationDisabled`, `SlowDown` (429), `InvalidRedirectUri` or
    `InvalidClientMetadata`.
    """
    registration = settings.global_policy.registration
    if not registration.dynamic:
        raise RegistrationDisabled("dynamic client registration is not enabled")
    count = await store.incr_counter(rate_key(ip), RATE_WINDOW)
    if count > registration.registrations_per_ip_per_hour:
        log.info("client_registration_refused", reason="rate limit", ip=ip)
        raise SlowDown("too many registrations from this address; try again later")
    try:
        meta = parse_client_metadata(
            body,
            allowed_custom_schemes=registration.allowed_custom_schemes,
            supported_scopes=supported_scopes(settings),
        )
    except OAuthError as err:
        log.info("client_registration_refused", reason=err.log_reason, error=err.error, ip=ip)
        raise
    client_id = new_token(18)
    secret: str | None = None
    if meta.token_endpoint_auth_method != PUBLIC:
        secret = new_token(32)
    client = Client(
        client_id=client_id,
        kind="dynamic",
        redirect_uris=meta.redirect_uris,
        token_endpoint_auth_method=meta.token_endpoint_auth_method,
        secret_hash=token_hash(secret) if secret else None,
        client_name=meta.client_name,
        grant_types=meta.grant_types,
        scopes=meta.scopes,
        application_type=meta.application_type,
        created_at=now,
        extra=meta.extra,
    )
    await store.put_client(client_id, client.to_record(), None)
    if metrics is not None:
        metrics.registrations.labels(kind="dynamic").inc()
    log.info(
        "client_registered",
        client_id=client_id,
        kind="dynamic",
        auth_method=meta.token_endpoint_auth_method,
    )
    response: dict[str, Any] = {
        "client_id": client_id,
        "client_id_issued_at": int(now),
        "redirect_uris": list(meta.redirect_uris),
        "token_endpoint_auth_method": meta.token_endpoint_auth_method,
        "grant_types": list(meta.grant_types),
        "response_types": list(meta.response_types),
        "application_type": meta.application_type,
    }
    if secret is not None:
        response["client_secret"] = secret
        response["client_secret_expires_at"] = 0
    if meta.client_name is not None:
        response["client_name"] = meta.client_name
    if meta.scopes is not None:
        response["scope"] = " ".join(meta.scopes)
    response.update(meta.extra)
    return client, response
