"""Reading request bodies with a deadline, so a client that never finishes cannot hold a handler.

aiohttp's server has no body read time-out of its own: a handler awaiting `request.post()` waits as
long as the client keeps the connection open (slowloris). Every handler that reads a body goes
through here; the deadline is `server.request_timeout`. A body that does not decode is the
client's error (400), never a fault (500).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.core.errors import MalformedBody, RequestTimeout
from gateway.web.appkeys import SETTINGS

FORM = "application/x-www-form-urlencoded"


def _deadline(request: web.Request) -> float:
    return request.app[SETTINGS].server.request_timeout


async def read_form(request: web.Request) -> list[tuple[str, str]]:
    """The urlencoded body as (name, value) pairs; the caller checks the content type."""
    try:
        async with asyncio.timeout(_deadline(request)):
            form = await request.post()
    except TimeoutError:
        raise RequestTimeout("the request body was not received in time") from None
    except (UnicodeDecodeError, ValueError):
        raise MalformedBody("the form body could not be decoded") from None
    pairs: list[tuple[str, str]] = []
    for name, value in form.items():
        if not isinstance(value, str):  # a file part: never expected in our forms
            raise MalformedBody("unexpected file upload in the form")
        pairs.append((name, value))
    return pairs


async def read_capped(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None once it grows past `limit` bytes; within the deadline."""
    body = bytearray()
    try:
        async with asyncio.timeout(_deadline(request)):
            while True:
                chunk = await request.content.read(limit + 1 - len(body))
                if not chunk:
                    return bytes(body)
                body.extend(chunk)
                if len(body) > limit:
                    return None
    except TimeoutError:
        raise RequestTimeout("the request body was not received in time") from None
