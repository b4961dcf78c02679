"""A whole run of the gateway with its log captured: every security decision is audited, and
no secret — planted or produced — ever reaches the log (DESIGN §6, invariant 9, R35).

Canaries are planted everywhere a secret lives: the upstream client secret (the legacy
provider's), the cookie secret and the encryption key of the config, the user's TOTP seed and
upstream password. The run then collects every secret it produces: the upstream's code and
state, the gateway's CSRF tokens and cookies, the client's authorization code, access and
refresh tokens (before and after a refresh), the upstream tokens sealed in the store (before
and after the refresh that renews them), a confidential client's secret, and the TOTP codes
typed. It drives: registration, consent, upstream login, a wrong TOTP code then the right one,
code redemption, refresh, MCP calls through the SDK client (allowed, denied by policy, with a
forged token), and a bad client secret. The log (level debug, JSON, stdlib records included) is
then searched for each canary, and for the audit event of each decision.

Only the gateway's output counts: the test's own HTTP client libraries log to the same stdlib
root logger, so they are held at WARNING while the log is captured.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec
from mcp.shared.exceptions import MCPError

from gateway.flows.upstream_tokens import blob_key
from gateway.logs import configure_logging, reset_logging
from tests.e2e.mcp_oauth import DEFAULT_REDIRECT_URI, plain_mcp_client, totp_code
from tests.e2e.support import (
    MODERN,
    answers,
    authorization_url,
    mcp_post,
    new_pkce,
    new_secret,
    redeem,
    refresh,
    register_public_client,
    rpc,
    token_request,
    unverified,
)
from tests.e2e.useragent import UserAgent, at_form_with
from tests.fixtures.gateway import RunningGateway, running_gateway
from tests.fixtures.peers import LegacyIdp, McpServer

pytestmark = pytest.mark.e2e

USER = "trent"
# The test's own client libraries (not the gateway) log through the same root logger.
CLIENT_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "mcp", "anyio", "hpack")
POLICY = {
    "mcp": {"rules": [{"method": "tools/call", "tool": "delete_everything", "effect": "deny"}]}
}
REQUIRED_CANARIES = frozenset(
    {
        "upstream client secret",
        "cookie secret",
        "encryption key",
        "TOTP seed",
        "upstream password",
        "upstream authorization code",
        "upstream state",
        "CSRF token (/oauth/authorize)",
        "CSRF token (/oauth/totp)",
        "authorization code",
        "access token",
        "access token signature",
        "refresh token",
        "refresh token secret part",
        "refreshed access token",
        "rotated refresh token",
        "upstream access token",
        "upstream refresh token",
        "renewed upstream access token",
        "renewed upstream refresh token",
        "forged token",
        "confidential client secret",
        "wrong client secret",
        "Basic credentials",
    }
)
MIN_CANARY = 8  # shorter secrets (TOTP codes) are searched as whole values, see below


@contextmanager
def captured_log() -> Iterator[io.StringIO]:
    """The gateway's log as it would reach stdout: JSON lines at level debug."""
    buf = io.StringIO()
    saved = {name: logging.getLogger(name).level for name in CLIENT_LOGGERS}
    configure_logging("debug", "json", buf)
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield buf
    finally:
        reset_logging()
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class Canaries:
    """The secrets the log must never contain, by what they are."""

    def __init__(self) -> None:
        self.long: dict[str, str] = {}
        self.short: dict[str, str] = {}

    def add(self, what: str, value: str | None) -> None:
        assert value, f"canary {what} is empty: the run did not produce it"
        if len(value) >= MIN_CANARY:
            self.long[what] = value
        else:
            self.short[what] = value

    def token(self, what: str, value: str | None) -> None:
        """A token, and the parts of it that are secret on their own."""
        self.add(what, value)
        assert value is not None
        if value.count(".") == 2:  # a JWT: its signature
            self.add(what + " signature", value.rsplit(".", 1)[1])
        elif "." in value:  # `<family>.<secret>`: the secret half
            self.add(what + " secret part", value.split(".", 1)[1])


def _events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        event = json.loads(line)  # every line is one JSON object
        assert isinstance(event, dict)
        events.append(event)
    return events


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _forged_token(gw: RunningGateway, kid: str) -> str:
    """A well-formed access token for this resource signed by a key the gateway never had."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(gw.clock.now())
    claims = {
        "iss": gw.url,
        "sub": USER,
        "aud": gw.resource_url(),
        "client_id": "forger",
        "scope": "mcp",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": secrets.token_hex(8),
        "auth_time": now,
        "amr": ["pwd", "otp", "mfa"],
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "at+jwt", "kid": kid})


async def _upstream_tokens(gw: RunningGateway, gid: str) -> dict[str, Any]:
    sealed = await gw.store.get_blob(blob_key(gid))
    assert sealed is not None
    data: dict[str, Any] = json.loads(gw.sealer.open(sealed, blob_key(gid)))
    return data


@dataclass
class Run:
    """What one full run produced: its log, its secrets, and who took part."""

    text: str
    events: list[dict[str, Any]]
    canaries: Canaries
    client_id: str
    confidential_client_id: str

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The events named `event` whose fields include `fields`."""
        return [
            e
            for e in self.events
            if e["event"] == event and all(e.get(k) == v for k, v in fields.items())
        ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Run:
    """One gateway run with canaries planted, driven through every decision, log captured."""
    with captured_log() as log:
        return await _drive(
            legacy_idp, gateway_ports[0], mcp_server, tmp_path_factory.mktemp("canaries"), log
        )


async def _drive(
    legacy_idp: LegacyIdp, port: int, mcp_server: McpServer, directory: Path, log: io.StringIO
) -> Run:
    """Plant the canaries, drive the run (see the module docstring), collect what it made."""
    canaries = Canaries()
    cookie_secret = "canary-cookie-secret-" + secrets.token_urlsafe(24)
    encryption_key = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    seed = new_secret()
    canaries.add("upstream client secret", legacy_idp.client_secret)
    canaries.add("cookie secret", cookie_secret)
    canaries.add("encryption key", encryption_key)
    canaries.add("TOTP seed", seed)
    canaries.add("TOTP seed (lower case)", seed.lower())
    canaries.add("upstream password", legacy_idp.accounts[USER])

    async with running_gateway(
        directory / "gateway",
        idp=legacy_idp,
        port=port,
        resources=[{"path": "/mcp", "upstream": mcp_server.url, "forward_token": "upstream"}],
        policy=POLICY,
        keys={"cookie_secret": cookie_secret},
        store={"encryption_key": encryption_key},
        upstream={
            "scopes": ["openid", "profile", "email", "offline_access"],
            "extra_authorize_params": {"prompt": "consent"},
        },
    ) as gw:
        await gw.enroll(USER, seed)
        client_id = await register_public_client(gw.url, name="canary client")

        # Authorization: consent, upstream login, a wrong TOTP code, then the right one.
        pkce = new_pkce()
        right = totp_code(seed)
        wrong = f"{(int(right) + 500_000) % 1_000_000:06d}"
        canaries.add("wrong TOTP code", wrong)
        canaries.add("TOTP code", right)
        url = authorization_url(gw.url, client_id=client_id, resource=gw.resource_url(), pkce=pkce)
        async with UserAgent(
            redirect_uri=DEFAULT_REDIRECT_URI, answers=answers(legacy_idp, USER, seed)
        ) as ua:
            at_totp = await ua.run(url, stop=at_form_with("code"))
            assert at_totp.page is not None
            for cookie in ua.client.cookies.jar:  # the transaction and consent cookies
                if cookie.name.startswith(("mfagw", "__Host-mfagw")) and cookie.value:
                    canaries.add(f"cookie {cookie.name}", cookie.value)
            refused = await ua.submit(at_totp.page, {"code": wrong})
            assert refused.status == 400
            done = await ua.submit(refused, {"code": right})
            assert done.status == 303
            assert done.location is not None
            for page in ua.pages:
                form = page.form()
                if form is not None and "csrf" in form.hidden:
                    canaries.add(f"CSRF token ({urlsplit(page.url).path})", form.hidden["csrf"])
                if page.url.startswith(gw.url + "/oauth/callback?"):
                    query = dict(parse_qsl(urlsplit(page.url).query))
                    canaries.add("upstream authorization code", query["code"])
                    canaries.add("upstream state", query["state"])
        code = dict(parse_qsl(urlsplit(done.location).query))["code"]
        canaries.add("authorization code", code)

        # Tokens, then a refresh (which renews the upstream tokens behind it).
        issued = await redeem(
            gw.url, code=code, pkce=pkce, client_id=client_id, resource=gw.resource_url()
        )
        assert issued.status_code == 200, issued.text
        first = issued.json()
        canaries.token("access token", first["access_token"])
        canaries.token("refresh token", first["refresh_token"])
        gid = unverified(first["access_token"])[1]["gid"]
        upstream_before = await _upstream_tokens(gw, gid)
        canaries.token("upstream access token", upstream_before["access_token"])
        canaries.token("upstream refresh token", upstream_before["refresh_token"])

        refreshed = await refresh(gw.url, refresh_token=first["refresh_token"], client_id=client_id)
        assert refreshed.status_code == 200, refreshed.text
        second = refreshed.json()
        canaries.token("refreshed access token", second["access_token"])
        canaries.token("rotated refresh token", second["refresh_token"])
        upstream_after = await _upstream_tokens(gw, gid)
        assert upstream_after["access_token"] != upstream_before["access_token"]
        canaries.token("renewed upstream access token", upstream_after["access_token"])
        canaries.token("renewed upstream refresh token", upstream_after["refresh_token"])

        # MCP calls with the SDK client: allowed, and denied by policy.
        bearer = {"Authorization": f"Bearer {second['access_token']}"}
        async with plain_mcp_client(gw.resource_url(), headers=bearer) as client:
            echoed = await client.call_tool("echo", {"text": "canary run"})
            whoami = await client.call_tool("whoami", {})
            with pytest.raises(MCPError):
                await client.call_tool("delete_everything", {})
        assert echoed.structured_content == {"result": "canary run"}
        assert whoami.structured_content is not None
        assert whoami.structured_content["authorization"] == (
            "Bearer " + upstream_after["access_token"]
        )

        # A forged access token.
        kid = jwt.get_unverified_header(second["access_token"])["kid"]
        forged = _forged_token(gw, kid)
        canaries.token("forged token", forged)
        forged_resp = await mcp_post(
            gw.resource_url(), rpc("tools/list"), token=forged, protocol=MODERN
        )
        assert forged_resp.status_code == 401

        # A confidential client presenting a wrong secret.
        async with httpx.AsyncClient(timeout=10) as http:
            registered = await http.post(
                gw.url + "/oauth/register",
                json={
                    "redirect_uris": [DEFAULT_REDIRECT_URI],
                    "client_name": "confidential canary",
                    "token_endpoint_auth_method": "client_secret_basic",
                    "grant_types": ["authorization_code", "refresh_token"],
                },
            )
        assert registered.status_code == 201, registered.text
        confidential = registered.json()
        canaries.add("confidential client secret", confidential["client_secret"])
        wrong_secret = "canary-wrong-client-secret-" + secrets.token_urlsafe(16)
        canaries.add("wrong client secret", wrong_secret)
        basic = base64.b64encode(f"{confidential['client_id']}:{wrong_secret}".encode()).decode()
        canaries.add("Basic credentials", basic)
        bad_client = await token_request(
            gw.url,
            {"grant_type": "refresh_token", "refresh_token": second["refresh_token"]},
            auth=(confidential["client_id"], wrong_secret),
        )
        assert bad_client.status_code == 401
        assert bad_client.json()["error"] == "invalid_client"

    text = log.getvalue()
    return Run(text, _events(text), canaries, client_id, confidential["client_id"])


# --------------------------------------------------------------------------- the verdicts


def test_no_planted_or_produced_secret_appears_in_the_log(run: Run) -> None:
    """Secrets of the config, the user, the upstream and the client, and every token, code,
    cookie and CSRF token of the run are absent from the log (invariant 9, R35, ASVS 16.2.5)."""
    canaries = run.canaries
    assert set(canaries.long) >= REQUIRED_CANARIES
    assert len([what for what in canaries.long if what.startswith("cookie mfagw_")]) == 2
    assert set(canaries.short) == {"TOTP code", "wrong TOTP code"}
    # The search works on this log: what is not secret is there to be found.
    assert run.client_id in run.text
    assert f'"sub":"{USER}"' in run.text
    leaked = sorted(what for what, value in canaries.long.items() if value in run.text)
    assert leaked == []
    values = [s for e in run.events for k, v in e.items() if k != "timestamp" for s in _strings(v)]
    for what, short in canaries.short.items():
        whole = re.compile(rf"(?<![0-9A-Za-z]){re.escape(short)}(?![0-9A-Za-z])")
        assert not [v for v in values if whole.search(v)], what


def test_every_line_is_a_structured_event(run: Run) -> None:
    """One JSON object per line with `timestamp`, `level`, `event`; request-scoped lines carry
    the request id and the route name, never a raw path (DESIGN §6, R35 16.4.1)."""
    assert all({"timestamp", "level", "event"} <= set(e) for e in run.events)
    in_requests = [e for e in run.events if "route" in e]
    assert in_requests
    assert all(re.fullmatch(r"[0-9a-f]{32}", e["request_id"]) for e in in_requests)
    assert not [e["route"] for e in in_requests if "?" in e["route"]]


def test_each_security_decision_of_the_run_has_its_audit_event(run: Run) -> None:
    """Registration, consent, upstream login, the failed and the accepted TOTP code, code and
    token issuance, the refresh, allowed and denied MCP calls (policy, forged token): each is an
    event naming the client, the user and, for refusals, the reason (DESIGN §6, R35)."""
    find = run.find
    client_id = run.client_id
    assert find("client_registered", client_id=client_id)
    assert find("consent_given", client_id=client_id)
    assert find("upstream_login_completed", client_id=client_id, sub=USER)
    failed = find("totp_failed", client_id=client_id, sub=USER)
    assert len(failed) == 1
    assert failed[0]["reason"]
    assert len(find("totp_accepted", client_id=client_id, sub=USER)) == 1
    assert len(find("code_issued", client_id=client_id, sub=USER)) == 1
    assert len(find("token_issued", client_id=client_id, sub=USER)) == 1
    assert len(find("token_refreshed", client_id=client_id, sub=USER)) == 1
    assert find("mcp_allowed", sub=USER, method="tools/call", tool="echo")
    assert find("mcp_allowed", sub=USER, method="tools/call", tool="whoami")
    assert find("mcp_denied", sub=USER, tool="delete_everything", reason="rule_denied")
    forged = find("mcp_denied", reason="invalid_token", route="/mcp")
    assert len(forged) == 1
    assert "sub" not in forged[0]  # nothing from an unverified token is believed
    finished = find("request_finished")
    assert {e["status"] for e in finished} >= {200, 201, 303, 400, 401, 403}


def test_a_failed_client_authentication_at_the_token_endpoint_is_audited(run: Run) -> None:
    """A confidential client presenting a wrong secret at `/oauth/token` is a failed
    authentication: it gets an audit event naming the client and the reason, not only the
    request summary line (R35: ASVS 16.3.1, 16.3.2)."""
    finished = run.find("request_finished", route="/oauth/token", status=401)
    assert len(finished) == 1
    request_id = finished[0]["request_id"]
    audit = [
        e
        for e in run.events
        if e.get("request_id") == request_id and e["event"] != "request_finished"
    ]
    assert [e["event"] for e in audit] in (["token_rejected"], ["request_rejected"])
    assert audit[0].get("client_id") == run.confidential_client_id
    assert audit[0].get("reason")
