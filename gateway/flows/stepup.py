"""The TOTP step-up of an authorization transaction (DESIGN §2.8-9, R34, invariants 1 and 5).

`verify_stepup` judges one submitted code for a transaction in stage `totp` (or `enroll`, the
first-login enrolment). Order of checks, each failing with the same generic result:

1. user locked? IP locked? (nothing is verified while locked);
2. one attempt slot is taken from the user's failure budget *before* verifying (atomic
   `INCR`), so N concurrent guesses can never verify more than the policy allows;
3. the code: 6-8 digits → TOTP (pyotp) and the matched time step burned atomically per user
   (`burn_step`: strictly increasing, so a replay or an older step is refused and logged as
   `totp_replay_rejected`); recovery-code shaped → `use_recovery_code` (once each);
4. a failure also counts against the client IP; at a limit the lock is set (store-side TTL,
   shared by every replica) and reported once;
5. success: the user's failure budget is cleared, stage → `done`, `auth_time` = now,
   `amr` = upstream methods + `otp`, `mfa`; only then `flows.codes.issue_code` makes the
   authorization code, consuming the stored transaction atomically (one code per
   transaction, even when two different valid codes race), and the client redirect is built.

The result carries the exact reason for the log; the user only ever sees one message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from gateway.core import regulation, totp
from gateway.core.redirects import authorization_response
from gateway.crypto import Sealer, SealError
from gateway.flows.codes import StepUpIncomplete, issue_code
from gateway.flows.enrollment import (
    PendingEnrollment,
    hash_recovery_code,
    open_seed,
    store_enrollment,
)
from gateway.flows.upstream_login import stepup_policy
from gateway.metrics import Metrics
from gateway.ports import Json, Store
from gateway.settings import Settings

#: The one message a user sees for every failure (wrong, replayed, locked, malformed ...).
GENERIC_FAILURE = (
    "That code was not accepted. Wait for a new code in your authenticator app and try again."
)
#: `amr` values the gateway's own step-up adds (RFC 8176 §2).
STEPUP_AMR: tuple[str, ...] = ("otp", "mfa")
MAX_CODE_LENGTH = 64
_DIGITS = re.compile(r"^[0-9]{6,8}$")

Reason = Literal[
    "accepted",
    "user_locked",
    "ip_locked",
    "wrong_code",
    "replayed",
    "malformed",
    "not_enrolled",
    "seed_unreadable",
    "recovery_code_invalid",
]
Method = Literal["totp", "recovery_code", "enrollment"]


class StepUpNotReady(Exception):
    """The transaction is not (or no longer) waiting for a step-up; show an error page."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class StepUpResult:
    """The verdict on one submitted code. Only `accepted` and `redirect_to` reach the user."""

    accepted: bool
    reason: Reason
    subject: str
    client_id: str
    method: Method | None = None
    redirect_to: str | None = None
    locked: tuple[str, ...] = field(default=())  # scopes that became locked with this failure
    counted: bool = False  # the attempt counted as a failure

    @property
    def replayed(self) -> bool:
        return self.reason == "replayed"


def transaction_subject(tx: Json) -> str:
    sub = tx.get("sub")
    if not isinstance(sub, str) or not sub:
        raise StepUpNotReady("transaction_has_no_subject")
    return sub


def check_stage(tx: Json | None) -> Json:
    """`tx` if it waits for a code (stage `totp` or `enroll`), else `StepUpNotReady`."""
    if tx is None:
        raise StepUpNotReady("transaction_expired")
    if tx.get("stage") not in ("totp", "enroll"):
        raise StepUpNotReady(f"stage_{tx.get('stage')}")
    transaction_subject(tx)
    return tx


async def verify_stepup(
    store: Store,
    sealer: Sealer,
    settings: Settings,
    txid: str,
    tx: Json,
    code: str,
    ip: str | None,
    now: float,
    *,
    metrics: Metrics | None = None,
) -> StepUpResult:
    """Judge `code` for transaction `txid` (already matched to this browser and CSRF-checked).

    Raises `StepUpNotReady` if `tx` is not waiting for a code; store failures propagate.
    """
    check_stage(tx)
    policy = stepup_policy(settings)
    user = transaction_subject(tx)
    client_id = str(tx.get("client_id", ""))
    keys = regulation.keys_for(user, ip)

    def result(
        reason: Reason, *, locked: tuple[str, ...] = (), counted: bool = False
    ) -> StepUpResult:
        return StepUpResult(
            accepted=False,
            reason=reason,
            subject=user,
            client_id=client_id,
            locked=locked,
            counted=counted,
        )

    if await store.is_locked(keys.user_lock):
        return result("user_locked")
    if await store.is_locked(keys.ip_lock):
        return result("ip_locked")
    # Take an attempt slot first: concurrent guesses cannot exceed the budget.
    user_attempts = await store.incr_counter(keys.user_failures, policy.failure_window)
    if user_attempts > policy.max_failures_per_user:
        await store.set_lock(keys.user_lock, policy.lockout)
        return result("user_locked")

    async def failed(reason: Reason) -> StepUpResult:
        ip_failures = await store.incr_counter(keys.ip_failures, policy.failure_window)
        decision = regulation.after_failure(user_attempts, ip_failures, policy)
        if decision.lock_user:
            await store.set_lock(keys.user_lock, policy.lockout)
            await store.clear_counter(keys.user_failures)
        if decision.lock_ip:
            await store.set_lock(keys.ip_lock, policy.lockout)
            await store.clear_counter(keys.ip_failures)
        return result(reason, locked=decision.scopes, counted=True)

    submitted = "".join(code.split())[:MAX_CODE_LENGTH]
    step_ttl = regulation.replay_guard_ttl(policy)

    async def check_code(seed: str) -> Reason | None:
        """None if `submitted` matches a time step of `seed` that this call burned (R34)."""
        step = totp.verify(
            seed,
            submitted,
            now,
            digits=policy.digits,
            period=policy.period,
            window=policy.window,
            algorithm=policy.algorithm,
        )
        if step is None:
            return "wrong_code"
        if not await store.burn_step(user, step, step_ttl):
            return "replayed"
        return None

    method: Method
    pending: PendingEnrollment | None = None

    if tx["stage"] == "enroll":
        sealed = tx.get("pending_seed_sealed")
        try:
            if not isinstance(sealed, str):
                raise ValueError("no pending seed")
            pending = PendingEnrollment.open(sealer, txid, sealed)
        except (SealError, ValueError):
            return await failed("seed_unreadable")
        if await store.get_totp(user) is not None:
            raise StepUpNotReady("already_enrolled")  # enrolled elsewhere meanwhile
        if not _DIGITS.match(submitted):
            return await failed("malformed")
        refusal = await check_code(pending.seed)
        if refusal is not None:
            return await failed(refusal)
        method = "enrollment"
    elif _DIGITS.match(submitted):
        record = await store.get_totp(user)
        if record is None or not record.confirmed:
            return await failed("not_enrolled")
        try:
            seed = open_seed(sealer, record)
        except (SealError, UnicodeDecodeError):
            return await failed("seed_unreadable")
        refusal = await check_code(seed)
        if refusal is not None:
            return await failed(refusal)
        method = "totp"
    else:
        hashed = hash_recovery_code(sealer, submitted)
        if hashed is None:
            return await failed("malformed")
        if await store.get_totp(user) is None:
            return await failed("not_enrolled")
        if not await store.use_recovery_code(user, hashed):
            return await failed("recovery_code_invalid")
        method = "recovery_code"

    await store.clear_counter(keys.user_failures)
    if pending is not None:
        await store_enrollment(store, sealer, user, pending.seed, pending.recovery_codes, now)
        tx.pop("pending_seed_sealed", None)

    amr_upstream = tx.get("amr_upstream")
    amr = [a for a in amr_upstream if isinstance(a, str)] if isinstance(amr_upstream, list) else []
    amr = [a for a in amr if a not in STEPUP_AMR] or ["pwd"]
    # Not written back: `issue_code` consumes the stored transaction atomically (and checks
    # that it still agrees with this copy), so of two racing successes only one gets a code,
    # and a transaction already consumed can never be re-created here.
    tx.update(stage="done", auth_time=now, amr=[*amr, *STEPUP_AMR], stepup_method=method)
    try:
        auth_code = await issue_code(store, settings, txid, tx, now, metrics=metrics)
    except StepUpIncomplete as exc:
        raise StepUpNotReady(f"code_refused: {exc.log_reason}") from None
    redirect_to = authorization_response(
        str(tx["redirect_uri"]),
        code=auth_code,
        state=tx.get("state") if isinstance(tx.get("state"), str) else None,
        iss=settings.issuer,
    )
    return StepUpResult(
        accepted=True,
        reason="accepted",
        subject=user,
        client_id=client_id,
        method=method,
        redirect_to=redirect_to,
    )
