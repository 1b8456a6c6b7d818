"""Print each fault's figures at the end of the run, so CI's log states them."""

from __future__ import annotations

from typing import Any

from tests.faults.harness import FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fault figures (acknowledged / stored / duplicates / missing)")
        for line in FIGURES:
            terminalreporter.write_line(line)
