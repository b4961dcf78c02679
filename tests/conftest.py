"""Shared pytest configuration: every module in tests/fixtures/ is a fixture plugin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.logs import reset_logging

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Whatever a test configured (the CLI configures logging on pytest's captured streams,
    which close after the test), the next test starts from structlog's defaults."""
    yield
    reset_logging()
