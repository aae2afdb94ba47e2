"""``Stream`` and ``AsyncStream``: many calls in flight on one ``ComputeStream``.

Each loss method (and ``value_and_grad``) of a stream sends its request tagged with a new id,
and the answer, which may overtake earlier ones, resolves that id's future. Requests are built
and checked locally as for a direct call (``Stream``: when the method is called;
``AsyncStream``: when its coroutine runs); a request the server rejects fails its own call with
the class a direct call would raise, and the stream goes on.

A stream that ends with UNAVAILABLE (a server's drain, which answers every request it took and
ends with ``remoteloss-drained`` in its trailing metadata, or a lost connection) is opened again
on the same channel, which may pick another replica, and its unanswered requests are sent again:
their bytes are kept until answered. Compute is a pure function, so a request computed twice is
harmless. Up to ``_stream_base.RESENDS`` times in a row without an answer, with backoff, within the stream's
deadline. Any other failure of the whole stream (deadline, cancellation, the server going away
for good) fails every unanswered call and every later one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import grpc

from remoteloss._calls import Backward, Plan, warn
from remoteloss._errors import CancelledError, LossServiceError, _error_from_rpc
from remoteloss._request import Request
from remoteloss._stream_base import StreamBase, copy_error, settle
from remoteloss._transport import Answer, Transport

__all__ = ["AsyncStream", "LossFuture", "Stream"]

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # the stubs lack it


class LossFuture(concurrent.futures.Future[Any]):
    """The result of one call on a ``Stream``: a ``concurrent.futures.Future``.

    ``result()`` gives what the direct call would have returned (numpy or torch, with a
    ``grad_fn`` when the call went through autograd) and re-raises the server's warnings,
    the first time, at its caller; a rejected request raises the direct call's exception.
    A request already sent cannot be withdrawn, so ``cancel()`` returns False.
    """

    def __init__(self, plan: Plan, backward: Backward) -> None:
        super().__init__()
        self._plan = plan
        self._backward = backward
        self._finish_lock = threading.Lock()
        self._finished = False
        self._value: Any = None
        self.set_running_or_notify_cancel()

    def result(self, timeout: float | None = None) -> Any:
        answer: Answer = super().result(timeout)
        with self._finish_lock:
            if not self._finished:
                self._value = self._plan.finish(answer, self._backward)
                self._finished = True
                warn(answer.message.warnings, stacklevel=2)  # result's caller
        return self._value


class Stream(StreamBase[LossFuture]):
    """Many calls on one ``ComputeStream`` of a ``Client`` (``client.stream()``); thread-safe.

    >>> with client.stream() as stream:  # doctest: +SKIP
    ...     futures = [stream.mse_loss(x, y) for x, y in pairs]
    ...     losses = [f.result() for f in futures]

    Each loss method returns a ``LossFuture`` at once; a call blocks only while ``window``
    requests are unanswered. ``timeout`` is the deadline of the whole stream in seconds (None,
    the default: none); wait for one result with ``future.result(timeout)``. Leaving the
    ``with`` block (or ``close()``) waits for every answer; leaving it by an exception cancels
    the stream, failing the unanswered futures with ``remoteloss.CancelledError``. Autograd
    works as for direct calls (a second call, if backward needs one, goes through the client).
    """

    def __init__(self, transport: Transport, *, timeout: float | None, window: int) -> None:
        super().__init__(timeout, window)
        self._transport = transport
        self._room = threading.Condition()
        self._outbox: queue.SimpleQueue[bytes | None]
        self._call: Any
        self._open([])
        self._reader = threading.Thread(target=self._read, name="remoteloss-stream", daemon=True)
        self._reader.start()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.cancel()
        self.close()

    def close(self) -> None:
        """Send no more requests and wait until every one sent is answered. Idempotent."""
        with self._room:
            if not self._closed:
                self._closed = True
                self._outbox.put(None)
            self._room.notify_all()
        self._reader.join()

    def cancel(self) -> None:
        """End the stream now: unanswered futures fail with ``remoteloss.CancelledError``."""
        with self._room:
            self._cancelled = True
            call = self._call
        call.cancel()

    def _submit(self, make_plan: Callable[[], Plan]) -> LossFuture:
        plan = make_plan()  # a bad argument raises here, in the caller, as a direct call would
        key = next(self._ids)
        item = plan.request.serialize_item(key)  # now: the arguments may change once this returns
        with self._room:
            while len(self._pending) >= self._window and self._failure is None and not self._closed:
                self._room.wait()
            self._check_open()
            future = LossFuture(plan, self._transport.compute)
            self._pending[key] = (future, item)
            self._outbox.put(item)
        return future

    def _open(self, items: list[bytes]) -> None:
        """Start a ComputeStream call that sends ``items``, then what later calls queue (under
        ``_room`` once the stream runs)."""
        outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # serialized items
        for item in items:
            outbox.put(item)
        if self._closed:
            outbox.put(None)
        self._call = self._transport.compute_stream(_requests(outbox), self._call_timeout())
        self._outbox = outbox  # once the call is made: if it cannot be, the ended call's stays

    def _read(self) -> None:
        attempts = 0
        while True:
            failure, answered = self._read_call(self._call)
            attempts = 0 if answered else attempts
            delay = self._resend_delay(failure, attempts)
            if delay is None:
                break
            time.sleep(delay)
            with self._room:
                if self._cancelled:
                    failure = CancelledError("the stream was cancelled")
                    break
                if self._closed and not self._pending:
                    break
                ended = self._outbox
                refused = self._reopen()
                if refused is not None:
                    failure = refused
                    break
            ended.put(None)  # ends gRPC's request thread of the ended call if it still waits
            attempts += 1
        self._finish(failure)

    def _read_call(self, call: Any) -> tuple[LossServiceError | None, bool]:
        """Settle the answers of ``call`` until it ends; why it ended (None: cleanly), and
        whether it answered anything."""
        answered = False
        try:
            for answer, payloads in call:
                answered = True
                with self._room:
                    entry = self._pending.pop(answer.id, None)
                    self._room.notify()
                if entry is not None:
                    settle(entry[0], answer, payloads)
                del answer, payloads, entry  # not held while the next answer is awaited
        except grpc.RpcError as exc:
            failure = _error_from_rpc(exc)
            failure.__cause__ = exc
            return failure, answered
        return None, answered

    def _finish(self, failure: LossServiceError | None) -> None:
        with self._room:
            failure, unanswered = self._end(failure)
            self._room.notify_all()
        self._outbox.put(None)  # ends gRPC's request thread if it still waits for one
        if failure is not None:
            for future in unanswered:
                future.set_exception(copy_error(failure))


def _requests(outbox: queue.SimpleQueue[bytes | None]) -> Iterator[bytes]:
    while (request := outbox.get()) is not None:
        yield request
        del request  # not held while the next is awaited


class AsyncStream(StreamBase[asyncio.Future[Answer]]):
    """Many calls on one ``ComputeStream`` of an ``AsyncClient`` (``aclient.stream()``).

    >>> async with aclient.stream() as stream:  # doctest: +SKIP
    ...     losses = await asyncio.gather(*(stream.mse_loss(x, y) for x, y in pairs))

    Each loss method is a coroutine that sends its request and returns the result once its
    answer arrives; run many at once (``asyncio.gather``, tasks) to keep the stream full. At most
    ``window`` requests are unanswered; more wait their turn. ``timeout`` is the deadline of
    the whole stream (None, the default: none). Leaving the ``async with`` block (or
    ``aclose()``) waits for every answer; leaving it by an exception cancels the stream.
    """

    def __init__(self, transport: Transport, *, timeout: float | None, window: int) -> None:
        super().__init__(timeout, window)
        self._transport = transport
        self._slots = asyncio.Semaphore(window)
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()  # serialized items
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.cancel()
        await self.aclose()

    async def aclose(self) -> None:
        """Send no more requests and wait until every one sent is answered. Idempotent."""
        self._closed = True
        if self._call is None:
            return
        self._outbox.put_nowait(None)
        if self._reader is not None:
            await self._reader
        if self._writer is not None:
            if not self._writer.done():  # a write waiting on a call cancelled early would wait forever
                self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)

    def cancel(self) -> None:
        """End the stream now: unanswered calls raise ``remoteloss.CancelledError``."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def _submit(self, make_plan: Callable[[], Plan]) -> Any:
        plan = make_plan()  # a bad argument raises when awaited, as on AsyncClient
        answer = await self._send(plan.request)
        result = plan.finish(answer, self._transport.compute)  # backward's second call blocks
        warn(answer.message.warnings, stacklevel=2)  # _submit, the coroutine awaiting the loss method
        return result

    async def _send(self, request: Request) -> Answer:
        async with self._slots:
            self._check_open()
            if self._call is None:
                self._open([])
                self._reader = asyncio.create_task(self._read())
            key = next(self._ids)
            answer = asyncio.get_running_loop().create_future()
            item = request.serialize_item(key)
            self._pending[key] = (answer, item)
            self._outbox.put_nowait(item)
            try:
                response: Answer = await answer
                return response
            finally:
                self._pending.pop(key, None)

    def _open(self, items: list[bytes]) -> None:
        """Start a ComputeStream call, and its writer, which sends ``items``, then what later calls queue."""
        self._outbox = asyncio.Queue()
        for item in items:
            self._outbox.put_nowait(item)
        if self._closed:
            self._outbox.put_nowait(None)
        self._call = self._transport.acompute_stream(self._call_timeout())
        self._writer = asyncio.create_task(self._write(self._call, self._outbox))

    async def _write(self, call: Any, outbox: asyncio.Queue[bytes | None]) -> None:
        """Send the queued requests in order, one write at a time, then half-close. A caller that
        gives up never cancels a write, which in grpc.aio would cancel the whole call."""
        try:
            while (request := await outbox.get()) is not None:
                await call.write(request)
                del request  # not held while the next is awaited
            await call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call has ended; the reader reports why
        except asyncio.CancelledError:
            if not call.done():  # this task itself was cancelled
                raise

    async def _read(self) -> None:
        attempts = 0
        while True:
            failure, answered = await self._read_call(self._call)
            attempts = 0 if answered else attempts
            delay = self._resend_delay(failure, attempts)
            if delay is None:
                break
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:  # this task's cancel (its loop closing)
                self._fail_all(CancelledError("the stream was cancelled"))
                raise
            if self._cancelled:
                failure = CancelledError("the stream was cancelled")
                break
            if self._closed and not self._pending:
                break
            ended = self._writer
            refused = self._reopen()
            if refused is not None:
                failure = refused
                break
            if ended is not None:  # it waits for a request, or has stopped on the ended call
                ended.cancel()
                await asyncio.gather(ended, return_exceptions=True)
            attempts += 1
        self._fail_all(failure)

    async def _read_call(self, call: Any) -> tuple[LossServiceError | None, bool]:
        """Settle the answers of ``call`` until it ends; why it ended (None: cleanly), and
        whether it answered anything."""
        answered = False
        try:
            while (item := await call.read()) is not _EOF:
                answered = True
                answer, payloads = item
                entry = self._pending.pop(answer.id, None)
                if entry is not None and not entry[0].done():  # not done: its caller may have gone
                    settle(entry[0], answer, payloads)
                del item, answer, payloads, entry  # not held while the next answer is awaited
        except grpc.RpcError as exc:
            failure = _error_from_rpc(exc)
            failure.__cause__ = exc
            return failure, answered
        except asyncio.CancelledError:  # grpc.aio's word for a call cancelled here, or this task's cancel
            if not call.cancelled():
                self._fail_all(CancelledError("the stream was cancelled"))
                raise
            return CancelledError("the stream was cancelled"), answered
        return None, answered

    def _fail_all(self, failure: LossServiceError | None) -> None:
        """Mark the stream ended and fail every unanswered call (``failure`` None: a clean end)."""
        failure, unanswered = self._end(failure)
        if failure is not None:
            for future in unanswered:
                if not future.done():
                    future.set_exception(copy_error(failure))
