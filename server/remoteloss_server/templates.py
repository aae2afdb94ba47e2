"""Request templates: what a small request's structure was found to be, kept for the next request
of the same structure.

A client sends the same call again and again with new numbers: the same loss, options, dtypes and
shapes; only its tensors' bytes differ. Its requests' bytes then differ only inside the ``data``
fields of its tensors, at the same places, since every tag and length around them is the same.
For a request that passed every check, ``Templates`` keeps its bytes but for those fields (a
``Template``) and what the checks found that depends on nothing else: the scan's outcome (no
unknown field, within the bounds), the loss, the elements declared, each tensor's dtype, shape
and place, the options. A later request of the same length whose bytes equal the template's
everywhere outside the tensors' data parses, field for field, to the same message but for those
bytes (a parser's every step depends on the tags and lengths it reads, and a ``bytes`` field's
content is taken as it is), so its call is the template's with tensors decoded from its own
bytes. The loss's own checks (``LossSpec.call``), which may read values (a class index in range,
CTC's lengths), run on them again, as does everything after: batching, compute, the answer. The
same call, bitwise, as the full path makes, for a fraction of its Python (``bench/run.py``).
A stream item's request is matched where it begins (``item_request``), and learned as a
``Compute`` call's.

Bounded: templates for at most ``capacity`` request sizes, ``PER_SIZE`` for each (the most recent
first out), learned only from requests of at most ``MAX_REQUEST_BYTES``, each holding at most
``MAX_KEPT_BYTES`` of the request. A request that matches none takes the full path, and becomes
a template once it has passed it if a request of its size missed before, among the last
``SEEN_PER_SIZE`` times ``capacity`` sizes that missed (a doorkeeper, as caches admit a key on its
second sight): a structure sent once, as by a caller who sends a new one every call, is neither
kept nor pushes out one in use, and costs nothing but the full path and a dictionary's entry.
The places a template keeps are found by that path's own scan (``field_scan.Layout``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from google.protobuf.message import DecodeError
from remoteloss import _wire as wire
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb

from remoteloss_server.field_scan import MAX_FIELDS, Layout
from remoteloss_server.losses import LOSSES, Call

__all__ = [
    "DEFAULT_CAPACITY", "MAX_KEPT_BYTES", "MAX_REQUEST_BYTES", "PER_SIZE", "SEEN_PER_SIZE", "Template", "Templates",
    "item_request",
]

DEFAULT_CAPACITY = 64  # request sizes with templates (``--request-templates``)
PER_SIZE = 4  # templates of one request size: e.g. one loss's "mean" and "sum" calls, which differ in a byte
MAX_REQUEST_BYTES = 64 * 1024  # above this a request's Python costs little beside its bytes' travel
MAX_KEPT_BYTES = 4096  # of a request's bytes outside its tensors' data: a call sends a few hundred
SEEN_PER_SIZE = 4  # sizes that missed, remembered for each size with templates: a size is learned on its second miss
_LITTLE = sys.byteorder == "little"  # a big-endian host decodes by the full path alone


class _Tensor(NamedTuple):
    name: str  # the loss's argument, or "grad_output"
    start: int  # where its data begins and ends in the request
    end: int
    info: codec.DTypeInfo
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Template:
    """A checked request's structure: its bytes outside its tensors' data, and what they say."""

    size: int
    kept: tuple[tuple[int, bytes], ...]  # (offset, bytes): all of the request but its tensors' data
    fields: int  # as field_scan counts them
    loss: str
    label: pb.ComputeRequest  # an empty request of the loss: what the metrics' label reads
    elements: int  # declared by the loss's tensors, as ``Intake.check`` counts them
    tensors: tuple[_Tensor, ...]  # the loss's
    grad_output: _Tensor | None
    options: Mapping[str, Any]  # as decoded, before the loss's checks
    requires_grad: tuple[str, ...]

    def matches(self, data: bytes, base: int) -> bool:
        """Whether ``data`` from ``base`` on (the template's size) equals the template outside its
        tensors' data."""
        return all(data.startswith(kept, base + at) for at, kept in self.kept)

    def call(self, request: bytes | memoryview, max_elements: int | None) -> tuple[Call, torch.Tensor | None]:
        """The call of ``request``, which ``matches``: the loss's checks run on its own tensors."""
        view = memoryview(request)
        tensors = {t.name: _decoded(view, t) for t in self.tensors}
        call = LOSSES[self.loss].call(tensors, dict(self.options), self.requires_grad, max_elements)
        return call, None if self.grad_output is None else _decoded(view, self.grad_output)


def _decoded(view: memoryview, tensor: _Tensor) -> torch.Tensor:
    """A tensor of its own memory (writable, as ``codec.decode_torch`` makes it) from its place."""
    return codec.tensor_from(tensor.info, tensor.shape, memoryview(bytearray(view[tensor.start:tensor.end])))


def item_request(data: bytes) -> tuple[int, int, int] | None:
    """A ``ComputeStreamRequest`` laid out as its id (when not 0), then its request to the end, as
    the SDK and most encoders write it: its id, where its request begins, and the fields besides
    the request's (as ``field_scan`` counts them); None for any other layout."""
    try:
        item_id, begin, fields = 0, 0, 1
        if data[:1] == b"\x08":
            item_id, begin = wire.read_varint(data, 1, len(data), 10)
            fields = 2
        if data[begin:begin + 1] != b"\x12":
            return None
        length, begin = wire.read_varint(data, begin + 1, len(data), 5)
    except DecodeError:
        return None
    return (item_id, begin, fields) if begin + length == len(data) else None


class Templates:
    """The templates of recent request structures, by request size (see the module's docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.capacity = capacity if _LITTLE else 0
        self.max_request_bytes = max_request_bytes
        self._by_size: dict[int, list[Template]] = {}
        self._missed: dict[int, None] = {}  # the sizes that missed last, oldest first
        self.hits = self.learned = 0

    def counts(self) -> dict[str, int]:
        """Requests that matched a template, and templates kept, so far (the metrics read them)."""
        return {"hit": self.hits, "learned": self.learned}

    def match(self, data: bytes, base: int = 0, fields: int = 0) -> Template | None:
        """The template ``data`` from ``base`` on matches, if any; ``fields`` more around it (a
        stream item's) must keep it within ``field_scan.MAX_FIELDS``, as its scan would."""
        for template in self._by_size.get(len(data) - base, ()):
            if template.matches(data, base) and template.fields + fields <= MAX_FIELDS:
                self.hits += 1
                return template
        return None

    def learnable(self, data: bytes | memoryview) -> bool:
        """Whether ``data``, which matched no template, may become one once it has passed every
        check: a small request of a size that missed before (which this call remembers)."""
        size = len(data)
        if not 0 < size <= self.max_request_bytes or self.capacity <= 0:
            return False
        if size in self._missed:
            return True
        self._missed[size] = None
        if len(self._missed) > SEEN_PER_SIZE * self.capacity:
            del self._missed[next(iter(self._missed))]
        return False

    def learn(
        self, data: bytes | memoryview, layout: Layout, elements: int, call: Call, grad_output: torch.Tensor | None,
    ) -> None:
        """Keep ``data``'s structure (``layout``, as its scan found it): it passed every check,
        declaring ``elements``, and became ``call`` (and ``grad_output``). A request whose tensors'
        places are not one each (an empty tensor sends none, a repeated field more than one) is
        not kept."""
        loss = call.loss
        spans, fields = layout.spans, layout.fields
        decoded = {**call.tensors, **({} if grad_output is None else {"grad_output": grad_output})}
        places = {_argument(path, loss): (start, end) for path, start, end in spans}
        if len(spans) != len(decoded) or places.keys() != decoded.keys():
            return  # None among the keys too: another loss's bytes
        tensors = {
            name: _Tensor(name, start, end, codec.DTYPES[codec.dtype_from_torch(decoded[name].dtype)],
                          tuple(decoded[name].shape))
            for name, (start, end) in places.items() if name is not None
        }
        if len(data) - sum(end - start for start, end in places.values()) > MAX_KEPT_BYTES:
            return  # counted before anything is copied
        kept, at = [], 0
        for start, end in sorted(places.values()):
            kept.append((at, bytes(data[at:start])))
            at = end
        kept.append((at, bytes(data[at:])))
        outside = tuple(kept)
        if any(known.kept == outside for known in self._by_size.get(len(data), ())):
            return  # kept already: requests read together (a stream's) all miss before the first is kept
        label = pb.ComputeRequest()
        getattr(label, loss).SetInParent()
        template = Template(
            len(data), outside, fields, loss, label, elements,
            tuple(tensor for name, tensor in tensors.items() if name != "grad_output"), tensors.get("grad_output"),
            dict(call.options), call.requires_grad,
        )
        self._keep(template)

    def _keep(self, template: Template) -> None:
        if self.capacity <= 0:
            return
        self.learned += 1
        same = self._by_size.pop(template.size, [])
        while len(self._by_size) >= self.capacity:
            del self._by_size[next(iter(self._by_size))]  # the size learned longest ago
        self._by_size[template.size] = [template, *same[:PER_SIZE - 1]]


def _argument(path: tuple[str, ...], loss: str) -> str | None:
    """The argument whose data a ``bytes`` field at ``path`` is: ``(loss, name, "data")`` or
    ``("grad_output", "data")``; None for any other (another loss's, in a repeated oneof)."""
    if path == ("grad_output", "data"):
        return "grad_output"
    if len(path) == 3 and path[0] == loss and path[2] == "data":
        return path[1]
    return None
