"""``--front native``: gRPC's C++ server as the transport, the server's own Python handlers behind it.

grpc.aio spends about three quarters of a small call's transport CPU in its Cython layer, an
event-loop turn and a thread hand-off per call (``bench/server_cpu.py``: "echo" against
"echo-c++"). ``NativeServer`` has the shape of a ``grpc.aio.Server`` (handlers, interceptors,
ports, start, stop), so ``app`` registers the same servicers on it, and serves them through
``_front`` (``server/native/``): gRPC's C++ core reads and writes the calls on its own
thread and hands this event loop every call and message that arrived since the last wake-up in
one batch. A unary handler runs on the spot in that batch, to its end unless it waits for
something (the batcher, a thread), and only then becomes a task; a streaming one is a task.
While a batch is handed out, ``arriving`` counts its requests still to come: a call the batcher
would compute on the spot, as if alone, joins a batch with them instead.

Every method, status and trailing metadata is the handler's, as on grpc.aio: handlers see a
``ServicerContext`` with the methods they use (metadata, peer, deadline, trailing metadata,
abort, done callbacks), interceptors run as on grpc.aio, and a call the client cancels, or whose
deadline passes, cancels its handler. ``available()`` says whether the extension was built
(gRPC's C++ library, Debian's ``libgrpc++-dev``, when the server was installed).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import inspect
import logging
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from remoteloss_server.busy_poll import BusyPoll
from remoteloss_server.log_sampling import LogSampler
from remoteloss_server.native_call import Aborted, Call, Context, Details, Metadata, Requests, Resumed
from remoteloss_server.tls_copy import TlsCopy

__all__ = ["TLS_REFRESH_S", "NativeServer", "available"]

# How often gRPC's C++ core reads the TLS files again (a ``TlsCopy``, which changes only when the
# server loads new files): a SIGHUP's renewal reaches new handshakes within this. gRPC 1.51's C++
# API has no reload on demand.
TLS_REFRESH_S = 1

if TYPE_CHECKING:  # the stubs' generics, which grpc lacks at run time
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Generic = grpc.GenericRpcHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]

logger = logging.getLogger(__name__)

try:
    from remoteloss_server import _front  # type: ignore[attr-defined]  # built from server/native/
except ImportError:  # pragma: no cover - built wherever CI runs
    _front = None


def available() -> bool:
    """Whether ``--front native`` can run here: the extension was built."""
    return _front is not None


class NativeServer:
    """A ``grpc.aio.Server`` in shape (the methods ``app`` uses), served by gRPC's C++ core."""

    def __init__(self, interceptors: Sequence[_Interceptor], options: Sequence[tuple[str, int]], *,
                 max_connections: int = 2**20, reuse_port: bool = False, threads: int = 1, memory_bytes: int = 0,
                 tls: TlsCopy | None = None, busy_poll_s: float = 0.0) -> None:
        if _front is None:
            raise RuntimeError("--front native: this installation has no native front (install libgrpc++-dev, reinstall)")
        self._interceptors = tuple(interceptors)
        self._options = [(name, int(value)) for name, value in options]
        self._threads = threads
        self._memory_bytes = memory_bytes
        self._tls = tls
        self._max_connections = max_connections
        self._reuse_port = reuse_port
        self._listeners: list[socket.socket] = []
        self._generic: list[_Generic] = []
        self._registered: dict[str, _Handler] = {}
        self._front: Any = None
        self._calls: dict[int, Call] = {}
        self._streams = 0  # of the calls, those whose client streams its requests
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        self.arriving = 0  # requests of the batch being handed out whose handlers have not run yet
        self._log = LogSampler()  # a flood of failing calls is not a flood of lines
        self._busy = BusyPoll(busy_poll_s)  # the loop turns on for a moment after each batch of events

    def add_generic_rpc_handlers(self, handlers: Sequence[_Generic]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, _Handler]) -> None:
        for name, handler in handlers.items():
            self._registered[f"/{service}/{name}"] = handler

    def add_insecure_port(self, address: str) -> int:
        """Listen on ``address`` in plaintext; the bound port, or RuntimeError if it cannot. The
        sockets are this process's, so that the front can count the connections it accepts
        (gRPC 1.51 cannot bound them)."""
        if self._tls is not None:
            raise RuntimeError("this front was given TLS files: add_secure_port")
        return self._bind(address, None)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        """Listen on ``address`` with TLS from the copy given at construction (``credentials``,
        grpc.aio's, hold the same certificates: gRPC's C++ core reads the copy's files itself)."""
        if self._tls is None:
            raise RuntimeError("this front was given no TLS files")
        cert, key, client_ca = self._tls.paths()
        return self._bind(address, (cert, key, client_ca or "", TLS_REFRESH_S))

    def _bind(self, address: str, tls: tuple[str, str, str, int] | None) -> int:
        if self._front is not None:
            raise RuntimeError("the native front listens on one address")
        self._listeners, port = _listen(address, self._reuse_port)
        try:
            fds = [sock.fileno() for sock in self._listeners]
            self._front = _front.Front(fds, self._options, self._max_connections, self._threads, self._memory_bytes, tls)
        except BaseException:
            _close(self._listeners)
            raise
        return port

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._front.fileno(), self._on_events)

    async def stop(self, grace: float | None) -> None:
        """Take no new call; those under way get ``grace`` seconds (None: none), then are cancelled."""
        try:
            await self._shut_down(grace)
        finally:
            if self._tls is not None:
                self._tls.close()  # after the core's shutdown: it reads the files until then

    async def _shut_down(self, grace: float | None) -> None:
        if self._front is None:
            return
        if self._loop is None:  # never started: nothing is under way
            self._front.shutdown(0.0)
            _close(self._listeners)
            return
        await asyncio.to_thread(self._front.shutdown, 0.0 if grace is None else grace)
        _close(self._listeners)
        self._on_events()  # the last events: the calls' ends
        self._loop.remove_reader(self._front.fileno())
        for call in list(self._calls.values()):
            if call.task is not None:
                call.task.cancel()
        self._calls.clear()
        self._streams = 0
        self._stopped.set()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ---- events ----

    def _on_events(self) -> None:
        events = self._front.take()
        self.arriving = sum(1 for event in events if event[0] in _ARRIVALS)
        for event in events:
            if event[0] in _ARRIVALS:
                self.arriving -= 1
            try:
                self._event(event)
            except Exception as exc:  # one call's failure is that call's alone: the batch goes on
                self._log.log(logger, logging.ERROR, ("failed",), "event=native_call_failed error=%s", repr(exc))
                # The call stays known until its DONE, which runs its done callbacks (budgets).
                self._front.finish(event[1], grpc.StatusCode.INTERNAL.value[0], "internal error", (), None)
        if len(self._calls) == self._streams:  # no call but client streams (busy or idle) in flight: poll for
            self._busy.touch()  # the next; with calls in flight, their events come anyway

    def _event(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == _START:
            self._start(*event[1:])
            return
        call = self._calls.get(event[1])
        if call is None:
            return
        if kind == _DONE:
            del self._calls[event[1]]
            self._streams -= call.requests is not None
            call.context.on_done(event[2])
            if event[2] and call.task is not None:
                call.task.cancel()
        elif kind == _WRITTEN:
            call.context.on_written()
        elif call.requests is not None:  # MESSAGE, HALF_CLOSE
            call.requests.arrived(event[2] if kind == _MESSAGE else None)
        elif call.handler is not None:  # a unary call's request
            self._unary_request(call, event[2] if kind == _MESSAGE else None)

    def _start(self, call_id: int, method: str, metadata: Metadata, deadline: float | None, peer: str,
               first: bytes | None) -> None:
        """A call's headers have come (``first``: its first message, if it came with them): its
        handler is looked up and interceptors run now, before its request is read."""
        context = Context(self._front, call_id, metadata, deadline, peer)
        call = Call(context, contextvars.copy_context().run)
        self._calls[call_id] = call
        handler = self._handler(method, metadata, call.run)
        if handler is None:
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            context.set_details("Method not found!")
            context.finish(None)
        elif handler.request_streaming:
            call.requests = Requests(self._front, call_id, first, handler.request_deserializer)
            self._streams += 1
            self._behave(call, handler, call.requests)
        else:
            call.handler = handler
            if first is not None:
                self._unary_request(call, first)

    def _unary_request(self, call: Call, message: bytes | None) -> None:
        handler, call.handler = call.handler, None
        assert handler is not None
        if message is None:
            call.context.set_code(grpc.StatusCode.INTERNAL)
            call.context.set_details("a unary call without its request")
            call.context.finish(None)
            return
        deserialize = handler.request_deserializer
        try:
            request = message if deserialize is None else call.run(deserialize, message)
        except Exception:  # bytes that are not the method's message: the caller's fault, as grpc.aio says
            call.context.set_code(grpc.StatusCode.INTERNAL)
            call.context.set_details("Exception deserializing request!")
            call.context.finish(None)
            return
        self._behave(call, handler, request)

    def _behave(self, call: Call, handler: _Handler, requests: Any) -> None:
        """Run the handler: on the spot to its end, or as a task from where it has to wait."""
        context, run = call.context, call.run
        if handler.response_streaming:
            behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
            assert behavior is not None
            context.serialize = handler.response_serializer
            call.task = self._task(self._stream(call, behavior, requests), run)
            return
        behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary
        coro = self._unary(call, run(behavior, requests, context), handler.response_serializer)
        try:
            yielded = run(coro.send, None)
        except StopIteration:
            return
        call.task = self._task(Resumed(coro, yielded), run)

    def _task(self, coro: Coroutine[Any, Any, None], run: Callable[..., Any]) -> asyncio.Task[None]:
        assert self._loop is not None
        return run(self._loop.create_task, coro)  # type: ignore[no-any-return]

    def _handler(self, method: str, metadata: Metadata, run: Callable[..., Any]) -> _Handler | None:
        if not self._interceptors:
            return self._lookup(method)
        details = Details(method, metadata)

        async def lookup(details: Any) -> _Handler | None:
            return self._lookup(details.method)

        continuation: Callable[[Any], Any] = lookup
        for interceptor in reversed(self._interceptors):
            continuation = _bind(interceptor, continuation)
        try:
            run(continuation(details).send, None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        raise RuntimeError("an interceptor waited: the native front runs interceptors on the spot")

    def _lookup(self, method: str) -> _Handler | None:
        handler = self._registered.get(method)
        if handler is not None:
            return handler
        details = Details(method, ())
        for generic in self._generic:
            handler = generic.service(details)  # type: ignore[arg-type]
            if handler is not None:
                return handler
        return None

    async def _unary(self, call: Call, answer: Coroutine[Any, Any, Any], serialize: Callable[[Any], bytes] | None) -> None:
        context = call.context
        try:
            response = await answer
        except Aborted:
            context.finish(None)
        except asyncio.CancelledError:
            if not context.done_:  # the server's stop cancelled it
                context.set_code(grpc.StatusCode.CANCELLED)
                context.finish(None)
        except Exception as exc:
            _unexpected(context, exc)
        else:
            context.finish(response if serialize is None else serialize(response))

    async def _stream(self, call: Call, behavior: Callable[..., Any], requests: Any) -> None:
        """A streaming answer: an async generator's items, or what a coroutine wrote (as grpc.aio)."""
        context = call.context
        try:
            answers = behavior(requests, context)
            if inspect.iscoroutine(answers):
                await answers
            else:
                async for answer in answers:
                    await context.write(answer)
                    del answer  # not held while the next is awaited: an idle stream pins nothing
        except Aborted:
            pass
        except asyncio.CancelledError:
            if context.done_:
                return
            context.set_code(grpc.StatusCode.CANCELLED)
        except Exception as exc:
            _unexpected(context, exc)
            return
        context.finish(None)


def _listen(address: str, reuse_port: bool) -> tuple[list[socket.socket], int]:
    """Listening sockets for ``address`` ("host:port"; port 0 picks one, the same for every
    address the host names) as gRPC binds them: "localhost" on each loopback address it has, "[::]"
    on every interface in both IPv6 and IPv4."""
    host, _, port_text = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    port = int(port_text)
    # "localhost" is both loopback addresses, whatever /etc/hosts says, as gRPC binds it.
    names = ("127.0.0.1", "::1") if host == "localhost" else (host or None,)
    try:
        found = [info for name in names
                 for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)]
    except OSError as exc:
        raise RuntimeError(f"cannot resolve {host!r}: {exc}") from None
    listeners: list[socket.socket] = []
    for family, kind, proto, _, where in dict.fromkeys(found):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and where[0] == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((where[0], port, *where[2:]))
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            sock.close()
            if listeners and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # e.g. "localhost" on a host without IPv6
            _close(listeners)
            raise RuntimeError(str(exc)) from None
        listeners.append(sock)
        port = port or sock.getsockname()[1]
    if not listeners:
        raise RuntimeError(f"{host!r} has no address to listen on")
    return listeners, port


def _close(listeners: list[socket.socket]) -> None:
    for sock in listeners:
        sock.close()
    listeners.clear()


def _bind(interceptor: _Interceptor, continuation: Callable[[Any], Any]) -> Callable[[Any], Any]:
    async def intercepted(details: Any) -> Any:
        return await interceptor.intercept_service(continuation, details)

    return intercepted


def _unexpected(context: Context, exc: Exception) -> None:
    logger.error("a handler failed", exc_info=exc)
    context.set_code(grpc.StatusCode.UNKNOWN)
    context.set_details(f"Unexpected {type(exc)}: {exc}")
    context.finish(None)


if _front is not None:
    _START, _MESSAGE, _HALF_CLOSE, _WRITTEN, _DONE = (
        _front.START, _front.MESSAGE, _front.HALF_CLOSE, _front.WRITTEN, _front.DONE
    )
    _ARRIVALS = frozenset((_START, _MESSAGE))  # the events that may bring a request
