"""The event loop polls for a moment after the last calls instead of sleeping (``--busy-poll-us``).

Between back-to-back calls the loop's thread sleeps in ``epoll``, and each call then pays for the
wake-up (on a virtual machine an idle CPU halts, and waking it goes through the hypervisor) and for
caches that other work filled meanwhile: a lone caller's small call spent about as long on these as on
the server's whole Python path (bench/ANALYSIS.md, tenth session). For ``window_s`` after the
last calls (the native front's batch of events that leaves none in flight, an HTTP inference
that does), the loop keeps turning without blocking (its ``select`` with no timeout), and at
each turn gives the CPU to any other thread that wants it (gRPC's, the compute threads); once a
window passes without a ``touch`` it sleeps as before.

The price is CPU: at most one core, for at most ``window_s`` after each batch of events, however
many callers send them; none on an idle server. A window of 0 turns it off.
"""

from __future__ import annotations

import asyncio
import os
import time

__all__ = ["BusyPoll"]


class BusyPoll:
    """Keeps the running event loop turning for ``window_s`` after each ``touch``."""

    __slots__ = ("_last", "_loop", "_polling", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._last = 0.0
        self._polling = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def touch(self) -> None:
        """Events came: poll until ``window_s`` has passed without another touch. Call it on
        the loop's thread."""
        if self.window_s <= 0:
            return
        self._last = time.monotonic()
        if not self._polling:
            self._polling = True
            self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        # One turn of the loop: it selects without blocking while this callback is pending. The
        # yield lets a thread of this process waiting for the CPU (gRPC's queue thread, a
        # compute thread) run first, rather than wait for this one's time slice.
        os.sched_yield()
        if time.monotonic() - self._last < self.window_s and self._loop is not None:
            self._loop.call_soon(self._turn)
        else:
            self._polling = False
