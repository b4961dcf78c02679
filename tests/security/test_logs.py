"""Secrets never reach the log, and attacker-chosen text cannot forge log lines (R35,
invariant 9).

The gateway's real logging chain (`gateway.logs.configure_logging`, JSON and console) writes to
a buffer while a whole flow runs over HTTP: a confidential client registers, a user logs in
upstream with a password and passes the TOTP step, the client redeems, refreshes, calls a
tool, revokes; attacks with forged tokens and wrong codes happen alongside. Every secret that
crossed the wire is then looked for in the log (the canary test of STYLE §4.4); so is anything
shaped like a JWT. Then text with line breaks and fake log syntax is sent where it does get
logged (a JSON-RPC method and a tool name) and must stay inside its one line.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from gateway.logs import configure_logging, reset_logging
from tests.fixtures.config import TEST_COOKIE_SECRET, TEST_ENCRYPTION_KEY
from tests.fixtures.peers import LegacyIdp, McpServer
from tests.security.harness import HANDSHAKE, Target, http_client, serve_target, tool_call

pytestmark = pytest.mark.asyncio(loop_scope="module")

JWT_SHAPED = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(
    tmp_path_factory: pytest.TempPathFactory,
    legacy_idp: LegacyIdp,
    gateway_ports: tuple[int, int],
    mcp_server: McpServer,
) -> AsyncIterator[Target]:
    """The module's gateway, with a deny rule to produce `mcp_denied`."""
    async with serve_target(
        tmp_path_factory.mktemp("logs"),
        idp=legacy_idp,
        port=gateway_ports[0],
        resources=[{"path": "/mcp", "upstream": mcp_server.url}],
        policy={"mcp": {"rules": [{"method": "tools/call", "tool": "delete_*", "effect": "deny"}]}},
    ) as t:
        yield t


# The test's own HTTP clients (the browser, the MCP client) log through the same stdlib root
# logger in this process; what they log is the client's business, not the gateway's.
CLIENT_LOGGERS = ("httpx", "httpcore")


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    """The gateway's logging chain writing into a buffer (pytest's handlers put back after)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    clients = {name: logging.getLogger(name).level for name in CLIENT_LOGGERS}
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    buffer = io.StringIO()
    yield buffer
    reset_logging()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    for name, level in clients.items():
        logging.getLogger(name).setLevel(level)


async def test_no_secret_of_a_whole_flow_reaches_the_log(
    target: Target, legacy_idp: LegacyIdp, log_buffer: io.StringIO
) -> None:
    """R35, invariant 9, STYLE §4.4: after registration, upstream login, TOTP, redemption,
    refresh, MCP calls, revocation and a few attacks, the JSON log contains none of the
    secrets that crossed the wire (client secret, password, seed, TOTP codes, code, tokens,
    cookies, CSRF tokens, configured secrets) and nothing shaped like a JWT; yet it records
    the security events, one JSON object per line with a request id."""
    configure_logging("debug", "json", stream=log_buffer)
    client = await target.register(auth_method="client_secret_basic", name="Canary client")
    assert client.client_secret is not None
    user = await target.new_user()
    secrets_seen: list[str] = [
        client.client_secret,
        user.password,
        user.secret,
        legacy_idp.client_secret,
        TEST_COOKIE_SECRET,
        TEST_ENCRYPTION_KEY,
    ]
    async with target.browser(user, client) as ua:
        at = await target.to_totp(ua, client)
        wrong = "000000" if user.code() != "000000" else "111111"
        await target.submit_totp(at, wrong)
        code_typed = user.code()
        done = await target.submit_totp(at, code_typed)
        grant = target.grant_from(at, done)
        cookies = [c.value for c in ua.client.cookies.jar if c.value]
        secrets_seen += [at.tx, at.csrf, code_typed, grant.code, *cookies]
    form = target.redeem_form(grant)
    del form["client_id"]
    redeemed = await target.token(form, auth=(client.client_id, client.client_secret))
    assert redeemed.status_code == 200, redeemed.text
    tokens = redeemed.json()
    refreshed = await target.token(
        {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        auth=(client.client_id, client.client_secret),
    )
    assert refreshed.status_code == 200
    new = refreshed.json()
    secrets_seen += [
        tokens["access_token"],
        tokens["refresh_token"],
        new["access_token"],
        new["refresh_token"],
        grant.pkce.verifier,
    ]
    assert (
        await target.mcp(
            tool_call("echo", text="hi"),
            token=new["access_token"],
            headers={"Cookie": "session=canary-cookie-value"},
        )
    ).status_code == 200
    forged = new["access_token"][:-4] + "AAAA"
    assert (await target.mcp(token=forged)).status_code == 401
    assert (
        await target.mcp(tool_call("delete_everything"), token=new["access_token"])
    ).status_code == 403
    # A replayed code with its secret-bearing parameters in a URL the gateway does not route.
    async with http_client() as http:
        await http.get(
            f"{target.url}/oauth/token?code={grant.code}&client_secret={client.client_secret}"
        )
        await http.post(
            f"{target.url}/oauth/revoke",
            data={"token": new["refresh_token"]},
            auth=(client.client_id, client.client_secret),
        )
        await http.get(f"{target.url}/mcp?access_token={new['access_token']}")
    secrets_seen += ["canary-cookie-value", forged]

    text = log_buffer.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    leaked = [s for s in secrets_seen if s and s in text]
    assert leaked == []
    assert JWT_SHAPED.findall(text) == []
    events = {line["event"] for line in lines}
    assert {
        "client_registered",
        "authorize_started",
        "consent_given",
        "upstream_login_completed",
        "totp_failed",
        "totp_accepted",
        "code_issued",
        "token_issued",
        "token_refreshed",
        "mcp_allowed",
        "mcp_denied",
        "request_finished",
    } <= events
    finished = [line for line in lines if line["event"] == "request_finished"]
    assert all(re.fullmatch(r"[0-9a-f]{32}", line["request_id"]) for line in finished)
    denied = [line for line in lines if line["event"] == "mcp_denied"]
    assert "invalid_token" in {d["reason"] for d in denied}


@pytest.mark.parametrize("fmt", ["console", "json"])
async def test_attacker_text_cannot_forge_log_lines(
    target: Target, log_buffer: io.StringIO, fmt: str
) -> None:
    """R35 (ASVS 16.4.1, log injection): a JSON-RPC method and a tool name carrying CR/LF and
    fake log syntax are logged escaped, inside their own line; no line of the log begins with
    the attacker's text."""
    configure_logging("info", "console" if fmt == "console" else "json", stream=log_buffer)
    fake = "2030-01-01T00:00:00Z [info     ] totp_accepted sub=admin"
    token = target.sign(target.mint())
    await target.mcp(tool_call(f"echo\n{fake}\r\n{fake}"), token=token, protocol=HANDSHAKE)
    await target.mcp(
        {"jsonrpc": "2.0", "id": 1, "method": f"tools/list\n{fake}"},
        token=token,
        protocol=HANDSHAKE,
    )
    lines = log_buffer.getvalue().splitlines()
    carrying = [line for line in lines if "totp_accepted sub=admin" in line]
    assert len(carrying) >= 2  # the tool name and the method were logged, inside their lines
    if fmt == "json":
        for line in lines:
            entry = json.loads(line)
            assert not entry["timestamp"].startswith("2030")
    else:
        assert all(re.match(r"^20[0-9]{2}-[0-9]{2}-[0-9]{2}T", line) for line in lines), lines
        assert all(not line.startswith("2030-01-01") for line in lines)
