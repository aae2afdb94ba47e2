"""How Compute and ComputeStream cross a channel: serialized requests out, answers read in place.

A request is serialized by its caller before the call starts (``Request.serialize``,
``Request.serialize_item``), so that what is sent is fixed when the call is made, even on a
stream, which sends later. An answer from ``wire.SPLIT_BYTES`` on is read with ``wire.split``: its
tensors' bytes stay in the received buffer until ``_calls.results`` copies each once, into the
array or tensor it returns (protobuf would copy them twice before that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from google.protobuf.message import Message

from remoteloss import wire
from remoteloss.v1 import loss_pb2 as pb

if TYPE_CHECKING:
    import grpc
    import grpc.aio

__all__ = ["Answer", "Stub", "read_answer", "read_stream_answer"]

_M = TypeVar("_M", bound=Message)
_SERVICE = pb.DESCRIPTOR.services_by_name["LossService"].full_name


class Answer(NamedTuple):
    """A ``ComputeResponse`` as received: for a large one, its tensors' data are placeholders
    of ``payloads``, views of the received bytes."""

    message: pb.ComputeResponse
    payloads: wire.Payloads | None = None

    def data(self, tensor: pb.Tensor) -> memoryview | None:
        """Where ``tensor`` (of ``message``) has its bytes: a view, or None for ``tensor.data``."""
        if self.payloads is None:
            return None
        placeholder = tensor.data
        return self.payloads.resolve(placeholder) if placeholder else None  # b"": a Tensor left unset


def read_answer(data: bytes) -> Answer:
    """A serialized ``ComputeResponse`` as an ``Answer``; raises DecodeError as protobuf does."""
    return Answer(*wire.parse(data, pb.ComputeResponse))


def read_stream_answer(data: bytes) -> tuple[pb.ComputeStreamResponse, wire.Payloads | None]:
    """A serialized ``ComputeStreamResponse``, and the payloads of its response's tensors."""
    return wire.parse(data, pb.ComputeStreamResponse)


class Stub:
    """The ``LossService`` methods on a channel (blocking or ``grpc.aio``) as the generated stub
    has them, except that Compute and ComputeStream take serialized requests and give an
    ``Answer`` (Compute) or ``(ComputeStreamResponse, payloads)`` (ComputeStream)."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        # Any: blocking or grpc.aio multicallables, as the channel makes them. _registered_method: as
        # the generated stubs call it (the stubs of grpc lack the argument).
        self.Compute: Any = channel.unary_unary(
            f"/{_SERVICE}/Compute", response_deserializer=read_answer, _registered_method=True  # type: ignore[call-arg]
        )
        self.ComputeStream: Any = channel.stream_stream(
            f"/{_SERVICE}/ComputeStream",
            response_deserializer=read_stream_answer,
            _registered_method=True,  # type: ignore[call-arg]
        )
        self.ListLosses: Any = channel.unary_unary(
            f"/{_SERVICE}/ListLosses",
            request_serializer=pb.ListLossesRequest.SerializeToString,
            response_deserializer=pb.ListLossesResponse.FromString,
            _registered_method=True,  # type: ignore[call-arg]
        )
