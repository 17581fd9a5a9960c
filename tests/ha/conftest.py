"""Figures the HA tests measure (``record_property("ha_...", value)``), printed after the run."""
from __future__ import annotations

from typing import Any

import pytest

PREFIX = "ha_"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, value in getattr(report, "user_properties", []):
                if name.startswith(PREFIX):
                    lines.append(f"{report.nodeid.split('::')[-1]}: {name[len(PREFIX):]} = {value}")
    if lines:
        terminalreporter.write_sep("-", "Redis HA figures")
        for line in lines:
            terminalreporter.write_line(line)
