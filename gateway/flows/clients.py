"""client_id → `Client`: pre-registered, dynamically registered, or a metadata document.

The lookup order is fixed and the three namespaces cannot collide: pre-registered ids come from
the authorization policy (`registration.clients`), an id that is a URL can only be a client-ID
metadata document (fetched through a `DocumentFetcher` and cached in the `ClientStore` for
`cimd_cache_ttl`; failures are never cached, R24), and anything else is looked up among the
dynamically registered clients. An unknown client is `None`; the caller decides whether that
is an HTML page (authorization endpoint, R8) or `invalid_client` (token endpoint). Store
failures propagate (`StoreUnavailable`): fail closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import structlog

from gateway.core.clients import (
    GRANT_TYPES,
    PUBLIC,
    CimdError,
    CimdUrlError,
    Client,
    check_cimd_url,
    looks_like_cimd,
    parse_client_metadata,
)
from gateway.core.errors import OAuthError
from gateway.core.metadata import supported_scopes
from gateway.crypto import token_hash
from gateway.metrics import Metrics
from gateway.ports import ClientStore
from gateway.settings import PreRegisteredClient, Settings

log = structlog.get_logger(__name__)


class DocumentFetcher(Protocol):
    """Fetches a client-ID metadata document (`adapters.cimd.CimdFetcher`)."""

    async def fetch(self, url: str) -> Mapping[str, Any]:
        """The JSON object at `url`; raises `CimdError` on any failure."""
        ...


def static_client(entry: PreRegisteredClient) -> Client:
    """A pre-registered client; confidential when the policy gives it a secret."""
    secret = entry.client_secret.get_secret_value() if entry.client_secret else None
    return Client(
        client_id=entry.client_id,
        kind="static",
        redirect_uris=tuple(entry.redirect_uris),
        token_endpoint_auth_method="client_secret_basic" if secret else PUBLIC,
        secret_hash=token_hash(secret) if secret else None,
        client_name=entry.client_name,
        grant_types=GRANT_TYPES,
        scopes=None if entry.scopes is None else tuple(entry.scopes),
        application_type="web",
    )


async def resolve_client(
    store: ClientStore,
    settings: Settings,
    client_id: str,
    *,
    fetcher: DocumentFetcher | None,
    now: float,
    metrics: Metrics | None = None,
) -> Client | None:
    """The client named `client_id`, or None if there is no such (usable) client."""
    registration = settings.global_policy.registration
    for entry in registration.clients:
        if entry.client_id == client_id:
            return static_client(entry)
    if looks_like_cimd(client_id):
        if not registration.client_id_metadata_documents or fetcher is None:
            return None
        client, fetched = await _metadata_document_client(store, settings, client_id, fetcher, now)
        if fetched and metrics is not None:
            metrics.registrations.labels(kind="cimd").inc()
        return client
    record = await store.get_client(client_id)
    if record is None or record.get("kind") != "dynamic":
        return None
    return _from_record(record, client_id)


def _from_record(record: Mapping[str, Any], client_id: str) -> Client | None:
    try:
        client = Client.from_record(record)
    except ValueError:
        log.warning("client_record_unreadable", client_id=client_id)
        return None
    return client if client.client_id == client_id else None


async def _metadata_document_client(
    store: ClientStore,
    settings: Settings,
    url: str,
    fetcher: DocumentFetcher,
    now: float,
) -> tuple[Client | None, bool]:
    """The client and whether its document was fetched (not cached) just now."""
    registration = settings.global_policy.registration
    try:
        check_cimd_url(url, allow_http=registration.cimd_allow_http)
    except CimdUrlError as exc:
        log.info("client_metadata_refused", client_id=url, reason=f"client_id URL {exc}")
        return None, False
    cached = await store.get_client(url)
    if cached is not None and cached.get("kind") == "cimd":
        return _from_record(cached, url), False
    try:
        doc = await fetcher.fetch(url)
        if doc.get("client_id") != url:
            raise CimdError("the document's client_id is not its URL")
        meta = parse_client_metadata(
            doc,
            allowed_custom_schemes=registration.allowed_custom_schemes,
            supported_scopes=supported_scopes(settings),
            metadata_document=True,
        )
    except CimdError as exc:
        log.info("client_metadata_refused", client_id=url, reason=str(exc))
        return None, False
    except OAuthError as exc:
        log.info("client_metadata_refused", client_id=url, reason=exc.log_reason)
        return None, False
    client = Client(
        client_id=url,
        kind="cimd",
        redirect_uris=meta.redirect_uris,
        token_endpoint_auth_method=PUBLIC,
        client_name=meta.client_name,
        grant_types=meta.grant_types,
        scopes=meta.scopes,
        application_type=meta.application_type,
        created_at=now,
        extra=meta.extra,
    )
    await store.put_client(url, client.to_record(), registration.cimd_cache_ttl)
    log.info("client_registered", client_id=url, kind="cimd")
    return client, True
