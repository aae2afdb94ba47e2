"""ModelInfer's raw tensor bytes without protobuf's copies.

upb copies a request's ``raw_input_contents`` when it parses the request and again each time one
is read, and copies each ``raw_output_contents`` entry into the answer and again when the answer
is serialized: four copies of every tensor, a few milliseconds at 1,000,000 float32. As the
native Compute does from ``wire.SPLIT_BYTES`` on, a large request's raw entries are cut out of
the received bytes as views (``split``) and upb parses only the rest; an answer's raw entries are
appended to the serialized rest as their own length-delimited fields (``answer``): protobuf
readers merge the fields of concatenated messages, and repeated entries keep their order.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from remoteloss import _wire as wire

__all__ = ["answer", "split"]

_RAW_INPUT = 7  # ModelInferRequest.raw_input_contents
_RAW_OUTPUT_TAG = wire.varint(6 << 3 | wire.DELIMITED)  # ModelInferResponse.raw_output_contents
# Top-level fields walked in Python at most; past it (a flood of tiny fields) upb parses it all, in C.
_MAX_FIELDS = 1024


def split(data: bytes) -> tuple[bytes, list[memoryview]] | None:
    """``data`` without its ``raw_input_contents``, and those entries as views of ``data``; None
    where upb should parse ``data`` whole: below ``wire.SPLIT_BYTES``, past ``_MAX_FIELDS``
    top-level fields, or bytes that do not parse (upb then says why)."""
    if len(data) < wire.SPLIT_BYTES:
        return None
    view = memoryview(data)
    end = len(data)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    pos = 0
    try:
        for _ in range(_MAX_FIELDS):
            if pos >= end:
                return b"".join(rest), raw
            at = pos
            tag, pos = wire.read_varint(view, pos, end, 5)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == wire.DELIMITED:
                length, pos = wire.read_varint(view, pos, end, 5)
                if pos + length > end:
                    return None
                if number == _RAW_INPUT:
                    raw.append(view[pos:pos + length])
                else:
                    rest.append(view[at:pos + length])
                pos += length
            else:
                pos = wire.skip_field(view, pos, end, number, wire_type, at, wire.MAX_DEPTH)
                rest.append(view[at:pos])
    except DecodeError:
        return None
    return None


def answer(head: bytes, contents: Sequence[memoryview | bytes]) -> bytes:
    """A serialized ModelInferResponse: ``head`` (the response without raw_output_contents), then
    each of ``contents`` as a raw_output_contents entry, copied once."""
    parts: list[bytes | memoryview] = [head]
    for data in contents:
        parts += (_RAW_OUTPUT_TAG, wire.varint(len(data) if isinstance(data, bytes) else data.nbytes), data)
    return b"".join(parts)
