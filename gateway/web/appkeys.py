"""Typed application state (`aiohttp.web.AppKey`), set once by `gateway.app.build_app`."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from gateway.clock import Clock
from gateway.crypto import Sealer
from gateway.keys import KeyRing
from gateway.metrics import Metrics
from gateway.ports import Store
from gateway.settings import Settings
from gateway.web.cookies import CookieCodec

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
CLOCK = web.AppKey("clock", Clock)
KEYS = web.AppKey("keys", KeyRing)
SEALER = web.AppKey("sealer", Sealer)
COOKIES = web.AppKey("cookies", CookieCodec)
METRICS = web.AppKey("metrics", Metrics)
# One pooled client session for calls to the upstream provider and client-ID metadata documents.
HTTP = web.AppKey("http", aiohttp.ClientSession)
