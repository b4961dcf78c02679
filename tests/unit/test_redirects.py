"""Redirect URIs: what may be registered, exact matching with the loopback-port rule, responses."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.errors import InvalidRedirectUri
from gateway.core.redirects import (
    authorization_response,
    is_loopback_redirect,
    match_redirect_uri,
    redirect_host,
    validate_redirect_uri,
)


class TestRegistrable:
    @pytest.mark.parametrize(
        "uri",
        [
            "https://app.example.com/callback",
            "https://app.example.com:8443/cb?tenant=1",
            "https://10.1.2.3/cb",
            "https://[2001:db8::1]:8443/cb",
            "http://127.0.0.1/callback",
            "http://127.0.0.1:8765/callback",
            "http://[::1]:3000/callback",
            "http://localhost:3000/callback",
            "http://localhost",
        ],
    )
    def test_https_and_loopback_http_are_accepted(self, uri: str) -> None:
        """https, or plain http on 127.0.0.1 / [::1] / localhost (R23, R36)."""
        assert validate_redirect_uri(uri) == uri

    def test_listed_custom_scheme_is_accepted(self) -> None:
        """A private-use scheme listed by policy may be registered (RFC 8252 §7.1)."""
        uri = "com.example.app:/oauth2redirect"
        assert validate_redirect_uri(uri, allowed_custom_schemes=["com.example.app"]) == uri

    @pytest.mark.parametrize(
        "uri",
        [
            "http://app.example.com/callback",  # plain http off loopback
            "http://127.0.0.1.evil.example/cb",  # looks like loopback, is not
            "http://localhost.evil.example/cb",
            "http://localhost@evil.example/cb",  # userinfo: the host is evil.example
            "https://user@app.example.com/cb",
            "https://user:pw@app.example.com/cb",
            "https://app.example.com/cb#fragment",
            "https://app.example.com/cb#",
            "https://APP.example.com/cb",  # non-canonical host
            "https://app.exa%6dple.com/cb",  # encoded host
            "https://app.example.com:99999/cb",
            "https://app.example.com:0/cb",
            "https://app.example.com:08443/cb",
            "https://app.example.com\\@evil.example/cb",
            "https://app.example.com/c b",
            "https:/app.example.com/cb",
            "https:app.example.com",
            "/relative/callback",
            "",
            "HTTPS://app.example.com/cb",
            "http://127.0.0.1:70000/cb",
            "com.example.app:/oauth2redirect",  # custom scheme not listed
        ],
    )
    def test_refused_uris(self, uri: str) -> None:
        """Anything else is `invalid_redirect_uri` (R23): no fragments, userinfo or tricks."""
        with pytest.raises(InvalidRedirectUri) as info:
            validate_redirect_uri(uri)
        assert info.value.error == "invalid_redirect_uri"

    @pytest.mark.parametrize(
        "uri",
        ["javascript:alert(1)", "data:text/html,x", "file:///etc/passwd", "vbscript:x"],
    )
    def test_dangerous_schemes_are_refused_even_when_listed(self, uri: str) -> None:
        """A policy cannot allow script, data or file URLs as redirect targets."""
        scheme = uri.split(":", 1)[0]
        with pytest.raises(InvalidRedirectUri):
            validate_redirect_uri(uri, allowed_custom_schemes=[scheme])

    def test_non_string_is_refused(self) -> None:
        """A JSON number or null in redirect_uris is refused."""
        with pytest.raises(InvalidRedirectUri):
            validate_redirect_uri(42)

    def test_loopback_and_host_helpers(self) -> None:
        """Loopback detection and the host shown on the consent page (R24)."""
        assert is_loopback_redirect("http://127.0.0.1:5/cb") is True
        assert is_loopback_redirect("https://127.0.0.1:5/cb") is False
        assert redirect_host("https://app.example.com:8443/cb") == "app.example.com"
        assert redirect_host("com.example.app:/cb") == "com.example.app:"


class TestMatching:
    def test_exact_match(self) -> None:
        """The registered string itself matches (R7)."""
        reg = ["https://app.example.com/cb"]
        assert match_redirect_uri("https://app.example.com/cb", reg) == "https://app.example.com/cb"

    @pytest.mark.parametrize(
        "asked",
        [
            "https://app.example.com/cb/",
            "https://app.example.com/CB",
            "https://app.example.com/cb?x=1",
            "https://app.example.com:443/cb",
            "https://app.example.com:8443/cb",
            "https://evil.example/cb",
            "https://app.example.com.evil.example/cb",
            "https://app.example.com@evil.example/cb",
            "http://app.example.com/cb",
            "https://APP.example.com/cb",
            "https://app.example.com/cb#x",
            "https://app.example.com/%63b",
        ],
    )
    def test_anything_but_the_exact_string_fails(self, asked: str) -> None:
        """Simple string comparison: no normalisation, prefixes, ports or case folding (R7, R8)."""
        assert match_redirect_uri(asked, ["https://app.example.com/cb"]) is None

    @pytest.mark.parametrize(
        ("registered", "asked"),
        [
            ("http://127.0.0.1/callback", "http://127.0.0.1:49152/callback"),
            ("http://127.0.0.1:3000/callback", "http://127.0.0.1:49152/callback"),
            ("http://[::1]:3000/callback", "http://[::1]:65535/callback"),
            ("http://localhost:3000/callback", "http://localhost:1/callback"),
            ("http://127.0.0.1:3000/callback?a=1", "http://127.0.0.1:8000/callback?a=1"),
            ("http://127.0.0.1:3000/callback", "http://127.0.0.1/callback"),
        ],
    )
    def test_loopback_port_may_differ(self, registered: str, asked: str) -> None:
        """RFC 8252 §7.3: for loopback redirect URIs any port is accepted (R7)."""
        assert match_redirect_uri(asked, [registered]) == asked

    @pytest.mark.parametrize(
        "asked",
        [
            "http://localhost:3000/callback",  # other loopback host name
            "http://[::1]:3000/callback",
            "https://127.0.0.1:3000/callback",  # other scheme
            "http://127.0.0.1:3000/callback/",
            "http://127.0.0.1:3000/other",
            "http://127.0.0.1:3000/callback?a=1",
            "http://127.0.0.1:3000@evil.example/callback",
            "http://127.0.0.1:3000.evil.example/callback",
            "http://127.0.0.%31:3000/callback",
            "http://127.1:3000/callback",
            "http://127.0.0.1:99999/callback",
            "http://127.0.0.1:03000/callback",
            "http://127.0.0.1:/callback",
            "HTTP://127.0.0.1:3000/callback",
            "http://127.0.0.1:3000/callback#frag",
        ],
    )
    def test_loopback_rule_changes_only_the_port(self, asked: str) -> None:
        """Only the port of a loopback URI may vary; host, scheme, path and query may not."""
        assert match_redirect_uri(asked, ["http://127.0.0.1:3000/callback"]) is None

    def test_port_rule_never_applies_off_loopback(self) -> None:
        """An https URI with another port does not match, even on a loopback address."""
        assert match_redirect_uri("https://127.0.0.1:9/cb", ["https://127.0.0.1:8/cb"]) is None

    @given(st.data())
    def test_matcher_never_accepts_another_scheme_host_or_port(self, data: st.DataObject) -> None:
        """Property: a match has the registered scheme and host, and outside loopback its port."""
        schemes = ["http", "https", "HTTP", "com.example"]
        hosts = ["127.0.0.1", "[::1]", "localhost", "app.example.com", "evil.example", "127.0.0.2"]
        ports = ["", ":1", ":80", ":443", ":3000", ":65535", ":99999", ":0"]
        paths = ["", "/", "/cb", "/cb?x=1", "@evil.example/cb", ".evil.example/cb"]

        def uri() -> str:
            scheme = data.draw(st.sampled_from(schemes))
            sep = data.draw(st.sampled_from(["://", ":/", ":"]))
            return (
                scheme
                + sep
                + data.draw(st.sampled_from(hosts))
                + data.draw(st.sampled_from(ports))
                + data.draw(st.sampled_from(paths))
            )

        registered = data.draw(st.lists(st.builds(uri), min_size=1, max_size=3))
        asked = data.draw(st.one_of(st.builds(uri), st.text(max_size=60)))
        result = match_redirect_uri(asked, registered)
        if result is None:
            return
        assert result == asked
        if asked in registered:
            return  # the very string that was registered
        # Otherwise only the loopback-port rule can have matched: everything but the port agrees.
        assert is_loopback_redirect(asked)
        got = urlsplit(asked)
        candidates = [urlsplit(r) for r in registered]
        assert any(
            c.scheme == got.scheme
            and c.hostname == got.hostname
            and c.netloc.count("@") == got.netloc.count("@") == 0
            and c.path == got.path
            and c.query == got.query
            for c in candidates
        )


class TestAuthorizationResponse:
    def test_adds_parameters_as_a_query(self) -> None:
        """`code`, `state`, `iss` go into the query of the verified URI (R10, R11)."""
        url = authorization_response(
            "https://app.example.com/cb", code="abc", state="xyz", iss="https://gw.example"
        )
        assert url == "https://app.example.com/cb?code=abc&state=xyz&iss=https%3A%2F%2Fgw.example"

    def test_keeps_the_clients_query(self) -> None:
        """Existing query parameters are kept verbatim (RFC 6749 §3.1.2)."""
        url = authorization_response("https://app.example.com/cb?tenant=a%20b", code="c1")
        assert url == "https://app.example.com/cb?tenant=a%20b&code=c1"

    def test_empty_query_and_none_values(self) -> None:
        """A trailing `?` gets no extra `&`; None values are left out."""
        url = authorization_response("http://127.0.0.1:5/cb?", code="c", state=None)
        assert url == "http://127.0.0.1:5/cb?code=c"

    def test_state_is_echoed_exactly(self) -> None:
        """Reserved characters in `state` are encoded so it comes back byte for byte (R10)."""
        state = "a b&c=d?e#f/%"
        url = authorization_response("https://app.example.com/cb", state=state)
        assert dict(parse_qsl(urlsplit(url).query)) == {"state": state}
        assert "#" not in url

    def test_custom_scheme(self) -> None:
        """Private-use scheme URIs get a query too."""
        url = authorization_response("com.example.app:/cb", code="c")
        assert url == "com.example.app:/cb?code=c"
