"""The gateway's own authorization codes: issued only after the TOTP step-up (invariant 1).

`issue_code` is the one function that creates a code, and it refuses unless the transaction
is in stage `done`, which only the step-up flow sets after a valid TOTP. It consumes the
transaction atomically, so one transaction yields at most one code. The code is 256 random
bits (R10), stored only as `token_hash(code)` for policy `tokens.code_ttl` (60 s by default),
bound to client, redirect URI, PKCE challenge, resource, scope, subject, `auth_time` (the
step-up) and `amr` (the upstream's methods plus `otp` and `mfa`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog

from gateway.core.errors import AccessDenied
from gateway.crypto import new_token, token_hash
from gateway.metrics import Metrics
from gateway.ports import Store
from gateway.settings import Policy, Settings

log = structlog.get_logger(__name__)

STAGE_DONE = "done"
DEFAULT_UPSTREAM_AMR: tuple[str, ...] = ("pwd",)
STEP_UP_AMR: tuple[str, ...] = ("otp", "mfa")
# Fields of the transaction that must be identical in the caller's copy and the stored one.
_BOUND_FIELDS = ("client_id", "redirect_uri", "code_challenge", "resource", "scope", "state")


class StepUpIncomplete(AccessDenied):
    """A code was asked for a transaction whose step-up did not succeed (invariant 1)."""


def resource_policy(settings: Settings, resource_url: str) -> Policy:
    """The policy of the resource a grant is for (the global policy if it is unknown)."""
    resource = settings.resource_by_url(resource_url)
    return settings.global_policy if resource is None else settings.policy_for(resource)


def gateway_amr(upstream_amr: object) -> list[str]:
    """The upstream's `amr` (default `["pwd"]`) plus `otp` and `mfa`, deduplicated, in order.

    `otp`/`mfa` claimed by the upstream are dropped first: in a gateway token they always mean
    the gateway's own step-up.
    """
    values: Iterable[object] = upstream_amr if isinstance(upstream_amr, list) else ()
    kept = [v for v in values if isinstance(v, str) and v and v not in STEP_UP_AMR]
    return list(dict.fromkeys([*(kept or DEFAULT_UPSTREAM_AMR), *STEP_UP_AMR]))


async def issue_code(
    store: Store,
    settings: Settings,
    txid: str,
    tx: dict[str, Any],
    now: float,
    *,
    metrics: Metrics | None = None,
) -> str:
    """A fresh single-use code for a transaction whose step-up succeeded.

    Raises `StepUpIncomplete` unless `tx["stage"] == "done"` and the stored transaction is
    still there (it is consumed here) and agrees with `tx`.
    """
    if tx.get("stage") != STAGE_DONE:
        raise StepUpIncomplete(
            "the second factor was not verified",
            log_reason=f"code asked in stage {tx.get('stage')!r}",
        )
    stored = await store.take_transaction(txid)
    if stored is None:
        raise StepUpIncomplete(
            "the sign-in request expired or was already used",
            log_reason="transaction already consumed or expired",
        )
    if any(stored.get(k) != tx.get(k) for k in _BOUND_FIELDS):
        raise StepUpIncomplete(
            "the sign-in request does not match",
            log_reason="transaction differs from the stored one",
        )
    sub = tx.get("sub")
    resource = tx.get("resource")
    required = (tx.get("client_id"), tx.get("redirect_uri"), tx.get("code_challenge"))
    if (
        not isinstance(sub, str)
        or not sub
        or not isinstance(resource, str)
        or not all(isinstance(v, str) and v for v in required)
    ):
        raise StepUpIncomplete(
            "the sign-in request is incomplete", log_reason="transaction lacks subject or binding"
        )
    policy = resource_policy(settings, resource)
    code = new_token(32)
    data: dict[str, Any] = {
        "client_id": tx["client_id"],
        "redirect_uri": tx["redirect_uri"],
        "redirect_uri_sent": bool(tx.get("redirect_uri_sent", True)),
        "code_challenge": tx["code_challenge"],
        "resource": resource,
        "scope": str(tx.get("scope", "")),
        "sub": sub,
        "auth_time": int(now),
        "auth_time_upstream": tx.get("auth_time_upstream"),
        "amr": gateway_amr(tx.get("amr_upstream")),
        "acr": policy.tokens.acr,
        "upstream_tokens_key": tx.get("upstream_tokens_key"),
        "txid": txid,
        "issued_at": now,
    }
    await store.put_code(token_hash(code), data, policy.tokens.code_ttl)
    remember = settings.global_policy.consent.remember
    if remember > 0 and tx.get("consented_at") is not None:
        await store.put_consent(sub, str(tx["client_id"]), remember)
    if metrics is not None:
        metrics.codes_issued.inc()
    log.info("code_issued", client_id=tx["client_id"], sub=sub, resource=resource)
    return code
