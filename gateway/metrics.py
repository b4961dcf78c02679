"""Prometheus metrics (prometheus-client), one registry per app.

Each `Metrics` owns its own `CollectorRegistry`, so several apps (tests, workers) never share
or collide on the process-global default registry. Label values are bounded by construction:
routes are canonical route names, methods and outcomes come from small fixed sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    120.0,
)


class Metrics:
    """Counters and histograms that the handlers and flows update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mfagw_http_requests",
            "HTTP requests handled, by canonical route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "mfagw_http_request_duration_seconds",
            "Time from request start until the handler returned (whole stream for streams)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stepups = Counter(
            "mfagw_stepups",
            "TOTP step-ups: started|succeeded|failed|replayed",
            ["outcome"],
            registry=r,
        )
        self.lockouts = Counter(
            "mfagw_lockouts",
            "Lock-outs after too many TOTP failures, by scope (user|ip)",
            ["scope"],
            registry=r,
        )
        self.codes_issued = Counter(
            "mfagw_codes_issued",
            "Authorization codes issued after a successful step-up",
            registry=r,
        )
        self.tokens = Counter(
            "mfagw_tokens",
            "Token events: issued|refreshed|revoked|reuse_detected",
            ["event"],
            registry=r,
        )
        self.mcp = Counter(
            "mfagw_mcp_requests",
            "MCP requests by resource path, outcome and reason",
            ["resource", "outcome", "reason"],
            registry=r,
        )
        self.registrations = Counter(
            "mfagw_client_registrations",
            "Client registrations by kind (dynamic|cimd)",
            ["kind"],
            registry=r,
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
