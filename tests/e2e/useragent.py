"""A scripted browser for end-to-end tests of the authorization pages.

`UserAgent` drives an `httpx.AsyncClient` (its own cookie jar, redirects NOT followed by httpx)
one step at a time: it follows 30x redirects itself, parses the first `<form method="post">` of
each HTML page with the standard library's `html.parser` (action, every input including hidden
ones, submit buttons), fills the named fields it has answers for (`username`/`password` at the
upstream login page, `decision=approve` on the gateway's consent page, `code` on the TOTP page),
posts, and stops as soon as a redirect points at the client's redirect URI, returning the
authorization response's query parameters without ever requesting that URI.

Every page seen is kept (`UserAgent.pages`: method, URL, status, headers, HTML) for assertions,
and a run can stop early at a page chosen by a predicate (e.g. "the TOTP form is shown").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from types import TracebackType
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import httpx

# An answer is a literal or a function called when the form is filled (e.g. a fresh TOTP code).
Answer = str | Callable[[], str]

_TEXTUAL = {"text", "password", "email", "number", "tel", "search", "url", ""}


class UserAgentError(Exception):
    """The scripted browser could not go on (no form, an unanswered field, too many steps)."""

    def __init__(self, message: str, page: Page | None = None) -> None:
        where = f" at {page.method} {page.url} -> {page.status}" if page is not None else ""
        super().__init__(message + where)
        self.page = page


@dataclass(frozen=True)
class FormField:
    """One `<input>`/`<button>`/`<textarea>`/`<select>` of a form."""

    tag: str
    type: str
    name: str
    value: str
    checked: bool = False
    attrs: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_submit(self) -> bool:
        return (self.tag == "button" and self.type in ("submit", "")) or (
            self.tag == "input" and self.type in ("submit", "image")
        )


@dataclass(frozen=True)
class Form:
    """The first POST form of a page, with its action resolved against the page URL."""

    action: str
    fields: tuple[FormField, ...]

    def field(self, name: str) -> FormField | None:
        """The first non-button field named `name`."""
        return next((f for f in self.fields if f.name == name and not f.is_submit), None)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields if f.name)

    @property
    def hidden(self) -> dict[str, str]:
        return {f.name: f.value for f in self.fields if f.tag == "input" and f.type == "hidden"}

    @property
    def buttons(self) -> tuple[FormField, ...]:
        return tuple(f for f in self.fields if f.is_submit)


@dataclass(frozen=True)
class Page:
    """One HTTP response the browser saw."""

    method: str
    url: str
    status: int
    headers: httpx.Headers
    html: str

    @property
    def location(self) -> str | None:
        """The absolute redirect target of a 30x, else None."""
        loc: str | None = self.headers.get("location")
        if self.status in (301, 302, 303, 307, 308) and loc:
            return urljoin(self.url, loc)
        return None

    def form(self) -> Form | None:
        """The first `<form method="post">` of the page, or None."""
        if "html" not in self.headers.get("content-type", "") or not self.html:
            return None
        parser = _FormParser()
        parser.feed(self.html)
        parser.close()
        if parser.action is None:
            return None
        return Form(action=urljoin(self.url, parser.action), fields=tuple(parser.fields))

    def has_field(self, name: str) -> bool:
        form = self.form()
        return form is not None and name in form.names


@dataclass(frozen=True)
class AuthorizationResponse:
    """The query of the final redirect to the client's redirect URI."""

    url: str
    params: Mapping[str, str]

    @property
    def code(self) -> str | None:
        return self.params.get("code")

    @property
    def state(self) -> str | None:
        return self.params.get("state")

    @property
    def iss(self) -> str | None:
        return self.params.get("iss")

    @property
    def error(self) -> str | None:
        return self.params.get("error")

    @property
    def error_description(self) -> str | None:
        return self.params.get("error_description")


@dataclass(frozen=True)
class Outcome:
    """How a run ended: at the redirect URI (`response`) or at a page (`page`)."""

    response: AuthorizationResponse | None
    page: Page | None


class _FormParser(HTMLParser):
    """Collects the first `<form method="post">` (case-insensitive) and its controls."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.action: str | None = None
        self.fields: list[FormField] = []
        self._in_form = False
        self._done = False
        self._text_target: dict[str, str] | None = None
        self._text: list[str] = []
        self._select: dict[str, str] | None = None
        self._select_value: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._done:
            return
        a = {k.lower(): (v if v is not None else "") for k, v in attrs}
        if tag == "form" and not self._in_form:
            if a.get("method", "get").lower() == "post":
                self._in_form = True
                self.action = a.get("action", "")
            return
        if not self._in_form:
            return
        if tag == "input":
            kind = a.get("type", "text").lower()
            if "name" in a:
                self.fields.append(
                    FormField("input", kind, a["name"], a.get("value", ""), "checked" in a, a)
                )
        elif tag == "button":
            if "name" in a or a.get("type", "submit").lower() == "submit":
                self.fields.append(
                    FormField(
                        "button",
                        a.get("type", "submit").lower(),
                        a.get("name", ""),
                        a.get("value", ""),
                        False,
                        a,
                    )
                )
        elif tag in ("textarea", "select") and "name" in a:
            self._text_target = a
            self._text = []
            if tag == "select":
                self._select = a
                self._select_value = None
        elif tag == "option" and self._select is not None:
            value = a.get("value")
            if self._select_value is None or "selected" in a:
                self._select_value = value if value is not None else ""

    def handle_data(self, data: str) -> None:
        if self._text_target is not None and self._select is None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if not self._in_form:
            return
        if tag == "form":
            self._in_form = False
            self._done = True
        elif tag == "textarea" and self._text_target is not None:
            a = self._text_target
            self.fields.append(
                FormField("textarea", "text", a["name"], "".join(self._text), False, a)
            )
            self._text_target = None
        elif tag == "select" and self._select is not None:
            a = self._select
            self.fields.append(
                FormField("select", "select", a["name"], self._select_value or "", False, a)
            )
            self._select = None
            self._text_target = None


def _same_endpoint(url: str, redirect_uri: str) -> bool:
    """Scheme, host, port and path equal (the query is the response)."""
    a, b = urlsplit(url), urlsplit(redirect_uri)
    return (a.scheme, a.hostname, a.port, a.path) == (b.scheme, b.hostname, b.port, b.path)


class UserAgent:
    """A step-by-step browser; `async with UserAgent(redirect_uri=...) as ua: ...`."""

    def __init__(
        self,
        *,
        redirect_uri: str,
        answers: Mapping[str, Answer] | None = None,
        max_steps: int = 30,
        timeout: float = 15.0,
    ) -> None:
        self.redirect_uri = redirect_uri
        self.answers: dict[str, Answer] = dict(answers or {})
        self.max_steps = max_steps
        self.pages: list[Page] = []
        self.client = httpx.AsyncClient(follow_redirects=False, timeout=timeout)

    async def __aenter__(self) -> UserAgent:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------------ single steps

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: Mapping[str, str] | list[tuple[str, str]] | None = None,
    ) -> Page:
        """Send one request (never following redirects) and record the page; `data` is sent as
        an urlencoded form (a list keeps repeated names and their order)."""
        if data is None:
            resp = await self.client.request(method, url)
        else:
            pairs = list(data.items()) if isinstance(data, Mapping) else list(data)
            resp = await self.client.request(
                method,
                url,
                content=urlencode(pairs).encode("ascii"),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        page = Page(method, str(resp.url), resp.status_code, resp.headers, resp.text)
        self.pages.append(page)
        return page

    async def get(self, url: str) -> Page:
        return await self.request("GET", url)

    def fill(
        self, form: Form, answers: Mapping[str, Answer] | None = None
    ) -> list[tuple[str, str]]:
        """The form data a user would submit: every control as the page set it, with the named
        answers typed in and the matching submit button (else the first named one) pressed."""
        given = {**self.answers, **(answers or {})}
        data: list[tuple[str, str]] = []
        for f in form.fields:
            if f.is_submit or not f.name:
                continue
            if f.tag == "input" and f.type in ("checkbox", "radio"):
                if f.name in given:
                    if _resolve(given[f.name]) == (f.value or "on"):
                        data.append((f.name, f.value or "on"))
                elif f.checked:
                    data.append((f.name, f.value or "on"))
                continue
            if f.name in given and f.type != "hidden":
                data.append((f.name, _resolve(given[f.name])))
            elif f.type in _TEXTUAL and f.tag == "input" and not f.value:
                raise UserAgentError(f"no answer for the form field {f.name!r}")
            else:
                data.append((f.name, f.value))
        named = [b for b in form.buttons if b.name]
        chosen = next(
            (b for b in named if b.name in given and _resolve(given[b.name]) == b.value), None
        )
        if chosen is None and named:
            if any(b.name in given for b in named):
                wanted = {b.name: _resolve(given[b.name]) for b in named if b.name in given}
                raise UserAgentError(f"no submit button matches {wanted}")
            chosen = named[0]
        if chosen is not None:
            data.append((chosen.name, chosen.value))
        return data

    async def submit(self, page: Page, answers: Mapping[str, Answer] | None = None) -> Page:
        """Fill and post the first POST form of `page`."""
        form = page.form()
        if form is None:
            raise UserAgentError("no <form method=post> on the page", page)
        return await self.request("POST", form.action, data=self.fill(form, answers))

    # ------------------------------------------------------------------ whole runs

    async def run(
        self,
        url: str,
        *,
        answers: Mapping[str, Answer] | None = None,
        stop: Callable[[Page], bool] | None = None,
    ) -> Outcome:
        """Open `url` and go on (redirects, forms) until the client's redirect URI is reached,
        `stop(page)` is true, or a page offers no way on (an error status, or no form)."""
        method, target = "GET", url
        data: list[tuple[str, str]] | None = None
        for _ in range(self.max_steps):
            if _same_endpoint(target, self.redirect_uri):
                return Outcome(AuthorizationResponse(target, _query(target)), None)
            page = await self.request(method, target, data=data)
            if stop is not None and stop(page):
                return Outcome(None, page)
            location = page.location
            if location is not None:
                if page.status in (307, 308):
                    pass  # method and body are kept
                else:
                    method, data = "GET", None
                target = location
                continue
            if page.status >= 400 or page.form() is None:
                return Outcome(None, page)
            form = page.form()
            assert form is not None
            method, target, data = "POST", form.action, self.fill(form, answers)
        raise UserAgentError(
            f"more than {self.max_steps} steps", self.pages[-1] if self.pages else None
        )

    async def authorize(
        self, url: str, *, answers: Mapping[str, Answer] | None = None
    ) -> AuthorizationResponse:
        """`run` that must end at the redirect URI."""
        outcome = await self.run(url, answers=answers)
        if outcome.response is None:
            raise UserAgentError("the flow did not reach the redirect URI", outcome.page)
        return outcome.response


def _resolve(answer: Answer) -> str:
    return answer() if callable(answer) else answer


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def at_form_with(name: str) -> Callable[[Page], bool]:
    """A `stop` predicate: the page's first POST form has a field named `name`."""

    def predicate(page: Page) -> bool:
        return page.location is None and page.has_field(name)

    return predicate


def at_url_prefix(prefix: str) -> Callable[[Page], bool]:
    """A `stop` predicate: the page was requested at a URL starting with `prefix`."""

    def predicate(page: Page) -> bool:
        return page.url.startswith(prefix)

    return predicate
