"""``join``'s walk: each ``Tensor.data`` placeholder replaced by the bytes it stands for."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from remoteloss._wire.encoding import DELIMITED, MAX_DEPTH, read_varint, skip_field, varint
from remoteloss._wire.payloads import Payloads
from remoteloss._wire.plans import DATA, Plan
from remoteloss._wire.stripping import Part

__all__ = ["join_fields"]


def join_fields(
    view: memoryview, start: int, end: int, plan: Plan, payloads: Payloads, depth: int
) -> tuple[list[Part], int] | None:
    """The fields in ``view[start:end]`` with the placeholders resolved, and their size; None
    when there is none."""
    parts: list[Part] = []
    size = 0
    kept = start  # where the span not yet in ``parts`` starts
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = read_varint(view, pos, end, 5)
        number, wire_type = tag >> 3, tag & 7
        if wire_type != DELIMITED:
            pos = skip_field(view, pos, end, number, wire_type, field_start, depth)
            continue
        length_at = pos
        length, body = read_varint(view, pos, end, 5)
        pos = body + length
        if pos > end:
            raise DecodeError(f"length past the end at byte {length_at}")
        child = plan.children.get(number)
        if child is not None:
            if depth <= 0:
                raise DecodeError(f"nested deeper than {MAX_DEPTH} at byte {field_start}")
            changed = join_fields(view, body, pos, child[0], payloads, depth - 1)
            if changed is None:
                continue
            new: list[Part] = [view[kept:length_at], varint(changed[1]), *changed[0]]
            size += length_at - kept + len(new[1]) + changed[1]
        elif plan.tensor and number == DATA:
            data = payloads.resolve(view[body:pos])
            new = [view[kept:field_start]]
            size += field_start - kept
            if data.nbytes:
                head = view[field_start:length_at].tobytes() + varint(data.nbytes)
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
