"""Request limits checked before any work is done on a request (no grpc, no torch).

- ``request_elements(message, max_dims=, where=)``: the tensor elements a request declares,
  summed over every ``Tensor`` in it, read from the shapes alone (the ``data`` bytes are never
  touched, so nothing is copied or decoded), each shape's rank checked first; the servicer
  rejects a request over ``max_request_elements`` with INVALID_ARGUMENT before it decodes anything.
- ``Admission``: the requests the server has accepted and not yet answered (queued or
  computing), bounded in number (``max_in_flight``) and in request bytes
  (``max_in_flight_bytes``). Past either bound a new request fails at once with
  RESOURCE_EXHAUSTED ("the server is saturated"), so a flood meets a refusal rather than a
  queue, and the memory the server holds for requests stays bounded. One request is always
  admitted when nothing else is in flight, however large (``max_message_bytes`` bounds it).
  A request frees its place when it is answered, fails, or its caller goes away. Used from the
  event loop only, so it needs no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from remoteloss.v1 import loss_pb2 as pb

from remoteloss_server.errors import InvalidArgumentError, ResourceExhaustedError

__all__ = ["Admission", "check_elements", "request_elements"]

_TENSOR = pb.Tensor.DESCRIPTOR


def request_elements(message: Message, *, max_dims: int | None = None, where: str = "request") -> int:
    """The elements of every ``Tensor`` in ``message`` (nested ones too), from their shapes.

    A negative dimension counts as 0 here; the codec rejects it later with its own message. A
    tensor of more than ``max_dims`` dimensions is refused here, before its shape is read (a
    packed ``shape`` of a million entries parses in C, but would be read one by one in Python),
    with InvalidArgumentError naming it as ``<where>: <field path>``. Only the fields that are
    set are visited (``ListFields``, one C call per message); a ``Tensor``'s own fields are never
    listed, since reading its ``data`` would copy it.
    """
    return _elements(message, max_dims, where, "")


def _elements(message: Message, max_dims: int | None, where: str, path: str) -> int:
    if message.DESCRIPTOR is _TENSOR:
        shape = message.shape  # type: ignore[attr-defined]
        if max_dims is not None and len(shape) > max_dims:
            name = f"{where}: {path}" if path else where
            raise InvalidArgumentError(
                f"{name}: shape has {len(shape)} dimensions, more than the limit of {max_dims}"
            )
        count = 1
        for size in shape:
            count *= size if size > 0 else 0
        return count
    total = 0
    for field, value in message.ListFields():
        kind = _KINDS.get(field)
        if kind is None:
            kind = _KINDS[field] = _kind(field)
        if kind == _SCALAR:
            continue
        inner = f"{path}.{field.name}" if path else field.name
        if kind == _SINGLE:
            total += _elements(value, max_dims, where, inner)
        else:
            for child in value.values() if kind == _MAP else value:
                if isinstance(child, Message):
                    total += _elements(child, max_dims, where, inner)
    return total


_SCALAR, _SINGLE, _REPEATED, _MAP = range(4)
_KINDS: dict[FieldDescriptor, int] = {}


def _kind(field: FieldDescriptor) -> int:
    if field.message_type is None:
        return _SCALAR
    if field.message_type.GetOptions().map_entry:
        return _MAP
    return _REPEATED if field.is_repeated else _SINGLE


def check_elements(loss: str, elements: int, limit: int | None) -> int:
    """``elements``, a request's declared count; InvalidArgumentError when more than ``limit``."""
    if limit is not None and elements > limit:
        raise InvalidArgumentError(
            f"{loss}: the request's tensors hold {elements} elements in all, more than this server's "
            f"max_request_elements of {limit}"
        )
    return elements


class Admission:
    """Bounds the requests in flight by count and by bytes; see the module's docstring."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        if max_requests < 1 or max_bytes < 1:
            raise ValueError(f"limits must be >= 1, got max_requests={max_requests}, max_bytes={max_bytes}")
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0  # admitted and not yet released
        self.bytes = 0

    @contextmanager
    def admit(self, size: int) -> Iterator[None]:
        """Hold a place for a request of ``size`` bytes while the block runs; raise
        ResourceExhaustedError at once when the server is saturated."""
        if self.requests >= self.max_requests:
            raise ResourceExhaustedError(
                f"the server is saturated: {self.requests} requests in flight, its max_in_flight; "
                "retry later with backoff, or send to another replica"
            )
        if self.requests and self.bytes + size > self.max_bytes:
            raise ResourceExhaustedError(
                f"the server is saturated: {self.bytes} request bytes in flight, and {size} more would pass its "
                f"max_in_flight_bytes of {self.max_bytes}; retry later with backoff, or send to another replica"
            )
        self.requests += 1
        self.bytes += size
        try:
            yield
        finally:
            self.requests -= 1
            self.bytes -= size
