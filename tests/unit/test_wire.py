"""remoteloss._wire: split agrees with upb's parse, keeps tensors' bytes in place and unknown
fields intact, and rejects what upb rejects.
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from remoteloss import codec
from remoteloss import _wire as wire
from remoteloss._request import LOSS_NAMES
from remoteloss._samples import ENTRIES
from remoteloss.v1 import loss_pb2 as pb
from remoteloss._wire import length_delimited as ld
from remoteloss_bench import payload as bench_payload

torch.set_num_threads(1)

_TENSOR = pb.Tensor.DESCRIPTOR


def _varint(value: int, width: int = 0) -> bytes:
    """``value`` as a varint, padded to ``width`` bytes with continuation bits (non-canonical)."""
    out = bytearray()
    while True:
        out.append(value & 0x7F)
        value >>= 7
        if not value and len(out) >= width:
            break
        out[-1] |= 0x80
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return codec.encode(tensor, requires_grad=False).SerializeToString()


def _tensors(message: Message) -> Iterator[Message]:
    """Every Tensor present in ``message``, at any depth."""
    if message.DESCRIPTOR.full_name == _TENSOR.full_name:
        yield message
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for item in value.values():
                    yield from _tensors(item)
        elif field.is_repeated:
            for item in value:
                yield from _tensors(item)
        else:
            yield from _tensors(value)


def _restore(data: bytes, message_type: Any) -> tuple[Message, wire.Payloads]:
    """Split ``data``, parse the result and put each tensor's bytes back from the payloads,
    checking that every Tensor holds a placeholder whose view lies in ``data``."""
    stripped, payloads = wire.split(data, message_type.DESCRIPTOR)
    parsed = message_type.FromString(stripped)
    for tensor in _tensors(parsed):
        assert len(tensor.data) == wire.PLACEHOLDER_SIZE
        view = payloads.resolve(tensor.data)
        assert view.obj is data
        tensor.data = bytes(view)
    return parsed, payloads


def _check(data: bytes, message_type: Any = pb.ComputeRequest) -> wire.Payloads:
    """Split, parse and restore ``data``: the same message as upb's parse, unknown fields included."""
    original = message_type.FromString(data)
    restored, payloads = _restore(data, message_type)
    assert restored == original
    assert restored.SerializeToString(deterministic=True) == original.SerializeToString(deterministic=True)
    return payloads


def _unknown(message: Message) -> list[tuple[int, int, object]]:
    return [
        (f.field_number, f.wire_type, None if isinstance(f.data, UnknownFieldSet) else f.data)
        for f in UnknownFieldSet(message)
    ]


# --- split: round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_split_round_trips_every_loss(loss: str, dtype: str) -> None:
    request = bench_payload.build(loss, ENTRIES[loss].batched, dtype, grad=True)
    data = request.SerializeToString()
    payloads = _check(data)
    sent = list(_tensors(request))
    assert len(payloads) == len(sent) >= 2
    assert payloads.nbytes == sum(len(t.data) for t in sent)


def test_split_of_a_hand_built_request() -> None:
    request = bench_payload.build("linear_cross_entropy", (3, 4), "float32", grad=True)
    options = request.linear_cross_entropy.options
    options.batch_chunk_size = 2
    options.chunking_method = "none"
    options.acc_dtype = pb.DTYPE_FLOAT32
    request.linear_cross_entropy.label_smoothing = 0.1
    request.grad_output.CopyFrom(codec.encode(torch.ones(()), requires_grad=False))  # field 64: 2-byte tag
    _check(request.SerializeToString())


def test_split_of_nested_option_messages() -> None:
    request = bench_payload.build("triplet_margin_with_distance_loss", (2, 3), "float64", grad=False)
    request.triplet_margin_with_distance_loss.distance_function.pairwise_distance.p = float("inf")
    _check(request.SerializeToString())


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 0, 2)], ids=str)
def test_split_gives_empty_tensors_a_placeholder(shape: tuple[int, ...]) -> None:
    request = pb.ComputeRequest()
    request.mse_loss.input.CopyFrom(codec.encode(torch.zeros(shape)))
    request.mse_loss.target.SetInParent()  # present, every field default: an empty body on the wire
    payloads = _check(request.SerializeToString())
    assert len(payloads) == 2 and payloads.nbytes == 0


def test_split_of_a_stream_request() -> None:
    inner = bench_payload.build("ctc_loss", (6, 2, 4), "float32", grad=True)
    data = pb.ComputeStreamRequest(id=2**63 + 5, request=inner).SerializeToString()
    assert len(_check(data, pb.ComputeStreamRequest)) == 4


def test_split_of_a_map_of_tensors() -> None:
    tensors = {"input": torch.randn(3, 2), "target": torch.zeros(0), "var": torch.randn(())}
    response = pb.ComputeResponse(
        loss=codec.encode(torch.tensor(1.5)),
        gradients={k: codec.encode(v, requires_grad=False) for k, v in tensors.items()},
        warnings=["a", "b"],
    )
    no_value = ld(2, ld(1, b"x"))  # an entry without its value: an empty Tensor
    payloads = _check(response.SerializeToString() + no_value, pb.ComputeResponse)
    assert len(payloads) == 5
    value = ld(2, _tensor_bytes(torch.ones(2)))
    for stray in (_tag(5, 0) + b"\x01", _tag(1, 0) + b"\x01", _tag(7, 3) + _tag(7, 4)):
        # upb keeps an entry with a field besides its key and value as an unknown field, as sent
        parsed, payloads = _restore(ld(2, ld(1, b"k") + value + stray), pb.ComputeResponse)
        assert not parsed.gradients and payloads.nbytes == 0
        _check(ld(2, ld(1, b"k") + value + stray) + ld(2, ld(1, b"j") + value), pb.ComputeResponse)


def test_split_of_a_message_without_tensors_returns_the_same_bytes() -> None:
    info = pb.LossInfo(name="mse_loss", tensors=[pb.TensorArgument(name="input", dtypes=[pb.DTYPE_FLOAT16, pb.DTYPE_FLOAT32])])
    data = pb.ListLossesResponse(losses=[info, info]).SerializeToString() + _tag(9, 0) + b"\x01"
    stripped, payloads = wire.split(data, pb.ListLossesResponse.DESCRIPTOR)
    assert stripped is data and len(payloads) == 0
    assert wire.split(memoryview(data), pb.ListLossesResponse.DESCRIPTOR)[0] == data


def test_split_keeps_unknown_fields_everywhere() -> None:
    group = _tag(99, 3) + _tag(1, 0) + b"\x07" + _tag(99, 4)
    tensor = _tensor_bytes(torch.randn(4)) + _tag(15, 5) + b"abcd" + group
    mse = ld(1, tensor) + ld(2, _tensor_bytes(torch.randn(4))) + ld(50, b"unknown in the loss")
    data = ld(2, mse) + _tag(100, 0) + _varint(2**64 - 1) + _tag(63, 1) + b"12345678"
    _check(data)
    parsed, _ = _restore(data, pb.ComputeRequest)
    assert _unknown(parsed) == [(100, 0, 2**64 - 1), (63, 1, int.from_bytes(b"12345678", "little"))]
    assert _unknown(parsed.mse_loss) == [(50, 2, b"unknown in the loss")]
    assert _unknown(parsed.mse_loss.input) == [(15, 5, int.from_bytes(b"abcd", "little")), (99, 3, None)]


def test_split_leaves_known_fields_of_the_wrong_wire_type_unknown() -> None:
    tensor = _tensor_bytes(torch.randn(2)) + _tag(3, 0) + b"\x05"  # data as a varint
    data = ld(2, ld(1, tensor) + _tag(2, 0) + b"\x01") + _tag(64, 5) + b"\0" * 4
    _check(data)


def test_split_keeps_last_wins_and_merges() -> None:
    a, b = torch.arange(3.0), torch.arange(3.0) + 10
    raw_a = codec.encode(a).data
    twice = _tensor_bytes(a) + ld(3, codec.encode(b).data)  # data twice: the last wins
    payloads = _check(ld(2, ld(1, twice)))
    assert len(payloads) == 1 and payloads.nbytes == len(raw_a)
    grad = _tag(4, 0) + b"\x01"
    for data in (
        ld(2, ld(1, _tensor_bytes(a))) + ld(2, ld(1, grad)),  # a later occurrence without data merges
        ld(2, ld(1, _tensor_bytes(a))) + ld(2, ld(1, _tensor_bytes(b))),
        ld(2, ld(1, _tensor_bytes(a)) + ld(1, b"")),
        ld(2, ld(1, _tensor_bytes(a))) + ld(1, ld(1, _tensor_bytes(b))) + ld(2, ld(1, grad)),  # oneof switched
        ld(2, ld(1, _tensor_bytes(a))) + ld(1, ld(1, _tensor_bytes(b))) + ld(2, b"") + ld(1, b""),
        ld(64, _tensor_bytes(a)) + ld(64, grad) + ld(64, b""),
    ):
        _check(data)
        _check(ld(2, data) + ld(2, ld(64, grad)), pb.ComputeStreamRequest)


def test_split_follows_oneofs_with_closed_enums_and_skips_group_fields() -> None:
    Holder = _proto2_holder()
    a = _tensor_bytes(torch.arange(3.0))
    group = _tag(4, 3) + _tag(1, 0) + b"\x01" + _tag(4, 4)
    for data in (
        ld(1, a) + _tag(2, 0) + b"\x05" + ld(1, b""),  # 5 is no Color: an unknown field, no switch
        ld(1, a) + _tag(2, 0) + b"\x01" + ld(1, b""),  # GREEN: the tensor is cleared
        ld(1, a) + group + ld(3, a) + _tag(4, 2) + b"\x00",
    ):
        _check(data, Holder)


def _proto2_holder() -> Any:
    """A proto2 message with a Tensor and a closed enum in one oneof, and a group field."""
    pool = descriptor_pool.DescriptorPool()
    loss = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(loss)
    pool.Add(loss)
    file = descriptor_pb2.FileDescriptorProto(name="holder.proto", package="t", syntax="proto2")
    file.dependency.append(loss.name)
    file.enum_type.add(name="Color").value.add(name="RED", number=0)
    file.enum_type[0].value.add(name="GREEN", number=1)
    holder = file.message_type.add(name="Holder")
    holder.oneof_decl.add(name="kind")
    optional, message, enum, group = (
        descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        descriptor_pb2.FieldDescriptorProto.TYPE_GROUP,
    )
    tensor = ".remoteloss.v1.Tensor"
    holder.field.add(name="tensor", number=1, label=optional, type=message, type_name=tensor, oneof_index=0)
    holder.field.add(name="color", number=2, label=optional, type=enum, type_name=".t.Color", oneof_index=0)
    holder.field.add(name="other", number=3, label=optional, type=message, type_name=tensor)
    holder.nested_type.add(name="Part").field.add(name="n", number=1, label=optional, type=enum, type_name=".t.Color")
    holder.field.add(name="part", number=4, label=optional, type=group, type_name=".t.Holder.Part")
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Holder"))


# --- split: malformed input ------------------------------------------------------------------


_NESTED = ld(2, ld(1, _tensor_bytes(torch.ones(2))))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x80", id="truncated tag"),
        pytest.param(_tag(1000, 0) + b"\x80", id="truncated varint"),
        pytest.param(_tag(1000, 0) + b"\xff" * 10 + b"\x01", id="varint of 11 bytes"),
        pytest.param(_varint(8, 6) + b"\x01", id="tag of 6 bytes"),
        pytest.param(_varint(1 << 32 | 8) + b"\x01", id="tag past 32 bits"),
        pytest.param(_tag(1000, 2) + _varint(0, 6), id="length of 6 bytes"),
        pytest.param(_tag(1000, 2) + _varint(2**31 - 1), id="length of 2**31 - 1"),
        pytest.param(b"\x12\x05\x0a", id="length past the end"),
        pytest.param(b"\x12\x02\x0a\x05" + b"\0" * 5, id="length past the enclosing message"),
        pytest.param(_NESTED[:-1], id="truncated tensor data"),
        pytest.param(b"\x00\x01", id="field number 0"),
        pytest.param(b"\x12\x02\x02\x00", id="field number 0 nested"),
        pytest.param(b"\x0e", id="wire type 6"),
        pytest.param(b"\x12\x01\x0f", id="wire type 7 nested"),
        pytest.param(_tag(1000, 1) + b"\0" * 7, id="truncated fixed64"),
        pytest.param(_tag(1000, 5) + b"\0" * 3, id="truncated fixed32"),
        pytest.param(_tag(5, 4), id="end group outside a group"),
        pytest.param(b"\x12\x01" + _tag(5, 4), id="end group ending a message"),
        pytest.param(_tag(5, 3) + _tag(6, 4), id="mismatched end group"),
        pytest.param(_tag(5, 3) + _tag(5, 0), id="unterminated group"),
        pytest.param(_tag(5, 3) + _tag(0, 4), id="end group of field 0"),
        pytest.param(_tag(5, 3) * 101 + _tag(5, 4) * 101, id="101 nested groups"),
        pytest.param(ld(2, _tag(5, 3) * 100 + _tag(5, 4) * 100), id="a loss and 100 groups"),
    ],
)
def test_split_rejects_what_upb_rejects(data: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.ComputeRequest.FromString(data)
    with pytest.raises(DecodeError):
        wire.split(data, pb.ComputeRequest.DESCRIPTOR)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(_varint(8, 5) + b"\x01", id="tag of 5 bytes"),
        pytest.param(_varint(((1 << 29) - 1) << 3) + b"\x01", id="largest field number"),
        pytest.param(_tag(1000, 0) + b"\xff" * 9 + b"\x7f", id="varint of 10 bytes"),
        pytest.param(b"\x12" + _varint(0, 5), id="length of 5 bytes"),
        pytest.param(_tag(5, 3) * 100 + _tag(5, 4) * 100, id="100 nested groups"),
        pytest.param(b"\x12\x00" + _tag(5, 3) + _tag(1, 2) + b"\x00" + _tag(5, 4), id="group"),
        pytest.param(_tag(5, 3) + b"\x00\x01\x03\x04" + _tag(5, 4), id="field number 0 in a group"),
    ],
)
def test_split_accepts_what_upb_accepts(data: bytes) -> None:
    _check(data)


@pytest.mark.parametrize("extra", [0, 1, 2])
def test_split_depth_limit_matches_upb_on_a_recursive_type(extra: int) -> None:
    value = _tag(5, 3) * extra + _tag(5, 4) * extra
    for _ in range(33):  # Value > Struct > map entry > Value: 99 levels below the top
        value = ld(5, ld(1, ld(1, b"a") + ld(2, value)))
    try:
        struct_pb2.Value.FromString(value)
    except DecodeError:
        with pytest.raises(DecodeError, match="nested deeper"):
            wire.split(value, struct_pb2.Value.DESCRIPTOR)
    else:
        assert extra <= 1
        _check(value, struct_pb2.Value)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out) + 1)
        kind = rng.randrange(5)
        if kind == 0 and at < len(out):
            out[at] = rng.randrange(256)
        elif kind == 1:
            out.insert(at, rng.choice((0x80, 0x00, 0x0A, 0x12, 0x1A, rng.randrange(256))))
        elif kind == 2 and at < len(out):
            del out[at]
        elif kind == 3:
            del out[at:]
        else:
            start = rng.randrange(len(out) + 1)
            out[at:at] = out[start : start + rng.randint(1, 12)]
    return bytes(out)


def _fuzz_seeds() -> list[tuple[bytes, Any]]:
    request = bench_payload.build("mse_loss", (3,), "float16", grad=True)
    request.grad_output.CopyFrom(codec.encode(torch.ones(()), requires_grad=False))
    lce = bench_payload.build("linear_cross_entropy", (2, 2), "float32", grad=True)
    lce.linear_cross_entropy.options.chunking_method = "auto"
    response = pb.ComputeResponse(gradients={"input": codec.encode(torch.ones(2))}, warnings=["w"])
    unknown = ld(2, ld(1, _tensor_bytes(torch.ones(1)) + _tag(9, 3) + _tag(9, 4)) + _tag(40, 5) + b"abcd")
    return [
        (request.SerializeToString(), pb.ComputeRequest),
        (lce.SerializeToString(), pb.ComputeRequest),
        (pb.ComputeStreamRequest(id=3, request=request).SerializeToString(), pb.ComputeStreamRequest),
        (response.SerializeToString(), pb.ComputeResponse),
        (unknown, pb.ComputeRequest),
    ]


@pytest.mark.parametrize("seed", range(4))
def test_split_agrees_with_upb_on_mutated_bytes(seed: int) -> None:
    rng = random.Random(seed)
    for data, message_type in _fuzz_seeds():
        for _ in range(300):
            mutated = _mutate(rng, data)
            try:
                expected = message_type.FromString(mutated)
            except DecodeError:
                expected = None
            try:
                stripped, _ = wire.split(mutated, message_type.DESCRIPTOR)
            except DecodeError:
                assert expected is None, mutated.hex()
                continue
            if expected is None:
                with pytest.raises(DecodeError):
                    message_type.FromString(stripped)
            else:
                restored, _ = _restore(mutated, message_type)
                assert restored == expected, mutated.hex()


# --- split: no copies ------------------------------------------------------------------------


def test_split_copies_no_tensor_bytes() -> None:
    request = bench_payload.build("mse_loss", (1 << 20,), "float32", grad=True)  # 8 MB
    data = request.SerializeToString()
    tracemalloc.start()
    try:
        stripped, payloads = wire.split(data, pb.ComputeRequest.DESCRIPTOR)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10 and len(stripped) < 64
    assert payloads.nbytes == 8 << 20
    parsed = pb.ComputeRequest.FromString(stripped)
    view = payloads.resolve(parsed.mse_loss.input.data)
    assert view.obj is data and view.readonly and view == request.mse_loss.input.data


def test_payloads_resolve_only_their_placeholders() -> None:
    stripped, payloads = wire.split(_NESTED, pb.ComputeRequest.DESCRIPTOR)
    assert len(payloads) == 1 and repr(payloads) == "Payloads(1 tensors, 8 bytes)"
    placeholder = pb.ComputeRequest.FromString(stripped).mse_loss.input.data
    assert payloads.resolve(placeholder) == codec.encode(torch.ones(2)).data
    for bad in (b"", b"\x01\x00\x00\x00", b"\x00\x00\x00", b"\x00\x00\x00\x00\x00", codec.encode(torch.ones(2)).data):
        with pytest.raises(ValueError, match="placeholder"):
            payloads.resolve(bad)


def test_length_delimited_wraps_a_response() -> None:
    response = pb.ComputeResponse(loss=codec.encode(torch.randn(300)), warnings=["w"])
    data = pb.ComputeStreamResponse(id=9).SerializeToString() + ld(2, response.SerializeToString())
    assert data == pb.ComputeStreamResponse(id=9, response=response).SerializeToString()
    assert ld(2**29 - 1, b"") == _tag(2**29 - 1, 2) + b"\x00"
    for number in (0, 2**29, -1):
        with pytest.raises(ValueError, match="field_number"):
            ld(number, b"")


# --- join ------------------------------------------------------------------------------------


def _with_placeholders(message: Message) -> tuple[Message, wire.Payloads]:
    """A copy of ``message`` whose every Tensor's data is a placeholder for it, as the SDK sends."""
    copy = type(message)()
    copy.CopyFrom(message)
    payloads = wire.Payloads()
    for tensor in _tensors(copy):
        tensor.data = payloads.add(tensor.data)
    return copy, payloads


def _check_join(message: Message) -> bytes:
    """``join`` of ``message`` serialized with placeholders: what upb gives for ``message``, byte for byte."""
    held, payloads = _with_placeholders(message)
    joined = wire.join(held.SerializeToString(), message.DESCRIPTOR, payloads)
    assert joined == message.SerializeToString()
    return joined


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_join_gives_upb_bytes_for_every_loss(loss: str, dtype: str) -> None:
    request = bench_payload.build(loss, ENTRIES[loss].batched, dtype, grad=True)
    request.grad_output.CopyFrom(codec.encode(torch.ones(()), requires_grad=False))  # field 64: 2-byte tag
    _check_join(request)
    _check_join(pb.ComputeStreamRequest(id=2**64 - 1, request=request))


def test_join_of_nested_options_and_large_lengths() -> None:
    request = bench_payload.build("linear_cross_entropy", (300, 40), "float64", grad=True)  # lengths of 3 bytes
    options = request.linear_cross_entropy.options
    options.batch_chunk_size = 2
    options.chunking_method = "none"
    options.acc_dtype = pb.DTYPE_FLOAT32
    request.linear_cross_entropy.label_smoothing = 0.1
    _check_join(request)
    triplet = bench_payload.build("triplet_margin_with_distance_loss", (2, 3), "float64", grad=False)
    triplet.triplet_margin_with_distance_loss.distance_function.pairwise_distance.p = float("inf")
    _check_join(triplet)
    _check_join(pb.ComputeStreamRequest(id=7, request=triplet))


@pytest.mark.parametrize("shape", [(0,), (3, 0), ()], ids=str)
def test_join_of_empty_and_scalar_tensors(shape: tuple[int, ...]) -> None:
    request = pb.ComputeRequest()
    request.mse_loss.input.CopyFrom(codec.encode(torch.zeros(shape, dtype=torch.bfloat16), requires_grad=True))
    request.mse_loss.target.SetInParent()  # present, every field default
    _check_join(request)


def test_join_inverts_split() -> None:
    for data, message_type in _fuzz_seeds():
        stripped, payloads = wire.split(data, message_type.DESCRIPTOR)
        joined = wire.join(stripped, message_type.DESCRIPTOR, payloads)
        assert message_type.FromString(joined) == message_type.FromString(data)


def test_join_leaves_a_message_without_tensors_as_it_is() -> None:
    data = pb.ComputeRequest(mse_loss=pb.MseLoss(reduction=pb.REDUCTION_SUM)).SerializeToString()
    assert wire.join(data, pb.ComputeRequest.DESCRIPTOR, wire.Payloads()) is data
    assert wire.join(memoryview(data), pb.ComputeRequest.DESCRIPTOR, wire.Payloads()) == data


def test_join_rejects_data_that_is_no_placeholder() -> None:
    data = pb.ComputeRequest(mse_loss=pb.MseLoss(input=codec.encode(torch.ones(2)))).SerializeToString()
    with pytest.raises(ValueError, match="placeholder"):
        wire.join(data, pb.ComputeRequest.DESCRIPTOR, wire.Payloads())
    with pytest.raises(DecodeError):
        wire.join(_NESTED[:-1], pb.ComputeRequest.DESCRIPTOR, wire.Payloads())


def test_join_copies_the_bytes_once() -> None:
    request = bench_payload.build("mse_loss", (1 << 20,), "float32", grad=True)  # 8 MB
    held, payloads = _with_placeholders(request)
    stripped = held.SerializeToString()
    tracemalloc.start()
    try:
        data = wire.join(stripped, pb.ComputeRequest.DESCRIPTOR, payloads)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) - (8 << 20) < 64 and peak < len(data) + (64 << 10)
