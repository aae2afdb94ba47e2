"""Python arguments -> ``ComputeRequest``, driven by the message descriptors.

A loss's arguments map onto its message by name, since fields carry torch's argument
names. Conversions are chosen by field type, never per loss: Tensor fields go through
the codec, ``Reduction`` takes torch's strings, optional scalars are set only when not
None, and the two option messages take torch's objects.

What the SDK sends is a ``Request``: from ``wire.SPLIT_BYTES`` of tensor data on, its tensors hold
placeholders for views of the arguments' memory, and serializing it writes each tensor's
bytes once (``wire.join``) instead of through protobuf's copies.
"""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from remoteloss import codec
from remoteloss import _wire as wire
from remoteloss._distances import CosineDistance, PairwiseDistance
from remoteloss._errors import InvalidArgumentError
from remoteloss.v1 import loss_pb2 as pb

__all__ = ["LOSS_NAMES", "REDUCTIONS", "Request", "build_request", "prepare_request", "tensor_names"]

LOSS_NAMES: tuple[str, ...] = tuple(f.name for f in pb.ComputeRequest.DESCRIPTOR.oneofs_by_name["loss"].fields)

# "none" -> REDUCTION_NONE, ...; UNSPECIFIED is never sent, torch always passes a string.
REDUCTIONS: dict[str, int] = {
    value.name.removeprefix("REDUCTION_").lower(): value.number
    for value in pb.Reduction.DESCRIPTOR.values
    if value.number != pb.REDUCTION_UNSPECIFIED
}

_TENSOR = pb.Tensor.DESCRIPTOR
_FLOAT_SUFFIX = "_float"  # `var_float`: the float form of the Tensor field `var`

_STREAM_ID_TAG = bytes([pb.ComputeStreamRequest.ID_FIELD_NUMBER << 3])  # field 1, a varint
_Tensors = list[tuple[pb.Tensor, memoryview]]  # the Tensors of a request, each with its data, not yet set


@dataclass(frozen=True)
class Request:
    """A ``ComputeRequest`` ready to send: ``message``, in which, when ``payloads`` is not None,
    each non-empty Tensor's data is a placeholder of ``payloads`` (a view of an argument's memory,
    or of a copy of it)."""

    message: pb.ComputeRequest
    payloads: wire.Payloads | None = None

    def serialize(self) -> bytes:
        """The serialized ``ComputeRequest``, the tensors' bytes in place of their placeholders."""
        return wire.serialize(self.message, self.payloads)

    def serialize_item(self, key: int) -> bytes:
        """The serialized ``ComputeStreamRequest(id=key, request=...)`` that carries it on a stream."""
        if self.payloads is None and key > 0:  # protobuf's bytes, written without copying the request first
            return b"".join((_STREAM_ID_TAG, wire.varint(key), wire.length_delimited(2, self.message.SerializeToString())))
        item = pb.ComputeStreamRequest(id=key, request=self.message)
        return wire.serialize(item, self.payloads)


@functools.cache
def tensor_names(loss: str) -> tuple[str, ...]:
    """The loss's tensor arguments, in torch's order."""
    fields = getattr(pb.ComputeRequest(), loss).DESCRIPTOR.fields
    return tuple(f.name for f in fields if f.message_type is _TENSOR)


def build_request(
    loss: str,
    arguments: Mapping[str, Any],
    *,
    wrt: Collection[str] = (),
    grad_output: Any = None,
) -> pb.ComputeRequest:
    """The request computing ``loss(**arguments)`` and the gradients for ``wrt``, every tensor's
    bytes in it.

    Raises InvalidArgumentError for a bad value and TypeError for a value of the wrong kind.
    """
    return _build(loss, arguments, wrt, grad_output, whole=True).message


def prepare_request(
    loss: str,
    arguments: Mapping[str, Any],
    *,
    wrt: Collection[str] = (),
    grad_output: Any = None,
) -> Request:
    """``build_request``'s request, ready to send: from ``wire.SPLIT_BYTES`` of tensor data on, its
    tensors' bytes are left where they are until it is serialized. Raises as ``build_request``."""
    return _build(loss, arguments, wrt, grad_output, whole=False)


def _build(
    loss: str, arguments: Mapping[str, Any], wrt: Collection[str], grad_output: Any, whole: bool
) -> Request:
    request = pb.ComputeRequest()
    message = getattr(request, loss)
    message.SetInParent()  # selects the loss even when every argument is a default
    tensors: _Tensors = []
    try:
        for name, value in arguments.items():
            if value is not None:
                _set(loss, message, name, value, requires_grad=name in wrt, tensors=tensors)
        if grad_output is not None:
            head, data = codec.encode_view(grad_output, name="grad_output", requires_grad=False)
            request.grad_output.CopyFrom(head)
            tensors.append((request.grad_output, data))
    except ValueError as exc:
        if isinstance(exc, InvalidArgumentError):
            raise
        raise InvalidArgumentError(f"{loss}: {exc}") from exc
    if whole:  # every tensor's bytes in the message, whatever their size
        for tensor, data in tensors:
            tensor.data = data.tobytes()
        return Request(request)
    return Request(request, wire.attach(tensors))


def _set(loss: str, message: Message, name: str, value: Any, *, requires_grad: bool, tensors: _Tensors) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    field = fields.get(name)
    if field is None:
        raise TypeError(f"{loss}() got an unexpected keyword argument {name!r}")
    if field.message_type is _TENSOR:
        if name + _FLOAT_SUFFIX in fields and _is_real_number(value):
            setattr(message, name + _FLOAT_SUFFIX, float(value))
        else:
            head, data = _tensor(name, value, requires_grad)
            getattr(message, name).CopyFrom(head)
            tensors.append((getattr(message, name), data))
    elif field.enum_type is pb.Reduction.DESCRIPTOR:
        setattr(message, name, _reduction(loss, value))
    elif field.message_type is not None:
        converter = _MESSAGE_CONVERTERS[field.message_type.full_name]
        getattr(message, name).CopyFrom(converter(loss, name, value))
    else:
        try:
            setattr(message, name, _scalar(loss, name, field.type, value))
        except ValueError as exc:  # out of the field's range
            raise ValueError(f"{name}: {exc}") from None


def _tensor(name: str, value: Any, requires_grad: bool) -> tuple[pb.Tensor, memoryview]:
    if name.endswith("_lengths") and not (codec.is_torch_tensor(value) or isinstance(value, np.ndarray)):
        lengths = np.asarray(value)  # a tuple or list, as torch accepts for ctc_loss
        if lengths.dtype.kind not in "iu":
            raise ValueError(f"{name}: lengths must be integers, got {lengths.dtype}")
        value = lengths.astype(np.int64)
    head, data = codec.encode_view(value, name=name, requires_grad=requires_grad)
    if not len(data):  # an empty shape may still be one torch refuses
        codec.check_tensor(head, name, data=data)
    elif requires_grad and not codec.DTYPES[head.dtype].floating:  # fails here, not remotely
        raise ValueError(f"{name}: requires_grad is set, but {codec.DTYPES[head.dtype].name} tensors have no gradient")
    # Otherwise the array's own dtype, shape and bytes: consistent by construction.
    return head, data


def _reduction(loss: str, value: Any) -> int:
    if isinstance(value, str) and value in REDUCTIONS:
        return REDUCTIONS[value]
    raise InvalidArgumentError(f"{loss}: reduction must be one of {sorted(REDUCTIONS)}, got {value!r}")


def _scalar(loss: str, name: str, kind: int, value: Any) -> bool | int | float | str:
    try:
        if kind == FieldDescriptor.TYPE_BOOL:
            return bool(value)
        if kind == FieldDescriptor.TYPE_INT64:
            return operator.index(value)
        if kind == FieldDescriptor.TYPE_DOUBLE and not isinstance(value, str | bytes):
            return float(value)
        if kind == FieldDescriptor.TYPE_STRING and isinstance(value, str):
            return value
    except (AttributeError, TypeError, ValueError):
        pass
    expected = {
        FieldDescriptor.TYPE_BOOL: "a bool",
        FieldDescriptor.TYPE_INT64: "an int",
        FieldDescriptor.TYPE_DOUBLE: "a float",
    }.get(kind, "a str")
    raise TypeError(f"{loss}: {name} must be {expected}, got {type(value).__name__}")


def _is_real_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)  # as torch's isinstance(var, float)


def _distance_function(loss: str, name: str, value: Any) -> pb.DistanceFunction:
    if isinstance(value, pb.DistanceFunction):
        return value
    if type(value) is PairwiseDistance:
        return pb.DistanceFunction(
            pairwise_distance=pb.PairwiseDistance(p=value.p, eps=value.eps, keepdim=value.keepdim)
        )
    if type(value) is CosineDistance:
        return pb.DistanceFunction(cosine_distance=pb.CosineDistance(dim=value.dim, eps=value.eps))
    torch = sys.modules.get("torch")  # a torch object means torch is imported already
    if torch is not None:
        if type(value) is torch.nn.PairwiseDistance:
            return pb.DistanceFunction(
                pairwise_distance=pb.PairwiseDistance(p=value.norm, eps=value.eps, keepdim=value.keepdim)
            )
        if value is torch.nn.functional.pairwise_distance or value is torch.pairwise_distance:
            return pb.DistanceFunction(pairwise_distance=pb.PairwiseDistance())
        if isinstance(value, torch.nn.CosineSimilarity):
            raise TypeError(
                f"{loss}: {name}=torch.nn.CosineSimilarity is a similarity, not a distance; "
                f"use remoteloss.CosineDistance(dim={value.dim}, eps={value.eps})"
            )
    raise TypeError(
        f"{loss}: {name} must be None, remoteloss.PairwiseDistance, remoteloss.CosineDistance, "
        "torch.nn.PairwiseDistance or torch.nn.functional.pairwise_distance (an arbitrary "
        f"callable cannot be sent to the server), got {value!r}"
    )


def _linear_cross_entropy_options(loss: str, name: str, value: Any) -> pb.LinearCrossEntropyOptions:
    if isinstance(value, pb.LinearCrossEntropyOptions):
        return value
    torch = sys.modules.get("torch")
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None) if torch is not None else None
    if options_type is None or not isinstance(value, options_type):
        raise TypeError(f"{loss}: {name} must be None or torch.nn.LinearCrossEntropyOptions, got {value!r}")
    message = pb.LinearCrossEntropyOptions(
        allow_retain_graph=bool(value.allow_retain_graph),
        chunking_method="none" if value.chunking_method is None else str(value.chunking_method),
        acc_policy=str(value.acc_policy),
    )
    if value.batch_chunk_size is not None:
        message.batch_chunk_size = int(value.batch_chunk_size)
    if value.acc_dtype is not None:
        message.acc_dtype = codec.dtype_from_torch(value.acc_dtype)
    return message


_MESSAGE_CONVERTERS: dict[str, Callable[[str, str, Any], Message]] = {
    pb.DistanceFunction.DESCRIPTOR.full_name: _distance_function,
    pb.LinearCrossEntropyOptions.DESCRIPTOR.full_name: _linear_cross_entropy_options,
}
