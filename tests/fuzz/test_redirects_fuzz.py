"""Fuzzing `gateway.core.redirects`: no open redirect, whatever the URIs (R7, R8, R23, R36).

Supersedes `tests/unit/test_redirects.py::TestMatch::test_matcher_never_accepts_another_scheme_
host_or_port` (same property, here with hostile URI parts: userinfo, look-alike and
percent-encoded hosts, leading-zero and out-of-range ports, dot segments, backslashes, case).
The oracle is written independently of the implementation: a requested URI that is not one of
the registered strings may only be accepted when both are plain `http://<loopback>` URIs that
are equal character for character except for the decimal port.
"""

# Properties branch on whether an input was refused, so they assert inside `except` blocks
# (`pytest.raises` cannot say "may raise"): PT017 does not apply to this file.
# ruff: noqa: PT017

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.errors import InvalidRedirectUri
from gateway.core.redirects import (
    authorization_response,
    match_redirect_uri,
    validate_redirect_uri,
)
from tests.fuzz.strategies import hostile_text, uris

LOOPBACK_HOSTS = ("127.0.0.1", "[::1]", "localhost")
CUSTOM = ("com.example.app",)
_PORT = re.compile(r"^:([1-9][0-9]{0,4})$")


def _loopback_split(uri: str) -> tuple[str, str, str] | None:
    """(host, port text, rest) of `http://<loopback>[:port]<rest>`; None for anything else."""
    if not uri.startswith("http://"):
        return None
    tail = uri[len("http://") :]
    for host in LOOPBACK_HOSTS:
        if not tail.startswith(host):
            continue
        after = tail[len(host) :]
        port, rest = after, ""
        for i, c in enumerate(after):
            if c in "/?":
                port, rest = after[:i], after[i:]
                break
        if port and (not _PORT.match(port) or int(port[1:]) > 65535):
            return None
        if "#" in rest or (rest and rest[0] not in "/?"):
            return None
        return host, port, rest
    return None


@st.composite
def _mutant(draw: st.DrawFn, uri: str) -> str:
    """`uri` with one small edit: a character inserted, replaced or dropped, a port, a case."""
    edit = draw(st.sampled_from(["insert", "replace", "drop", "port", "upper", "suffix"]))
    i = draw(st.integers(0, len(uri)))
    c: str = draw(st.sampled_from([*":/@.?#%\\0Aa9-_[]", "%2e", ":0", ":3001", "@evil"]))
    if edit == "insert":
        return uri[:i] + c + uri[i:]
    if edit == "replace":
        return uri[:i] + c + uri[i + 1 :]
    if edit == "drop":
        return uri[:i] + uri[i + 1 :]
    if edit == "port":
        port = draw(st.sampled_from(["", ":1", ":3001", ":65535", ":65536", ":08080"]))
        return re.sub(r"^(\w+://[^/:?#]*)(:\d*)?", lambda m: m.group(1) + port, uri, count=1)
    if edit == "upper":
        return uri.upper()
    return uri + c


@st.composite
def _asked_and_registered(draw: st.DrawFn) -> tuple[str, list[str]]:
    registered = draw(st.lists(uris(), min_size=1, max_size=3))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(uris()), registered
    base = draw(st.sampled_from(registered))
    return (base if kind == 1 else draw(_mutant(base))), registered


@settings(max_examples=250, deadline=None)
@given(case=_asked_and_registered())
@example(case=("http://127.0.0.1:4000/cb", ["http://127.0.0.1:3000/cb"]))
@example(case=("http://127.0.0.1:3000@evil.example/cb", ["http://127.0.0.1:3000/cb"]))
@example(case=("http://localhost.evil.example/cb", ["http://localhost/cb"]))
@example(case=("http://localhost:3000/cb", ["http://127.0.0.1:3000/cb"]))
@example(case=("https://app.example.com:444/cb", ["https://app.example.com/cb"]))
def test_a_match_is_the_registered_uri_or_a_loopback_port_variant(
    case: tuple[str, list[str]],
) -> None:
    """The matcher returns the requested URI only if it is registered verbatim, or if both are
    plain http loopback URIs differing in the port alone (RFC 8252 §7.3); no other scheme,
    host, path, query or userinfo ever gets through (R7)."""
    asked, registered = case
    result = match_redirect_uri(asked, registered)
    if result is None:
        return
    assert result == asked
    if asked in registered:
        return
    got = _loopback_split(asked)
    assert got is not None, asked
    host, _, rest = got
    assert any(
        (split := _loopback_split(r)) is not None and split[0] == host and split[2] == rest
        for r in registered
    ), (asked, registered)


@settings(max_examples=150, deadline=None)
@given(registered=uris(), port=st.integers(min_value=0, max_value=100_000))
def test_https_and_custom_scheme_uris_never_take_another_port(registered: str, port: int) -> None:
    """Outside plain-http loopback, changing (or adding) the port never matches (R7)."""
    base, sep, rest = registered.partition("://")
    if not sep or base == "http":
        return
    authority, slash, path = rest.partition("/")
    host = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    asked = f"{base}://{host}:{port}{slash}{path}"
    if asked == registered:
        return
    assert match_redirect_uri(asked, [registered]) is None


@settings(max_examples=300, deadline=None)
@given(uri=st.one_of(uris(), hostile_text))
def test_registration_accepts_only_safe_redirect_uris(uri: str) -> None:
    """A URI that may be registered is https with a plain host and no userinfo, plain-http
    loopback, or a listed custom scheme; never a fragment, never a dangerous scheme, never
    upper-case schemes, and the refusal is always `invalid_redirect_uri` (R23, R36)."""
    try:
        accepted = validate_redirect_uri(uri, allowed_custom_schemes=CUSTOM)
    except InvalidRedirectUri as err:
        assert err.error == "invalid_redirect_uri"
        assert uri not in err.description or len(uri) < 4
        return
    assert accepted == uri
    assert "#" not in uri
    scheme, _, rest = uri.partition(":")
    assert scheme == scheme.lower()
    if scheme == "https":
        authority = rest[2:].split("/", 1)[0].split("?", 1)[0]
        assert rest.startswith("//")
        assert authority
        assert "@" not in authority
    elif scheme == "http":
        assert _loopback_split(uri) is not None, uri
    else:
        assert scheme in CUSTOM


@settings(max_examples=150, deadline=None)
@given(
    uri=st.sampled_from(
        [
            "https://app.example.com/cb",
            "https://app.example.com/cb?tenant=a%20b",
            "https://app.example.com/cb?",
            "https://app.example.com/cb?x=1&",
            "http://127.0.0.1:3000/cb",
            "com.example.app:/oauth",
        ]
    ),
    code=st.one_of(st.none(), hostile_text),
    state=st.one_of(st.none(), hostile_text),
)
def test_the_response_keeps_the_uri_and_echoes_state_exactly(
    uri: str, code: str | None, state: str | None
) -> None:
    """`authorization_response` only appends: the verified URI (with the client's own query)
    is a prefix of the result, no fragment appears, and `code`, `state`, `iss` decode back to
    exactly what was given, whatever characters they hold (R10, R11)."""
    iss = "https://gw.example"
    result = authorization_response(uri, code=code, state=state, iss=iss)
    assert result.startswith(uri)
    assert "#" not in result
    added = result[len(uri) :].lstrip("?&")
    expected = [
        (k, v) for k, v in (("code", code), ("state", state), ("iss", iss)) if v is not None
    ]
    assert parse_qsl(added, keep_blank_values=True) == expected
