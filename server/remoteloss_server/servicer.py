"""The ``LossService`` RPCs: the only place gRPC statuses are produced.

Handlers raise the domain errors of ``errors``; ``translate_errors`` turns them into statuses and
anything unexpected into an opaque INTERNAL, so no exception ever escapes a handler.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor as Pool
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from google.protobuf.wrappers_pb2 import UInt64Value

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server.batcher import Batcher
from remoteloss_server.errors import InvalidArgumentError, ServiceError, UnimplementedError
from remoteloss_server.executor import Executor, Result
from remoteloss_server.limits import Admission, check_request_elements
from remoteloss_server.losses import LOSSES, Call, describe_all
from remoteloss_server.losses.spec import MAX_DIMS
from remoteloss_server.metrics import Metrics
from remoteloss_server.streaming import bounded_map
from remoteloss_server.telemetry import REQUEST_ID_KEY, RequestRecord, request_id

__all__ = [
    "SERVICE_NAME",
    "WORKER_METADATA_KEY",
    "LossServicer",
    "UndecodableRequest",
    "add_to_server",
    "recorded",
    "translate_errors",
]

logger = logging.getLogger(__name__)

# Requests up to this size are decoded and checked on the event loop, and their answers encoded
# there; larger ones on a helper thread, so that a big request does not hold up the others. Below
# a few MiB the hop to a thread costs more than the work it moves (measured on loopback).
_INLINE_BYTES = 4 * 1024 * 1024

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LossService"].full_name
WORKER_METADATA_KEY = "remoteloss-worker"  # trailing metadata: which worker process answered (--workers > 1)

_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Handler = Callable[[_S, _Req, grpc.aio.ServicerContext[_Req, _Resp]], Awaitable[_Resp]]


def translate_errors(handler: _Handler[_S, _Req, _Resp]) -> _Handler[_S, _Req, _Resp]:
    """Abort with the status of a ``ServiceError``; log anything else and abort with INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: _S, request: _Req, context: grpc.aio.ServicerContext[_Req, _Resp]) -> _Resp:
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidArgumentError(f"the request is not a valid {request.type_name}: {request.reason}")
            return await handler(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await context.abort(*status_of(exc, handler.__name__))
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper


def status_of(exc: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    """The status for an exception: a ``ServiceError``'s own code and message; anything else is
    logged with its traceback and becomes an opaque INTERNAL."""
    if isinstance(exc, ServiceError):
        return grpc.StatusCode[exc.code], str(exc)
    logger.error("%s failed", where, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"


def recorded(handler: _Handler[LossServicer, _Req, _Resp]) -> _Handler[LossServicer, _Req, _Resp]:
    """Request metrics, the ``x-request-id`` echo (trailing metadata, also on errors) and one log
    line per failure, around a handler already wrapped in ``translate_errors``. Each request is
    recorded before its answer or status goes out, so a scrape after a reply always counts it."""

    @functools.wraps(handler)
    async def wrapper(
        self: LossServicer, request: _Req, context: grpc.aio.ServicerContext[_Req, _Resp]
    ) -> _Resp:
        sent = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_KEY), None)
        record = RequestRecord(self._metrics, request, request_id(sent if isinstance(sent, str) else None))
        context.set_trailing_metadata(((REQUEST_ID_KEY, record.request_id),))
        try:
            response = await handler(self, request, _RecordingContext(context, record))  # type: ignore[arg-type]
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            record.finish("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")
            raise
        except BaseException:  # after an abort, which recorded it; anything else is recorded here
            code = context.code()
            record.finish(code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN", details=context.details() or "")
            raise
        record.finish("OK", response if isinstance(response, Message) else None)
        return response

    return wrapper


class _RecordingContext:
    """A handler's context whose ``abort`` records the status in the request's record first."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], record: RequestRecord) -> None:
        self._context = context
        self._record = record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", *args: Any, **kwargs: Any) -> NoReturn:
        self._record.finish(code.name, details=details)
        await self._context.abort(code, details, *args, **kwargs)
        raise AssertionError("context.abort returned")  # pragma: no cover


@dataclass(frozen=True)
class UndecodableRequest:
    """Bytes that do not parse as the request message; the handler answers INVALID_ARGUMENT
    (gRPC itself would answer UNKNOWN)."""

    type_name: str
    reason: str
    id: int | None = None  # a ComputeStreamRequest's id, when it can still be read


def _lenient(message_type: type[Message]) -> Callable[[bytes], Message | UndecodableRequest]:
    def deserialize(data: bytes) -> Message | UndecodableRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(message_type.DESCRIPTOR.full_name, str(exc), _stream_id(message_type, data))

    return deserialize


def _stream_id(message_type: type[Message], data: bytes) -> int | None:
    """The id of a ComputeStreamRequest whose ``request`` does not parse: UInt64Value has the id's
    field number and type, and skips field 2 unread, as an unknown field."""
    if message_type is not pb.ComputeStreamRequest:
        return None
    try:
        return int(UInt64Value.FromString(data).value)
    except DecodeError:
        return None


def add_to_server(servicer: LossServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as the generated ``add_LossServiceServicer_to_server`` does, with
    deserializers that let undecodable bytes reach ``translate_errors``."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["LossService"].methods:
        request_type: type[Message] = getattr(pb, method.input_type.name)
        response_type: type[Message] = getattr(pb, method.output_type.name)
        streams = (method.client_streaming, method.server_streaming)
        if streams not in ((True, True), (False, False)):  # pragma: no cover - the schema has no such RPC
            raise TypeError(f"{method.name}: one-sided streaming is not wired")
        make = grpc.stream_stream_rpc_method_handler if streams[0] else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


class LossServicer(loss_pb2_grpc.LossServiceServicer):
    """Compute, ComputeStream and ListLosses. Computations run on ``pool``, never on the event
    loop; each Compute is recorded in ``metrics`` (a private ``Metrics`` when none is given).
    ``worker``, the process's index under ``--workers``, is sent back as the trailing metadata
    ``remoteloss-worker`` of Compute and ComputeStream (nothing when None). With a ``batcher``
    (the server's), calls go through it; without one, each runs alone on ``pool``."""

    def __init__(
        self,
        executor: Executor,
        pool: Pool,
        metrics: Metrics | None = None,
        *,
        worker: int | None = None,
        batcher: Batcher | None = None,
        max_elements: int | None = None,
        max_request_elements: int | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._executor = executor
        self._pool = pool
        self._batcher = batcher
        self._metrics = metrics if metrics is not None else Metrics()
        self._catalog = describe_all(LOSSES.values())
        self._worker = () if worker is None else ((WORKER_METADATA_KEY, str(worker)),)
        self._max_elements = max_elements  # tensor elements a request may imply; None: no limit
        self._max_request_elements = max_request_elements  # declared by one request in all; None: no limit
        self._admission = admission  # bounds the requests in flight; None: no bound

    @recorded
    @translate_errors
    async def Compute(
        self, request: pb.ComputeRequest, context: grpc.aio.ServicerContext[pb.ComputeRequest, pb.ComputeResponse]
    ) -> pb.ComputeResponse:
        _add_trailing_metadata(context, self._worker)
        return await self._compute(request, context)

    stream_window = 64  # unanswered requests per ComputeStream; no more are read until one is answered

    async def ComputeStream(
        self,
        requests: AsyncIterator[pb.ComputeStreamRequest | UndecodableRequest],
        context: grpc.aio.ServicerContext[pb.ComputeStreamRequest, pb.ComputeStreamResponse],
    ) -> AsyncIterator[pb.ComputeStreamResponse]:
        """Each item through ``_compute``, ``stream_window`` at a time, answered as each finishes.

        An item's failure is its answer's ``error``; only an item whose id cannot be read, or a
        failure of the stream itself, ends the stream. Each item is recorded as one request, with
        the request id ``<the stream's x-request-id>/<item id>``.
        """
        sent = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_KEY), None)
        stream_id = request_id(sent if isinstance(sent, str) else None)
        _add_trailing_metadata(context, ((REQUEST_ID_KEY, stream_id), *self._worker))

        def respond(item: pb.ComputeStreamRequest | UndecodableRequest) -> Awaitable[pb.ComputeStreamResponse]:
            return self._stream_item(item, context, stream_id)

        try:
            answers = bounded_map(requests, respond, self.stream_window)
            async for answer in answers:
                yield answer
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await context.abort(*status_of(exc, "ComputeStream"))

    async def _stream_item(
        self,
        item: pb.ComputeStreamRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        stream_id: str,
    ) -> pb.ComputeStreamResponse:
        """One item's answer, an error included; raises only for an undecodable item without an id."""
        if isinstance(item, UndecodableRequest) and item.id is None:
            raise InvalidArgumentError(f"the request is not a valid {item.type_name}: {item.reason}")
        inner = item.request if isinstance(item, pb.ComputeStreamRequest) else item
        record = RequestRecord(self._metrics, inner, f"{stream_id}/{item.id}")
        try:
            if isinstance(item, UndecodableRequest):
                raise InvalidArgumentError(f"the request is not a valid {item.type_name}: {item.reason}")
            unknown = UnknownFieldSet(item)
            if len(unknown):
                raise UnimplementedError(
                    f"the stream request holds field {unknown[0].field_number}, which this server does not know; "
                    "it may come from a newer client"
                )
            response = await self._compute(item.request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            record.finish("CANCELLED")
            raise
        except Exception as exc:
            code, message = status_of(exc, "ComputeStream")
            record.finish(code.name, details=message)
            return pb.ComputeStreamResponse(id=item.id or 0, error=pb.Error(code=code.value[0], message=message))
        record.finish("OK", response)
        return pb.ComputeStreamResponse(id=item.id, response=response)

    async def _compute(
        self, request: pb.ComputeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ComputeResponse:
        """One request, from checks to answer: the path of Compute and of every ComputeStream item.

        Raises the domain errors of ``errors``; never aborts ``context``, which a stream's items share.
        A saturated server (``admission``) refuses it first, with RESOURCE_EXHAUSTED; its place is
        freed when it is answered, fails or is cancelled.
        """
        if self._admission is None:
            return await self._compute_admitted(request, context)
        with self._admission.admit(request.ByteSize()):
            return await self._compute_admitted(request, context)

    async def _compute_admitted(
        self, request: pb.ComputeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ComputeResponse:
        unknown = _unknown_field(request)
        if unknown is not None:
            raise UnimplementedError(
                f"the request holds {unknown}, which this server does not know; it may come from a newer client"
            )
        name = request.WhichOneof("loss")
        if name is None:
            raise InvalidArgumentError("no loss set in the request")
        if name not in LOSSES:
            raise UnimplementedError(f"{name} is not served here")
        check_request_elements(name, request, self._max_request_elements)  # from shapes, before decoding
        if self._batcher is None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._compute_blocking, name, request)
        large = request.ByteSize() > _INLINE_BYTES
        limit = self._max_elements
        call, grad_output = (
            await asyncio.to_thread(_prepare, name, request, limit) if large else _prepare(name, request, limit)
        )
        remaining = context.time_remaining()
        deadline = None if remaining is None else self._batcher.clock() + remaining
        result = await self._batcher.submit(call, grad_output, deadline)
        return await asyncio.to_thread(_response, result) if large else _response(result)

    @translate_errors
    async def ListLosses(
        self,
        request: pb.ListLossesRequest,
        context: grpc.aio.ServicerContext[pb.ListLossesRequest, pb.ListLossesResponse],
    ) -> pb.ListLossesResponse:
        return self._catalog

    def _compute_blocking(self, name: str, request: pb.ComputeRequest) -> pb.ComputeResponse:
        """Decode, validate, compute and encode; runs on a compute thread."""
        return _response(self._executor.run(*_prepare(name, request, self._max_elements)))


def _prepare(
    name: str, request: pb.ComputeRequest, max_elements: int | None = None
) -> tuple[Call, torch.Tensor | None]:
    """The validated call (its tensors on the host) and the decoded grad_output."""
    call = LOSSES[name].prepare(getattr(request, name), "cpu", max_elements=max_elements)
    grad_output = None
    if request.HasField("grad_output"):
        try:
            grad_output = codec.decode_torch(
                request.grad_output, "grad_output", max_elements=max_elements, max_dims=MAX_DIMS
            )
        except ValueError as exc:
            raise InvalidArgumentError(f"{name}: {exc}") from None
    return call, grad_output


def _response(result: Result) -> pb.ComputeResponse:
    return pb.ComputeResponse(
        loss=codec.encode(result.loss, name="loss", requires_grad=False),
        gradients={k: codec.encode(v, name=k, requires_grad=False) for k, v in result.gradients.items()},
        warnings=result.warnings,
    )


def _add_trailing_metadata(
    context: grpc.aio.ServicerContext[Any, Any], pairs: tuple[tuple[str, str], ...]
) -> None:
    """Add ``pairs`` to the trailing metadata set so far (``set_trailing_metadata`` replaces it)."""
    if pairs:
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), *pairs))


def _unknown_field(message: Message, path: str = "") -> str | None:
    """The first field unknown to this server's schema, e.g. "field 23 of mse_loss".

    Walks the message fields that are set, never reading a bytes or string value (which would
    copy tensor data): a message without such fields lists its set fields in one C call.
    """
    unknown = UnknownFieldSet(message)
    if len(unknown):
        return f"field {unknown[0].field_number} of {path or message.DESCRIPTOR.name}"
    kinds, one_by_one = _walk_plan(message.DESCRIPTOR)
    if not kinds:  # no message fields: nothing to descend into
        return None
    if one_by_one:
        present = [
            (field, getattr(message, field.name))
            for field, kind in kinds.items()
            if kind != _SINGLE or message.HasField(field.name)
        ]
    else:
        present = [(field, value) for field, value in message.ListFields() if field in kinds]
    for field, value in present:
        kind = kinds[field]
        children = value.values() if kind == _MAP else value if kind == _REPEATED else (value,)
        for child in children:
            if isinstance(child, Message):
                found = _unknown_field(child, f"{path}.{field.name}" if path else field.name)
                if found is not None:
                    return found
    return None


_SINGLE, _REPEATED, _MAP = range(3)
_WALK_PLANS: dict[Any, tuple[dict[Any, int], bool]] = {}


def _walk_plan(descriptor: Any) -> tuple[dict[Any, int], bool]:
    """How ``_unknown_field`` finds a message type's children, worked out once per type: its
    message fields (single, repeated or map), and whether to check them one by one (the type has
    bytes or string fields, whose values ``ListFields`` would copy)."""
    plan = _WALK_PLANS.get(descriptor)
    if plan is None:
        kinds = {
            f: _MAP if f.message_type.GetOptions().map_entry else _REPEATED if f.is_repeated else _SINGLE
            for f in descriptor.fields
            if f.message_type is not None
        }
        texts = any(f.type in (f.TYPE_BYTES, f.TYPE_STRING) for f in descriptor.fields)
        plan = _WALK_PLANS[descriptor] = (kinds, texts)
    return plan
