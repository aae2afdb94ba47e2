"""``inference.GRPCInferenceService`` (the Open Inference Protocol over gRPC) on the server's gRPC
port: translates between the protocol's messages and ``oip``/``oip_door``, and nothing else.

ModelInfer and ModelStreamInfer take bytes (parsed here, after the call's bytes are known, as the
native Compute does) and give bytes; the other RPCs take messages. An input's bytes come from
``raw_input_contents`` (one entry per input, in order) or from its typed ``contents``; every
output's bytes go into ``raw_output_contents``, as Triton answers. torch's warnings are the
answer's parameter ``warnings`` (a JSON list). The published RPCs not served here (repository,
shared memory, trace, log settings) are not registered, so gRPC answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from remoteloss import _wire as wire
from remoteloss_server import oip, oip_wire
from remoteloss_server.errors import InvalidArgumentError
from remoteloss_server.field_scan import FieldLimitError, scan
from remoteloss_server.inference import grpc_service_pb2 as ipb
from remoteloss_server.limits import Ticket
from remoteloss_server.oip_door import Door
from remoteloss_server.status import caller_request_id, final, register, status_of, tolerant, translate_errors
from remoteloss_server.streaming import Stopped, bounded_map

__all__ = ["PROTOCOL", "SERVICE_NAME", "InferenceServicer", "add_to_server"]

SERVICE_NAME: str = ipb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PROTOCOL = "oip_grpc"  # the metrics' protocol label
_RAW = frozenset({"ModelInfer", "ModelStreamInfer"})
# Typed contents: the InferTensorContents field and numpy dtype of each datatype that has one.
_CONTENTS = {
    "BOOL": ("bool_contents", "|b1"), "UINT8": ("uint_contents", "|u1"), "INT8": ("int_contents", "|i1"),
    "INT16": ("int_contents", "<i2"), "INT32": ("int_contents", "<i4"), "INT64": ("int64_contents", "<i8"),
    "FP32": ("fp32_contents", "<f4"), "FP64": ("fp64_contents", "<f8"),
}


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register the served RPCs: ModelInfer and ModelStreamInfer raw (bytes), the rest with their
    messages (undecodable bytes reach ``translate_errors`` as INVALID_ARGUMENT; fields this trimmed
    copy of the protocol lacks are skipped, as any protobuf reader skips them)."""
    register(server, ipb, SERVICE_NAME, servicer, _RAW, tolerant)


def _parse(data: bytes) -> ipb.ModelInferRequest:
    """The request, parsed once a bounded walk (``field_scan``, skipping fields this trimmed copy
    of the protocol lacks, as any protobuf reader does) has counted its fields and typed values:
    upb makes 8 bytes of each 1-byte entry of a packed shape, and an object of each tiny input, so
    16 MiB of them would become gigabytes, and seconds of the event loop's time."""
    scan(data, ipb.ModelInferRequest.DESCRIPTOR, skip_unknown=True,
         listed=ipb.InferTensorContents.DESCRIPTOR, max_listed=oip.MAX_LISTED_ELEMENTS)
    return ipb.ModelInferRequest.FromString(data)


def parameters(sent: Any, model: str = "") -> dict[str, Any]:
    """A map of InferParameter as Python values (at most ``oip.MAX_LISTED_PARAMETERS``)."""
    oip.check_listed(model, "parameters", len(sent), oip.MAX_LISTED_PARAMETERS)
    values = {}
    for key, parameter in sent.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = None if choice is None else getattr(parameter, choice)
    return values


def infer_request(
    message: ipb.ModelInferRequest, raw: Sequence[bytes | memoryview] | None = None
) -> oip.InferRequest:
    """The protocol-neutral request; InvalidArgumentError for contents that do not line up.
    ``raw``: the raw_input_contents cut out of the received bytes (``oip_wire.split``), if they were."""
    raw = message.raw_input_contents if raw is None else raw
    where = message.model_name
    oip.check_listed(where, "inputs", len(message.inputs), oip.MAX_LISTED_TENSORS)
    oip.check_listed(where, "outputs", len(message.outputs), oip.MAX_LISTED_TENSORS)
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgumentError(
            f"{where}: the request has {len(raw)} raw_input_contents for {len(message.inputs)} inputs"
        )
    inputs = []
    for index, sent in enumerate(message.inputs):
        if raw:
            if sent.HasField("contents"):
                raise InvalidArgumentError(f"{where}: input {sent.name} has contents, and the request raw_input_contents")
            data: bytes | memoryview = raw[index]
        else:
            data = _typed(where, sent)
        inputs.append(oip.InferInput(sent.name, sent.datatype, tuple(sent.shape), data, parameters(sent.parameters, where)))
    outputs = [(o.name, parameters(o.parameters, where)) for o in message.outputs]
    return oip.InferRequest(
        message.model_name, message.model_version, message.id, parameters(message.parameters, where), inputs, outputs or None
    )


def _typed(where: str, sent: Any) -> bytes:
    found = _CONTENTS.get(sent.datatype)
    if found is None:
        if sent.datatype in oip.DATATYPES:
            raise InvalidArgumentError(f"{where}: input {sent.name}: {sent.datatype} travels in raw_input_contents only")
        return b""  # the datatype itself is refused, in the native words
    name, dtype = found
    values = getattr(sent.contents, name)
    if len(values) > oip.MAX_LISTED_ELEMENTS:  # each value becomes a Python object: send raw bytes instead
        raise InvalidArgumentError(
            f"{where}: input {sent.name} has {len(values)} typed contents, over the {oip.MAX_LISTED_ELEMENTS} "
            "this server reads; send large tensors in raw_input_contents"
        )
    try:
        # As a list: numpy refuses a Python int out of the dtype's range, but casts protobuf's
        # repeated field as the C array it is, wrapping 300 to 44 in INT8.
        return np.array(list(values), dtype=np.dtype(dtype)).tobytes()
    except OverflowError:
        raise InvalidArgumentError(f"{where}: input {sent.name}: a value is out of {sent.datatype}'s range") from None


class InferenceServicer:
    """The served RPCs of ``inference.GRPCInferenceService`` in front of ``door``."""

    stream_window = 64  # unanswered requests per ModelStreamInfer, as ComputeStream

    def __init__(self, door: Door) -> None:
        self._door = door

    async def ModelInfer(self, data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        """One serialized ModelInferRequest in, one serialized ModelInferResponse out."""
        answer = await self._infer(data, caller_request_id(context), context)
        if isinstance(answer, bytes):
            return answer
        del data  # not held by the abort's traceback
        final(context, answer[0])
        await context.abort(*answer[:2])
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        """Each request answered as it is computed; a failed one answers ``error_message`` and the
        stream goes on. A drain ends the stream with UNAVAILABLE once the requests read are answered."""
        stream_id = caller_request_id(context)
        count = 0
        unsent: set[Ticket] = set()  # the budgets of answers made and not yet written

        async def respond(data: bytes) -> tuple[bytes, Ticket | None]:
            nonlocal count
            count += 1
            held: set[Ticket] = set()
            answer = await self._infer(data, f"{stream_id}/{count}", context, held)
            unsent.update(held)
            ticket = next(iter(held), None)
            if isinstance(answer, bytes):  # ModelStreamInferResponse{infer_response}, not re-parsed
                return wire.length_delimited(2, answer), ticket
            code, message, (model, request_id) = answer  # the id lets the client match the error
            failed = ipb.ModelInferResponse(model_name=model, id=request_id)
            return ipb.ModelStreamInferResponse(error_message=message, infer_response=failed).SerializeToString(), ticket

        try:
            async for answer, ticket in bounded_map(requests, respond, self.stream_window, stop=self._door.draining):
                yield answer  # resumes once gRPC has taken the answer
                if ticket is not None:
                    ticket.release()
                    unsent.discard(ticket)
                del answer, ticket  # not held while the next is awaited: an idle stream pins nothing
        except Stopped:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the server is draining: it answered every request it took on this stream; send the rest again",
            )
        finally:
            for ticket in unsent:
                ticket.release()

    async def _infer(
        self, data: bytes, request_id: str, context: grpc.aio.ServicerContext[Any, Any],
        hold: set[Ticket] | None = None,
    ) -> bytes | tuple[grpc.StatusCode, str, tuple[str, str]]:
        """A serialized ModelInferResponse, or the status of a failure (recorded) with the model
        and id the request named. The request's
        budgets are released when the call ends, or, given ``hold``, put there for the caller to
        release once the answer is written."""
        door, started = self._door, time.perf_counter_ns()
        split = oip_wire.split(data)
        try:
            message: ipb.ModelInferRequest | None = _parse(data if split is None else split[0])
        except DecodeError as exc:
            message = None
            error: Exception | None = InvalidArgumentError(f"the request is not a valid inference.ModelInferRequest: {exc}")
        except FieldLimitError as exc:  # kept as text: its traceback holds the request's bytes
            message, error = None, InvalidArgumentError(str(exc))
        model = message.model_name if message is not None else ""
        record = door.record(model, request_id, len(data), PROTOCOL)
        ticket = None
        try:
            if message is None:
                raise error  # type: ignore[misc]
            ticket = door.admit(len(data), context.peer())
            if ticket is not None and hold is not None:
                hold.add(ticket)
            elif ticket is not None:
                context.add_done_callback(lambda _: ticket.release())  # type: ignore[arg-type]
            request = infer_request(message, None if split is None else split[1])
            del split  # the request's views of ``data`` now live in ``request`` only
            answer = await door.infer(request, len(data), record, ticket, context.time_remaining())
            response = ipb.ModelInferResponse(
                model_name=answer.model.name, model_version=oip.VERSION, id=message.id,
                outputs=[ipb.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=o.shape)
                         for o in answer.outputs],
            )
            for key, value in oip.warnings_parameter(answer.result).items():
                response.parameters[key].string_param = value
            return oip_wire.answer(response.SerializeToString(), [o.data for o in answer.outputs])
        except asyncio.CancelledError:
            door.failed(record, model, "CANCELLED", "", time.perf_counter_ns() - started)
            if ticket is not None and hold is not None:
                hold.discard(ticket)
                ticket.release()
            raise
        except Exception as exc:
            code, details = status_of(exc, "ModelInfer")
            door.failed(record, model, code.name, details, time.perf_counter_ns() - started)
            return code, details, (model, message.id if message is not None else "")

    @translate_errors
    async def ServerLive(self, request: ipb.ServerLiveRequest, context: Any) -> ipb.ServerLiveResponse:
        return ipb.ServerLiveResponse(live=True)

    @translate_errors
    async def ServerReady(self, request: ipb.ServerReadyRequest, context: Any) -> ipb.ServerReadyResponse:
        return ipb.ServerReadyResponse(ready=self._door.ready)

    @translate_errors
    async def ModelReady(self, request: ipb.ModelReadyRequest, context: Any) -> ipb.ModelReadyResponse:
        ready = request.name in oip.MODELS and request.version in ("", oip.VERSION) and self._door.ready
        return ipb.ModelReadyResponse(ready=ready)

    @translate_errors
    async def ServerMetadata(self, request: ipb.ServerMetadataRequest, context: Any) -> ipb.ServerMetadataResponse:
        return json_format.ParseDict(oip.server_metadata(), ipb.ServerMetadataResponse())

    @translate_errors
    async def ModelMetadata(self, request: ipb.ModelMetadataRequest, context: Any) -> ipb.ModelMetadataResponse:
        model = oip.find(request.name, request.version)
        return json_format.ParseDict(model.metadata(), ipb.ModelMetadataResponse())

    @translate_errors
    async def ModelConfig(self, request: ipb.ModelConfigRequest, context: Any) -> ipb.ModelConfigResponse:
        model = oip.find(request.name, request.version)
        return json_format.ParseDict({"config": model.config()}, ipb.ModelConfigResponse())

    @translate_errors
    async def ModelStatistics(
        self, request: ipb.ModelStatisticsRequest, context: Any
    ) -> ipb.ModelStatisticsResponse:
        report = self._door.statistics.report(request.name, request.version)
        return json_format.ParseDict(report, ipb.ModelStatisticsResponse())

