"""Framing: answers to bytes, and what an answer will weigh before it exists (no grpc).

``answer(result)`` is the serialized ComputeResponse: from ``wire.SPLIT_BYTES`` of tensor data
on, each tensor is written once, straight from its memory (``wire.attach``, ``wire.serialize``),
instead of through ``tobytes``, the message and its serialization. ``stream_answer`` and
``stream_error`` frame a ComputeStream item's answer around it. ``held_bytes(call)`` estimates,
before a call computes, the bytes its answer will hold until sent, for the in-flight budgets.
"""

from __future__ import annotations

from remoteloss import _wire as wire
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.executor import Result
from remoteloss_server.losses import Call

__all__ = ["HELD_COPIES", "answer", "held_bytes", "stream_answer", "stream_error", "tensor_bytes"]

# An answer waiting to be sent is held twice: the bytes made here, and gRPC's copy of them.
HELD_COPIES = 2


def answer(result: Result) -> bytes:
    """The serialized ComputeResponse of ``result``."""
    if tensor_bytes(result) < wire.SPLIT_BYTES:  # small: each tensor's bytes straight into its message
        response = pb.ComputeResponse()  # fields set one by one: upb's keyword map and list copies cost more
        codec.encode_into(response.loss, result.loss, name="loss", requires_grad=False)
        for name, value in result.gradients.items():
            codec.encode_into(response.gradients[name], value, name=name, requires_grad=False)
        if result.warnings:
            response.warnings.extend(result.warnings)
        return response.SerializeToString()
    messages, tensors = {}, []
    for name, value in {"loss": result.loss, **result.gradients}.items():
        messages[name], data = codec.encode_view(value, name=name, requires_grad=False)
        tensors.append((messages[name], data))
    payloads = wire.attach(tensors)
    loss = messages.pop("loss")
    return wire.serialize(pb.ComputeResponse(loss=loss, gradients=messages, warnings=result.warnings), payloads)


def tensor_bytes(result: Result) -> int:
    """The bytes of ``result``'s tensors, which decide where it is serialized."""
    size = result.loss.nbytes
    for gradient in result.gradients.values():
        size += gradient.nbytes
    return size


def stream_answer(item_id: int, response: bytes) -> bytes:
    """ComputeStreamResponse{id, response} written around the answer's bytes, not re-parsed."""
    return pb.ComputeStreamResponse(id=item_id).SerializeToString() + wire.length_delimited(2, response)


def stream_error(item_id: int, code: int, message: str) -> bytes:
    """ComputeStreamResponse{id, error}: ``code`` is a google.rpc.Code number."""
    return pb.ComputeStreamResponse(id=item_id, error=pb.Error(code=code, message=message)).SerializeToString()


def held_bytes(call: Call) -> tuple[int, int]:
    """About what ``call`` will hold: its answer as held until sent (``HELD_COPIES`` times the
    loss, as large as the call's largest tensor with ``reduction="none"``, and a gradient for each
    argument that requires one), and the most it holds at once (that largest tensor, computing,
    and the answer)."""
    itemsize = 0  # the loss's dtype: the widest floating argument's (8 without one)
    largest = call.implied_elements
    gradients = 0
    for name, tensor in call.tensors.items():  # one pass, on every request's path
        numel = tensor.numel()
        largest = max(largest, numel)
        if tensor.is_floating_point():
            itemsize = max(itemsize, tensor.element_size())
        if name in call.requires_grad:
            gradients += numel
    itemsize = itemsize or 8
    loss = largest if call.options.get("reduction") == "none" else 1
    answer_size = itemsize * HELD_COPIES * (loss + gradients)
    return answer_size, itemsize * largest + answer_size
