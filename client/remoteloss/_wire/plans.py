"""What ``split`` and ``join`` need of a message type: where its Tensors are (a ``Plan``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from remoteloss._wire.encoding import DELIMITED, FIXED32, FIXED64, START_GROUP, VARINT
from remoteloss.v1 import loss_pb2 as pb

if TYPE_CHECKING:
    from google._upb._message import Descriptor as _UpbDescriptor  # how stubs type Message.DESCRIPTOR

__all__ = ["DATA", "MAP_VALUE", "TENSOR", "Plan", "plan"]

TENSOR = pb.Tensor.DESCRIPTOR
DATA = TENSOR.fields_by_name["data"].number
MAP_VALUE = 2


class Plan:
    """What ``split`` needs of one message type."""

    __slots__ = ("children", "entry", "oneofs", "tensor", "tensor_map")

    def __init__(self, tensor: bool) -> None:
        self.tensor = tensor  # remoteloss.v1.Tensor itself
        self.children: dict[int, tuple[Plan, bool]] = {}  # message fields: number -> (plan, repeated)
        # Members of the oneofs that hold Tensors: number -> (oneof index, wire type, values of a
        # closed enum). Setting another member clears the one set before, which split follows.
        self.oneofs: dict[int, tuple[int, int, frozenset[int] | None]] = {}
        # A map entry: the wire types of its key and value. upb keeps an entry with any other
        # field as an unknown field of the map's message, as it came, instead of in the map.
        self.entry: tuple[int, int] | None = None
        self.tensor_map = False  # a map entry whose value is a Tensor


_PLANS: dict[object, Plan] = {}  # by descriptor

_WIRE_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: FIXED64,
    FieldDescriptor.TYPE_FIXED64: FIXED64,
    FieldDescriptor.TYPE_SFIXED64: FIXED64,
    FieldDescriptor.TYPE_FLOAT: FIXED32,
    FieldDescriptor.TYPE_FIXED32: FIXED32,
    FieldDescriptor.TYPE_SFIXED32: FIXED32,
    FieldDescriptor.TYPE_STRING: DELIMITED,
    FieldDescriptor.TYPE_BYTES: DELIMITED,
    FieldDescriptor.TYPE_MESSAGE: DELIMITED,
    FieldDescriptor.TYPE_GROUP: START_GROUP,
}


def plan(descriptor: Descriptor | _UpbDescriptor) -> Plan:
    """The plan of a message type, made once per type (and per type it reaches)."""
    found = _PLANS.get(descriptor)
    if found is not None:
        return found
    descriptor = _checked(descriptor)
    reachable = _reachable(descriptor)
    holds = _holding_tensors(reachable)
    made = {d.full_name: Plan(tensor=d.full_name == TENSOR.full_name) for d in reachable}
    for d in reachable:
        _fill(made[d.full_name], d, made, holds)
    _PLANS.update((d, made[d.full_name]) for d in reachable)
    return made[descriptor.full_name]


def _fill(plan: Plan, d: Descriptor, made: dict[str, Plan], holds: set[str]) -> None:
    """Set ``plan``, of the type ``d``: its message fields, oneofs with Tensors, map entry."""
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
                wire_type = _WIRE_TYPES.get(f.type, VARINT)
                enum = f.enum_type
                closed = frozenset(enum.values_by_number) if enum is not None and enum.is_closed else None
                plan.oneofs[f.number] = (oneof.index, wire_type, closed)
    if d.GetOptions().map_entry:
        key, value = d.fields_by_number[1], d.fields_by_number[MAP_VALUE]
        plan.entry = (_WIRE_TYPES.get(key.type, VARINT), _WIRE_TYPES.get(value.type, VARINT))
        value_type = value.message_type
        plan.tensor_map = value_type is not None and value_type.full_name == TENSOR.full_name


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
    holds = {TENSOR.full_name}
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
