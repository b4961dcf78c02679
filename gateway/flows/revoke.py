"""Token revocation (RFC 7009, R22): refresh families and access tokens.

The answer is always the same (200, empty) once the client is authenticated, whether the token
was valid, unknown, foreign or already dead, so the endpoint tells nobody anything about a
token. A token is revoked only when it belongs to the requesting client:

- a refresh token `"<gid>.<secret>"` must be the family's current one (checked by rotating it
  atomically, which is harmless since the family is deleted next) or a rotated-out one (the
  store then revokes the family itself); the family, its access tokens (`jti` deny-list until
  their `exp`) and its upstream tokens go;
- an access token is parsed only after it verified with one of the gateway's own keys
  (signature, `typ`, `iss`, `aud` = one of our resources, `exp`); its `jti` is denied until
  `exp`.
"""

from __future__ import annotations

import structlog

from gateway.core.clients import Client
from gateway.core.errors import InvalidToken
from gateway.core.params import RevokeRequest
from gateway.core.tokens import TokenVerifier, VerificationKey, VerifiedToken
from gateway.crypto import new_token, token_hash
from gateway.flows.codes import resource_policy
from gateway.flows.upstream_tokens import blob_key
from gateway.keys import KeyRing
from gateway.metrics import Metrics
from gateway.ports import RotateOutcome, Store
from gateway.settings import Settings

log = structlog.get_logger(__name__)


def gateway_verifier(settings: Settings, keys: KeyRing) -> TokenVerifier:
    """A verifier that knows only the gateway's own keys (never a trusted issuer's)."""

    def resolve(issuer: str, kid: str) -> VerificationKey | None:
        return keys.verification_key(kid) if issuer == settings.issuer else None

    return TokenVerifier(resolve)


def verify_own_access_token(
    settings: Settings, keys: KeyRing, token: str, now: float
) -> VerifiedToken | None:
    """The verified facts of one of our access tokens for any resource, or None."""
    verifier = gateway_verifier(settings, keys)
    for resource in settings.resources:
        try:
            return verifier.verify(token, audience=settings.resource_url(resource), now=now)
        except InvalidToken:
            continue
    return None


async def revoke_token(
    store: Store,
    settings: Settings,
    keys: KeyRing,
    client: Client,
    req: RevokeRequest,
    *,
    now: float,
    metrics: Metrics | None = None,
) -> None:
    """Revoke `req.token` if it is one of ours and `client`'s; silently do nothing otherwise."""
    token = req.token
    dots = token.count(".")
    # The token's shape decides, whatever `token_type_hint` says (RFC 7009 §2.1).
    if dots == 1:
        revoked = await _revoke_refresh(store, settings, client, token)
    elif dots == 2:
        revoked = await _revoke_access(store, settings, keys, client, token, now)
    else:
        revoked = False
    if revoked:
        if metrics is not None:
            metrics.tokens.labels(event="revoked").inc()
    else:
        log.info(
            "token_rejected",
            client_id=client.client_id,
            reason="revocation of an unknown or foreign token ignored",
        )


async def _revoke_refresh(store: Store, settings: Settings, client: Client, token: str) -> bool:
    gid, _, secret = token.partition(".")
    if not gid or not secret:
        return False
    family = await store.get_family(gid)
    if family is None or family.get("client_id") != client.client_id:
        return False
    policy = resource_policy(settings, str(family.get("resource", "")))
    outcome = await store.rotate_refresh(
        gid, token_hash(token), token_hash(new_token(32)), policy.tokens.refresh_token_ttl
    )
    if outcome is RotateOutcome.INVALID:
        return False
    jtis = await store.revoke_family(gid)
    for jti, exp in jtis:
        await store.revoke_jti(jti, exp)
    await store.delete_blob(blob_key(gid))
    log.info(
        "token_revoked",
        client_id=client.client_id,
        sub=family.get("sub"),
        kind="refresh_token",
        access_tokens=len(jtis),
    )
    return True


async def _revoke_access(
    store: Store, settings: Settings, keys: KeyRing, client: Client, token: str, now: float
) -> bool:
    verified = verify_own_access_token(settings, keys, token, now)
    if verified is None or verified.client_id != client.client_id:
        return False
    await store.revoke_jti(verified.jti, verified.expires_at)
    log.info("token_revoked", client_id=client.client_id, sub=verified.subject, kind="access_token")
    return True
