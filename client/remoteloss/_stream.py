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
harmless. Up to ``_RESENDS`` times in a row without an answer, with backoff, within the stream's
deadline. Any other failure of the whole stream (deadline, cancellation, the server going away
for good) fails every unanswered call and every later one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from remoteloss._calls import Backward, Plan, plan_loss, plan_value_and_grad, warn
from remoteloss._errors import (
    CancelledError,
    InternalServerError,
    LossServiceError,
    _error_from_code,
    _error_from_rpc,
)
from remoteloss._losses import LossMethods
from remoteloss._request import Request
from remoteloss._transport import Answer, Transport
from remoteloss.v1 import loss_pb2 as pb
from remoteloss._wire import Payloads

__all__ = ["AsyncStream", "LossFuture", "Stream"]

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # the stubs lack it
_RESENDS = 5  # new streams in a row, after UNAVAILABLE, that get no answer before the calls fail
_RESEND_BACKOFF_S = 0.05  # the wait before the first; doubled each time, up to _RESEND_MAX_BACKOFF_S
_RESEND_MAX_BACKOFF_S = 1.0
# What grpc.aio reports, as INTERNAL, when a write fails because the server has just ended the call
# (a drain ends streams while their clients still write): the call's own status is then lost.
# No server sends it (ours says "internal error"), so it is taken as the end of a connection.
_LOST_STATUS = "Internal error from Core"


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


class _StreamBase(LossMethods):
    """Ids, the unanswered calls, and turning an answer or a stream failure into outcomes."""

    def __init__(self, timeout: float | None, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._timeout = timeout
        self._deadline: float | None = None  # time.monotonic() of the deadline, once the call starts
        self._window = window
        self._ids = itertools.count(1)
        self._failure: LossServiceError | None = None  # what ended the stream, once it ended badly
        self._closed = False
        self._cancelled = False  # cancel() was called: nothing is sent again

    def _call_timeout(self) -> float | None:
        """The timeout of the next ComputeStream call: what is left of the stream's deadline."""
        if self._timeout is None:
            return None
        if self._deadline is None:
            self._deadline = time.monotonic() + self._timeout
            return self._timeout
        return max(0.0, self._deadline - time.monotonic())

    def _resend_delay(self, failure: LossServiceError | None, attempts: int) -> float | None:
        """How long to wait before sending the unanswered requests again on a new call (None: do
        not): after UNAVAILABLE, ``attempts`` new calls in a row without an answer so far."""
        if failure is None or self._cancelled:
            return None
        lost = failure.code == grpc.StatusCode.INTERNAL and failure.details == _LOST_STATUS
        if failure.code != grpc.StatusCode.UNAVAILABLE and not lost:
            return None
        if attempts >= _RESENDS:
            return None
        delay = min(_RESEND_MAX_BACKOFF_S, _RESEND_BACKOFF_S * 2.0**attempts) * random.uniform(0.5, 1.0)
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            return None
        return delay

    def value_and_grad(
        self,
        loss_name: str,
        /,
        *args: Any,
        wrt: str | Sequence[str] = ("input",),
        grad_output: Any = None,
        **kwargs: Any,
    ) -> Any:
        """``Client.value_and_grad`` on the stream: a future (``Stream``) or a coroutine (``AsyncStream``)."""
        return self._submit(lambda: plan_value_and_grad(self, loss_name, args, kwargs, wrt, grad_output))

    def _compute(self, loss: str, arguments: dict[str, Any]) -> Any:
        return self._submit(lambda: plan_loss(loss, arguments))

    def _submit(self, make_plan: Callable[[], Plan]) -> Any:
        """Send the planned request: at once (``Stream``), or when the coroutine runs (``AsyncStream``)."""
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._failure is not None:
            raise _copy(self._failure)
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")


class Stream(_StreamBase):
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
        self._pending: dict[int, tuple[LossFuture, bytes]] = {}  # each unanswered call and its item
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
        self._outbox = outbox
        self._call = self._transport.compute_stream(_requests(outbox), self._call_timeout())

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
                self._open([item for _, (_, item) in sorted(self._pending.items())])
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
                    _settle(entry[0], answer, payloads)
        except grpc.RpcError as exc:
            failure = _error_from_rpc(exc)
            failure.__cause__ = exc
            return failure, answered
        return None, answered

    def _finish(self, failure: LossServiceError | None) -> None:
        with self._room:
            unanswered = [future for future, _ in self._pending.values()]
            self._pending = {}
            failure = _ended(failure, len(unanswered))
            self._failure = failure
            self._closed = True
            self._room.notify_all()
        self._outbox.put(None)  # ends gRPC's request thread if it still waits for one
        if failure is not None:
            for future in unanswered:
                future.set_exception(_copy(failure))


def _requests(outbox: queue.SimpleQueue[bytes | None]) -> Iterator[bytes]:
    while (request := outbox.get()) is not None:
        yield request


class AsyncStream(_StreamBase):
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
        self._pending: dict[int, tuple[asyncio.Future[Answer], bytes]] = {}  # each unanswered call, its item
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
            self._open([item for _, (_, item) in sorted(self._pending.items())])
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
                    _settle(entry[0], answer, payloads)
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
        unanswered = [future for future, _ in self._pending.values()]
        self._pending = {}
        failure = _ended(failure, len(unanswered))
        self._failure = failure
        self._closed = True
        if failure is not None:
            for future in unanswered:
                if not future.done():
                    future.set_exception(_copy(failure))


def _settle(
    future: concurrent.futures.Future[Any] | asyncio.Future[Answer],
    answer: pb.ComputeStreamResponse,
    payloads: Payloads | None,
) -> None:
    """Resolve a call's future with its answer, or with the error a unary call would have raised."""
    outcome = _outcome(answer, payloads)
    if isinstance(outcome, LossServiceError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _outcome(answer: pb.ComputeStreamResponse, payloads: Payloads | None) -> Answer | LossServiceError:
    """The answer's response, or the exception a unary call would have raised for its error."""
    kind = answer.WhichOneof("result")
    if kind == "response":
        return Answer(answer.response, payloads)
    if kind == "error":
        return _error_from_code(_CODES.get(answer.error.code, grpc.StatusCode.UNKNOWN), answer.error.message)
    return InternalServerError(f"the stream's answer {answer.id} holds neither a response nor an error")


def _ended(failure: LossServiceError | None, unanswered: int) -> LossServiceError | None:
    """Why the stream ended, for the calls it leaves unanswered (None: it ended cleanly)."""
    if failure is None and unanswered:
        return InternalServerError(f"the stream ended with {unanswered} requests unanswered")
    return failure


def _copy(error: LossServiceError) -> LossServiceError:
    """A fresh exception like ``error`` (each raise gets its own traceback), caused by the same."""
    fresh = type(error)(error.details, error.code)
    fresh.__cause__ = error.__cause__
    return fresh

