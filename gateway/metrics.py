"""Prometheus metrics (prometheus-client), one registry per app.

(Skeleton: the platform work package fills this in; see docs/ARCHITECTURE.md.)
"""

from __future__ import annotations


class Metrics:
    """Counters and histograms that the handlers and flows update."""
