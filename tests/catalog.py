"""The losses as the wire schema lists them: names, count and the first field number after them.

Tests take loss names and counts from here (or from ``LOSSES``), never from a literal: adding a
loss to the ``ComputeRequest.loss`` oneof changes them everywhere at once.
"""

from __future__ import annotations

from remoteloss.v1 import loss_pb2 as pb

__all__ = ["LOSS_NAMES", "NEWER_LOSS_FIELD", "newer_loss_field"]

_ONEOF = pb.ComputeRequest.DESCRIPTOR.oneofs_by_name["loss"]

# Every loss, in the order of the oneof.
LOSS_NAMES: tuple[str, ...] = tuple(f.name for f in _ONEOF.fields)

# The field number a loss added after these would take: past the oneof, and no other field's.
NEWER_LOSS_FIELD: int = next(
    n for n in range(max(f.number for f in _ONEOF.fields) + 1, 2**29)
    if n not in pb.ComputeRequest.DESCRIPTOR.fields_by_number
)


def newer_loss_field(payload: bytes = b"") -> bytes:
    """``ComputeRequest`` bytes holding a loss field this server does not know (a newer client's):
    the field key (length-delimited) and ``payload`` as its message."""
    key = NEWER_LOSS_FIELD << 3 | 2
    out = bytearray()
    for value in (key, len(payload)):
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload
