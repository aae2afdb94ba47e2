"""``bounded_map``: a function over an async stream, a bounded number of items at a time.

The engine of ``ComputeStream``, kept apart from gRPC so that it can be tested alone. No grpc here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["bounded_map"]

_T = TypeVar("_T")
_R = TypeVar("_R")


async def bounded_map(
    items: AsyncIterable[_T], function: Callable[[_T], Awaitable[_R]], limit: int
) -> AsyncIterator[_R]:
    """Yield ``await function(item)`` for every item, in the order the calls finish.

    At most ``limit`` items are in flight: read and not yet yielded. The next item is read only
    when a slot is free, and a slot frees only once its result has been taken, so a slow
    consumer (a client that reads no answers) or slow calls stop the reading: backpressure
    reaches the sender through gRPC's flow control. An exception from ``function`` or from
    reading ends the stream with that exception; closing the generator cancels what is in
    flight.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    iterator = aiter(items)
    running: set[asyncio.Future[_R]] = set()
    reading: asyncio.Future[tuple[bool, _T]] | None = None
    exhausted = False
    try:
        while True:
            if reading is None and not exhausted and len(running) < limit:
                reading = asyncio.ensure_future(_next(iterator))
            waiting: set[asyncio.Future[Any]] = set(running)
            if reading is not None:
                waiting.add(reading)
            if not waiting:
                return
            finished, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if reading is not None and reading in finished:
                finished.discard(reading)
                more, item = reading.result()
                reading = None
                if more:
                    running.add(asyncio.ensure_future(function(item)))
                else:
                    exhausted = True
            for task in finished:
                running.discard(task)
                result: _R = task.result()
                yield result
    finally:
        pending: list[asyncio.Future[Any]] = [*running, *([reading] if reading is not None else [])]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _next(iterator: AsyncIterator[_T]) -> tuple[bool, _T]:
    """``(True, item)``, or ``(False, _END)`` at the end: a Task cannot end in StopAsyncIteration."""
    try:
        return True, await anext(iterator)
    except StopAsyncIteration:
        return False, _END  # never used as an item


_END: Any = object()
