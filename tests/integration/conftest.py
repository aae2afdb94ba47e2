"""End-of-run summaries: the fuzz tests' count of requests (test_fuzz.py) and each attack's
figures, RSS and the bystander's slowest call (attack.py)."""

from __future__ import annotations

import sys
from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    fuzz = sys.modules.get(f"{__package__}.test_fuzz") if __package__ else None
    summary = fuzz.Tally.summary() if fuzz is not None else None
    for line in (summary or "").splitlines():
        terminalreporter.write_line(line)
    attack = sys.modules.get(f"{__package__}.attack") if __package__ else None
    for figures in attack.Watch.report if attack is not None else ():
        terminalreporter.write_line(f"attack: {figures.line()}")
