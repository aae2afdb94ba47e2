"""bounded_map: completion order, the in-flight limit, backpressure, failures, cancellation, and
the stop event of a drain.

Deterministic: calls finish when the test sets their events, never by timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from remoteloss_server.streaming import Stopped, bounded_map


class Source:
    """An async stream of 0..n-1 that records how many items were read."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[int]:
        for i in range(self.n):
            self.read += 1
            yield i


class Feed:
    """An async stream of the items the test puts, as a client sends them; records the reads."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.read: list[int] = []

    async def __aiter__(self) -> AsyncIterator[int]:
        while (item := await self.queue.get()) is not None:
            self.read.append(item)
            yield item


async def _settle() -> None:
    for _ in range(20):  # let every ready task run
        await asyncio.sleep(0)


def test_results_come_in_completion_order() -> None:
    async def main() -> list[int]:
        gates = {i: asyncio.Event() for i in range(3)}

        async def work(i: int) -> int:
            await gates[i].wait()
            return i

        out: list[int] = []
        results = bounded_map(Source(3), work, limit=3)

        async def consume() -> None:
            async for value in results:
                out.append(value)

        consumer = asyncio.create_task(consume())
        for i in (2, 0, 1):
            await _settle()
            gates[i].set()
        await consumer
        return out

    assert asyncio.run(main()) == [2, 0, 1]


def test_at_most_limit_in_flight_and_reading_waits_for_a_slot() -> None:
    async def main() -> None:
        source = Source(10)
        gates = [asyncio.Event() for _ in range(10)]
        running = 0
        peak = 0

        async def work(i: int) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await gates[i].wait()
            running -= 1
            return i

        results = bounded_map(source, work, limit=3)
        first = asyncio.ensure_future(anext(results))
        await _settle()
        assert source.read == 3 and running == 3  # nothing more is read while 3 are in flight
        gates[1].set()
        assert await first == 1
        await _settle()
        # The slot freed once its result was taken: a fourth item, no more.
        assert source.read == 3  # the generator is suspended at its yield until asked again
        second = asyncio.ensure_future(anext(results))
        await _settle()
        assert source.read == 4 and running == 3
        for gate in gates:
            gate.set()
        rest = [await second] + [value async for value in results]
        assert sorted([1, *rest]) == list(range(10))
        assert peak == 3

    asyncio.run(main())


def test_a_failing_call_ends_the_stream_and_cancels_the_others() -> None:
    async def main() -> None:
        cancelled: list[int] = []
        started: list[int] = []

        async def work(i: int) -> int:
            started.append(i)
            if i == 1:
                while len(started) < 3:  # fail once all three are in flight
                    await asyncio.sleep(0)
                raise ValueError("item 1")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(i)
                raise
            return i

        with pytest.raises(ValueError, match="item 1"):
            async for _ in bounded_map(Source(3), work, limit=3):
                pass
        assert sorted(cancelled) == [0, 2]

    asyncio.run(main())


def test_closing_the_generator_cancels_what_is_in_flight() -> None:
    async def main() -> None:
        cancelled: list[int] = []

        started: list[int] = []

        async def work(i: int) -> int:
            started.append(i)
            if i == 0:
                while len(started) < 4:  # answer once all four are in flight
                    await asyncio.sleep(0)
                return 0
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(i)
                raise
            return i

        results = bounded_map(Source(4), work, limit=4)
        assert await anext(results) == 0
        await results.aclose()
        assert sorted(cancelled) == [1, 2, 3]

    asyncio.run(main())


def test_empty_source_and_bad_limit() -> None:
    async def main() -> None:
        async def work(i: int) -> int:
            return i

        assert [v async for v in bounded_map(Source(0), work, limit=2)] == []
        with pytest.raises(ValueError, match="limit"):
            await anext(bounded_map(Source(1), work, limit=0))

    asyncio.run(main())


class Gated:
    """``work``: each call waits for its gate; ``started`` lists the calls made."""

    def __init__(self) -> None:
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []

    async def work(self, i: int) -> int:
        self.started.append(i)
        await self.gates.setdefault(i, asyncio.Event()).wait()
        return i

    def open(self) -> None:
        for i in self.started:
            self.gates.setdefault(i, asyncio.Event()).set()


async def _collect(results: AsyncIterator[int], into: list[int]) -> None:
    async for value in results:
        into.append(value)


def test_a_stop_reads_no_more_answers_what_was_read_and_raises_stopped() -> None:
    async def main() -> None:
        feed, calls, stop = Feed(), Gated(), asyncio.Event()
        for i in range(3):
            feed.queue.put_nowait(i)
        out: list[int] = []
        consumer = asyncio.create_task(_collect(bounded_map(feed, calls.work, limit=8, stop=stop), out))
        await _settle()
        assert calls.started == [0, 1, 2]  # and the reader waits for a fourth item
        stop.set()
        await _settle()
        for i in range(3, 6):  # sent after the stop: never taken
            feed.queue.put_nowait(i)
        await _settle()
        assert feed.read == [0, 1, 2] and not consumer.done()  # the three still run
        calls.open()
        with pytest.raises(Stopped):
            await consumer
        assert sorted(out) == [0, 1, 2]
        assert feed.read == [0, 1, 2] and calls.started == [0, 1, 2]

    asyncio.run(main())


def test_a_stop_while_every_slot_is_taken_reads_nothing_more() -> None:
    async def main() -> None:
        source, calls, stop = Source(10), Gated(), asyncio.Event()
        out: list[int] = []
        consumer = asyncio.create_task(_collect(bounded_map(source, calls.work, limit=2, stop=stop), out))
        await _settle()
        stop.set()
        calls.open()
        with pytest.raises(Stopped):
            await consumer
        assert sorted(out) == [0, 1] and source.read == 2

    asyncio.run(main())


def test_a_stop_ends_an_idle_stream_at_once_and_one_stopped_before_reads_nothing() -> None:
    async def main() -> None:
        async def work(i: int) -> int:
            return i

        feed, stop = Feed(), asyncio.Event()
        results = bounded_map(feed, work, limit=4, stop=stop)
        waiting = asyncio.ensure_future(anext(results))
        await _settle()
        stop.set()
        with pytest.raises(Stopped):
            await asyncio.wait_for(waiting, timeout=5)
        source = Source(3)
        with pytest.raises(Stopped):
            await anext(bounded_map(source, work, limit=4, stop=stop))
        assert source.read == 0

    asyncio.run(main())


def test_a_stop_after_the_items_ran_out_is_no_stop() -> None:
    async def main() -> None:
        source, calls, stop = Source(2), Gated(), asyncio.Event()
        out: list[int] = []
        consumer = asyncio.create_task(_collect(bounded_map(source, calls.work, limit=4, stop=stop), out))
        await _settle()
        assert source.read == 2  # every item read; both still compute
        stop.set()
        await _settle()
        calls.open()
        await consumer  # ends as usual: nothing was left unread
        assert sorted(out) == [0, 1]

    asyncio.run(main())


class AheadSource:
    """0..n-1 fetched in runs, as the native front's requests: each time what was fetched is
    taken, the next run fetches as many as the last ``read_ahead`` allowed."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fetched = 0
        self.allowed: list[int] = []
        self._ahead = 1

    def read_ahead(self, count: int) -> None:
        self.allowed.append(count)
        self._ahead = count

    def __aiter__(self) -> AheadSource:
        self._buffer: list[int] = []
        return self

    async def __anext__(self) -> int:
        if not self._buffer:
            if self.fetched >= self.n:
                raise StopAsyncIteration
            run = range(self.fetched, min(self.n, self.fetched + self._ahead))
            self._buffer.extend(run)
            self.fetched += len(run)
        return self._buffer.pop(0)


def test_what_is_fetched_ahead_counts_against_the_limit() -> None:
    async def main() -> tuple[AheadSource, list[int], list[int]]:
        gates = {i: asyncio.Event() for i in range(100)}

        async def work(i: int) -> int:
            await gates[i].wait()
            return i

        source = AheadSource(100)
        results = bounded_map(source, work, limit=8)
        out: list[int] = []
        unanswered: list[int] = []  # fetched and not yet answered, whenever the stream is stuck

        async def consume() -> None:
            async for value in results:
                out.append(value)

        consumer = asyncio.create_task(consume())
        for first in range(0, 100, 4):  # a few answers at a time: asks come with slots held
            await _settle()
            unanswered.append(source.fetched - len(out))
            for i in range(first, first + 4):
                gates[i].set()
        await consumer
        return source, out, unanswered

    source, out, unanswered = asyncio.run(main())
    assert sorted(out) == list(range(100))
    assert max(unanswered) == 8, unanswered  # the window, full, and never more
    assert source.allowed[0] == 8 and min(source.allowed) < 8 and all(n >= 1 for n in source.allowed)
