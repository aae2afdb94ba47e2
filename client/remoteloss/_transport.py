"""How calls cross a channel: the shared ``Transport``, serialized requests out, answers read in place.

``Transport`` is what ``Client``, ``AsyncClient`` and their streams share: the ``Channels``
(blocking and ``grpc.aio``), and each call's deadline and metadata.

A request is serialized by its caller before the call starts (``Request.serialize``,
``Request.serialize_item``), so that what is sent is fixed when the call is made, even on a
stream, which sends later. An answer from ``wire.SPLIT_BYTES`` on is read with ``wire.split``: its
tensors' bytes stay in the received buffer until ``_calls.results`` copies each once, into the
array or tensor it returns (protobuf would copy them twice before that).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from remoteloss import _wire as wire
from remoteloss._channel import create_aio_channel, create_channel
from remoteloss._errors import _connection_lost, _error_from_rpc
from remoteloss._request import Request
from remoteloss.v1 import loss_pb2 as pb

__all__ = [
    "UNARY_RESENDS", "UNREACHED", "Answer", "Channels", "Resend", "Stub", "Transport",
    "read_answer", "read_stream_answer",
]

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


class Channels:
    """The channels that a client, its ``with_options`` copies and its streams share: a blocking
    one, made on first use (``Client`` makes it at once), and a ``grpc.aio`` one made on first use
    inside the event loop (``AsyncClient``; the blocking one then serves autograd's second calls
    only, and is made only if one happens)."""

    def __init__(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
    ) -> None:
        self._target = target
        self._credentials = credentials
        self._options = tuple(options)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: Stub | None = None
        self._aio_channel: grpc.aio.Channel | None = None
        self._aio_stub: Stub | None = None
        self.closed = False

    def stub(self) -> Stub:
        """The ``Stub`` on the blocking channel."""
        with self._lock:
            if self.closed:
                raise RuntimeError("the client is closed")
            if self._stub is None:
                self._channel = create_channel(self._target, credentials=self._credentials, options=self._options)
                self._stub = Stub(self._channel)
            return self._stub

    def aio_stub(self) -> Stub:
        """The ``Stub`` on the ``grpc.aio`` channel; call it from the event loop."""
        if self.closed:
            raise RuntimeError("the client is closed")
        if self._aio_stub is None:
            self._aio_channel = create_aio_channel(self._target, credentials=self._credentials, options=self._options)
            self._aio_stub = Stub(self._aio_channel)
        return self._aio_stub

    @property
    def has_blocking_channel(self) -> bool:
        return self._channel is not None

    def close(self) -> None:
        with self._lock:
            self.closed = True
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    async def aclose(self) -> None:
        self.close()
        channel, self._aio_channel = self._aio_channel, None
        if channel is not None:
            await channel.close(None)


UNARY_RESENDS = 1  # a unary call whose answer was cut is sent this many times more (see Resend)
# gRPC's words for a call that reached no server (its details begin so, newer and older wording):
# its retry policy spent the attempts already, and a resend would only double the time to fail.
UNREACHED = ("connections to all backends failing", "failed to connect to all addresses", "errors resolving",
             "DNS resolution failed")


class Resend:
    """Whether a failed unary call is sent again, and the timeout of each send.

    gRPC's retry policy (``SERVICE_CONFIG``) sends a call again only until the server's answer
    has begun: its headers commit the call (gRPC's retry design, A6). A server that dies while an
    answer is on its way (SIGKILL, the OOM killer, a lost node; a large answer takes many round
    trips of flow control) ends the call UNAVAILABLE, or INTERNAL behind a proxy that resets it
    (``_errors._connection_lost``), and gRPC gives it up. Compute and ListLosses are pure
    functions, so the SDK sends such a call ``UNARY_RESENDS`` times more itself, each time with
    what is left of the deadline, and gRPC's retry policy again. Any other status, a call that
    reached no server (``UNREACHED``), or no time left, is final.
    """

    __slots__ = ("_deadline", "_left", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._left = UNARY_RESENDS

    def again(self, exc: grpc.RpcError) -> bool:
        code, details = getattr(exc, "code", None), getattr(exc, "details", None)
        if self._left == 0 or not callable(code) or not callable(details):
            return False
        text = details() or ""
        if not _connection_lost(code(), text) or text.startswith(UNREACHED):
            return False
        if self._deadline is not None:
            self.timeout = self._deadline - time.monotonic()
            if self.timeout <= 0:
                return False
        self._left -= 1
        return True


@dataclass(frozen=True)
class Transport:
    """How a client and its streams send: shared ``Channels``, plus the deadline and metadata of
    each call. ``Client``, ``AsyncClient`` and their streams hold one, and use nothing else of
    each other; ``with_options`` gives a new one on the same channels."""

    channels: Channels
    timeout: float | None
    metadata: tuple[tuple[str, str | bytes], ...] = field(repr=False)  # may hold the API key
    name: str = "the client"  # for "... is closed"

    def check_open(self) -> None:
        if self.channels.closed:
            raise RuntimeError(f"{self.name} is closed")

    def unary(self, method: str, request: Any) -> Any:
        """A unary call on the blocking channel, sent once more if its connection was lost
        (``Resend``); a failure raises the status's ``LossServiceError``."""
        self.check_open()
        call, resend = getattr(self.channels.stub(), method), Resend(self.timeout)
        while True:
            try:
                return call(request, timeout=resend.timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                if not resend.again(exc):
                    raise _error_from_rpc(exc) from exc

    async def aunary(self, method: str, request: Any) -> Any:
        """A unary call on the ``grpc.aio`` channel, sent again as ``unary`` sends it."""
        self.check_open()
        call, resend = getattr(self.channels.aio_stub(), method), Resend(self.timeout)
        while True:
            try:
                return await call(request, timeout=resend.timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                if not resend.again(exc):
                    raise _error_from_rpc(exc) from exc

    def compute(self, request: Request) -> Answer:
        """A blocking Compute (also autograd's second call of an ``AsyncClient``)."""
        answer: Answer = self.unary("Compute", request.serialize())
        return answer

    async def acompute(self, request: Request) -> Answer:
        answer: Answer = await self.aunary("Compute", request.serialize())  # serialized now, not when sent
        return answer

    def compute_stream(self, requests: Iterator[bytes], timeout: float | None) -> Any:
        """A blocking ComputeStream call sending the serialized ``requests``; ``timeout``: the stream's."""
        return self.channels.stub().ComputeStream(requests, timeout=timeout, metadata=self.metadata)

    def acompute_stream(self, timeout: float | None) -> Any:
        """A ``grpc.aio`` ComputeStream call; its requests go with ``write``."""
        return self.channels.aio_stub().ComputeStream(timeout=timeout, metadata=self.metadata)
