"""``split``'s walk over a serialized message: each ``Tensor.data`` becomes a placeholder."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from remoteloss._wire.encoding import (
    DELIMITED,
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_TAG,
    VARINT,
    read_varint,
    skip_field,
    skip_varint,
    varint,
)
from remoteloss._wire.payloads import PLACEHOLDER_SIZE, Payloads, placeholder
from remoteloss._wire.plans import DATA, MAP_VALUE, Plan

__all__ = ["Part", "Walk"]

Part = bytes | memoryview
_Key = tuple[int, ...]  # a message's place in the parsed tree, as a path of field numbers

_DATA_TAG = bytes([DATA << 3 | DELIMITED, PLACEHOLDER_SIZE])
_MAP_VALUE_TAG = bytes([MAP_VALUE << 3 | DELIMITED])


class _Spans:
    """A message's bytes as they are rebuilt: spans of the input kept as they came, and new
    bytes between them (``parts`` stays None while nothing changed)."""

    __slots__ = ("kept", "parts", "size")

    def __init__(self, start: int) -> None:
        self.parts: list[Part] | None = None
        self.size = 0
        self.kept = start  # where the span not yet in ``parts`` starts

    def replace(self, view: memoryview, upto: int, resume: int, new: Sequence[Part], new_size: int) -> None:
        """Keep ``view[kept:upto]``, then ``new`` (``new_size`` bytes); go on from ``resume``."""
        if self.parts is None:
            self.parts = []
        if self.kept < upto:
            self.parts.append(view[self.kept : upto])
            self.size += upto - self.kept
        self.parts += new
        self.size += new_size
        self.kept = resume

    def finish(self, view: memoryview, end: int, tail: list[Part]) -> tuple[list[Part], int] | None:
        """The rebuilt fields up to ``end``, then ``tail``, and their size; None if unchanged."""
        if self.parts is None and not tail:
            return None
        parts = [] if self.parts is None else self.parts
        size = self.size
        if self.kept < end:
            parts.append(view[self.kept : end])
            size += end - self.kept
        parts += tail
        size += sum(len(part) for part in tail)
        return parts, size


class Walk:
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

    def message(self, start: int, end: int, plan: Plan, key: _Key, depth: int) -> tuple[list[Part], int] | None:
        """Walk the fields in ``view[start:end]``; return the new fields and their size, or None
        when nothing changed."""
        view = self.view
        oneofs = plan.oneofs
        entry = plan.entry
        stray = False  # a map entry has a field other than its key and value
        spans = _Spans(start)
        data: tuple[int, int] | None = None  # a Tensor's last data field
        has_value = False  # a map entry's value was seen
        pos = start
        while pos < end:
            field_start = pos
            tag = view[pos]
            pos += 1
            if tag >= 0x80:
                tag, pos = read_varint(view, field_start, end, 5)
                if tag > MAX_TAG:
                    raise DecodeError(f"tag out of range at byte {field_start}")
            number = tag >> 3
            wire_type = tag & 7
            if number == 0:
                raise DecodeError(f"field number 0 at byte {field_start}")
            if oneofs and number in oneofs:
                self._oneof(key, number, wire_type, oneofs[number], pos, end)
            if entry is not None and not stray:
                stray = number > 2 or wire_type != entry[number - 1]
            if wire_type == DELIMITED:
                has_value = has_value or (number == MAP_VALUE and number in plan.children)
                pos, found = self._delimited(spans, plan, key, number, field_start, pos, end, depth)
                if found is not None:
                    data = found
            elif wire_type == VARINT:  # the most frequent kind, inline
                pos = skip_varint(view, pos, end)
            else:
                pos = skip_field(view, pos, end, number, wire_type, field_start, depth)
        if stray:
            self._clear(key)  # the entry stays as it came, an unknown field
            return None
        return spans.finish(view, end, self._tail(plan, key, data, has_value, start))

    def _delimited(
        self, spans: _Spans, plan: Plan, key: _Key, number: int, field_start: int, pos: int, end: int, depth: int
    ) -> tuple[int, tuple[int, int] | None]:
        """Read the length-delimited field whose value starts at ``pos``: a message field is walked
        (and replaced in ``spans`` when it changed), a Tensor's data cut out. Returns the position
        after it and, for a Tensor's data, where that data is."""
        view = self.view
        length_at = pos
        length = view[pos] if pos < end else 0x80
        pos += 1
        if length >= 0x80:
            length, pos = read_varint(view, length_at, end, 5)
            if length >= MAX_LENGTH:
                raise DecodeError(f"length out of range at byte {length_at}")
        body = pos
        pos += length
        if pos > end:
            raise DecodeError(f"length past the end at byte {length_at}")
        child = plan.children.get(number)
        if child is not None:
            if depth <= 0:
                raise DecodeError(f"nested deeper than {MAX_DEPTH} at byte {field_start}")
            if child[1]:
                self.occurrences += 1
                child_key = (*key, number, self.occurrences)
            else:
                child_key = (*key, number)
            changed = self.message(body, pos, child[0], child_key, depth - 1)
            if changed is not None:
                new_length = varint(changed[1])
                spans.replace(view, length_at, pos, [new_length, *changed[0]], len(new_length) + changed[1])
        elif plan.tensor and number == DATA:
            spans.replace(view, field_start, pos, (), 0)
            return pos, (body, pos)
        return pos, None

    def _tail(self, plan: Plan, key: _Key, data: tuple[int, int] | None, has_value: bool, start: int) -> list[Part]:
        """What ends a message: a Tensor's placeholder field, or a Tensor map entry's missing value."""
        if plan.tensor:
            field = self._tensor(key, None if data is None else self.view[data[0] : data[1]], start)
            return [] if field is None else [field]
        if plan.tensor_map and not has_value:  # a missing value is an empty Tensor
            field = self._tensor((*key, MAP_VALUE), None, start)
            assert field is not None
            return [_MAP_VALUE_TAG, varint(len(field)), field]
        return []

    def _tensor(self, key: _Key, data: memoryview | None, start: int) -> bytes | None:
        """The placeholder field ending a Tensor's occurrence; None when an earlier occurrence
        set its data and this one does not change it."""
        index = self.tensors.get(key)
        if index is None:
            index = self.payloads.issue(self.view[start:start] if data is None else data)
            self.tensors[key] = index
        elif data is not None:
            self.payloads.replace(index, data)
        else:
            return None
        return _DATA_TAG + placeholder(index)

    def _oneof(
        self, key: _Key, number: int, wire_type: int, member: tuple[int, int, frozenset[int] | None], pos: int, end: int
    ) -> None:
        """Follow a oneof member being set: a different member clears the one set before."""
        index, expected, closed = member
        if wire_type != expected:
            return  # parsed as an unknown field
        if closed is not None:
            value = read_varint(self.view, pos, end, 10)[0]
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
            self.payloads.replace(self.tensors.pop(key), self.view[0:0])
        for slot in [s for s in self.members if s[0][:width] == prefix]:
            del self.members[slot]
