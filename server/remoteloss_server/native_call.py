"""One call of the native front (``native_front``): what its handler sees, ``Context`` (the
subset of ``grpc.aio.ServicerContext`` this server's handlers use), its requests as an async
iterator, and ``Resumed``, which lets a coroutine started on the spot continue as a task."""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import logging
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any, NamedTuple

import grpc

__all__ = ["Aborted", "Call", "Context", "Details", "Metadata", "Requests", "Resumed"]

logger = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str | bytes], ...]


class Details(NamedTuple):  # grpc.HandlerCallDetails, as interceptors read it
    method: str
    invocation_metadata: Metadata


class Aborted(grpc.aio.AbortError):
    pass


class Context:
    """What a handler may ask of its call (the subset of ``grpc.aio.ServicerContext`` in use)."""

    def __init__(self, front: Any, call_id: int, metadata: Metadata, deadline: float | None, peer: str) -> None:
        self._front = front
        self._id = call_id
        self._metadata = metadata
        self._deadline = deadline
        self._peer = peer
        self._trailing: Sequence[tuple[str, str | bytes]] = ()
        self._code = grpc.StatusCode.OK
        self._details = ""
        self._callbacks: list[Callable[[Any], None]] = []
        self._written: asyncio.Future[None] | None = None
        self.serialize: Callable[[Any], bytes] | None = None  # a streaming answer's serializer
        self.cancelled_ = False
        self.done_ = False

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.time()

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = metadata

    def trailing_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self._trailing

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def cancelled(self) -> bool:
        return self.cancelled_

    def done(self) -> bool:
        return self.done_

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self.done_:
            callback(self)
        else:
            self._callbacks.append(callback)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        if code == grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN  # as grpc.aio: an abort is a failure
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = trailing_metadata
        raise Aborted()

    async def write(self, message: Any) -> None:
        """Send one message (serialized by the method's serializer); returns once gRPC has taken it
        or the call's queue of writes in the extension has room for it (a few, see front.h)."""
        if self._front.write(self._id, message if self.serialize is None else self.serialize(message)):
            return
        self._written = asyncio.get_running_loop().create_future()
        await self._written  # a call that ends first is cancelled by its DONE

    def on_done(self, cancelled: bool) -> None:
        self.done_, self.cancelled_ = True, cancelled
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                logger.exception("a done callback failed")

    def on_written(self) -> None:
        if self._written is not None and not self._written.done():
            self._written.set_result(None)

    def finish(self, message: bytes | None) -> None:
        code = self._code.value[0]
        self._front.finish(self._id, code, self._details, self._trailing, message if code == 0 else None)


class Requests:
    """A streaming call's requests as an async iterator. The first was asked for at the call's
    start (and may have come with it); once what came is taken, ``__anext__`` asks gRPC for more:
    as many as the handler said it may take (``read_ahead``: ``streaming.bounded_map`` gives the
    free places of its window), at most ``AHEAD``, which the front reads back to back while they
    are small (front.h), so a stream's requests reach the loop several to a batch of events."""

    AHEAD = 16  # requests asked for at once, at most

    def __init__(self, front: Any, call_id: int, first: bytes | None, deserialize: Callable[[bytes], Any] | None) -> None:
        self._front = front
        self._id = call_id
        self._deserialize = deserialize
        self._arrived: collections.deque[bytes | None] = collections.deque()  # None: the caller's half-close
        self._waiter: asyncio.Future[None] | None = None
        self._asked = True  # by the front, for the first message
        self._ahead = 1  # how many the next ask is for
        self._ended = False
        if first is not None:
            self._arrived.append(first)

    def read_ahead(self, count: int) -> None:
        """The handler may take ``count`` more requests now: the next ask is for as many (at
        most ``AHEAD``, at least one)."""
        self._ahead = max(1, min(count, self.AHEAD))

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Any:
        if self._ended:
            raise StopAsyncIteration
        if not self._arrived:
            if not self._asked:
                self._asked = True
                if not self._front.read(self._id, self._ahead):
                    self._ended = True
                    raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._arrived.popleft()
        if not self._arrived:
            self._asked = False  # the front reads no further unless asked again
        if message is None:
            self._ended = True
            raise StopAsyncIteration
        return message if self._deserialize is None else self._deserialize(message)

    def arrived(self, message: bytes | None) -> None:
        self._arrived.append(message)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Call:
    __slots__ = ("context", "handler", "requests", "run", "task")

    def __init__(self, context: Context, run: Callable[..., Any]) -> None:
        self.context = context
        self.run = run  # in the call's own context variables
        self.handler: grpc.RpcMethodHandler[Any, Any] | None = None  # a unary request's, until its request comes
        self.requests: Requests | None = None
        self.task: asyncio.Task[None] | None = None


class Resumed(collections.abc.Coroutine):  # type: ignore[type-arg]
    """``coro``, started on the spot and now waiting on ``yielded``, as a coroutine a task can run
    from there: its first step hands the task ``yielded``, the rest are ``coro``'s own. A task
    cancelled before its first step throws into ``coro`` where it waits, as into any task's
    coroutine (a wrapping ``async def`` would be cancelled before reaching it)."""

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coro = coro
        self._yielded: Any = yielded
        self._started = False

    def send(self, value: Any) -> Any:
        if not self._started:
            self._started = True
            return self._yielded
        return self._coro.send(value)

    def throw(self, *exc: Any) -> Any:
        self._started = True
        return self._coro.throw(*exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, Any]:  # pragma: no cover - only a task runs it
        raise TypeError("a Resumed coroutine is run by a task, not awaited")
