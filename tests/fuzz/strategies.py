"""Hypothesis strategies shared by the fuzz tests: hostile text, parameter lists, JSON, URIs, and
nearly valid authorization requests and client metadata to mutate.

Values mix what a parser expects (so that deep branches are reached) with what an attacker sends:
control characters, non-ASCII and look-alike characters, percent-encodings, values just under and
over the length caps, repeated names, and a marker string used to prove that attacker text is
never reflected into an error description.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from gateway.core import pkce
from gateway.core.clients import AUTH_METHODS

Pairs = list[tuple[str, str]]
# Attacker text that must never come back in an `error_description`.
MARKER = "Zq7Marker"
NOW = 1_800_000_000.0

HOSTILE_CHARS = st.sampled_from(
    [*"\x00\t\n\r \"'<>\\%#?&=/@:;,+[]{}|^`~", "\u202e", "\u2028", "\ufeff", "é", "𝔞", "ı"]
)

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(HOSTILE_CHARS, max_size=12),
    st.builds(lambda a, b: a + MARKER + b, st.text(max_size=8), st.text(max_size=8)),
    # Around the caps of `core.params` (1024 state, 2048 client_id, 4096 any value).
    st.builds(lambda n: "a" * n, st.sampled_from([1023, 1024, 1025, 2048, 2049, 4096, 4097])),
)


def pairs_of(
    names: list[str], values: st.SearchStrategy[str]
) -> st.SearchStrategy[list[tuple[str, str]]]:
    """Lists of (name, value) with names mostly from `names` (repeats allowed) or random."""
    name = st.one_of(st.sampled_from(names), st.text(max_size=10))
    return st.lists(st.tuples(name, st.one_of(values, hostile_text)), max_size=12)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=16),
)


def json_values(keys: list[str] | None = None) -> st.SearchStrategy[Any]:
    """Nested JSON values; object keys mostly from `keys` when given."""
    key = st.one_of(st.sampled_from(keys), st.text(max_size=6)) if keys else st.text(max_size=6)
    return st.recursive(
        json_scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(key, inner, max_size=6)
        ),
        max_leaves=16,
    )


@st.composite
def json_text(draw: st.DrawFn, value: st.SearchStrategy[Any]) -> str:
    """`value` serialised in one of several legal ways (spacing, key order, escapes)."""
    doc = draw(value)
    style = draw(st.sampled_from(["compact", "spaced", "sorted", "ascii"]))
    if style == "compact":
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    if style == "spaced":
        return json.dumps(doc, indent=1)
    if style == "sorted":
        return json.dumps(doc, sort_keys=True)
    return json.dumps(doc, ensure_ascii=True)


# --------------------------------------------------------------------------- URIs

SCHEMES = ["http", "https", "HTTP", "Https", "com.example.app", "javascript", "data", "file", ""]
HOSTS = [
    "127.0.0.1",
    "[::1]",
    "localhost",
    "LOCALHOST",
    "127.0.0.2",
    "127.1",
    "0.0.0.0",  # noqa: S104 - a hostile redirect host, never bound
    "[::ffff:127.0.0.1]",
    "app.example.com",
    "App.Example.com",
    "app.example.com.",
    "evil.example",
    "app.example.com.evil.example",
    "127.0.0.1.evil.example",
    "xn--pple-43d.com",
    "аpp.example.com",  # Cyrillic a
    "app.example.com%2eevil.example",
    "",
]
PORTS = [
    "",
    ":",
    ":0",
    ":1",
    ":80",
    ":443",
    ":3000",
    ":03000",
    ":8080",
    ":65535",
    ":65536",
    ":99999",
    ":-1",
    ":3000:4000",
]
PATHS = [
    "",
    "/",
    "/cb",
    "/cb/",
    "/CB",
    "/cb?x=1",
    "/cb?x=1&y=2",
    "/cb#frag",
    "/cb%2F..",
    "/../cb",
    "/./cb",
    "//cb",
    "/cb\\..",
    "\\cb",
    "?cb",
    "#cb",
]
USERINFO = ["", "", "", "user@", "127.0.0.1@", "app.example.com@", "a:b@"]


@st.composite
def uris(draw: st.DrawFn) -> str:
    """A URI assembled from hostile parts, or arbitrary text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=40))
    scheme = draw(st.sampled_from(SCHEMES))
    sep = draw(st.sampled_from(["://", "://", "://", ":/", ":", ":///"]))
    return (
        scheme
        + sep
        + draw(st.sampled_from(USERINFO))
        + draw(st.sampled_from(HOSTS))
        + draw(st.sampled_from(PORTS))
        + draw(st.sampled_from(PATHS))
    )


# --------------------------------------------------------------------------- endpoint inputs

CHALLENGE = pkce.s256("a" * 43)
MCP = "http://127.0.0.1:8080/mcp"
FILES = "http://127.0.0.1:8080/files"
# Pre-registered clients (client id -> redirect URIs) of `test_params_fuzz`'s gateway config.
CLIENTS = {
    "client-1": ("https://app.example.com/cb", "http://127.0.0.1:3000/cb"),
    "native": ("http://127.0.0.1/callback",),
    "narrow": ("https://narrow.example.com/cb",),
}
AUTHORIZE_NAMES = [
    "response_type", "client_id", "redirect_uri", "code_challenge", "code_challenge_method",
    "state", "scope", "resource", "response_mode", "request", "request_uri", "nonce", "prompt",
]  # fmt: skip
TOKEN_NAMES = [
    "grant_type", "code", "code_verifier", "redirect_uri", "refresh_token", "scope",
    "resource", "client_id", "client_secret",
]  # fmt: skip


authorize_values = st.sampled_from(
    [
        "code", "token", "S256", "plain", CHALLENGE, "a" * 42, "client-1", "native", "narrow",
        "nobody", "https://app.example.com/cb", "http://127.0.0.1:3000/cb",
        "http://127.0.0.1:4567/cb", "http://127.0.0.1:4567/callback", "https://evil.example/cb",
        MCP, FILES, MCP + "/", "mcp files:read files:write offline_access", "query", "fragment",
        "st-1", "",
    ]
)  # fmt: skip


@st.composite
def authorize_pairs(draw: st.DrawFn) -> Pairs:
    """Often a nearly valid request with a few edits, sometimes pure noise."""
    if draw(st.integers(0, 4)) == 4:  # noise one time in five (hypothesis favours 0)
        return draw(pairs_of(AUTHORIZE_NAMES, authorize_values))
    client = draw(st.sampled_from(sorted(CLIENTS)))
    base = {
        "response_type": "code",
        "client_id": client,
        "redirect_uri": draw(st.sampled_from([*CLIENTS[client], "http://127.0.0.1:9999/cb"])),
        "code_challenge": CHALLENGE,
        "code_challenge_method": "S256",
        "state": draw(st.one_of(st.just("st-1"), hostile_text)),
        "resource": draw(st.sampled_from([MCP, FILES])),
        "scope": draw(st.sampled_from(["mcp", "files:read", "files:write", "x", ""])),
    }
    pairs = list(base.items())
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(AUTHORIZE_NAMES))
        value = draw(st.one_of(authorize_values, hostile_text))
        action = draw(st.sampled_from(["replace", "repeat", "drop"]))
        if action == "replace":
            pairs = [(n, value if n == name else v) for n, v in pairs]
        elif action == "repeat":
            pairs.append((name, value))
        else:
            pairs = [(n, v) for n, v in pairs if n != name]
    return pairs


METADATA_KEYS = [
    "redirect_uris", "token_endpoint_auth_method", "grant_types", "response_types",
    "client_name", "scope", "application_type", "client_uri", "logo_uri", "software_id",
    "client_secret", "jwks",
]  # fmt: skip


@st.composite
def client_metadata(draw: st.DrawFn) -> Any:
    """Registration bodies: arbitrary JSON, or nearly valid metadata with hostile parts."""
    if draw(st.booleans()):
        return draw(json_values(METADATA_KEYS))
    doc: dict[str, Any] = {
        "redirect_uris": draw(st.lists(st.one_of(uris(), json_values()), max_size=11)),
        "token_endpoint_auth_method": draw(st.sampled_from([*AUTH_METHODS, "private_key_jwt"])),
        "grant_types": draw(
            st.sampled_from(
                [["authorization_code"], ["refresh_token"], ["authorization_code", "implicit"], "x"]
            )
        ),
        "response_types": draw(st.sampled_from([["code"], ["token"], ["code", "code"], []])),
    }
    for key in draw(st.lists(st.sampled_from(METADATA_KEYS), max_size=3)):
        doc[key] = draw(st.one_of(hostile_text, json_values()))
    return doc
