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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from remoteloss.v1 import loss_pb2 as pb

if TYPE_CHECKING:
    from google._upb._message import Descriptor as _UpbDescriptor  # how stubs type Message.DESCRIPTOR

__all__ = [
    "MAX_DEPTH",
    "PLACEHOLDER_SIZE",
    "SPLIT_BYTES",
    "Payloads",
    "attach",
    "join",
    "length_delimited",
    "parse",
    "serialize",
    "split",
]

MAX_DEPTH = 100  # nested messages and groups, as upb allows by default
PLACEHOLDER_SIZE = 4  # bytes of a placeholder: a little-endian payload index
# From this many bytes (of a message, or of its tensors' data) on, ``parse``, ``attach`` and
# ``serialize`` leave tensors' bytes where they are; below it protobuf's own parser and serializer
# are faster than the walk over the wire format.
SPLIT_BYTES = 1024 * 1024

_Part = bytes | memoryview
_Key = tuple[int, ...]  # a message's place in the parsed tree, as a path of field numbers

_VARINT, _FIXED64, _DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = range(6)
_MAX_TAG = 0xFFFF_FFFF  # upb reads a tag as a 32-bit varint (at most 5 bytes)
_MAX_LENGTH = 0x7FFF_FFFF  # upb rejects lengths from INT32_MAX on (also at most 5 bytes)
_MAX_FIELD_NUMBER = (1 << 29) - 1

_TENSOR = pb.Tensor.DESCRIPTOR
_DATA = _TENSOR.fields_by_name["data"].number
_DATA_TAG = bytes([_DATA << 3 | _DELIMITED, PLACEHOLDER_SIZE])
_MAP_VALUE = 2
_MAP_VALUE_TAG = bytes([_MAP_VALUE << 3 | _DELIMITED])


class Payloads:
    """The tensors' bytes of a message stripped by ``split``, or to be put back by ``join``: one
    view per placeholder.

    Each view that ``split`` issues is a read-only slice of the buffer given to it and keeps that
    buffer alive; ``add`` keeps the buffer it is given.
    """

    __slots__ = ("_views",)

    def __init__(self) -> None:
        self._views: list[memoryview] = []

    def resolve(self, placeholder: bytes | memoryview) -> memoryview:
        """The bytes a placeholder stands for; ValueError for one this object did not issue."""
        index = int.from_bytes(placeholder, "little") if len(placeholder) == PLACEHOLDER_SIZE else -1
        if not 0 <= index < len(self._views):
            raise ValueError(f"{bytes(placeholder[:8])!r} is not a tensor placeholder of this message")
        return self._views[index]

    def add(self, data: bytes | memoryview) -> bytes:
        """A new placeholder standing for ``data``, which is kept, not copied (for ``join``)."""
        return _placeholder(self._issue(memoryview(data)))

    def __len__(self) -> int:
        return len(self._views)

    @property
    def nbytes(self) -> int:
        """Total bytes of the tensors' data."""
        return sum(view.nbytes for view in self._views)

    def __repr__(self) -> str:
        return f"Payloads({len(self)} tensors, {self.nbytes} bytes)"

    def _issue(self, view: memoryview) -> int:
        self._views.append(view)
        return len(self._views) - 1

    def _replace(self, index: int, view: memoryview) -> None:
        self._views[index] = view


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
    walk = _Walk(view)
    changed = walk.message(0, len(view), _plan(descriptor), (), MAX_DEPTH)
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
    joined = _join(view, 0, len(view), _plan(descriptor), payloads, MAX_DEPTH)
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
    if not 1 <= field_number <= _MAX_FIELD_NUMBER:
        raise ValueError(f"field_number must be in [1, {_MAX_FIELD_NUMBER}], got {field_number}")
    return b"".join((_varint(field_number << 3 | _DELIMITED), _varint(len(payload)), payload))


# --- split ---------------------------------------------------------------------------------


class _Plan:
    """What ``split`` needs of one message type."""

    __slots__ = ("children", "entry", "oneofs", "tensor", "tensor_map")

    def __init__(self, tensor: bool) -> None:
        self.tensor = tensor  # remoteloss.v1.Tensor itself
        self.children: dict[int, tuple[_Plan, bool]] = {}  # message fields: number -> (plan, repeated)
        # Members of the oneofs that hold Tensors: number -> (oneof index, wire type, values of a
        # closed enum). Setting another member clears the one set before, which split follows.
        self.oneofs: dict[int, tuple[int, int, frozenset[int] | None]] = {}
        # A map entry: the wire types of its key and value. upb keeps an entry with any other
        # field as an unknown field of the map's message, as it came, instead of in the map.
        self.entry: tuple[int, int] | None = None
        self.tensor_map = False  # a map entry whose value is a Tensor


_PLANS: dict[object, _Plan] = {}  # by descriptor

_WIRE_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: _FIXED64,
    FieldDescriptor.TYPE_FIXED64: _FIXED64,
    FieldDescriptor.TYPE_SFIXED64: _FIXED64,
    FieldDescriptor.TYPE_FLOAT: _FIXED32,
    FieldDescriptor.TYPE_FIXED32: _FIXED32,
    FieldDescriptor.TYPE_SFIXED32: _FIXED32,
    FieldDescriptor.TYPE_STRING: _DELIMITED,
    FieldDescriptor.TYPE_BYTES: _DELIMITED,
    FieldDescriptor.TYPE_MESSAGE: _DELIMITED,
    FieldDescriptor.TYPE_GROUP: _START_GROUP,
}


def _plan(descriptor: Descriptor | _UpbDescriptor) -> _Plan:
    """The plan of a message type, made once per type (and per type it reaches)."""
    plan = _PLANS.get(descriptor)
    if plan is not None:
        return plan
    descriptor = _checked(descriptor)
    reachable = _reachable(descriptor)
    holds = _holding_tensors(reachable)
    made = {d.full_name: _Plan(tensor=d.full_name == _TENSOR.full_name) for d in reachable}
    for d in reachable:
        plan = made[d.full_name]
        for f in d.fields:
            sub = f.message_type
            if sub is None:
                continue
            if f.type == FieldDescriptor.TYPE_GROUP:
                if sub.full_name in holds:
                    raise ValueError(f"{f.full_name}: Tensors inside group-encoded fields are not supported")
                continue
            plan.children[f.number] = (made[sub.full_name], bool(f.is_repeated))
        for oneof in d.oneofs:
            if any(f.message_type is not None and f.message_type.full_name in holds for f in oneof.fields):
                for f in oneof.fields:
                    wire_type = _WIRE_TYPES.get(f.type, _VARINT)
                    enum = f.enum_type
                    closed = frozenset(enum.values_by_number) if enum is not None and enum.is_closed else None
                    plan.oneofs[f.number] = (oneof.index, wire_type, closed)
        if d.GetOptions().map_entry:
            key, value = d.fields_by_number[1], d.fields_by_number[_MAP_VALUE]
            plan.entry = (_WIRE_TYPES.get(key.type, _VARINT), _WIRE_TYPES.get(value.type, _VARINT))
            value_type = value.message_type
            plan.tensor_map = value_type is not None and value_type.full_name == _TENSOR.full_name
    _PLANS.update((d, made[d.full_name]) for d in reachable)
    return made[descriptor.full_name]


def _checked(descriptor: Descriptor | _UpbDescriptor) -> Descriptor:
    """``descriptor``, typed as a message descriptor (stubs tell upb's class apart, it is not)."""
    if not isinstance(descriptor, Descriptor):
        raise TypeError(f"expected a message Descriptor, got {type(descriptor).__name__}")
    return descriptor


def _reachable(descriptor: Descriptor) -> list[Descriptor]:
    found: dict[str, Descriptor] = {}
    pending = [descriptor]
    while pending:
        d = pending.pop()
        if d.full_name not in found:
            found[d.full_name] = d
            pending.extend(f.message_type for f in d.fields if f.message_type is not None)
    return list(found.values())


def _holding_tensors(descriptors: list[Descriptor]) -> set[str]:
    """Full names of the types that are, or reach, a Tensor."""
    holds = {_TENSOR.full_name}
    grown = True
    while grown:
        grown = False
        for d in descriptors:
            if d.full_name not in holds and any(
                f.message_type is not None and f.message_type.full_name in holds for f in d.fields
            ):
                holds.add(d.full_name)
                grown = True
    return holds


class _Walk:
    """One pass of ``split`` over ``view``.

    Tensors are tracked by their place in the parsed tree (``_Key``) so that a Tensor met again
    (the same field repeated, which protobuf merges) reuses its payload instead of resetting it.
    """

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.payloads = Payloads()
        self.tensors: dict[_Key, int] = {}  # Tensor -> its payload index
        self.members: dict[tuple[_Key, int], int] = {}  # (message, oneof index) -> member set
        self.occurrences = 0  # numbers each element of a repeated field apart

    def message(
        self, start: int, end: int, plan: _Plan, key: _Key, depth: int
    ) -> tuple[list[_Part], int] | None:
        """Walk the fields in ``view[start:end]``; return the new fields and their size, or None
        when nothing changed."""
        view = self.view
        children = plan.children
        oneofs = plan.oneofs
        tensor = plan.tensor
        entry = plan.entry
        stray = False  # a map entry has a field other than its key and value
        parts: list[_Part] | None = None
        size = 0
        kept = start  # where the span not yet in ``parts`` starts
        data: tuple[int, int] | None = None  # a Tensor's last data field
        has_value = False  # a map entry's value was seen
        pos = start
        while pos < end:
            field_start = pos
            tag = view[pos]
            pos += 1
            if tag >= 0x80:
                tag, pos = _read_varint(view, field_start, end, 5)
                if tag > _MAX_TAG:
                    raise DecodeError(f"tag out of range at byte {field_start}")
            number = tag >> 3
            wire_type = tag & 7
            if number == 0:
                raise DecodeError(f"field number 0 at byte {field_start}")
            if oneofs and number in oneofs:
                self._oneof(key, number, wire_type, oneofs[number], pos, end)
            if entry is not None and not stray:
                stray = number > 2 or wire_type != entry[number - 1]
            if wire_type == _DELIMITED:
                length_at = pos
                length = view[pos] if pos < end else 0x80
                pos += 1
                if length >= 0x80:
                    length, pos = _read_varint(view, length_at, end, 5)
                    if length >= _MAX_LENGTH:
                        raise DecodeError(f"length out of range at byte {length_at}")
                body = pos
                pos += length
                if pos > end:
                    raise DecodeError(f"length past the end at byte {length_at}")
                child = children.get(number)
                if child is not None:
                    if depth <= 0:
                        raise DecodeError(f"nested deeper than {MAX_DEPTH} at byte {field_start}")
                    if child[1]:
                        self.occurrences += 1
                        child_key = (*key, number, self.occurrences)
                    else:
                        child_key = (*key, number)
                    has_value = has_value or number == _MAP_VALUE
                    changed = self.message(body, pos, child[0], child_key, depth - 1)
                    if changed is not None:
                        if parts is None:
                            parts = []
                        head = view[kept:length_at]
                        new_length = _varint(changed[1])
                        parts.append(head)
                        parts.append(new_length)
                        parts += changed[0]
                        size += len(head) + len(new_length) + changed[1]
                        kept = pos
                elif tensor and number == _DATA:
                    if parts is None:
                        parts = []
                    if kept < field_start:
                        parts.append(view[kept:field_start])
                        size += field_start - kept
                    kept = pos
                    data = (body, pos)
            elif wire_type == _VARINT:  # the most frequent kind, inline
                pos = _skip_varint(view, pos, end)
            else:
                pos = _skip_field(view, pos, end, number, wire_type, field_start, depth)

        if stray:
            self._clear(key)  # the entry stays as it came, an unknown field
            return None
        tail: list[_Part] = []
        if tensor:
            placeholder = self._tensor(key, None if data is None else view[data[0] : data[1]], start)
            if placeholder is not None:
                tail.append(placeholder)
        elif plan.tensor_map and not has_value:  # a missing value is an empty Tensor
            placeholder = self._tensor((*key, _MAP_VALUE), None, start)
            assert placeholder is not None
            tail += (_MAP_VALUE_TAG, _varint(len(placeholder)), placeholder)
        if parts is None and not tail:
            return None
        if parts is None:
            parts = []
        if kept < end:
            parts.append(view[kept:end])
            size += end - kept
        parts += tail
        size += sum(len(part) for part in tail)
        return parts, size

    def _tensor(self, key: _Key, data: memoryview | None, start: int) -> bytes | None:
        """The placeholder field ending a Tensor's occurrence; None when an earlier occurrence
        set its data and this one does not change it."""
        index = self.tensors.get(key)
        if index is None:
            index = self.payloads._issue(self.view[start:start] if data is None else data)
            self.tensors[key] = index
        elif data is not None:
            self.payloads._replace(index, data)
        else:
            return None
        return _DATA_TAG + _placeholder(index)

    def _oneof(
        self, key: _Key, number: int, wire_type: int, member: tuple[int, int, frozenset[int] | None], pos: int, end: int
    ) -> None:
        """Follow a oneof member being set: a different member clears the one set before."""
        index, expected, closed = member
        if wire_type != expected:
            return  # parsed as an unknown field
        if closed is not None:
            value = _read_varint(self.view, pos, end, 10)[0]
            value &= 0xFFFF_FFFF
            if (value - (1 << 32) if value >= 1 << 31 else value) not in closed:
                return  # an unknown value of a closed enum is kept as an unknown field
        slot = (key, index)
        previous = self.members.get(slot)
        if previous == number:
            return
        self.members[slot] = number
        if previous is not None:
            self._clear((*key, previous))

    def _clear(self, prefix: _Key) -> None:
        """Forget the Tensors under ``prefix``, a field that parsing clears."""
        width = len(prefix)
        for key in [k for k in self.tensors if k[:width] == prefix]:
            self.payloads._replace(self.tensors.pop(key), self.view[0:0])
        for slot in [s for s in self.members if s[0][:width] == prefix]:
            del self.members[slot]


# --- join ----------------------------------------------------------------------------------


def _join(
    view: memoryview, start: int, end: int, plan: _Plan, payloads: Payloads, depth: int
) -> tuple[list[_Part], int] | None:
    """The fields in ``view[start:end]`` with the placeholders resolved, and their size; None
    when there is none."""
    parts: list[_Part] = []
    size = 0
    kept = start  # where the span not yet in ``parts`` starts
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _read_varint(view, pos, end, 5)
        number, wire_type = tag >> 3, tag & 7
        if wire_type != _DELIMITED:
            pos = _skip_field(view, pos, end, number, wire_type, field_start, depth)
            continue
        length_at = pos
        length, body = _read_varint(view, pos, end, 5)
        pos = body + length
        if pos > end:
            raise DecodeError(f"length past the end at byte {length_at}")
        child = plan.children.get(number)
        if child is not None:
            if depth <= 0:
                raise DecodeError(f"nested deeper than {MAX_DEPTH} at byte {field_start}")
            changed = _join(view, body, pos, child[0], payloads, depth - 1)
            if changed is None:
                continue
            new: list[_Part] = [view[kept:length_at], _varint(changed[1]), *changed[0]]
            size += length_at - kept + len(new[1]) + changed[1]
        elif plan.tensor and number == _DATA:
            data = payloads.resolve(view[body:pos])
            new = [view[kept:field_start]]
            size += field_start - kept
            if data.nbytes:
                head = view[field_start:length_at].tobytes() + _varint(data.nbytes)
                new += (head, data)
                size += len(head) + data.nbytes
        else:
            continue
        parts += new
        kept = pos
    if not parts:
        return None
    parts.append(view[kept:end])
    return parts, size + end - kept


# --- the wire format -------------------------------------------------------------------------


def _placeholder(index: int) -> bytes:
    return index.to_bytes(PLACEHOLDER_SIZE, "little")


def _skip_field(view: memoryview, pos: int, end: int, number: int, wire_type: int, at: int, depth: int) -> int:
    """The position after the value at ``pos`` of a field that is not length-delimited, whose tag
    is at ``at``."""
    if wire_type == _VARINT:
        return _skip_varint(view, pos, end)
    if wire_type == _FIXED64 or wire_type == _FIXED32:
        pos += 8 if wire_type == _FIXED64 else 4
        if pos > end:
            raise DecodeError(f"truncated fixed-size field at byte {at}")
        return pos
    if wire_type == _START_GROUP:
        return _skip_group(view, pos, end, number, depth - 1)
    if wire_type == _END_GROUP:
        raise DecodeError(f"end-group tag outside a group at byte {at}")
    raise DecodeError(f"invalid wire type {wire_type} at byte {at}")


def _read_varint(view: memoryview, start: int, end: int, limit: int) -> tuple[int, int]:
    """The varint at ``start`` of at most ``limit`` bytes, and the position after it."""
    value = 0
    shift = 0
    pos = start
    stop = min(end, start + limit)
    while pos < stop:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
    if pos >= end and pos - start < limit:
        raise DecodeError(f"truncated varint at byte {start}")
    raise DecodeError(f"varint longer than {limit} bytes at byte {start}")


def _skip_varint(view: memoryview, pos: int, end: int) -> int:
    if pos < end and view[pos] < 0x80:
        return pos + 1
    return _read_varint(view, pos, end, 10)[1]


def _skip_group(view: memoryview, pos: int, end: int, number: int, depth: int) -> int:
    """The position after the end-group tag matching ``number``, checking the group's fields as
    upb skips an unknown group (which allows field number 0 in it)."""
    if depth < 0:
        raise DecodeError(f"nested deeper than {MAX_DEPTH} at byte {pos}")
    while pos < end:
        tag_at = pos
        tag, pos = _read_varint(view, pos, end, 5)
        if tag > _MAX_TAG:
            raise DecodeError(f"tag out of range at byte {tag_at}")
        inner, wire_type = tag >> 3, tag & 7
        if wire_type == _DELIMITED:
            length_at = pos
            length, pos = _read_varint(view, pos, end, 5)
            if length >= _MAX_LENGTH or pos + length > end:
                raise DecodeError(f"length past the end at byte {length_at}")
            pos += length
        elif wire_type == _END_GROUP:
            if inner != number:
                raise DecodeError(f"end-group tag of field {inner} closes field {number} at byte {tag_at}")
            return pos
        else:
            pos = _skip_field(view, pos, end, inner, wire_type, tag_at, depth)
    raise DecodeError(f"group of field {number} not closed")


def _varint(value: int) -> bytes:
    """``value`` (taken as an unsigned 64-bit integer) as a varint."""
    value &= 0xFFFF_FFFF_FFFF_FFFF
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
