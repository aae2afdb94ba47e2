"""gRPC statuses from the domain errors of ``errors``, and the call metadata every protocol's
servicer reads and writes: the only place a ``ServiceError`` becomes a status.

``status_of(exc, where)`` gives a ``ServiceError`` its own code and message (cut to
``MAX_DETAILS``) and turns anything else into an opaque INTERNAL, logged with its traceback;
``translate_errors`` wraps a unary handler with it, so no exception ever escapes a handler.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from types import ModuleType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from remoteloss_server.errors import ServiceError
from remoteloss_server.intake import UndecodableRequest, receive
from remoteloss_server.telemetry import REQUEST_ID_KEY, request_id

__all__ = [
    "MAX_DETAILS", "add_trailing_metadata", "caller_request_id", "final", "register", "register_foreign", "status_of",
    "tolerant", "translate_errors",
]

logger = logging.getLogger(__name__)

# A status message's characters at most: gRPC refuses a status past 16 KiB of metadata (the
# caller then sees RESOURCE_EXHAUSTED "Stream removed"), and the message is logged too.
MAX_DETAILS = 2048

# gRPC's retry policy (the SDK's retries RESOURCE_EXHAUSTED) reads this trailer: a negative
# pushback means "do not retry". RESOURCE_EXHAUSTED has two sources: gRPC's core sheds a call
# (RST_STREAM, ENHANCE_YOUR_CALM) when what it holds of requests not yet whole fills its memory
# quota, whoever's call it is and before any handler saw it, so that one is safe to retry;
# a budget or queue of the server's own refusing a request is an answer, and says so.
_NO_RETRY = ("grpc-retry-pushback-ms", "-1")

_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Handler = Callable[[_S, _Req, grpc.aio.ServicerContext[_Req, _Resp]], Awaitable[_Resp]]


def status_of(exc: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    """The status for an exception: a ``ServiceError``'s own code and message; anything else is
    logged with its traceback and becomes an opaque INTERNAL."""
    if isinstance(exc, ServiceError):
        message = str(exc)  # torch's text may quote a request's string option, of any length
        if len(message) > MAX_DETAILS:
            message = f"{message[:MAX_DETAILS]}... ({len(message) - MAX_DETAILS} more characters)"
        return grpc.StatusCode[exc.code], message
    logger.error("%s failed", where, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"


def final(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode) -> None:
    """Tell gRPC's retry policy not to retry ``code`` when it is a RESOURCE_EXHAUSTED of the
    server's own (see ``_NO_RETRY``); call it before aborting with ``code``."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        add_trailing_metadata(context, (_NO_RETRY,))


def translate_errors(handler: _Handler[_S, _Req, _Resp]) -> _Handler[_S, _Req, _Resp]:
    """Abort with the status of a ``ServiceError`` (an ``UndecodableRequest`` included); log
    anything else and abort with INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: _S, request: _Req, context: grpc.aio.ServicerContext[_Req, _Resp]) -> _Resp:
        try:
            if isinstance(request, UndecodableRequest):
                raise request.error()
            return await handler(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, details = status_of(exc, handler.__name__)
            final(context, code)
            await context.abort(code, details)
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper


def caller_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's ``x-request-id`` when well formed, else a new one."""
    sent = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_KEY), None)
    return request_id(sent if isinstance(sent, str) else None)


def add_trailing_metadata(context: grpc.aio.ServicerContext[Any, Any], pairs: tuple[tuple[str, str], ...]) -> None:
    """Add ``pairs`` to the trailing metadata set so far (``set_trailing_metadata`` replaces it)."""
    if pairs:
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), *pairs))


def register(
    server: grpc.aio.Server, messages: ModuleType, service: str, servicer: Any, raw: Collection[str],
    lenient: Callable[[type[Message]], Callable[[bytes], Any]] | None = None,
) -> None:
    """Register every RPC of ``service`` (its full name; its messages in the generated module
    ``messages``) as the generated ``add_*Servicer_to_server`` does, except that the methods in
    ``raw`` take and give bytes (they parse and serialize themselves, see ``receive``) and the
    others' deserializers (``lenient(request_type)``; by default ``receive``'s, which refuses
    unknown fields) let undecodable bytes reach ``translate_errors`` (INVALID_ARGUMENT)."""
    deserializer = lenient or _lenient
    handlers = {}
    for method, request_type, response_type, make in _methods(messages, service):
        plain = method.name in raw
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=None if plain else deserializer(request_type),
            response_serializer=None if plain else response_type.SerializeToString,
        )
    _add(server, service, handlers)


_MAKERS = {  # grpc's handler for each (client streaming, server streaming)
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
}


def _methods(messages: ModuleType, service: str) -> Iterator[tuple[Any, type[Message], type[Message], Any]]:
    """Each RPC of ``service``: its descriptor, request and response classes, and grpc's maker of
    its handler."""
    for method in messages.DESCRIPTOR.services_by_name[service.rpartition(".")[2]].methods:
        request_type: type[Message] = getattr(messages, method.input_type.name)
        response_type: type[Message] = getattr(messages, method.output_type.name)
        yield method, request_type, response_type, _MAKERS[method.client_streaming, method.server_streaming]


def _add(server: grpc.aio.Server, service: str, handlers: dict[str, Any]) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]


def _lenient(message_type: type[Message]) -> Callable[[bytes], Message | UndecodableRequest]:
    """A request deserializer that lets undecodable bytes reach the handler."""

    def deserialize(data: bytes) -> Message | UndecodableRequest:
        return receive(data, message_type).message

    return deserialize


def register_foreign(
    server: grpc.aio.Server, messages: ModuleType, service: str, servicer: Any, generated: type
) -> None:
    """Register a servicer this server does not own (health's, reflection's; ``service`` is its
    full name, its messages in ``messages``, ``generated`` the generated servicer it derives from)
    as its generated ``add_*Servicer_to_server`` would, except that bytes that do not parse as a
    request fail that call with INVALID_ARGUMENT before the servicer sees them, and a method the
    servicer does not implement is not registered (gRPC answers UNIMPLEMENTED). The generated code
    answers UNKNOWN and UNIMPLEMENTED, and grpc.aio logs an ERROR with a traceback for each: to
    services open to callers without a key, a flood of log lines."""
    handlers = {}
    for method, request_type, response_type, make in _methods(messages, service):
        if getattr(type(servicer), method.name) is getattr(generated, method.name, None):
            continue  # the generated stub, which raises NotImplementedError
        handlers[method.name] = make(
            _refusing(getattr(servicer, method.name), method.client_streaming),
            request_deserializer=tolerant(request_type),
            response_serializer=response_type.SerializeToString,
        )
    _add(server, service, handlers)


def tolerant(message_type: type[Message]) -> Callable[[bytes], Message | UndecodableRequest]:
    """protobuf's deserializer (unknown fields skipped, as any reader skips them), or, for bytes it
    cannot parse, why: an ``UndecodableRequest``, never an exception."""

    def deserialize(data: bytes) -> Message | UndecodableRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(message_type.DESCRIPTOR.full_name, str(exc))

    return deserialize


def _refusing(method: Callable[..., Any], streamed: bool) -> Callable[..., Any]:
    """``method`` (a coroutine function, an async generator function or a plain function, as
    grpc.aio takes them), aborting its call at an ``UndecodableRequest`` (INVALID_ARGUMENT)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async for request in requests:
            await refuse(request, context)
            yield request
            del request  # not held while the next is awaited: an idle stream pins nothing

    async def vetted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """The request, or the stream of them, as ``method`` takes it: refused where undecodable."""
        if streamed:
            return checked(request, context)
        await refuse(request, context)
        return request

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def each(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async for answer in method(await vetted(request, context), context):
                yield answer
                del answer  # not held while the next is awaited

        return each

    @functools.wraps(method)
    async def once(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        answer = method(await vetted(request, context), context)
        return await answer if inspect.isawaitable(answer) else answer

    return once
