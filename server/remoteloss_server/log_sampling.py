"""Log lines of caller-made events, sampled: at most ``LOG_LINES_PER_S`` a second of each kind.

A failed request logs a line, and so does a call without a valid key, which anyone can send at the
cost of its headers: unsampled, a flood of bad requests would be a flood of log lines, filling
disks and taking the event loop's time to format them. The metrics still count every one. Each
server keeps its own sampler (on its ``Metrics``, its ``ApiKeyInterceptor``), so that servers
in one process (tests) do not share their seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

__all__ = ["LOG_LINES_PER_S", "LogSampler"]

LOG_LINES_PER_S = 20


class LogSampler:
    """Per key (a bounded set of values: event, code, tenant), at most ``per_s`` lines in each
    second of ``clock``; the first line let through after some were held back says how many."""

    def __init__(self, per_s: int = LOG_LINES_PER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s = per_s
        self.clock = clock
        self._seconds: dict[Hashable, list[int]] = {}  # key -> [second, lines let through, held back]

    def admit(self, key: Hashable) -> int | None:
        """None: hold this line back; else let it through, with the lines held back since the last one."""
        second = int(self.clock())
        state = self._seconds.get(key)
        if state is None or state[0] != second:
            held = 0 if state is None else state[2]
            self._seconds[key] = [second, 1, 0]
            return held
        if state[1] < self.per_s:
            state[1] += 1
            return 0
        state[2] += 1
        return None

    def log(self, logger: logging.Logger, level: int, key: Hashable, message: str, *args: object) -> None:
        """``logger.log(level, message, *args)`` if ``key`` has lines left this second; the first
        line after some were held back ends with ``suppressed=N``."""
        if not logger.isEnabledFor(level):
            return
        held = self.admit(key)
        if held is None:
            return
        if held:
            logger.log(level, message + " suppressed=%d", *args, held)
        else:
            logger.log(level, message, *args)
