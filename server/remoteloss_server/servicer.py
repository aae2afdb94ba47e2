"""The ``LossService`` RPCs: the only place gRPC statuses are produced.

Handlers raise the domain errors of ``errors``; ``status_of`` turns them into statuses (directly in
Compute and ComputeStream, through ``translate_errors`` in ListLosses) and anything unexpected into
an opaque INTERNAL, so no exception ever escapes a handler. Compute and ComputeStream take and give
bytes: they parse requests themselves (``receive``), which lets a large request's tensors be read in
place and every size be known without re-serializing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor as Pool
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError, Message
from google.protobuf.wrappers_pb2 import UInt64Value

from remoteloss import codec
from remoteloss import _wire as wire
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server.batcher import Batcher
from remoteloss_server.errors import InvalidArgumentError, ServiceError, UnimplementedError
from remoteloss_server.executor import Executor, Result
from remoteloss_server.field_scan import FieldLimitError, UnknownField, scan
from remoteloss_server.limits import Admission, Ticket, check_elements, request_elements
from remoteloss_server.losses import LOSSES, Call, describe_all
from remoteloss_server.losses.spec import MAX_DIMS
from remoteloss_server.metrics import Metrics
from remoteloss_server.streaming import Stopped, bounded_map
from remoteloss_server.telemetry import REQUEST_ID_KEY, TENANT, RequestRecord, loss_label, request_id

__all__ = [
    "DRAINED_METADATA_KEY",
    "SERVICE_NAME",
    "WORKER_METADATA_KEY",
    "LossServicer",
    "Received",
    "UndecodableRequest",
    "add_to_server",
    "receive",
    "translate_errors",
]

logger = logging.getLogger(__name__)

# Requests up to this size are decoded and checked on the event loop, and their answers encoded
# there; larger ones on a helper thread, so that a big request does not hold up the others. Below
# a few MiB the hop to a thread costs more than the work it moves (measured on loopback).
_INLINE_BYTES = 4 * 1024 * 1024

# An answer waiting to be sent is held twice: the bytes made here, and gRPC's copy of them.
_HELD_COPIES = 2

# A status message's characters at most: gRPC refuses a status past 16 KiB of metadata (the
# caller then sees RESOURCE_EXHAUSTED "Stream removed"), and the message is logged too.
_MAX_DETAILS = 2048

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LossService"].full_name
WORKER_METADATA_KEY = "remoteloss-worker"  # trailing metadata: which worker process answered (--workers > 1)
# Trailing metadata of a ComputeStream that a drain ended (UNAVAILABLE): the answers it sent.
DRAINED_METADATA_KEY = "remoteloss-drained"

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
                raise request.error()
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
        message = str(exc)  # torch's text may quote a request's string option, of any length
        if len(message) > _MAX_DETAILS:
            message = f"{message[:_MAX_DETAILS]}... ({len(message) - _MAX_DETAILS} more characters)"
        return grpc.StatusCode[exc.code], message
    logger.error("%s failed", where, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"


@dataclass(frozen=True)
class UndecodableRequest:
    """Bytes that do not parse as the request message, or that this server will not parse (too
    many fields, too long a string: ``refusal``); the handler answers INVALID_ARGUMENT (gRPC
    itself would answer UNKNOWN)."""

    type_name: str
    reason: str
    id: int | None = None  # a ComputeStreamRequest's id, when it can still be read
    refusal: str | None = None  # the whole message, when the bytes were not parsed on purpose

    def error(self) -> InvalidArgumentError:
        if self.refusal is not None:
            return InvalidArgumentError(self.refusal)
        return InvalidArgumentError(f"the request is not a valid {self.type_name}: {self.reason}")


def _lenient(message_type: type[Message]) -> Callable[[bytes], Message | UndecodableRequest]:
    """A request deserializer that lets undecodable bytes reach the handler."""

    def deserialize(data: bytes) -> Message | UndecodableRequest:
        return receive(data, message_type).message

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


@dataclass(frozen=True)
class Received:
    """A request as the handler got it: the parsed message (or why it did not parse), its size on
    the wire, for a large one where its tensors' bytes lie in the received bytes, and its first
    field unknown to this server."""

    message: Message | UndecodableRequest
    size: int
    payloads: wire.Payloads | None = None
    unknown: UnknownField | None = None


def receive(data: bytes, message_type: type[Message]) -> Received:
    """Parse ``data``, once ``field_scan.scan`` has found its first unknown field, if any, and
    refused it past its limits (``MAX_FIELDS`` fields, ``MAX_STRING_BYTES`` a string). From
    ``wire.SPLIT_BYTES`` on, the tensors' bytes are not copied into the message: ``wire.split``
    leaves them where they are, and the loss reads them there. A request with an unknown field is
    refused: below ``SPLIT_BYTES`` upb parses it all (in C; bytes that do not parse are still
    INVALID_ARGUMENT), from it on it is not parsed (``_unparsed``)."""
    large = len(data) >= wire.SPLIT_BYTES
    try:
        try:
            unknown = scan(data, message_type.DESCRIPTOR)
        except DecodeError:
            if not large:
                message_type.FromString(data)  # raises too, in upb's words, as before the scan
            raise
        if unknown is None:
            message, payloads = wire.parse(data, message_type)
        else:  # refused
            message = _unparsed(message_type, data, unknown) if large else message_type.FromString(data)
            payloads = None
    except DecodeError as exc:
        undecodable = UndecodableRequest(message_type.DESCRIPTOR.full_name, str(exc), _stream_id(message_type, data))
        return Received(undecodable, len(data))
    except FieldLimitError as exc:  # kept as text: its traceback holds the request's bytes
        name, refusal = message_type.DESCRIPTOR.full_name, str(exc)
        return Received(UndecodableRequest(name, refusal, _stream_id(message_type, data), refusal), len(data))
    return Received(message, len(data), payloads, unknown)


def _unparsed(message_type: type[Message], data: bytes, unknown: UnknownField) -> Message:
    """What a large request with an unknown field stands for, unparsed: the messages that lead to
    the field, and a stream item's id. Past the field nothing was scanned, and upb makes 8 bytes of
    each 1-byte entry of a packed field: 16 MiB would become 128 MiB or more."""
    message = message_type()
    inner = message
    for name in unknown.path:
        inner = getattr(inner, name)
        inner.SetInParent()
    sent = _stream_id(message_type, data)
    if sent is not None:
        message.id = sent  # type: ignore[attr-defined]
    return message


def add_to_server(servicer: LossServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as the generated ``add_LossServiceServicer_to_server`` does, except
    that Compute and ComputeStream take and give bytes (they parse and serialize themselves, see
    ``receive``), and ListLosses's deserializer lets undecodable bytes reach ``translate_errors``."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["LossService"].methods:
        request_type: type[Message] = getattr(pb, method.input_type.name)
        response_type: type[Message] = getattr(pb, method.output_type.name)
        streams = (method.client_streaming, method.server_streaming)
        if streams not in ((True, True), (False, False)):  # pragma: no cover - the schema has no such RPC
            raise TypeError(f"{method.name}: one-sided streaming is not wired")
        make = grpc.stream_stream_rpc_method_handler if streams[0] else grpc.unary_unary_rpc_method_handler
        raw = method.name in _RAW_METHODS
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=None if raw else _lenient(request_type),
            response_serializer=None if raw else response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


_RAW_METHODS = frozenset({"Compute", "ComputeStream"})


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
        self._draining = asyncio.Event()  # set by drain(): streams read no more requests
        codec.allow_read_only_buffers()  # now, before any compute thread records warnings

    async def Compute(self, data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        """One serialized ComputeRequest in, one serialized ComputeResponse out. Each request is
        recorded (metrics, the ``x-request-id`` echo as trailing metadata, one log line per
        failure) before its answer or status goes out, so a scrape after a reply always counts it."""
        received = receive(data, pb.ComputeRequest)
        parsed = isinstance(received.message, Message)
        record = RequestRecord(
            self._metrics, loss_label(received.message, received.unknown is not None), _request_id(context),
            received.size if parsed else None,
        )
        context.set_trailing_metadata(((REQUEST_ID_KEY, record.request_id), *self._worker))
        try:
            ticket = self._admit(received.size, context)
            if ticket is not None:  # the answer counts until gRPC has sent it (or the call ended)
                context.add_done_callback(lambda _: ticket.release())  # type: ignore[arg-type]  # stubs: a class
            response = await self._compute(received, record, context, ticket)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            record.finish("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")
            raise
        except Exception as exc:
            code, details = status_of(exc, "Compute")
            record.finish(code.name, details=details)
        else:
            record.finish("OK", len(response))
            return response
        # Aborted outside the except block and without the request: gRPC keeps the abort's
        # traceback, this frame included, in a reference cycle until the garbage collector runs,
        # and a refused request's bytes must not wait for it.
        del data, received
        await context.abort(code, details)
        raise AssertionError("context.abort returned")  # pragma: no cover

    stream_window = 64  # unanswered requests per ComputeStream; no more are read until one is answered

    async def ComputeStream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        """Each serialized ComputeStreamRequest through ``_compute``, ``stream_window`` at a time,
        answered (a serialized ComputeStreamResponse) as each finishes.

        An item's failure is its answer's ``error``; only an item whose id cannot be read, or a
        failure of the stream itself, ends the stream. Each item is recorded as one request, with
        the request id ``<the stream's x-request-id>/<item id>``.

        Once ``drain()`` is called, the stream reads no more requests, sends the answers of those
        it has read, and ends with UNAVAILABLE and the trailing metadata ``remoteloss-drained:
        <answers sent>``: a request without an answer was not taken (unless the client had
        half-closed and every request was read: then the stream ends OK as usual).
        """
        stream_id = _request_id(context)
        _add_trailing_metadata(context, ((REQUEST_ID_KEY, stream_id), *self._worker))

        unsent: set[Ticket] = set()  # the budgets of answers computed and not yet written

        def respond(data: bytes) -> Awaitable[tuple[bytes, Ticket | None]]:
            return self._stream_item(data, context, stream_id, unsent)

        answered = 0
        try:
            answers = bounded_map(requests, respond, self.stream_window, stop=self._draining)
            async for answer, ticket in answers:
                yield answer  # resumes once gRPC has taken the answer
                answered += 1
                if ticket is not None:
                    ticket.release()
                    unsent.discard(ticket)
        except Stopped:
            logger.info("event=stream_drained request_id=%s answered=%d", stream_id, answered)
            _add_trailing_metadata(context, ((DRAINED_METADATA_KEY, str(answered)),))
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the server is draining: it answered every request it took on this stream ({answered}); "
                "the requests without an answer were not taken: send them again on a new stream",
            )
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await context.abort(*status_of(exc, "ComputeStream"))
        finally:
            for ticket in unsent:
                ticket.release()

    def drain(self) -> None:
        """Begin the drain: every ComputeStream, open or new, stops reading requests, answers
        those it has read, and ends (see ComputeStream). Call it on the server's event loop."""
        self._draining.set()

    async def _stream_item(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], stream_id: str, unsent: set[Ticket]
    ) -> tuple[bytes, Ticket | None]:
        """One item's answer, an error included, and its place in the budgets (added to
        ``unsent`` until the stream has written the answer); raises only for an undecodable item
        without an id."""
        received = receive(data, pb.ComputeStreamRequest)
        item = received.message
        assert isinstance(item, pb.ComputeStreamRequest | UndecodableRequest)
        if isinstance(item, UndecodableRequest) and item.id is None:
            raise item.error()
        inner = item.request if isinstance(item, pb.ComputeStreamRequest) else item
        record = RequestRecord(
            self._metrics, loss_label(inner, received.unknown is not None), f"{stream_id}/{item.id}",
            received.size if isinstance(item, Message) else None,
        )
        ticket = None
        try:
            ticket = self._admit(received.size, context)
            if ticket is not None:
                unsent.add(ticket)
            if isinstance(item, UndecodableRequest):
                raise item.error()
            unknown = received.unknown
            if unknown is not None and not unknown.path:
                raise UnimplementedError(
                    f"the stream request holds field {unknown.number}, which this server does not know; "
                    "it may come from a newer client"
                )
            request = Received(item.request, received.size, received.payloads, unknown and unknown.below("request"))
            response = await self._compute(request, record, context, ticket)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            record.finish("CANCELLED")
            if ticket is not None:
                ticket.release()
            raise
        except Exception as exc:
            code, message = status_of(exc, "ComputeStream")
            record.finish(code.name, details=message)
            error = pb.Error(code=code.value[0], message=message)
            return pb.ComputeStreamResponse(id=item.id or 0, error=error).SerializeToString(), ticket
        record.finish("OK", len(response))
        # ComputeStreamResponse{id, response} written around the answer's bytes, not re-parsed.
        return pb.ComputeStreamResponse(id=item.id).SerializeToString() + wire.length_delimited(2, response), ticket

    def _admit(self, size: int, context: grpc.aio.ServicerContext[Any, Any]) -> Ticket | None:
        """A place in the in-flight budgets (the server's, the caller's tenant's and connection's)
        for a request of ``size`` bytes; ResourceExhaustedError when one is spent. The caller
        releases it once the answer has left."""
        if self._admission is None:
            return None
        return self._admission.admit(size, tenant=TENANT.get(), connection=context.peer())

    async def _compute(
        self,
        received: Received,
        record: RequestRecord,
        context: grpc.aio.ServicerContext[Any, Any],
        ticket: Ticket | None,
    ) -> bytes:
        """One admitted request, from checks to serialized answer: the path of Compute and of
        every ComputeStream item. The answer's bytes join ``ticket``'s budgets.

        Raises the domain errors of ``errors``; never aborts the call, which a stream's items share.
        """
        request = received.message
        if isinstance(request, UndecodableRequest):
            raise request.error()
        assert isinstance(request, pb.ComputeRequest)
        answer = await self._answer(request, received, record, context, ticket)
        if ticket is not None:
            ticket.answered(_HELD_COPIES * len(answer))
        return answer

    async def _answer(
        self,
        request: pb.ComputeRequest,
        received: Received,
        record: RequestRecord,
        context: grpc.aio.ServicerContext[Any, Any],
        ticket: Ticket | None,
    ) -> bytes:
        if received.unknown is not None:
            raise UnimplementedError(
                f"the request holds {received.unknown.describe()}, which this server does not know; "
                "it may come from a newer client"
            )
        name = request.WhichOneof("loss")
        if name is None:
            raise InvalidArgumentError("no loss set in the request")
        if name not in LOSSES:
            raise UnimplementedError(f"{name} is not served here")
        # From the shapes, before decoding: the loss's arguments (counted in the metrics) and grad_output.
        record.elements = request_elements(getattr(request, name), max_dims=MAX_DIMS, where=name)
        incoming = (
            request_elements(request.grad_output, max_dims=MAX_DIMS, where=f"{name}: grad_output")
            if request.HasField("grad_output") else 0
        )
        check_elements(name, record.elements + incoming, self._max_request_elements)
        payloads = received.payloads
        if self._batcher is None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._compute_blocking, name, request, payloads)
        limit = self._max_elements
        call, grad_output = (
            await asyncio.to_thread(_prepare, name, request, limit, payloads)
            if received.size > _INLINE_BYTES
            else _prepare(name, request, limit, payloads)
        )
        if ticket is not None:  # its answer counts from now; one that could never fit is refused
            ticket.reserve(*_held_bytes(call), name)
        remaining = context.time_remaining()
        deadline = None if remaining is None else self._batcher.clock() + remaining
        # Alone in the server, a request has nothing to wait for: the batcher may compute it at once.
        # One turn of the event loop first lets requests that arrived with it show themselves.
        lone = False
        if self._admission is not None and self._admission.pending == 1 and self._batcher.idle:
            await asyncio.sleep(0)
            lone = self._admission.pending == 1
        result = await self._batcher.submit(call, grad_output, deadline, lone=lone, tenant=record.tenant)
        large = sum(t.nbytes for t in (result.loss, *result.gradients.values())) > _INLINE_BYTES
        return await asyncio.to_thread(_serialize, result) if large else _serialize(result)

    @translate_errors
    async def ListLosses(
        self,
        request: pb.ListLossesRequest,
        context: grpc.aio.ServicerContext[pb.ListLossesRequest, pb.ListLossesResponse],
    ) -> pb.ListLossesResponse:
        return self._catalog

    def _compute_blocking(self, name: str, request: pb.ComputeRequest, payloads: wire.Payloads | None) -> bytes:
        """Decode, validate, compute and serialize; runs on a compute thread."""
        return _serialize(self._executor.run(*_prepare(name, request, self._max_elements, payloads)))


def _prepare(
    name: str, request: pb.ComputeRequest, max_elements: int | None = None, payloads: wire.Payloads | None = None
) -> tuple[Call, torch.Tensor | None]:
    """The validated call (its tensors on the host) and the decoded grad_output."""
    call = LOSSES[name].prepare(getattr(request, name), "cpu", max_elements=max_elements, payloads=payloads)
    grad_output = None
    if request.HasField("grad_output"):
        sent = request.grad_output
        try:
            grad_output = codec.decode_torch(
                sent, "grad_output", max_elements=max_elements, max_dims=MAX_DIMS,
                data=None if payloads is None else payloads.resolve(sent.data),
            )
        except ValueError as exc:
            raise InvalidArgumentError(f"{name}: {exc}") from None
    return call, grad_output


def _held_bytes(call: Call) -> tuple[int, int]:
    """About what ``call`` will hold: its answer as held until sent (``_HELD_COPIES`` times the
    loss, as large as the call's largest tensor with ``reduction="none"``, and a gradient for each
    argument that requires one), and the most it holds at once (that largest tensor, computing,
    and the answer)."""
    tensors = call.tensors.values()
    itemsize = max((t.element_size() for t in tensors if t.is_floating_point()), default=8)  # the loss's dtype
    largest = max(max((t.numel() for t in tensors), default=0), call.implied_elements)
    loss = largest if call.options.get("reduction") == "none" else 1
    gradients = sum(call.tensors[name].numel() for name in call.requires_grad)
    answer = itemsize * _HELD_COPIES * (loss + gradients)
    return answer, itemsize * largest + answer


def _serialize(result: Result) -> bytes:
    """The serialized ComputeResponse. From ``wire.SPLIT_BYTES`` of tensor data on, each tensor is
    written once, straight from its memory, instead of through ``tobytes``, the message and its
    serialization (``wire.attach``, ``wire.serialize``)."""
    messages, tensors = {}, []
    for name, value in {"loss": result.loss, **result.gradients}.items():
        messages[name], data = codec.encode_view(value, name=name, requires_grad=False)
        tensors.append((messages[name], data))
    payloads = wire.attach(tensors)
    loss = messages.pop("loss")
    return wire.serialize(pb.ComputeResponse(loss=loss, gradients=messages, warnings=result.warnings), payloads)


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's ``x-request-id`` when well formed, else a new one."""
    sent = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_KEY), None)
    return request_id(sent if isinstance(sent, str) else None)


def _add_trailing_metadata(
    context: grpc.aio.ServicerContext[Any, Any], pairs: tuple[tuple[str, str], ...]
) -> None:
    """Add ``pairs`` to the trailing metadata set so far (``set_trailing_metadata`` replaces it)."""
    if pairs:
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), *pairs))
