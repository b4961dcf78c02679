"""Replica tests: two real gateway processes sharing one Redis (`gateway_processes`)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from tests.faults.procs import attach_gateway_logs, gateway_processes
from tests.fixtures.peers import PEER_FIXTURES

__all__ = ["gateway_processes"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    """Attach the replicas' logs to a failed test (the peers plugin does it when it runs)."""
    outcome: Any = yield
    if PEER_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())):
        attach_gateway_logs(item, outcome.get_result())
