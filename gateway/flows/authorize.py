"""The authorization endpoint and the consent decision, up to the upstream hop (DESIGN §2.4-2.6).

`start_authorization` validates a request in the order R8 demands: client and redirect URI
first (failures are `NotRedirectable`: the user is told, nobody is redirected), then everything
else (failures are `RedirectableError`: 303 to the *verified* URI with `error`, `state`,
`iss`). A valid request becomes a transaction (random id, policy `tokens.transaction_ttl`) in
stage `consent`; the web layer binds it to the browser with the `tx` cookie.

Consent comes before the upstream hop (R15): `approve_consent` moves the transaction to stage
`upstream` and calls `gateway.flows.upstream_login.begin_upstream_login`, which stores the
upstream `state`, nonce and PKCE verifier and returns the upstream URL; `deny_consent` ends the
transaction so that the client gets `access_denied`. No code exists at any point here: only the
step-up flow moves a transaction to stage `done` (invariant 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.core.clients import Client
from gateway.core.errors import OAuthError, UnauthorizedClient
from gateway.core.params import (
    AuthorizeRequest,
    parse_authorize_request,
    parse_authorize_target,
)
from gateway.core.redirects import match_redirect_uri
from gateway.crypto import new_token
from gateway.flows.clients import DocumentFetcher, resolve_client
from gateway.flows.upstream_login import begin_upstream_login
from gateway.metrics import Metrics
from gateway.ports import Json, Store, UpstreamIdP
from gateway.settings import Settings

log = structlog.get_logger(__name__)

STAGE_CONSENT = "consent"
STAGE_UPSTREAM = "upstream"


class NotRedirectable(Exception):
    """Unknown client or unverified redirect URI: show a page, never redirect (R8)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(reason)
        self.message = message
        self.reason = reason


class RedirectableError(Exception):
    """A protocol error to send to an already verified redirect URI."""

    def __init__(self, error: OAuthError, *, redirect_uri: str, state: str | None) -> None:
        super().__init__(error.log_reason)
        self.error = error
        self.redirect_uri = redirect_uri
        self.state = state


@dataclass(frozen=True)
class PendingAuthorization:
    """A validated request, stored as transaction `txid` for `ttl` seconds."""

    txid: str
    tx: Json
    client: Client
    request: AuthorizeRequest
    ttl: float


def transaction_ttl(settings: Settings, resource_url: str) -> float:
    """Lifetime of a transaction for this resource (its policy's `tokens.transaction_ttl`)."""
    resource = settings.resource_by_url(resource_url)
    policy = settings.global_policy if resource is None else settings.policy_for(resource)
    return policy.tokens.transaction_ttl


def remaining_ttl(tx: Json, now: float) -> float:
    """Seconds a stored transaction has left (0 when it is past its end)."""
    expires_at = tx.get("expires_at")
    if isinstance(expires_at, int | float) and not isinstance(expires_at, bool):
        return max(0.0, float(expires_at) - now)
    return 0.0


async def start_authorization(
    store: Store,
    settings: Settings,
    pairs: Sequence[tuple[str, str]],
    *,
    fetcher: DocumentFetcher | None,
    now: float,
    metrics: Metrics | None = None,
) -> PendingAuthorization:
    """Validate `/oauth/authorize` and store the transaction (stage `consent`).

    Raises `NotRedirectable` or `RedirectableError`; `StoreUnavailable` propagates.
    """
    try:
        target = parse_authorize_target(pairs)
    except OAuthError as err:
        raise NotRedirectable(
            "The request is missing a valid client_id or redirect_uri.", reason=err.log_reason
        ) from None
    client = await resolve_client(
        store, settings, target.client_id, fetcher=fetcher, now=now, metrics=metrics
    )
    if client is None:
        raise NotRedirectable(
            "The application is not known to this server.", reason="unknown client"
        )
    if target.redirect_uri is None:
        if len(client.redirect_uris) != 1:
            raise NotRedirectable(
                "The request does not say where to return to.", reason="redirect_uri missing"
            )
        redirect_uri: str | None = client.redirect_uris[0]
    else:
        redirect_uri = match_redirect_uri(target.redirect_uri, client.redirect_uris)
    if redirect_uri is None:
        raise NotRedirectable(
            "The return address is not registered for this application.",
            reason="redirect_uri not registered",
        )
    try:
        if not client.allows_grant("authorization_code"):
            raise UnauthorizedClient("the client may not use the authorization code grant")
        request = parse_authorize_request(
            pairs,
            target=target,
            redirect_uri=redirect_uri,
            settings=settings,
            client_scopes=client.scopes,
        )
    except OAuthError as err:
        raise RedirectableError(err, redirect_uri=redirect_uri, state=target.state) from None

    ttl = transaction_ttl(settings, request.resource)
    txid = new_token(32)
    tx: Json = {
        "client_id": client.client_id,
        "client_name": client.client_name,
        "redirect_uri": request.redirect_uri,
        "redirect_uri_sent": request.redirect_uri_sent,
        "state": request.state,
        "code_challenge": request.code_challenge,
        "scope": request.scope_string,
        "resource": request.resource,
        "browser": new_token(16),
        "created_at": now,
        "expires_at": now + ttl,
        "stage": STAGE_CONSENT,
    }
    await store.put_transaction(txid, tx, ttl)
    log.info(
        "authorize_started",
        client_id=client.client_id,
        resource=request.resource,
        scope=request.scope_string,
    )
    return PendingAuthorization(txid=txid, tx=tx, client=client, request=request, ttl=ttl)


async def consent_transaction(store: Store, txid: str) -> Json | None:
    """The transaction `txid` if it is waiting for consent, else None."""
    tx = await store.get_transaction(txid)
    if tx is None or tx.get("stage") != STAGE_CONSENT:
        return None
    return tx


async def _take_for_consent(store: Store, txid: str, now: float) -> Json:
    """Atomically take the transaction: one consent decision per transaction, ever."""
    tx = await store.take_transaction(txid)
    if tx is None:
        raise NotRedirectable(
            "This sign-in request has expired or was already used.",
            reason="transaction missing at consent",
        )
    if tx.get("stage") != STAGE_CONSENT:
        raise NotRedirectable(
            "This sign-in request has already been used.",
            reason=f"consent in stage {tx.get('stage')!r}",
        )
    if remaining_ttl(tx, now) <= 0:
        raise NotRedirectable("This sign-in request has expired.", reason="transaction expired")
    return tx


async def approve_consent(
    store: Store,
    upstream: UpstreamIdP,
    settings: Settings,
    txid: str,
    *,
    now: float,
    remembered: bool = False,
) -> tuple[str, Json]:
    """Consent given (on the page, or remembered by cookie): stage `upstream`.

    Returns the upstream authorization URL to 303 to, and the transaction. Only a transaction
    in stage `consent` may proceed, and only once (it is taken atomically and written back in
    stage `upstream` before the upstream hop). Raises `NotRedirectable` otherwise.
    """
    tx = await _take_for_consent(store, txid, now)
    updated: dict[str, Any] = {**tx, "stage": STAGE_UPSTREAM, "consented_at": now}
    await store.put_transaction(txid, updated, remaining_ttl(tx, now))
    url = await begin_upstream_login(store, upstream, settings, txid, updated, now)
    log.info(
        "consent_given",
        client_id=tx.get("client_id"),
        resource=tx.get("resource"),
        remembered=remembered,
    )
    return url, updated


async def deny_consent(store: Store, txid: str, *, now: float) -> Json:
    """Consent refused: end the transaction (single use) and return it for the error redirect.

    Raises `NotRedirectable` when there is no transaction waiting for consent.
    """
    tx = await _take_for_consent(store, txid, now)
    log.info("consent_denied", client_id=tx.get("client_id"), resource=tx.get("resource"))
    return tx
