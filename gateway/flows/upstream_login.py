"""The upstream hop of an authorization transaction: redirect out, and the callback back in.

`begin_upstream_login` runs after consent (DESIGN §2.6): it makes the gateway's own PKCE S256
pair, a CSPRNG `state` (bound server-side to the transaction, single use, ~10 min, R16) and a
`nonce`, records them in the transaction and returns the upstream authorization URL.

`complete_upstream_login` handles `/oauth/callback` (DESIGN §2.7): the `state` is consumed
atomically before anything else; a missing, unknown, expired or reused state, or a callback in
a browser that does not hold the transaction cookie, ends on an HTML page (never a redirect:
nothing about the client is verified for *this* browser). Once both are verified the client's
redirect URI is known, so upstream errors become `access_denied` (or `temporarily_unavailable`)
redirects to it. The upstream tokens are sealed under blob key `upstream:<txid>`; the
transaction moves to stage `totp`, or `enroll` when enrolment at first login applies. No code
of any kind is produced here (invariant 1).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from gateway.core.errors import (
    AccessDenied,
    InvalidRequest,
    OAuthError,
    ServerError,
    TemporarilyUnavailable,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.core.pkce import s256
from gateway.crypto import Sealer, new_token
from gateway.flows.enrollment import PendingEnrollment
from gateway.flows.upstream_tokens import store_tokens
from gateway.ports import Json, Store, UpstreamIdP
from gateway.settings import Settings, StepUpPolicy

CALLBACK_PATH = "/oauth/callback"
TOTP_PATH = "/oauth/totp"
#: Upper bound of an upstream `state` binding (R16: short expiry, ~10 min).
STATE_TTL = 600.0
_MAX_PARAM = 2048

# Upstream authorization errors that mean "the user did not (or could not) log in".
_PASSTHROUGH: dict[str, type[OAuthError]] = {
    "temporarily_unavailable": TemporarilyUnavailable,
    "server_error": ServerError,
}


def stepup_policy(settings: Settings) -> StepUpPolicy:
    """The step-up policy: the global authorization policy's, because a seed and its lockout
    belong to the user, not to one resource (the same for every resource)."""
    return settings.global_policy.stepup


def callback_url(settings: Settings) -> str:
    """The redirect URI registered upstream: `<public_url>/oauth/callback`."""
    return settings.server.public_url + CALLBACK_PATH


def totp_url(txid: str) -> str:
    return f"{TOTP_PATH}?{urlencode({'tx': txid})}"


def remaining_ttl(settings: Settings, tx: Mapping[str, Any], now: float) -> float:
    """Seconds the transaction has left: until its `expires_at` (set by the authorize flow),
    else `created_at` + the policy's transaction TTL; never extended, at least one second."""
    expires = tx.get("expires_at")
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        return max(1.0, float(expires) - now)
    created = tx.get("created_at")
    ttl = settings.global_policy.tokens.transaction_ttl
    if isinstance(created, int | float) and not isinstance(created, bool):
        return max(1.0, float(created) + ttl - now)
    return ttl


async def begin_upstream_login(
    store: Store, upstream: UpstreamIdP, settings: Settings, txid: str, tx: Json, now: float
) -> str:
    """Record state/nonce/PKCE in `tx` (updated in place and stored), stage → `upstream`,
    and return the upstream authorization URL. Raises `UpstreamUnavailable` when discovery
    fails (nothing is stored then) and `InvalidRequest` for a transaction past this step."""
    if tx.get("stage") not in ("consent", "upstream"):
        raise InvalidRequest(
            "the authorization request is not awaiting login",
            log_reason=f"begin_upstream_login in stage {tx.get('stage')!r}",
        )
    verifier = secrets.token_urlsafe(48)  # 64 characters (RFC 7636 §4.1: 43-128)
    state = new_token(32)
    nonce = new_token(32)
    url = await upstream.authorization_url(
        redirect_uri=callback_url(settings), state=state, nonce=nonce, code_challenge=s256(verifier)
    )
    ttl = remaining_ttl(settings, tx, now)
    tx.update(
        stage="upstream", upstream_state=state, upstream_nonce=nonce, upstream_verifier=verifier
    )
    await store.put_transaction(txid, tx, ttl)
    await store.bind_upstream_state(state, txid, min(STATE_TTL, ttl))
    return url


# --------------------------------------------------------------------------- callback


class CallbackRefused(Exception):
    """End the callback on an HTML page (never a redirect). `reason` is for the log only."""

    def __init__(
        self,
        title: str,
        message: str,
        status: int,
        reason: str,
        *,
        client_id: str | None = None,
        subject: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.title = title
        self.message = message
        self.status = status
        self.reason = reason
        self.client_id = client_id
        self.subject = subject


class CallbackClientError(Exception):
    """Report `error` to the client's verified redirect URI (state and cookie were checked)."""

    def __init__(
        self,
        error: OAuthError,
        *,
        redirect_uri: str,
        state: str | None,
        client_id: str,
        reason: str,
    ) -> None:
        super().__init__(reason)
        self.error = error
        self.redirect_uri = redirect_uri
        self.state = state
        self.client_id = client_id
        self.reason = reason


@dataclass(frozen=True)
class LoginCompleted:
    """The upstream login worked: go to the step-up page."""

    txid: str
    next_url: str
    subject: str
    client_id: str
    stage: str  # "totp" | "enroll"


def _refused(reason: str, *, status: int = 400) -> CallbackRefused:
    return CallbackRefused(
        "Sign-in could not be completed",
        "This sign-in link is invalid, was already used, or has expired. Go back to the "
        "application and start signing in again.",
        status,
        reason,
    )


def _same(a: object, b: str) -> bool:
    return isinstance(a, str) and hmac.compare_digest(a.encode(), b.encode())


def _param(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None or len(value) > _MAX_PARAM:
        return None
    return value


async def complete_upstream_login(
    store: Store,
    sealer: Sealer,
    upstream: UpstreamIdP,
    settings: Settings,
    params: Mapping[str, str],
    cookie_txid: str | None,
    now: float,
) -> LoginCompleted:
    """Verify the callback and establish the user; see the module docstring for the rules.

    `params` are the callback's query parameters (each at most once), `cookie_txid` the value
    of the signed transaction cookie of this browser. Raises `CallbackRefused` (HTML page) or
    `CallbackClientError` (redirect to the client); store failures propagate (fail closed).
    """
    state = _param(params, "state")
    if not state:
        raise _refused("missing_state")
    txid = await store.take_upstream_state(state)  # single use, whatever happens next
    if txid is None:
        raise _refused("unknown_or_reused_state")
    tx = await store.get_transaction(txid)
    if tx is None:
        raise _refused("transaction_expired")
    client_id = str(tx.get("client_id", ""))
    if tx.get("stage") != "upstream" or not _same(tx.get("upstream_state"), state):
        raise _refused("state_not_current")
    if cookie_txid is None or not _same(cookie_txid, txid):
        await store.take_transaction(txid)  # the state is spent: this transaction is dead
        refused = _refused("browser_mismatch", status=403)
        refused.client_id = client_id
        raise refused

    redirect_uri = tx.get("redirect_uri")
    if not isinstance(redirect_uri, str) or not client_id:
        await store.take_transaction(txid)
        raise _refused("transaction_malformed", status=500)
    client_state = tx.get("state") if isinstance(tx.get("state"), str) else None

    async def client_error(err: OAuthError, reason: str) -> CallbackClientError:
        await store.take_transaction(txid)
        await store.delete_blob(f"upstream:{txid}")
        return CallbackClientError(
            err, redirect_uri=redirect_uri, state=client_state, client_id=client_id, reason=reason
        )

    try:
        if not await upstream.accepts_response_issuer(_param(params, "iss")):
            raise await client_error(
                AccessDenied("the sign-in provider's response was not valid"), "iss_mismatch"
            )
        upstream_error = _param(params, "error")
        if upstream_error is not None:
            err_type = _PASSTHROUGH.get(upstream_error, AccessDenied)
            code_safe = upstream_error if upstream_error.replace("_", "").isalnum() else "other"
            raise await client_error(
                err_type("the user was not signed in by the sign-in provider"),
                f"upstream_error:{code_safe[:40]}",
            )
        code = _param(params, "code")
        if not code:
            raise await client_error(
                AccessDenied("the sign-in provider returned no authorization code"),
                "upstream_no_code",
            )
        identity, tokens = await upstream.login(
            code,
            redirect_uri=callback_url(settings),
            code_verifier=str(tx.get("upstream_verifier", "")),
            nonce=str(tx.get("upstream_nonce", "")),
        )
    except UpstreamRejected as exc:
        raise await client_error(
            AccessDenied("the sign-in provider did not confirm the user"),
            f"upstream_rejected:{exc.error}: {exc.reason}",
        ) from None
    except UpstreamUnavailable as exc:
        raise await client_error(
            TemporarilyUnavailable("the sign-in provider is unavailable"),
            f"upstream_unavailable: {exc}",
        ) from None

    policy = stepup_policy(settings)
    ttl = remaining_ttl(settings, tx, now)
    record = await store.get_totp(identity.subject)
    if record is not None and record.confirmed:
        stage = "totp"
    elif policy.enrollment == "first_login":
        stage = "enroll"
        tx["pending_seed_sealed"] = PendingEnrollment.new(policy).seal(sealer, txid)
    else:
        await store.take_transaction(txid)
        raise CallbackRefused(
            "Two-step verification is not set up",
            "Your account has no authenticator enrolled for this service, so sign-in cannot "
            "continue. Ask your administrator to enroll you, then sign in again.",
            403,
            "not_enrolled",
            client_id=client_id,
            subject=identity.subject,
        )

    await store_tokens(store, sealer, txid, tokens, ttl=ttl, now=now)
    for spent in ("upstream_state", "upstream_nonce", "upstream_verifier"):
        tx.pop(spent, None)
    tx.update(
        stage=stage,
        sub=identity.subject,
        auth_time_upstream=identity.auth_time,
        amr_upstream=list(identity.amr),
        upstream_tokens_key=f"upstream:{txid}",
    )
    await store.put_transaction(txid, tx, ttl)
    return LoginCompleted(
        txid=txid,
        next_url=totp_url(txid),
        subject=identity.subject,
        client_id=client_id,
        stage=stage,
    )
