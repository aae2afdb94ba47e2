"""The fuzz tests' count of requests, at the end of the run (see test_fuzz.py)."""

from __future__ import annotations

import sys
from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    fuzz = sys.modules.get(f"{__package__}.test_fuzz") if __package__ else None
    summary = fuzz.Tally.summary() if fuzz is not None else None
    for line in (summary or "").splitlines():
        terminalreporter.write_line(line)
