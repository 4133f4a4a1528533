"""Reliability suites (issue 7): load, hot reload, faults, bad input, security. Loopback only, bounded."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter):
    from tests.reliability.helpers import FIGURES

    if not FIGURES:
        return
    terminalreporter.section("reliability figures (measured in this run)")
    for name, figs in FIGURES.items():
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in figs.items()))
