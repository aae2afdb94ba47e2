"""The event loop the server runs on: uvloop's where it is installed, else asyncio's own.

gRPC's asyncio server runs on any asyncio loop. Every request costs a few turns of the loop
(gRPC's completion events arrive through it), and asyncio's loop spends them in Python
(``_run_once``, the selector, ``Handle._run``); uvloop spends them in C, on libuv. With 64 small
callers that is about a fifth of the server's CPU per request, the bare echo's included
(``bench/server_cpu.py``). ``--event-loop asyncio`` keeps the standard loop.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["choose", "run"]


_T = TypeVar("_T")


def choose(name: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop ``name`` (``config.EVENT_LOOPS``) stands for, as its name and a factory;
    ImportError when ``uvloop`` is asked for and not installed."""
    if name != "asyncio":
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if name == "uvloop":
                raise ImportError("event_loop uvloop: the uvloop package is not installed (pip install uvloop)") from None
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return "uvloop", factory
    return "asyncio", asyncio.new_event_loop


def run(main: Coroutine[Any, Any, _T], factory: Callable[[], asyncio.AbstractEventLoop]) -> _T:
    """``asyncio.run(main)`` on a loop that ``factory`` makes (``choose``)."""
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
