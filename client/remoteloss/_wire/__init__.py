"""Protobuf wire format around tensors, without copying their bytes.

The upb runtime copies every bytes field when it parses a message, again when the field is
read, and serializes a message in full to size it. For tensors of many megabytes those copies
dominate a request. This module works on the wire format itself:

- ``split`` takes a serialized message and returns it with every ``Tensor.data`` replaced by a
  4-byte placeholder, plus ``Payloads``, which maps each placeholder to a zero-copy view of the
  tensor's bytes in the received buffer;
- ``join``, its inverse, puts the bytes back in place of the placeholders: a sender sets
  placeholders (``Payloads.add``) as the data of its large tensors, serializes the small message
  that leaves, and ``join`` copies each tensor's bytes once, into the result;
- ``parse``, ``attach`` and ``serialize`` are what a sender and a receiver call: they take these
  paths from ``SPLIT_BYTES`` on and protobuf's own below it.

Both follow the protobuf encoding spec and, where it leaves a choice, what upb does. Shared by
the SDK (requests out, answers in) and the server (requests in, answers out); no grpc, no torch.
Private to both: not a public name of the SDK. Its parts: ``encoding`` (varints, skipping a
field), ``payloads``, ``plans`` (where a message type's Tensors are), ``stripping`` (split's
walk) and ``joining`` (join's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import Message

from remoteloss._wire.encoding import DELIMITED, MAX_DEPTH, MAX_FIELD_NUMBER, read_varint, skip_field, varint
from remoteloss._wire.joining import join_fields
from remoteloss._wire.payloads import PLACEHOLDER_SIZE, Payloads
from remoteloss._wire.plans import plan
from remoteloss._wire.stripping import Walk

if TYPE_CHECKING:
    from google._upb._message import Descriptor as _UpbDescriptor  # how stubs type Message.DESCRIPTOR
    from google.protobuf.descriptor import Descriptor

__all__ = [
    "DELIMITED",
    "MAX_DEPTH",
    "PLACEHOLDER_SIZE",
    "SPLIT_BYTES",
    "Payloads",
    "attach",
    "join",
    "length_delimited",
    "parse",
    "read_varint",
    "serialize",
    "skip_field",
    "split",
    "varint",
]

# From this many bytes (of a message, or of its tensors' data) on, ``parse``, ``attach`` and
# ``serialize`` leave tensors' bytes where they are; below it protobuf's own parser and serializer
# are faster than the walk over the wire format.
SPLIT_BYTES = 1024 * 1024


def split(data: bytes | memoryview, descriptor: Descriptor | _UpbDescriptor) -> tuple[bytes, Payloads]:
    """Strip a serialized ``descriptor`` message of its tensors' bytes.

    Returns the message with each ``Tensor.data`` a placeholder (those of empty tensors too),
    and the ``Payloads`` the placeholders resolve in; the tensors' bytes are not copied. All
    else, unknown fields included, is kept byte for byte. Parsing the result gives the message
    that parsing ``data`` gives, but for the placeholders, under protobuf's rules (the last
    value wins, occurrences of a message merge, a oneof keeps its last member).

    Groups (wire types 3 and 4) are checked as upb checks an unknown group (matched, nested at
    most ``MAX_DEPTH`` deep) and copied through unread, group-typed fields too: the schema has
    none. Packed fields, strings and other scalars are copied through; parsing the result
    checks them. Extensions are copied through as unknown fields.

    Raises DecodeError for bytes that are not a well-formed message, ValueError for a
    descriptor with a Tensor inside a group-encoded field.
    """
    view = memoryview(data).cast("B")
    walk = Walk(view)
    changed = walk.message(0, len(view), plan(descriptor), (), MAX_DEPTH)
    if changed is None:
        stripped = data if isinstance(data, bytes) else view.tobytes()
    else:
        stripped = b"".join(changed[0])
    return stripped, walk.payloads


def join(stripped: bytes | memoryview, descriptor: Descriptor | _UpbDescriptor, payloads: Payloads) -> bytes:
    """The inverse of ``split``: ``stripped`` (a serialized ``descriptor`` message) with each
    ``Tensor.data`` placeholder replaced by the bytes it stands for in ``payloads`` and every
    enclosing length fixed; each tensor's bytes are copied once, into the result.

    A placeholder that stands for no bytes leaves no field, as protobuf writes an empty ``bytes``,
    so for a message that upb serialized with placeholders as its tensors' data, the result is
    byte for byte what upb gives for the message holding the bytes themselves. All else is copied
    through. Raises ValueError for a ``Tensor.data`` that is no placeholder of ``payloads``,
    DecodeError for bytes that are not a well-formed message.
    """
    view = memoryview(stripped).cast("B")
    joined = join_fields(view, 0, len(view), plan(descriptor), payloads, MAX_DEPTH)
    if joined is None:
        return stripped if isinstance(stripped, bytes) else view.tobytes()
    return b"".join(joined[0])


_M = TypeVar("_M", bound=Message)


def parse(data: bytes, message_type: type[_M]) -> tuple[_M, Payloads | None]:
    """``data`` parsed; from ``SPLIT_BYTES`` on through ``split``, with the ``Payloads`` its
    tensors' data resolve in (None below it). Raises DecodeError as protobuf does."""
    if len(data) < SPLIT_BYTES:
        return message_type.FromString(data), None
    stripped, payloads = split(data, message_type.DESCRIPTOR)
    return message_type.FromString(stripped), payloads


def attach(tensors: Sequence[tuple[Message, memoryview]]) -> Payloads | None:
    """Give each ``Tensor`` message its data: the bytes themselves when all of them come to less
    than ``SPLIT_BYTES`` (returns None), else placeholders of the returned ``Payloads`` (an empty
    one stays unset), for ``serialize`` to write once."""
    if sum(data.nbytes for _, data in tensors) < SPLIT_BYTES:
        for tensor, data in tensors:
            tensor.data = data.tobytes()  # type: ignore[attr-defined]
        return None
    payloads = Payloads()
    for tensor, data in tensors:
        if data.nbytes:  # an empty bytes field is never written
            tensor.data = payloads.add(data)  # type: ignore[attr-defined]
    return payloads


def serialize(message: Message, payloads: Payloads | None) -> bytes:
    """``message`` serialized, with the bytes of ``payloads`` (from ``attach``) in place of their
    placeholders."""
    data = message.SerializeToString()
    return data if payloads is None else join(data, message.DESCRIPTOR, payloads)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length and ``payload``, e.g. a message as a field."""
    if not 1 <= field_number <= MAX_FIELD_NUMBER:
        raise ValueError(f"field_number must be in [1, {MAX_FIELD_NUMBER}], got {field_number}")
    return b"".join((varint(field_number << 3 | DELIMITED), varint(len(payload)), payload))
