"""The Open Inference Protocol over HTTP/REST (``/v2/...``), served by aiohttp on ``http_port``
in the server's own process and event loop, in front of the same ``oip_door.Door`` as gRPC.

Endpoints: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{m}``,
``/v2/models/{m}/ready``, ``/v2/models/{m}/config``, ``/v2/models/{m}/stats``,
``/v2/models/stats``, ``POST /v2/models/{m}/infer``, and each ``/v2/models/{m}/...`` also as
``/v2/models/{m}/versions/{v}/...``. Bodies are ``oip_json``'s. Errors are ``{"error": message}``
with the HTTP status of the gRPC code (``STATUS``), the message the gRPC call would carry.

Who may call and what it may spend, as for gRPC: with API keys, every path but
``/v2/health/*`` needs ``Authorization: Bearer <key>`` (401 from the headers alone); a body
longer than ``max_message_bytes`` is refused from its ``Content-Length`` (413) and never read
past that size (aiohttp's ``client_max_size``); the in-flight budgets are taken from the
``Content-Length`` before the body is read and held until the answer is written, so an inference
without one (a chunked body) is refused (400) before it is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

from remoteloss_server import oip, oip_json
from remoteloss_server.auth import ApiKeyInterceptor
from remoteloss_server.busy_poll import BusyPoll
from remoteloss_server.errors import DeadlineExceededError, InvalidArgumentError, ServiceError, UnavailableError
from remoteloss_server.oip_door import Door
from remoteloss_server.status import MAX_DETAILS
from remoteloss_server.telemetry import REQUEST_ID_KEY, TENANT, quote, request_id

__all__ = ["PROTOCOL", "STATUS", "HttpServer", "start"]

logger = logging.getLogger(__name__)

PROTOCOL = "oip_http"  # the metrics' protocol label
HEADER_LENGTH = "Inference-Header-Content-Length"
# JSON parsed at most per request (its header, or the whole body without binary data): json.loads
# holds the GIL throughout, stalling every other caller, thread or not: on a 2-core Xeon 20 ms a
# MiB of floats, 30 of small integers, 35 of small objects, 97 of empty lists (bench figures in
# docs/DESIGN.md). So at most 1 MiB (about 100,000 floats); larger tensors travel as binary data
# (the JSON only describes them).
MAX_JSON_BYTES = 1024 * 1024
# An inference's budgets are taken from its Content-Length before its body is read, so a body that
# never comes would hold them: it must arrive within BODY_BASE_S plus a second per BODY_MIN_RATE
# bytes (gRPC, by contrast, hands a handler only whole requests).
BODY_BASE_S = 5.0
BODY_MIN_RATE = 8 * 1024 * 1024  # bytes a second
# gRPC code name -> HTTP status, as Triton and KServe answer them.
STATUS = {
    "INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "UNIMPLEMENTED": 501, "CANCELLED": 499, "INTERNAL": 500,
}
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(code: str, message: str) -> web.Response:
    return web.json_response({"error": message[:MAX_DETAILS]}, status=STATUS.get(code, 500))


def _failure(exc: Exception, where: str) -> tuple[str, str]:
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    logger.error("%s failed", where, exc_info=exc)
    return "INTERNAL", "internal error"


class HttpServer:
    """The running HTTP front end; ``stop(grace_s)`` lets requests in flight finish first."""

    def __init__(self, runner: web.AppRunner, listener: asyncio.Server, port: int) -> None:
        self._runner, self._listener, self.port = runner, listener, port

    async def stop(self, grace_s: float) -> None:
        self._listener.close()  # no new connections; the open ones finish below
        self._runner._shutdown_timeout = grace_s  # aiohttp's: how long open requests may finish
        await self._runner.cleanup()


HANDSHAKE_TIMEOUT_S = 10.0  # a TLS connection's handshake, as gRPC's port allows
# A connection without a request in progress is closed this long after it opened or after its
# last answer: an idle keep-alive connection, and one whose request line and headers trickle in
# (aiohttp's timer runs from the last answer, not from the last byte). aiohttp's own default is
# an hour (3630 s in aiohttp 3.14), which would let a caller hold a place of max_connections that long.
KEEPALIVE_S = 75.0
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


class _Full(asyncio.Protocol):
    """A connection past ``max_connections``: answered 503 and closed, nothing read."""

    def __init__(self, limit: int) -> None:
        body = json.dumps({"error": f"the server has its max_connections ({limit}) open; retry later, "
                                    "or on a connection already open"}).encode()
        self._answer = _FULL % (len(body), body)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream's transport, though not always a subclass of asyncio.Transport (uvloop's are not).
        cast(asyncio.Transport, transport).write(self._answer)
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted in ``slots`` from its accept until it is
    lost. A TLS connection whose handshake fails never reaches ``connection_made`` nor
    ``connection_lost``: its place is given back once the handshake's time is up."""

    def __init__(self, inner: asyncio.Protocol, slots: _Slots, tls: bool) -> None:
        self._inner, self._slots, self._held = inner, slots, True
        self._expiry = (asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S + 1.0, self._release)
                        if tls else None)

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._slots.taken -= 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Slots:
    """At most ``limit`` connections at once: ``protocol()`` makes each accepted connection's
    protocol, aiohttp's while a place is free, else ``_Full``; refusals are logged at most once a
    second. Counted from the accept, since a burst of accepts runs before any connection is made."""

    def __init__(self, server: web.Server, limit: int, tls: bool) -> None:
        self._server, self.limit, self._tls = server, limit, tls
        self.taken = 0
        self._logged = 0.0

    def protocol(self) -> asyncio.BaseProtocol:
        if self.taken < self.limit:
            self.taken += 1
            return _Counted(self._server(), self, self._tls)
        if time.monotonic() - self._logged >= 1.0:
            self._logged = time.monotonic()
            logger.warning("event=connection_refused port=http reason=max_connections limit=%d", self.limit)
        return _Full(self.limit)


class _Routes:
    def __init__(self, door: Door, keys: ApiKeyInterceptor | None, busy: BusyPoll) -> None:
        self.door, self.keys = door, keys
        self.busy, self.inferring = busy, 0  # the loop polls once no inference is in flight (busy_poll)

    @web.middleware
    async def guard(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """API keys (every path but health), then the handler; errors as the protocol's JSON."""
        if self.keys is not None and not request.path.startswith("/v2/health/"):
            tenant, reason = self.keys.tenant_of(request.headers.getall("Authorization", []))
            if tenant is None:
                self.keys.log_sampler.log(logger, logging.INFO, ("unauthenticated", "http"),
                                          "event=unauthenticated method=%s reason=%s", quote(request.path), quote(reason))
                return _error(
                    "UNAUTHENTICATED",
                    f"{reason}: send the header 'Authorization: Bearer <key>' with a key this server accepts",
                )
            TENANT.set(tenant)
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: an unknown path, a method, a body too large
            if exc.status < 400:
                raise
            return web.json_response({"error": exc.reason if exc.text is None else exc.text}, status=exc.status)
        except Exception as exc:
            return _error(*_failure(exc, request.path))

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.door.ready}, status=200 if self.door.ready else 503)

    async def server(self, request: web.Request) -> web.Response:
        return web.json_response(oip.server_metadata())

    def _model(self, request: web.Request) -> oip.Model:
        return oip.find(request.match_info["model"], request.match_info.get("version", ""))

    async def metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self._model(request).metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        self._model(request)
        return web.json_response({"ready": self.door.ready}, status=200 if self.door.ready else 503)

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(self._model(request).config())

    async def stats(self, request: web.Request) -> web.Response:
        name = request.match_info.get("model", "")
        return web.json_response(self.door.statistics.report(name, request.match_info.get("version", "")))

    async def infer(self, request: web.Request) -> web.StreamResponse:
        """One inference: budgets from Content-Length, then the body, the door, the answer."""
        door, started = self.door, time.perf_counter_ns()
        name = request.match_info["model"]
        size = request.content_length
        record = door.record(name, request_id(request.headers.get(REQUEST_ID_KEY)), size, PROTOCOL)
        ticket = None
        self.inferring += 1
        try:
            if not door.ready:
                raise UnavailableError("the server is draining: send the request to another server")
            size, length = _sizes(request, name)
            ticket = door.admit(size, _connection(request))
            within = BODY_BASE_S + size / BODY_MIN_RATE
            try:
                body = await asyncio.wait_for(request.read(), within)
            except TimeoutError:
                raise DeadlineExceededError(
                    f"{name}: the request's {size} bytes did not arrive within {within:.1f} s"
                ) from None
            version = request.match_info.get("version", "")
            if len(body) > door.inline_bytes:
                sent = await asyncio.to_thread(oip_json.infer_request, name, version, body, length)
            else:
                sent = oip_json.infer_request(name, version, body, length)
            answer = await door.infer(sent, len(body), record, ticket, None, lambda o: oip_json.check_outputs(sent, o))
            warnings = oip.warnings_parameter(answer.result)
            if answer.size > door.inline_bytes:
                data, headers = await asyncio.to_thread(oip_json.response, sent, answer.outputs, warnings)
            else:
                data, headers = oip_json.response(sent, answer.outputs, warnings)
            response = web.Response(body=data, headers=headers)
            await response.prepare(request)
            await response.write_eof()  # written: the budgets are released below
            return response
        except asyncio.CancelledError:
            door.failed(record, name, "CANCELLED", "", time.perf_counter_ns() - started)
            raise
        except web.HTTPRequestEntityTooLarge as exc:
            door.failed(record, name, "RESOURCE_EXHAUSTED", exc.text or "", time.perf_counter_ns() - started)
            raise
        except Exception as exc:
            code, details = _failure(exc, "infer")
            door.failed(record, name, code, details, time.perf_counter_ns() - started)
            return _error(code, details)
        finally:
            if ticket is not None:
                ticket.release()
            self.inferring -= 1
            if not self.inferring:
                self.busy.touch()


def _sizes(request: web.Request, name: str) -> tuple[int, int | None]:
    """The body's size and its JSON header's (None: all of it is JSON), from the headers alone;
    refused (before anything is read) past ``max_message_bytes`` or ``MAX_JSON_BYTES``, or unknown."""
    size = request.content_length
    if size is None:  # chunked: its size, which the budgets need before reading, is unknown
        raise InvalidArgumentError(f"{name}: the request has no Content-Length; send the body with its length, not chunked")
    limit = request.app._client_max_size  # max_message_bytes
    if size > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
    header = request.headers.get(HEADER_LENGTH)
    length = int(header) if header is not None and header.isdigit() else None
    if header is not None and length is None:
        raise InvalidArgumentError(f"{name}: {HEADER_LENGTH} must be a number, got {header!r}")
    if (size if length is None else length) > MAX_JSON_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_JSON_BYTES, actual_size=size if length is None else length,
            text=f"{name}: the request's JSON is over {MAX_JSON_BYTES} bytes; send large tensors as "
            f"binary data ({HEADER_LENGTH} and each input's binary_data_size)",
        )
    return size, length


def _connection(request: web.Request) -> str | None:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    return None if peer is None else f"http:{peer[0]}:{peer[1]}"


def application(
    door: Door, keys: ApiKeyInterceptor | None, max_body_bytes: int, busy_poll_s: float = 0.0
) -> web.Application:
    routes = _Routes(door, keys, BusyPoll(busy_poll_s))
    app = web.Application(middlewares=[routes.guard], client_max_size=max_body_bytes)
    app.router.add_get("/v2/health/live", routes.live)
    app.router.add_get("/v2/health/ready", routes.ready)
    app.router.add_get("/v2", routes.server)
    app.router.add_get("/v2/models/stats", routes.stats)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, routes.metadata)
        app.router.add_get(prefix + "/ready", routes.model_ready)
        app.router.add_get(prefix + "/config", routes.config)
        app.router.add_get(prefix + "/stats", routes.stats)
        app.router.add_post(prefix + "/infer", routes.infer)
    return app


async def start(
    door: Door, host: str, port: int, *, keys: ApiKeyInterceptor | None, max_body_bytes: int,
    tls: ssl.SSLContext | None = None, reuse_port: bool = False, max_connections: int = 4096,
    busy_poll_s: float = 0.0,
) -> HttpServer:
    """Serve on ``host:port`` (0: a free port), at most ``max_connections`` connections open;
    OSError when it cannot be bound. aiohttp's own site has no bound on connections, so the
    listener is asyncio's, on aiohttp's protocol factory (``_Slots``)."""
    # handler_cancellation: a caller that closes its connection cancels its request, as a gRPC
    # cancel does (aiohttp's default since 3.9 computes it anyway, for no one).
    runner = web.AppRunner(application(door, keys, max_body_bytes, busy_poll_s), access_log=None,
                           keepalive_timeout=KEEPALIVE_S, handler_cancellation=True)
    await runner.setup()
    bind: str | None = host.removeprefix("[").removesuffix("]")
    if bind in ("", "::", "0.0.0.0"):  # every address of both families, as gRPC's "[::]" is
        bind = None  # asyncio binds "::" with IPV6_V6ONLY, which would refuse IPv4 callers
    assert runner.server is not None  # set up
    try:
        listener = await asyncio.get_running_loop().create_server(
            _Slots(runner.server, max_connections, tls is not None).protocol, bind, port, ssl=tls,
            reuse_port=reuse_port or None,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if tls is not None else None,
        )
    except OSError:
        await runner.cleanup()
        raise
    return HttpServer(runner, listener, int(listener.sockets[0].getsockname()[1]))
