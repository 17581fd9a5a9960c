"""Fixtures of the fault scenarios: a fault proxy in front of the test redis-server, and the
figures (p99 latency during each fault, time to recover) printed at the end of the run."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.redisproc import RedisServer

_FIGURES: list[tuple[str, str, float]] = []


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(redis_server.port) as fault_proxy:
        yield fault_proxy


class Figures:
    """Records one scenario's measured figures for the run's closing summary."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario

    def record(self, name: str, seconds: float) -> None:
        _FIGURES.append((self.scenario, name, seconds))


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node.name)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("fault scenario figures")
    for scenario, name, seconds in _FIGURES:
        terminalreporter.write_line(f"{scenario:<70} {name:<28} {seconds * 1000:8.0f} ms")
