"""The protobuf wire format itself: wire types, varints, and skipping a field's value.

Limits and errors as upb's: a tag is a 32-bit varint, a length below INT32_MAX, and malformed
bytes raise ``DecodeError`` naming the byte where they start.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

MAX_DEPTH = 100  # nested messages and groups, as upb allows by default

VARINT, FIXED64, DELIMITED, START_GROUP, END_GROUP, FIXED32 = range(6)
MAX_TAG = 0xFFFF_FFFF  # upb reads a tag as a 32-bit varint (at most 5 bytes)
MAX_LENGTH = 0x7FFF_FFFF  # upb rejects lengths from INT32_MAX on (also at most 5 bytes)
MAX_FIELD_NUMBER = (1 << 29) - 1


def skip_field(view: memoryview, pos: int, end: int, number: int, wire_type: int, at: int, depth: int) -> int:
    """The position after the value at ``pos`` of a field that is not length-delimited, whose tag
    is at ``at``."""
    if wire_type == VARINT:
        return skip_varint(view, pos, end)
    if wire_type == FIXED64 or wire_type == FIXED32:
        pos += 8 if wire_type == FIXED64 else 4
        if pos > end:
            raise DecodeError(f"truncated fixed-size field at byte {at}")
        return pos
    if wire_type == START_GROUP:
        return skip_group(view, pos, end, number, depth - 1)
    if wire_type == END_GROUP:
        raise DecodeError(f"end-group tag outside a group at byte {at}")
    raise DecodeError(f"invalid wire type {wire_type} at byte {at}")


def read_varint(view: bytes | memoryview, start: int, end: int, limit: int) -> tuple[int, int]:
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


def skip_varint(view: memoryview, pos: int, end: int) -> int:
    if pos < end and view[pos] < 0x80:
        return pos + 1
    return read_varint(view, pos, end, 10)[1]


def skip_group(view: memoryview, pos: int, end: int, number: int, depth: int) -> int:
    """The position after the end-group tag matching ``number``, checking the group's fields as
    upb skips an unknown group (which allows field number 0 in it)."""
    if depth < 0:
        raise DecodeError(f"nested deeper than {MAX_DEPTH} at byte {pos}")
    while pos < end:
        tag_at = pos
        tag, pos = read_varint(view, pos, end, 5)
        if tag > MAX_TAG:
            raise DecodeError(f"tag out of range at byte {tag_at}")
        inner, wire_type = tag >> 3, tag & 7
        if wire_type == DELIMITED:
            length_at = pos
            length, pos = read_varint(view, pos, end, 5)
            if length >= MAX_LENGTH or pos + length > end:
                raise DecodeError(f"length past the end at byte {length_at}")
            pos += length
        elif wire_type == END_GROUP:
            if inner != number:
                raise DecodeError(f"end-group tag of field {inner} closes field {number} at byte {tag_at}")
            return pos
        else:
            pos = skip_field(view, pos, end, inner, wire_type, tag_at, depth)
    raise DecodeError(f"group of field {number} not closed")


def varint(value: int) -> bytes:
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
