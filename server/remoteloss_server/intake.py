"""Intake: a request, as bytes or as a message another protocol built, to a validated ``Call``.

Protocol-neutral (no grpc): the servicer of each protocol turns what it received into a
``Received`` (``receive`` for the native bytes) and calls ``Intake.prepare``, which checks, in
order and before anything is decoded, that every field is known (UNIMPLEMENTED), that a loss is
set, and the elements the request declares (``max_request_elements``); then decodes and validates
the loss's arguments (``LossSpec.prepare``, with ``max_elements``) and ``grad_output``, on the
event loop up to ``policy.inline_bytes`` and on a helper thread above. What it raises are the
domain errors of ``errors``.

``receive`` scans the bytes first (``field_scan``: its first unknown field, at most
``MAX_FIELDS`` fields and ``MAX_STRING_BYTES`` a string, so nothing proportional to a request's
size runs in Python), then parses them: from ``wire.SPLIT_BYTES`` on, the tensors' bytes are not
copied into the message (``wire.split`` leaves them where they are, and the loss reads them there).
``Intake.receive`` does the same for a unary call's bytes, and ``Intake.receive_item`` for a stream
item, unless they match a request template (``templates``): a structure checked before, whose
checks then need not run again. A small request that does not is scanned with a ``Layout``, kept
as a template once it has passed every check.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import NamedTuple

import torch
from google.protobuf.message import DecodeError, Message
from google.protobuf.wrappers_pb2 import UInt64Value

from remoteloss import _wire as wire
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.errors import InvalidArgumentError, UnimplementedError
from remoteloss_server.field_scan import FieldLimitError, Layout, UnknownField, scan
from remoteloss_server.limits import check_elements, request_elements
from remoteloss_server.losses import LOSSES, Call
from remoteloss_server.losses.spec import MAX_DIMS
from remoteloss_server.scheduling import SchedulingPolicy
from remoteloss_server.templates import DEFAULT_CAPACITY, MAX_REQUEST_BYTES, Template, Templates, item_request

__all__ = ["Intake", "Prepared", "Received", "UndecodableRequest", "prepare", "receive"]


@dataclass(frozen=True)
class UndecodableRequest:
    """Bytes that do not parse as the request message, or that this server will not parse (too
    many fields, too long a string: ``refusal``); answered INVALID_ARGUMENT (gRPC itself would
    answer UNKNOWN)."""

    type_name: str
    reason: str
    id: int | None = None  # a ComputeStreamRequest's id, when it can still be read
    refusal: str | None = None  # the whole message, when the bytes were not parsed on purpose

    def error(self) -> InvalidArgumentError:
        if self.refusal is not None:
            return InvalidArgumentError(self.refusal)
        return InvalidArgumentError(f"the request is not a valid {self.type_name}: {self.reason}")


class Received(NamedTuple):  # a tuple: made for every request, quicker than a frozen dataclass
    """A request as a protocol got it: the parsed message (or why it did not parse), its size on
    the wire, for a large one where its tensors' bytes lie in the received bytes, and its first
    field unknown to this server. A ``ComputeRequest`` from ``Intake.receive`` (or a stream item
    from ``receive_item``: its request's) may also have its bytes (``data``): a template's
    (``template``, whose ``label`` is then the message), or ones that may become a template once
    checked (with the ``layout`` their scan found)."""

    message: Message | UndecodableRequest
    size: int
    payloads: wire.Payloads | None = None
    unknown: UnknownField | None = None
    data: bytes | memoryview | None = None
    template: Template | None = None
    layout: Layout | None = None


def receive(data: bytes, message_type: type[Message], layout: Layout | None = None) -> Received:
    """Parse ``data``, once ``field_scan.scan`` has found its first unknown field, if any, and
    refused it past its limits (filling ``layout`` if given). A request with an unknown field is
    refused: below ``SPLIT_BYTES`` upb parses it all (in C; bytes that do not parse are still
    INVALID_ARGUMENT), from it on it is not parsed (``_unparsed``)."""
    large = len(data) >= wire.SPLIT_BYTES
    try:
        try:
            unknown = scan(data, message_type.DESCRIPTOR, layout=layout)
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


def _stream_id(message_type: type[Message], data: bytes) -> int | None:
    """The id of a ComputeStreamRequest whose ``request`` does not parse: UInt64Value has the id's
    field number and type, and skips field 2 unread, as an unknown field."""
    if message_type is not pb.ComputeStreamRequest:
        return None
    try:
        return int(UInt64Value.FromString(data).value)
    except DecodeError:
        return None


class Prepared(NamedTuple):  # as Received
    """A validated request: its loss, the call (tensors on the host), the decoded grad_output and
    the tensor elements the request declared (for the metrics)."""

    loss: str
    call: Call
    grad_output: torch.Tensor | None
    elements: int


class Intake:
    """``prepare(received)``: the checks and decoding every protocol's requests go through."""

    def __init__(
        self,
        policy: SchedulingPolicy,
        *,
        max_elements: int | None = None,
        max_request_elements: int | None = None,
        templates: int = DEFAULT_CAPACITY,
    ) -> None:
        self.inline_bytes = policy.inline_bytes  # decoded (and answers encoded) on the event loop up to this
        self.max_elements = max_elements  # tensor elements a request may imply; None: no limit
        self.max_request_elements = max_request_elements  # declared by one request in all; None: no limit
        # Request sizes whose recent structures are kept (``templates``); 0: none. Only requests
        # decoded on the event loop are kept, so that a template's is too.
        self.templates = Templates(templates, min(MAX_REQUEST_BYTES, self.inline_bytes))

    def receive(self, data: bytes) -> Received:
        """``receive(data, pb.ComputeRequest)``, or, for bytes that match a template, nothing
        parsed: the template stands for what the scan and upb would find."""
        template = self.templates.match(data)
        if template is not None:
            return Received(template.label, len(data), data=data, template=template)
        return self._learnable(data, pb.ComputeRequest, data)

    def receive_item(self, data: bytes) -> tuple[int | None, Received]:
        """A ``ComputeStreamRequest`` whose request matches a template: its id, and its request as
        ``receive`` gives a matching one (its size the item's); any other: None, and ``receive(data,
        pb.ComputeStreamRequest)``, with its request's bytes when they may become a template."""
        laid = item_request(data) if self.templates.capacity else None
        if laid is None:
            return None, receive(data, pb.ComputeStreamRequest)
        item_id, begin, around = laid
        request = memoryview(data)[begin:]
        template = self.templates.match(data, begin, around)
        if template is not None:
            return item_id, Received(template.label, len(data), data=request, template=template)
        return None, self._learnable(data, pb.ComputeStreamRequest, request, begin, around)

    def _learnable(
        self, data: bytes, message_type: type[Message], request: bytes | memoryview, begin: int = 0, around: int = 0,
    ) -> Received:
        """``receive(data, message_type)``, with ``request`` (``data`` itself, or from ``begin`` on
        a stream item's request, which ``around`` fields precede) and its layout, when it may
        become a template once checked."""
        if not self.templates.learnable(request):
            return receive(data, message_type)
        found = Layout()
        received = receive(data, message_type, found)
        if received.unknown is not None or not isinstance(received.message, Message):
            return received
        layout = found if request is data else found.inside("request", begin, around)
        return received._replace(data=request, layout=layout)

    async def prepare(self, received: Received) -> Prepared:
        """The validated request, or the domain error that refuses it: decoded on the spot up to
        ``inline_bytes`` (``prepare_now``), on a helper thread above."""
        if received.size <= self.inline_bytes:
            return self.prepare_now(received)
        request, name, elements = self._checked(received)
        call, grad_output = await asyncio.to_thread(prepare, name, request, self.max_elements, received.payloads)
        return Prepared(name, call, grad_output, elements)

    def prepare_now(self, received: Received) -> Prepared:
        """``prepare``, on the spot (for a request of at most ``inline_bytes``): from its template's
        checks and its own tensors, when it has one; else checked whole, and kept as a template."""
        template, data = received.template, received.data
        if template is not None and data is not None:
            call, grad_output = template.call(data, self.max_elements)
            return Prepared(template.loss, call, grad_output, template.elements)
        request, name, elements = self._checked(received)
        call, grad_output = prepare(name, request, self.max_elements, received.payloads)
        if data is not None and received.layout is not None:
            self.templates.learn(data, received.layout, elements, call, grad_output)
        return Prepared(name, call, grad_output, elements)

    def _checked(self, received: Received) -> tuple[pb.ComputeRequest, str, int]:
        """The request, its loss and its declared elements (``check``); its refusal raised."""
        request = received.message
        if isinstance(request, UndecodableRequest):
            raise request.error()
        assert isinstance(request, pb.ComputeRequest)
        return (request, *self.check(request, received.unknown))

    def check(self, request: pb.ComputeRequest, unknown: UnknownField | None = None) -> tuple[str, int]:
        """The loss's name and the elements of the loss's arguments, from the shapes, before
        anything is decoded; refuses unknown fields, a request without a loss and one that
        declares more than ``max_request_elements`` (grad_output counted)."""
        if unknown is not None:
            raise UnimplementedError(
                f"the request holds {unknown.describe()}, which this server does not know; "
                "it may come from a newer client"
            )
        name = request.WhichOneof("loss")
        if name is None:
            raise InvalidArgumentError("no loss set in the request")
        if name not in LOSSES:
            raise UnimplementedError(f"{name} is not served here")
        elements = request_elements(getattr(request, name), max_dims=MAX_DIMS, where=name)
        incoming = (
            request_elements(request.grad_output, max_dims=MAX_DIMS, where=f"{name}: grad_output")
            if request.HasField("grad_output") else 0
        )
        check_elements(name, elements + incoming, self.max_request_elements)
        return name, elements


def prepare(
    name: str, request: pb.ComputeRequest, max_elements: int | None = None, payloads: wire.Payloads | None = None
) -> tuple[Call, torch.Tensor | None]:
    """The validated call of loss ``name`` (its tensors on the host) and the decoded grad_output."""
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
