"""A bounded walk over a request's wire bytes, before it is parsed (no grpc, no torch).

A request is a few dozen fields: a loss, its tensors (dtype, shape, data, requires_grad) and a
handful of options. ``scan`` walks the fields of a serialized message as its schema describes
them, descending into known message fields and skipping every value by its length, and stops

- at the first field the schema does not know (a number it lacks, or a known number with a wire
  type that upb would keep as an unknown field): it returns where that field is, and the
  request is UNIMPLEMENTED without any unknown field being materialized;
- past ``max_fields`` fields in all (a packed field's entries each count; for varints each byte,
  as an entry takes one at least), or at a string longer than ``MAX_STRING_BYTES``:
  ``FieldLimitError`` (INVALID_ARGUMENT), so neither this walk nor ``wire.split``'s, which visits
  the same fields, grows with the request's size, and no option value of megabytes reaches torch
  (whose message would quote it);
- at bytes that are not well formed: ``DecodeError``, as upb would raise.

Nothing after the first unknown field is read; upb (in C) parses the rest.

A protocol whose readers skip unknown fields (the Open Inference Protocol's) scans with
``skip_unknown``: each unknown field is skipped by its length and counted, and the walk goes on,
so the bound holds for the whole message. Its typed tensor values (``listed``: the message type
that holds them) count against a budget of their own, ``max_listed`` values in all, packed or not.

Given a ``Layout``, the same walk also records where each ``bytes`` field's value lies and how
many fields it counted: what a request template keeps (``templates``), found without a second walk.
"""

from __future__ import annotations

from dataclasses import dataclass, field as _field
from typing import TYPE_CHECKING

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from remoteloss import _wire as wire

from remoteloss_server.errors import InvalidArgumentError

if TYPE_CHECKING:
    from google._upb._message import Descriptor as _UpbDescriptor

__all__ = ["MAX_FIELDS", "MAX_STRING_BYTES", "FieldLimitError", "Layout", "Span", "UnknownField", "scan"]

# Fields one request may hold, at every depth. The largest legitimate ComputeRequest (five
# tensors of rank 64 with unpacked shapes, every option, a grad_output) holds about 400; a packed
# shape of rank 8 with sizes up to 2**21 counts 24 at most.
MAX_FIELDS = 1024
# Bytes of one string field: the requests' strings are option values such as "aspect_ratio:8".
MAX_STRING_BYTES = 1024

# A ``bytes`` field's place: the names of the fields that lead to it, its own last, and where its
# value starts and ends in the scanned bytes.
Span = tuple[tuple[str, ...], int, int]

_VARINT, _FIXED64, _DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = range(6)
_MAX_TAG = 0xFFFF_FFFF  # upb reads a tag as a 32-bit varint
_MAX_LENGTH = 0x7FFF_FFFF  # upb rejects lengths from INT32_MAX on
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
}


@dataclass(frozen=True)
class UnknownField:
    """A field the schema does not know: its number, the names of the message fields leading to
    the message that holds it (empty: the scanned message itself), and that message's type name."""

    number: int
    path: tuple[str, ...]
    holder: str

    def describe(self) -> str:
        """E.g. "field 23 of mse_loss", "field 5 of mse_loss.input", "field 5 of ComputeRequest"."""
        return f"field {self.number} of {'.'.join(self.path) or self.holder}"

    def below(self, name: str) -> UnknownField | None:
        """The same field as seen from the message field ``name``, when it lies inside it."""
        if not self.path or self.path[0] != name:
            return None
        return UnknownField(self.number, self.path[1:], self.holder)


@dataclass(slots=True)
class Layout:
    """What a ``scan`` that found no unknown field saw of a message: the place of each ``bytes``
    field, in the order met, and the fields it holds, as the scan counts them."""

    spans: list[Span] = _field(default_factory=list)
    fields: int = 0

    def inside(self, name: str, begin: int, around: int) -> Layout:
        """The layout of the message field ``name`` (not repeated) whose value begins at byte
        ``begin``, when ``around`` of the fields counted lie outside it."""
        spans = [(path[1:], start - begin, end - begin) for path, start, end in self.spans if path[:1] == (name,)]
        return Layout(spans, self.fields - around)


class FieldLimitError(InvalidArgumentError):
    """A request of more than ``MAX_FIELDS`` fields, or with a string of more than
    ``MAX_STRING_BYTES``."""

    @classmethod
    def fields(cls, limit: int, field: str) -> FieldLimitError:
        return cls(
            f"the request holds more than {limit} fields, this server's limit for one request "
            f"(field {limit + 1} is {field}); a request needs a few dozen"
        )

    @classmethod
    def string(cls, length: int, field: str) -> FieldLimitError:
        return cls(f"{field} holds {length} bytes, more than this server's limit of {MAX_STRING_BYTES} for a string")


# What a known tag's value is, and so what the walk does with it.
_SKIP_VARINT, _SKIP_FIXED64, _SKIP_FIXED32, _BYTES, _STRING, _MESSAGE, _PACKED = range(7)


class _Field:
    __slots__ = ("action", "child", "name", "width")

    def __init__(self, name: str, action: int, child: _Plan | None = None, width: int = 0) -> None:
        self.name = name
        self.action = action
        self.child = child  # _MESSAGE: the plan of its type
        self.width = width  # _PACKED: the entries' width in bytes, 0 for varints


class _Plan:
    """The fields of one message type, by tag (field number and wire type), as upb keeps them:
    a known number of another wire type is an unknown field (but for packed and unpacked runs)."""

    __slots__ = ("name", "tags")

    def __init__(self, name: str) -> None:
        self.name = name
        self.tags: dict[int, _Field] = {}


_PLANS: dict[object, _Plan] = {}
_ACTIONS = {_VARINT: _SKIP_VARINT, _FIXED64: _SKIP_FIXED64, _FIXED32: _SKIP_FIXED32}


def _plan(descriptor: Descriptor | _UpbDescriptor) -> _Plan:
    """The plan of a message type and of every type it reaches, made once."""
    plan = _PLANS.get(descriptor)
    if plan is not None:
        return plan
    reached: dict[str, Descriptor | _UpbDescriptor] = {}
    pending = [descriptor]
    while pending:
        d = pending.pop()
        if d.full_name not in reached:
            reached[d.full_name] = d
            pending.extend(f.message_type for f in d.fields if f.message_type is not None)
    made = {name: _Plan(d.name) for name, d in reached.items()}
    for name, d in reached.items():
        tags = made[name].tags
        for f in d.fields:
            if f.type == FieldDescriptor.TYPE_GROUP:
                raise ValueError(f"{f.full_name}: group-encoded fields are not supported")
            wire_type = _WIRE_TYPES.get(f.type, _VARINT)
            if f.message_type is not None:
                field = _Field(f.name, _MESSAGE, made[f.message_type.full_name])
            elif wire_type == _DELIMITED:
                field = _Field(f.name, _STRING if f.type == FieldDescriptor.TYPE_STRING else _BYTES)
            else:
                field = _Field(f.name, _ACTIONS[wire_type])
                if f.is_repeated:  # packable: a packed run is known too
                    width = 8 if wire_type == _FIXED64 else 4 if wire_type == _FIXED32 else 0
                    tags[f.number << 3 | _DELIMITED] = _Field(f.name, _PACKED, width=width)
            tags[f.number << 3 | wire_type] = field
    _PLANS.update((d, made[name]) for name, d in reached.items())
    return made[descriptor.full_name]


def scan(
    data: bytes | memoryview, descriptor: Descriptor | _UpbDescriptor, *, max_fields: int = MAX_FIELDS,
    skip_unknown: bool = False, listed: Descriptor | _UpbDescriptor | None = None, max_listed: int = 0,
    layout: Layout | None = None,
) -> UnknownField | None:
    """The first field of ``data`` (a serialized ``descriptor`` message) that the schema does not
    know, or None when it knows them all; see the module's docstring. Visits at most
    ``max_fields`` fields (``FieldLimitError`` past them) and reads nothing after an unknown
    field; raises DecodeError for bytes that are not well formed before that. With
    ``skip_unknown``, unknown fields are skipped (and counted) instead, and it returns None; the
    scalar values in ``listed`` messages count against ``max_listed``, not ``max_fields``. A
    ``layout`` (empty) is filled as the walk goes: whole when it returns None."""
    view = data if isinstance(data, bytes) else memoryview(data).cast("B")
    spans = None if layout is None else layout.spans
    walk = _Scan(view, max_fields, skip_unknown, None if listed is None else _plan(listed), max_listed, spans)
    found = walk.message(0, len(view), _plan(descriptor), (), wire.MAX_DEPTH)
    if layout is not None:
        layout.fields = max_fields - walk.left
    return found


class _Scan:
    __slots__ = ("left", "limit", "listed", "listed_left", "max_listed", "skip_unknown", "spans", "view")

    def __init__(
        self, view: bytes | memoryview, limit: int, skip_unknown: bool = False,
        listed: _Plan | None = None, max_listed: int = 0, spans: list[Span] | None = None,
    ) -> None:
        self.view = view
        self.spans = spans
        self.limit = limit
        self.left = limit  # fields that may still be visited
        self.skip_unknown = skip_unknown
        self.listed = listed
        self.max_listed = max_listed
        self.listed_left = max_listed  # values of ``listed`` messages that may still be visited

    def message(self, start: int, end: int, plan: _Plan, path: tuple[str, ...], depth: int) -> UnknownField | None:
        view = self.view
        tags = plan.tags
        left = self.left
        pos = start
        while pos < end:
            at = pos
            tag = view[pos]
            pos += 1
            if tag >= 0x80:
                tag, pos = wire.read_varint(view, at, end, 5)
            known = tags.get(tag)
            if known is None:
                unknown = _unknown(tag, at, path, plan)
                if not self.skip_unknown:
                    return unknown
                left -= 1
                if left < 0:
                    raise FieldLimitError.fields(self.limit, unknown.describe())
                pos = _skip(view, pos, end, tag, at)
                continue
            left -= 1
            if left < 0:
                raise FieldLimitError.fields(self.limit, _name(known, path, plan))
            action = known.action
            if action == _SKIP_VARINT:
                if pos < end and view[pos] < 0x80:
                    pos += 1
                else:
                    pos = wire.read_varint(view, pos, end, 10)[1]
                continue
            if action == _SKIP_FIXED64 or action == _SKIP_FIXED32:
                pos += 8 if action == _SKIP_FIXED64 else 4
                if pos > end:
                    raise DecodeError(f"truncated fixed-size field at byte {at}")
                continue
            length, pos = _length(view, pos, end)
            if action == _MESSAGE:
                if depth <= 0:
                    raise DecodeError(f"nested deeper than {wire.MAX_DEPTH} at byte {at}")
                assert known.child is not None
                self.left = left
                if known.child is self.listed:
                    found = self._values(pos, pos + length, known.child, (*path, known.name))
                else:
                    found = self.message(pos, pos + length, known.child, (*path, known.name), depth - 1)
                if found is not None:
                    return found
                left = self.left
            elif action == _PACKED and length > 1:  # each entry counts as a field; for varints each byte
                left -= (length // known.width if known.width else length) - 1
                if left < 0:
                    raise FieldLimitError.fields(self.limit, _name(known, path, plan))
            elif action == _STRING and length > MAX_STRING_BYTES:
                raise FieldLimitError.string(length, _name(known, path, plan))
            elif action == _BYTES and self.spans is not None:
                self.spans.append(((*path, known.name), pos, pos + length))
            pos += length
        self.left = left
        return None

    def _values(self, start: int, end: int, plan: _Plan, path: tuple[str, ...]) -> UnknownField | None:
        """A ``listed`` message: its scalar values, packed or not, count against ``max_listed``;
        its other fields (and, with ``skip_unknown``, unknown ones) against the fields."""
        view = self.view
        pos = start
        while pos < end:
            at = pos
            tag, pos = wire.read_varint(view, at, end, 5)
            known = plan.tags.get(tag)
            action = None if known is None else known.action
            if action == _PACKED:
                assert known is not None
                length, pos = _length(view, pos, end)
                if known.width:
                    values = length // known.width
                else:  # varints: one value per byte below 0x80, counted in C
                    values = len(bytes(view[pos:pos + length]).translate(None, _HIGH_BYTES))
                pos += length
            elif action in (_SKIP_VARINT, _SKIP_FIXED64, _SKIP_FIXED32):
                values = 1
                pos = _skip(view, pos, end, tag, at)
            else:  # bytes, or a field the schema does not know
                if known is None:
                    found = _unknown(tag, at, path, plan)
                    if not self.skip_unknown:
                        return found
                    field = found.describe()
                else:
                    field = _name(known, path, plan)
                self.left -= 1
                if self.left < 0:
                    raise FieldLimitError.fields(self.limit, field)
                pos = _skip(view, pos, end, tag, at)
                continue
            self.listed_left -= values
            if self.listed_left < 0:
                raise FieldLimitError(
                    f"the request lists more than {self.max_listed} values in {'.'.join(path)} in all, this "
                    "server's limit (each becomes a Python object); send large tensors as raw bytes"
                )
        return None


_HIGH_BYTES = bytes(range(0x80, 0x100))


def _skip(view: bytes | memoryview, pos: int, end: int, tag: int, at: int) -> int:
    """Past the value of the field whose tag (at ``at``) ends at ``pos``; a group is refused, as
    walking one would visit its fields unbounded (``_unknown`` has refused invalid wire types)."""
    wire_type = tag & 7
    if wire_type == _VARINT:
        return wire.read_varint(view, pos, end, 10)[1]
    if wire_type == _DELIMITED:
        length, pos = _length(view, pos, end)
        return pos + length
    if wire_type == _START_GROUP:
        raise FieldLimitError(f"field {tag >> 3} is a group, which this server does not read")
    pos += 8 if wire_type == _FIXED64 else 4
    if pos > end:
        raise DecodeError(f"truncated fixed-size field at byte {at}")
    return pos


def _length(view: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """A length-delimited field's length at ``pos``, and where its bytes begin."""
    length_at = pos
    length = view[pos] if pos < end else 0x80
    pos += 1
    if length >= 0x80:
        high = view[pos] if pos < end else 0x80
        if high < 0x80:  # two bytes or three, as for most tensors' data
            length = length & 0x7F | high << 7
            pos += 1
        elif pos + 1 < end and view[pos + 1] < 0x80:
            length = length & 0x7F | (high & 0x7F) << 7 | view[pos + 1] << 14
            pos += 2
        else:
            length, pos = wire.read_varint(view, length_at, end, 5)
    if length >= _MAX_LENGTH or pos + length > end:
        raise DecodeError(f"length past the end at byte {length_at}")
    return length, pos


def _unknown(tag: int, at: int, path: tuple[str, ...], plan: _Plan) -> UnknownField:
    """The unknown field of a tag that is no known one; DecodeError where upb would raise."""
    if tag > _MAX_TAG:
        raise DecodeError(f"tag out of range at byte {at}")
    number, wire_type = tag >> 3, tag & 7
    if number == 0:
        raise DecodeError(f"field number 0 at byte {at}")
    if wire_type == _END_GROUP or wire_type > _FIXED32:
        raise DecodeError(f"invalid wire type {wire_type} at byte {at}")
    return UnknownField(number, path, plan.name)  # a group too: the plans have none


def _name(field: _Field, path: tuple[str, ...], plan: _Plan) -> str:
    """E.g. "shape of mse_loss.input"."""
    return f"{field.name} of {'.'.join(path) or plan.name}"
