"""Audit events of the authorization facade: every step logged, no secret in any event (R35)."""

from __future__ import annotations

import structlog

from gateway.ports import Store
from tests.flows.conftest import HarnessFactory, basic, new_verifier


async def test_events_name_the_steps_and_never_carry_secrets(
    make_harness: HarnessFactory, store: Store
) -> None:
    """Registration, code, token, refresh, replay and revocation each log their event; the raw
    events (before the redaction processor) never contain a secret, code or token (R35)."""
    gw = await make_harness(store)
    with structlog.testing.capture_logs() as events:
        reg = await gw.register(token_endpoint_auth_method="client_secret_post")
        client_id, secret = reg["client_id"], reg["client_secret"]
        verifier = new_verifier()
        code, _ = await gw.seed_code(client_id, verifier)
        first = await (await gw.redeem(client_id, code, verifier, client_secret=secret)).json()
        refreshed = await (
            await gw.token(
                {
                    "grant_type": "refresh_token",
                    "refresh_token": first["refresh_token"],
                    "client_id": client_id,
                    "client_secret": secret,
                }
            )
        ).json()
        await gw.redeem(client_id, code, verifier, client_secret=secret)  # replay
        await gw.token(
            {"grant_type": "refresh_token", "refresh_token": "x.y"}, auth=basic(client_id, "wrong")
        )
        await gw.client.post(
            "/oauth/revoke",
            data={
                "token": refreshed["refresh_token"],
                "client_id": client_id,
                "client_secret": secret,
            },
        )
    names = [e["event"] for e in events]
    for expected in (
        "client_registered",
        "code_issued",
        "token_issued",
        "token_refreshed",
        "code_replayed",
        "token_revoked",
        "request_finished",
    ):
        assert expected in names, expected
    secrets_ = [
        secret,
        code,
        verifier,
        first["access_token"],
        first["refresh_token"],
        refreshed["access_token"],
        refreshed["refresh_token"],
        first["refresh_token"].split(".", 1)[1],
    ]
    text = repr(events)
    for value in secrets_:
        assert value not in text
