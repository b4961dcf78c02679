"""Hypothesis strategies shared by the fuzz tests: hostile text, parameter lists, JSON, URIs.

Values mix what a parser expects (so that deep branches are reached) with what an attacker sends:
control characters, non-ASCII and look-alike characters, percent-encodings, values just under and
over the length caps, repeated names, and a marker string used to prove that attacker text is
never reflected into an error description.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

# Attacker text that must never come back in an `error_description`.
MARKER = "Zq7Marker"
NOW = 1_800_000_000.0

HOSTILE_CHARS = st.sampled_from(
    list("\x00\t\n\r \"'<>\\%#?&=/@:;,+[]{}|^`~") + ["\u202e", "\u2028", "\ufeff", "é", "𝔞", "ı"]
)

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(HOSTILE_CHARS, max_size=12),
    st.builds(lambda a, b: a + MARKER + b, st.text(max_size=8), st.text(max_size=8)),
    # Around the caps of `core.params` (1024 state, 2048 client_id, 4096 any value).
    st.builds(lambda n: "a" * n, st.sampled_from([1023, 1024, 1025, 2048, 2049, 4096, 4097])),
)


def pairs_of(names: list[str], values: st.SearchStrategy[str]) -> st.SearchStrategy[
    list[tuple[str, str]]
]:
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
    "0.0.0.0",
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
PORTS = ["", ":", ":0", ":1", ":80", ":443", ":3000", ":03000", ":8080", ":65535", ":65536",
         ":99999", ":-1", ":3000:4000"]
PATHS = ["", "/", "/cb", "/cb/", "/CB", "/cb?x=1", "/cb?x=1&y=2", "/cb#frag", "/cb%2F..",
         "/../cb", "/./cb", "//cb", "/cb\\..", "\\cb", "?cb", "#cb"]
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
