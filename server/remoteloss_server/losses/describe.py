"""``ListLosses``: each ``LossSpec`` and torch's signature, described as a ``LossInfo``."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.losses.spec import LossSpec

__all__ = ["describe", "describe_all", "markdown_table"]

_DEPRECATED = frozenset({"size_average", "reduce"})
_SCALAR_TYPES = {
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_STRING: "string",
}
_FLOAT_SUFFIX = "_float"  # `var_float` is the float form of torch's `var`


def _json(value: Any) -> str:
    """torch's default as JSON; no default at all (a required argument) reads as null."""
    if value is inspect.Parameter.empty:
        value = None
    return json.dumps(value)  # float("inf") -> "Infinity", as Python's json reads it back


def _type(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return str(field.message_type.name)
    if field.enum_type is not None:
        return str(field.enum_type.name)
    return _SCALAR_TYPES[field.type]


def describe(spec: LossSpec) -> pb.LossInfo:
    """One loss: its tensors and options in torch's order, with torch's defaults."""
    parameters = spec.signature.parameters
    order = {name: i for i, name in enumerate(parameters)}

    def position(name: str) -> int:
        return order.get(name, order.get(name.removesuffix(_FLOAT_SUFFIX), len(order)))

    tensors = [
        pb.TensorArgument(
            name=t.name,
            required=t.required,
            dtypes=sorted(codec.dtype_from_torch(d) for d in t.dtypes),
            differentiable=t.differentiable,
            shape=t.shape,
        )
        for t in sorted(spec.tensors, key=lambda t: position(t.name))
    ]
    names = {t.name for t in spec.tensors}
    options = []
    for field in sorted((f for f in spec.descriptor.fields if f.name not in names), key=lambda f: position(f.name)):
        parameter = parameters.get(field.name)
        options.append(
            pb.OptionArgument(
                name=field.name,
                type=_type(field),
                default_value=_json(parameter.default if parameter is not None else None),
                allowed_values=spec.reductions if field.name == "reduction" else (),
                deprecated=field.name in _DEPRECATED,
            )
        )
    doc = inspect.getdoc(spec.function) or ""
    return pb.LossInfo(
        name=spec.name,
        message_type=spec.descriptor.full_name,
        module=spec.module,
        tensors=tensors,
        options=options,
        summary=doc.strip().splitlines()[0] if doc.strip() else "",
    )


def describe_all(specs: Iterable[LossSpec]) -> pb.ListLossesResponse:
    """The ListLosses answer, built once at startup."""
    return pb.ListLossesResponse(losses=[describe(spec) for spec in specs])


def markdown_table(specs: Iterable[LossSpec]) -> str:
    """README's table of losses: each loss, its torch.nn class, tensors and options."""
    rows = [
        "| loss (`torch.nn.functional`) | `torch.nn` class | tensors (*optional*; ∂: may require grad) | options |",
        "|---|---|---|---|",
    ]
    for spec in specs:
        info = describe(spec)
        tensors = ", ".join(
            (f"`{t.name}`" if t.required else f"*`{t.name}`*") + (" ∂" if t.differentiable else "")
            for t in info.tensors
        )
        options = ", ".join(f"`{o.name}`" for o in info.options if not o.deprecated)
        deprecated = [f"`{o.name}`" for o in info.options if o.deprecated]
        if deprecated:
            options += f" (+ deprecated {', '.join(deprecated)})"
        rows.append(f"| `{spec.name}` | `{spec.module}` | {tensors} | {options} |")
    return "\n".join(rows) + "\n"
