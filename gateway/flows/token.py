"""The token endpoint: client authentication, code redemption and refresh rotation (§2.10-2.11).

Client authentication (`authenticate_client`): public clients send only `client_id`;
confidential ones `client_secret_basic` or `client_secret_post` (one method per request), and
the secret is compared by hash in constant time. Any failure is `invalid_client` (401).

`authorization_code` (`redeem_code`): the code is taken atomically (single use); it must
belong to the authenticated client, PKCE S256 must verify, a `redirect_uri` sent must equal the
code's (R21), a `resource` sent must equal the code's (R12). A code that was already redeemed
revokes what it produced (refresh family and its access tokens), but only when the replay
itself is otherwise valid: same client, right verifier, same redirect URI (R17). The grant gets
a refresh family whose id `gid` is also the access token's `gid` claim; sealed upstream tokens
move from `upstream:<txid>` to `upstream:<gid>`.

`refresh_token` (`refresh`): `"<gid>.<secret>"`, rotated on every use; presenting a rotated-out
token revokes the family and its access tokens (R20). Scope may only narrow, `resource` must
match, and a refresh never extends MFA: `auth_time`/`amr` are those of the step-up and once
`now - auth_time > tokens.mfa_max_age` the refresh is `invalid_grant` (R31). Where upstream
tokens are held, they are refreshed first and a failure fails the gateway refresh.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog

from gateway.core import pkce
from gateway.core.clients import Client
from gateway.core.errors import (
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    TemporarilyUnavailable,
    UnauthorizedClient,
)
from gateway.core.params import TokenRequest, parse_basic_credentials, split_scope
from gateway.core.tokens import build_access_claims, mint_access_token
from gateway.crypto import Sealer, new_token, token_hash
from gateway.flows.clients import DocumentFetcher, resolve_client
from gateway.flows.codes import resource_policy
from gateway.flows.upstream_tokens import blob_key, move_upstream_tokens
from gateway.keys import KeyRing
from gateway.metrics import Metrics
from gateway.ports import Json, RotateOutcome, Store
from gateway.settings import Settings

log = structlog.get_logger(__name__)

AuthMethod = Literal["none", "client_secret_basic", "client_secret_post"]
FORWARD_UPSTREAM: Final = "upstream"
RefreshUpstream = Callable[[str], Awaitable[object]]
"""gid → refresh the grant's upstream tokens; raises `UpstreamUnavailable` on failure."""


@dataclass(frozen=True)
class Authenticated:
    """The client of a token/revocation request and how it authenticated."""

    client: Client
    method: AuthMethod


async def authenticate_client(
    store: Store,
    settings: Settings,
    *,
    authorization: str | None,
    form_client_id: str | None,
    form_secret: str | None,
    fetcher: DocumentFetcher | None,
    now: float,
) -> Authenticated:
    """Identify and authenticate the client (RFC 6749 §2.3, R19); `InvalidClient` otherwise."""
    secret: str | None
    method: AuthMethod
    if authorization is not None:
        client_id, secret = parse_basic_credentials(authorization)
        if form_secret is not None:
            raise InvalidRequest("use exactly one client authentication method")
        if form_client_id is not None and form_client_id != client_id:
            raise InvalidClient("client_id does not match the credentials")
        method = "client_secret_basic"
    elif form_client_id is not None:
        client_id, secret = form_client_id, form_secret
        method = "client_secret_post" if secret is not None else "none"
    else:
        raise InvalidClient("client authentication is required")

    client = await resolve_client(store, settings, client_id, fetcher=fetcher, now=now)
    if client is None:
        raise InvalidClient("client authentication failed", log_reason="unknown client")
    if client.confidential:
        if not secret or method == "none":
            raise InvalidClient("client authentication failed", log_reason="secret missing")
        expected = client.secret_hash or ""
        if not hmac.compare_digest(token_hash(secret).encode(), expected.encode()):
            raise InvalidClient("client authentication failed", log_reason="wrong secret")
        registered = client.token_endpoint_auth_method
        if client.kind == "dynamic" and registered != method:
            raise InvalidClient(
                "client authentication failed", log_reason=f"{method} used, {registered} registered"
            )
        return Authenticated(client, method)
    if secret:
        raise InvalidClient(
            "client authentication failed", log_reason="a public client presented a secret"
        )
    return Authenticated(client, "none")


@dataclass
class TokenService:
    """What the grants need; built per request by the web layer."""

    store: Store
    settings: Settings
    keys: KeyRing
    sealer: Sealer
    metrics: Metrics | None = None
    refresh_upstream: RefreshUpstream | None = None

    # ------------------------------------------------------------------ helpers

    def _count(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.tokens.labels(event=event).inc()

    async def _revoke_family(self, gid: str, *, reason: str) -> int:
        """Delete the family, deny its access tokens, drop its upstream tokens."""
        jtis = await self.store.revoke_family(gid)
        for jti, exp in jtis:
            await self.store.revoke_jti(jti, exp)
        await self.store.delete_blob(blob_key(gid))
        self._count("revoked")
        log.info(
            "token_revoked", gid_hash=token_hash(gid)[:12], reason=reason, access_tokens=len(jtis)
        )
        return len(jtis)

    async def _finish_revocation(self, gid: str) -> None:
        """A reuse deletes the family's data atomically but its access tokens are denied in later
        writes; if the store failed in between, the family's access-token ids are still there.
        Any later refresh naming the grant finishes the job (fail closed, DESIGN §2.11)."""
        leftover = await self.store.revoke_family(gid)
        for jti, exp in leftover:
            await self.store.revoke_jti(jti, exp)
        if leftover:
            await self.store.delete_blob(blob_key(gid))
            self._count("revoked")
            log.warning(
                "token_revoked",
                gid_hash=token_hash(gid)[:12],
                reason="unfinished revocation completed",
                access_tokens=len(leftover),
            )

    async def _keep_upstream_tokens(self, code: Json, gid: str, ttl: float, now: float) -> bool:
        """Move the transaction's sealed upstream tokens to the grant when the resource forwards
        them (`forward_token = "upstream"`); otherwise drop them (no secret kept for nothing)."""
        txid = code.get("txid")
        if not isinstance(txid, str) or not txid:
            return False
        resource = self.settings.resource_by_url(str(code.get("resource", "")))
        if resource is None or resource.forward_token != FORWARD_UPSTREAM:
            await self.store.delete_blob(blob_key(txid))
            return False
        return await move_upstream_tokens(self.store, self.sealer, txid, gid, ttl=ttl, now=now)

    def _mint(self, family: Json, *, gid: str, scope: str, now: float) -> tuple[str, Json, float]:
        policy = resource_policy(self.settings, str(family["resource"]))
        ttl = policy.tokens.access_token_ttl
        claims = build_access_claims(
            issuer=self.settings.issuer,
            sub=str(family["sub"]),
            audience=str(family["resource"]),
            client_id=str(family["client_id"]),
            scope=scope,
            auth_time=float(family["auth_time"]),
            amr=list(family["amr"]),
            acr=family.get("acr"),
            gid=gid,
            now=now,
            ttl=ttl,
        )
        return mint_access_token(claims, self.keys.active), claims, ttl

    # ------------------------------------------------------------------ authorization_code

    async def redeem_code(self, client: Client, req: TokenRequest, now: float) -> dict[str, Any]:
        """Exchange a code for tokens (single use; replay revokes, R17/R18/R21)."""
        if req.code is None or req.code_verifier is None:
            raise InvalidRequest("code and code_verifier are required")
        code_hash = token_hash(req.code)
        data = await self.store.take_code(code_hash)
        if data is None:
            await self._on_missing_code(code_hash, client, req)
            raise InvalidGrant("the code is invalid, expired or already used")
        if data.get("client_id") != client.client_id:
            log.info("token_rejected", client_id=client.client_id, reason="code of another client")
            raise InvalidGrant("the code was not issued to this client")
        if not pkce.verify_s256(req.code_verifier, str(data.get("code_challenge", ""))):
            log.info("token_rejected", client_id=client.client_id, reason="PKCE mismatch")
            raise InvalidGrant("code_verifier does not match the code_challenge")
        if req.redirect_uri is not None and req.redirect_uri != data.get("redirect_uri"):
            log.info("token_rejected", client_id=client.client_id, reason="redirect_uri mismatch")
            raise InvalidGrant("redirect_uri does not match the authorization request")
        if req.resource is not None and req.resource != data.get("resource"):
            log.info("token_rejected", client_id=client.client_id, reason="resource mismatch")
            raise InvalidTarget("resource does not match the authorization request")

        policy = resource_policy(self.settings, str(data["resource"]))
        gid = new_token(16)
        family_ttl = max(policy.tokens.refresh_token_ttl, policy.tokens.access_token_ttl)
        # Remember the redemption first, so a racing replay finds what to revoke.
        await self.store.mark_code_used(code_hash, gid, family_ttl)
        family: Json = {
            "client_id": client.client_id,
            "sub": data["sub"],
            "scope": data["scope"],
            "resource": data["resource"],
            "auth_time": data["auth_time"],
            "amr": data["amr"],
            "acr": data.get("acr"),
            "code_challenge": data["code_challenge"],
            "redirect_uri": data["redirect_uri"],
            "created_at": now,
            "upstream": False,
        }
        family["upstream"] = await self._keep_upstream_tokens(data, gid, family_ttl, now)
        issue_refresh = client.allows_grant("refresh_token")
        refresh_token = f"{gid}.{new_token(32)}"
        # Without a refresh token the family still exists: it tracks the access tokens of the
        # grant, so that a replayed code can revoke them; its token hash is never handed out.
        current = token_hash(refresh_token if issue_refresh else new_token(32))
        await self.store.create_family(gid, current, family, family_ttl)
        access_token, claims, ttl = self._mint(family, gid=gid, scope=str(data["scope"]), now=now)
        await self.store.add_family_jti(gid, claims["jti"], float(claims["exp"]))
        self._count("issued")
        log.info(
            "token_issued",
            client_id=client.client_id,
            sub=data["sub"],
            resource=data["resource"],
            grant="authorization_code",
        )
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": int(ttl),
            "scope": str(data["scope"]),
        }
        if issue_refresh:
            body["refresh_token"] = refresh_token
        return body

    async def _on_missing_code(self, code_hash: str, client: Client, req: TokenRequest) -> None:
        """A code that is not (or no longer) there: revoke its grant if this is a valid replay."""
        gid = await self.store.code_used_by(code_hash)
        if gid is None:
            log.info("token_rejected", client_id=client.client_id, reason="unknown code")
            return
        family = await self.store.get_family(gid)
        valid_replay = (
            family is not None
            and family.get("client_id") == client.client_id
            and req.code_verifier is not None
            and pkce.verify_s256(req.code_verifier, str(family.get("code_challenge", "")))
            and (req.redirect_uri is None or req.redirect_uri == family.get("redirect_uri"))
        )
        if not valid_replay:
            log.info(
                "code_replayed",
                client_id=client.client_id,
                revoked=False,
                reason="replay with invalid parameters",
            )
            return
        log.warning(
            "code_replayed",
            client_id=client.client_id,
            revoked=True,
            sub=family.get("sub") if family else None,
        )
        self._count("reuse_detected")
        await self._revoke_family(gid, reason="code replay")

    # ------------------------------------------------------------------ refresh_token

    async def refresh(self, client: Client, req: TokenRequest, now: float) -> dict[str, Any]:
        """Rotate a refresh token and mint a new access token (R20, R31)."""
        if req.refresh_token is None:
            raise InvalidRequest("refresh_token is required")
        gid, dot, secret = req.refresh_token.partition(".")
        if not dot or not gid or not secret:
            raise InvalidGrant("the refresh token is invalid")
        family = await self.store.get_family(gid)
        if family is None:
            # Unknown, expired or revoked; a rotated-out token of a live family is found below.
            log.info("token_rejected", client_id=client.client_id, reason="unknown family")
            await self._finish_revocation(gid)
            raise InvalidGrant("the refresh token is invalid")
        if family.get("client_id") != client.client_id:
            log.info(
                "token_rejected", client_id=client.client_id, reason="family of another client"
            )
            raise InvalidGrant("the refresh token was not issued to this client")
        if not client.allows_grant("refresh_token"):
            raise UnauthorizedClient("the client may not use refresh tokens")
        if req.resource is not None and req.resource != family.get("resource"):
            raise InvalidTarget("resource does not match the grant")
        original = split_scope(str(family.get("scope", "")))
        asked = split_scope(req.scope)
        if req.scope is not None and not asked:
            raise InvalidScope("scope is empty")
        if any(s not in original for s in asked):
            raise InvalidScope("a refresh may not widen the scope")
        scope = " ".join(asked or original)
        policy = resource_policy(self.settings, str(family["resource"]))
        auth_time = float(family["auth_time"])
        if now - auth_time > policy.tokens.mfa_max_age:
            log.info(
                "token_rejected",
                client_id=client.client_id,
                sub=family.get("sub"),
                reason="mfa_max_age exceeded",
            )
            raise InvalidGrant("the second-factor authentication is too old; sign in again")

        if family.get("upstream"):
            # Before rotating: an upstream failure leaves the client's refresh token usable.
            if self.refresh_upstream is None:
                raise TemporarilyUnavailable("the upstream provider cannot be reached")
            await self.refresh_upstream(gid)

        new_refresh = f"{gid}.{new_token(32)}"
        outcome = await self.store.rotate_refresh(
            gid,
            token_hash(req.refresh_token),
            token_hash(new_refresh),
            policy.tokens.refresh_token_ttl,
        )
        if outcome is RotateOutcome.REUSED:
            log.warning("refresh_reuse_detected", client_id=client.client_id, sub=family.get("sub"))
            self._count("reuse_detected")
            await self._revoke_family(gid, reason="refresh token reuse")
            raise InvalidGrant("the refresh token was already used")
        if outcome is not RotateOutcome.ROTATED:
            log.info("token_rejected", client_id=client.client_id, reason="refresh token invalid")
            raise InvalidGrant("the refresh token is invalid")

        access_token, claims, ttl = self._mint(family, gid=gid, scope=scope, now=now)
        await self.store.add_family_jti(gid, claims["jti"], float(claims["exp"]))
        self._count("refreshed")
        log.info(
            "token_refreshed",
            client_id=client.client_id,
            sub=family.get("sub"),
            resource=family.get("resource"),
        )
        return {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": int(ttl),
            "scope": scope,
            "refresh_token": new_refresh,
        }

    async def grant(self, client: Client, req: TokenRequest, now: float) -> dict[str, Any]:
        """Dispatch on `grant_type` (already validated by `parse_token_request`)."""
        if not client.allows_grant(req.grant_type):
            raise UnauthorizedClient("the client may not use this grant type")
        if req.grant_type == "authorization_code":
            return await self.redeem_code(client, req, now)
        return await self.refresh(client, req, now)
