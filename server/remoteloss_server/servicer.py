"""The ``LossService`` RPCs: the only place gRPC statuses are produced.

Handlers raise the domain errors of ``errors``; ``translate_errors`` turns them into statuses and
anything unexpected into an opaque INTERNAL, so no exception ever escapes a handler.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor as Pool
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server.errors import InvalidArgumentError, ServiceError, UnimplementedError
from remoteloss_server.executor import Executor
from remoteloss_server.losses import LOSSES, describe_all

__all__ = ["SERVICE_NAME", "LossServicer", "UndecodableRequest", "add_to_server", "translate_errors"]

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LossService"].full_name

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
        except ServiceError as err:
            await context.abort(grpc.StatusCode[err.code], str(err))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            logger.exception("%s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper


@dataclass(frozen=True)
class UndecodableRequest:
    """Bytes that do not parse as the request message; the handler answers INVALID_ARGUMENT
    (gRPC itself would answer UNKNOWN)."""

    type_name: str
    reason: str


def _lenient(message_type: type[Message]) -> Callable[[bytes], Message | UndecodableRequest]:
    def deserialize(data: bytes) -> Message | UndecodableRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(message_type.DESCRIPTOR.full_name, str(exc))

    return deserialize


def add_to_server(servicer: LossServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as the generated ``add_LossServiceServicer_to_server`` does, with
    deserializers that let undecodable bytes reach ``translate_errors``."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["LossService"].methods:
        request_type: type[Message] = getattr(pb, method.input_type.name)
        response_type: type[Message] = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


class LossServicer(loss_pb2_grpc.LossServiceServicer):
    """Compute and ListLosses. Computations run on ``pool``, never on the event loop."""

    def __init__(self, executor: Executor, pool: Pool) -> None:
        self._executor = executor
        self._pool = pool
        self._catalog = describe_all(LOSSES.values())

    @translate_errors
    async def Compute(
        self, request: pb.ComputeRequest, context: grpc.aio.ServicerContext[pb.ComputeRequest, pb.ComputeResponse]
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
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._compute, name, request)

    @translate_errors
    async def ListLosses(
        self,
        request: pb.ListLossesRequest,
        context: grpc.aio.ServicerContext[pb.ListLossesRequest, pb.ListLossesResponse],
    ) -> pb.ListLossesResponse:
        return self._catalog

    def _compute(self, name: str, request: pb.ComputeRequest) -> pb.ComputeResponse:
        """Decode, validate, compute and encode; runs on a compute thread."""
        call = LOSSES[name].prepare(getattr(request, name), self._executor.device)
        grad_output = None
        if request.HasField("grad_output"):
            try:
                grad_output = codec.decode_torch(request.grad_output, "grad_output")
            except ValueError as exc:
                raise InvalidArgumentError(f"{name}: {exc}") from None
        result = self._executor.run(call, grad_output)
        return pb.ComputeResponse(
            loss=codec.encode(result.loss, name="loss", requires_grad=False),
            gradients={k: codec.encode(v, name=k, requires_grad=False) for k, v in result.gradients.items()},
            warnings=result.warnings,
        )


def _unknown_field(message: Message, path: str = "") -> str | None:
    """The first field unknown to this server's schema, e.g. "field 23 of mse_loss".

    Walks message fields only, never reading a scalar or bytes value (which would copy tensor data).
    """
    unknown = UnknownFieldSet(message)
    if len(unknown):
        return f"field {unknown[0].field_number} of {path or message.DESCRIPTOR.name}"
    for field in message.DESCRIPTOR.fields:
        if field.message_type is None:
            continue
        value: Any = getattr(message, field.name)
        if field.message_type.GetOptions().map_entry:
            children = list(value.values())
        elif field.is_repeated:
            children = list(value)
        else:
            children = [value] if message.HasField(field.name) else []
        for child in children:
            if isinstance(child, Message):
                found = _unknown_field(child, f"{path}.{field.name}" if path else field.name)
                if found is not None:
                    return found
    return None
