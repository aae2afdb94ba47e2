"""``bounded_map``: a function over an async stream, a bounded number of items at a time.

The engine of ``ComputeStream``, kept apart from gRPC so that it can be tested alone. No grpc here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["Stopped", "bounded_map"]

_T = TypeVar("_T")
_R = TypeVar("_R")


class Stopped(Exception):
    """``bounded_map`` stopped reading on its ``stop`` event before the items ran out; every item
    it had read was answered (yielded) before this was raised."""


class _Slots:
    """``bounded_map``'s window: a slot is taken as an item is read, and freed once its result
    has been taken."""

    def __init__(self, size: int) -> None:
        self._size, self._taken, self._free = size, 0, asyncio.Semaphore(size)

    async def take(self) -> int:
        """Wait for a slot; how many items may be read now, this one included."""
        await self._free.acquire()
        self._taken += 1
        return self._size - self._taken + 1

    def release(self) -> None:
        self._taken -= 1
        self._free.release()


async def bounded_map(
    items: AsyncIterable[_T],
    function: Callable[[_T], Awaitable[_R]],
    limit: int,
    *,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[_R]:
    """Yield ``await function(item)`` for every item, in the order the calls finish.

    At most ``limit`` items are in flight: read and not yet yielded. The next item is read only
    when a slot is free, and a slot frees only once its result has been taken, so a slow
    consumer (a client that reads no answers) or slow calls stop the reading: backpressure
    reaches the sender through gRPC's flow control. An exception from ``function`` or from
    reading ends the stream with that exception; closing the generator cancels what is in
    flight.

    Once ``stop`` is set, no more items are read (a read under way is abandoned: its item, if
    one arrives, is never taken); the calls already made finish and their results are yielded,
    then the stream ends with ``Stopped``, unless the items had run out before. Nothing in
    flight ends it at once.

    One reader task feeds the calls; each finished call (and the reader, when it ends) lands in
    one queue, so each item costs O(1) whatever ``limit`` is. Items that fetch several at once (the
    native front's) are told how many the free slots allow (``read_ahead``): they count too.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    slots = _Slots(limit)
    finished: asyncio.Queue[asyncio.Future[Any]] = asyncio.Queue()
    running: set[asyncio.Future[_R]] = set()
    read_ahead: Callable[[int], None] = getattr(items, "read_ahead", lambda count: None)

    async def read() -> None:
        iterator = aiter(items)
        while True:
            read_ahead(await slots.take())
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
            running.add(watch(function(item)))
            del item  # not held while the next is awaited: an idle stream pins nothing

    def watch(awaitable: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(awaitable)
        task.add_done_callback(finished.put_nowait)
        return task

    stopped = stop is not None and stop.is_set()
    reader = None if stopped else watch(read())
    watcher = None if stop is None or stopped else watch(stop.wait())
    helpers = [task for task in (reader, watcher) if task is not None]
    reading = reader is not None
    try:
        while reading or running:
            done = await finished.get()
            if done is watcher:
                if reading and reader is not None and not reader.done():
                    reader.cancel()  # the reader's own end, when it comes, is ignored
                    reading, stopped = False, True
            elif done is reader:
                if reading:
                    reading = False
                    done.result()  # the reading's exception, if any, ends the stream
            else:
                running.discard(done)
                yield done.result()
                slots.release()
            del done  # the last call's future holds its answer
        if stopped:
            raise Stopped
    finally:
        pending: list[asyncio.Future[Any]] = [*running, *helpers]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
