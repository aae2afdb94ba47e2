"""remoteloss_server.field_scan: the first unknown field, found by a walk that reads a bounded
number of fields (counted here, never timed), and never lets an unknown field through."""

from __future__ import annotations

import random
from typing import Any

import pytest
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from remoteloss._request import LOSS_NAMES
from remoteloss.v1 import loss_pb2 as pb
from remoteloss._wire import length_delimited as ld
from remoteloss_bench import payload as bench_payload
from remoteloss_server.field_scan import MAX_FIELDS, MAX_STRING_BYTES, FieldLimitError, UnknownField, scan
from remoteloss_server.inference import grpc_service_pb2 as ipb

REQUEST = pb.ComputeRequest.DESCRIPTOR
MSE_LOSS, INPUT, SHAPE = 2, 1, 2
GARBAGE = b"\x0f\xff\xff"  # wire type 7 and a truncated varint: nothing after a stop is read
_SHAPES = {"ctc_loss": (6, 2, 4)}


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_request_is_known(loss: str) -> None:
    request = bench_payload.build(loss, _SHAPES.get(loss, (4, 3)), "float32", grad=True)
    request.grad_output.CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32))
    assert scan(request.SerializeToString(), REQUEST) is None
    item = pb.ComputeStreamRequest(id=3, request=request).SerializeToString()
    assert scan(item, pb.ComputeStreamRequest.DESCRIPTOR) is None


def test_unknown_fields_are_found_where_they_are() -> None:
    mse = pb.ComputeRequest(mse_loss=pb.MseLoss(input=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2]))).SerializeToString()
    assert scan(b"\xb8\x01\x00" + mse, REQUEST) == UnknownField(23, (), "ComputeRequest")
    assert scan(ld(MSE_LOSS, b"\xb8\x01\x05"), REQUEST) == UnknownField(23, ("mse_loss",), "MseLoss")
    found = scan(ld(MSE_LOSS, ld(INPUT, b"\x28\x01")), REQUEST)
    assert found is not None and found.describe() == "field 5 of mse_loss.input"
    assert UnknownField(23, (), "ComputeRequest").describe() == "field 23 of ComputeRequest"
    # A known number of the wrong wire type is unknown, as upb keeps it: dtype as fixed32.
    wrong_type = ld(MSE_LOSS, ld(INPUT, b"\x0d\x00\x00\x00\x00"))
    assert scan(wrong_type, REQUEST) == UnknownField(1, ("mse_loss", "input"), "Tensor")
    # shape is packable: unpacked varints and a packed run are both known.
    assert scan(ld(MSE_LOSS, ld(INPUT, b"\x10\x02\x10\x03" + ld(SHAPE, b"\x04\x05"))), REQUEST) is None
    # A group is unknown (the schema has none).
    assert scan(b"\xbb\x01\xbc\x01", REQUEST) == UnknownField(23, (), "ComputeRequest")


def test_stream_item_paths() -> None:
    top = scan(pb.ComputeStreamRequest(id=4).SerializeToString() + b"\x28\x01", pb.ComputeStreamRequest.DESCRIPTOR)
    assert top == UnknownField(5, (), "ComputeStreamRequest") and top.below("request") is None
    inner = scan(b"\x08\x04" + ld(2, ld(MSE_LOSS, b"\xb8\x01\x00")), pb.ComputeStreamRequest.DESCRIPTOR)
    assert inner is not None and inner.below("request") == UnknownField(23, ("mse_loss",), "MseLoss")


def test_nothing_after_the_first_unknown_field_is_read() -> None:
    assert scan(b"\xb8\x01\x01" * 1000 + GARBAGE, REQUEST) == UnknownField(23, (), "ComputeRequest")
    assert scan(ld(MSE_LOSS, b"\xb8\x01\x01" * 1000) + GARBAGE, REQUEST) == UnknownField(23, ("mse_loss",), "MseLoss")


@pytest.mark.parametrize("limit", [3, 10, MAX_FIELDS])
def test_at_most_max_fields_are_visited(limit: int) -> None:
    """``limit`` known fields pass; one more is refused, and nothing after it is read."""
    def reductions(count: int) -> bytes:
        return ld(MSE_LOSS, b"\x20\x01" * count)

    assert scan(reductions(limit - 1), REQUEST, max_fields=limit) is None  # the mse_loss field counts too
    with pytest.raises(FieldLimitError, match=f"more than {limit} fields.*reduction of mse_loss"):
        scan(reductions(limit) + GARBAGE, REQUEST, max_fields=limit)
    with pytest.raises(FieldLimitError, match="shape of mse_loss.input"):
        scan(ld(MSE_LOSS, ld(INPUT, b"\x10\x01" * limit)) + GARBAGE, REQUEST, max_fields=limit)


def test_packed_entries_count_as_fields() -> None:
    """Each byte of a packed run of varints counts, as an entry takes one at least."""
    def packed(entries: bytes) -> bytes:
        return ld(MSE_LOSS, ld(INPUT, ld(SHAPE, entries)))

    assert scan(packed(b"\x01" * (MAX_FIELDS - 2)), REQUEST) is None  # mse_loss, input, then the entries
    with pytest.raises(FieldLimitError, match="field 1025 is shape of mse_loss.input"):
        scan(packed(b"\x01" * (MAX_FIELDS - 1)), REQUEST)
    assert scan(packed(b"\x81\x01" * (MAX_FIELDS // 2 - 1)), REQUEST) is None
    with pytest.raises(FieldLimitError):
        scan(packed(b"\x81\x01" * (MAX_FIELDS // 2)), REQUEST)
    with pytest.raises(FieldLimitError):
        scan(packed(b"\x01" * 16 * 1024 * 1024), REQUEST)


def test_malformed_bytes_are_decode_errors() -> None:
    for data in (b"\x12\x05\x01", b"\x00\x01", b"\x14", b"\x0f", b"\x12", b"\xff\xff\xff\xff\xff\x01"):
        with pytest.raises(DecodeError):
            scan(data, REQUEST)
        with pytest.raises(DecodeError):
            pb.ComputeRequest.FromString(data)


def _has_unknown(message: Message) -> bool:
    if len(UnknownFieldSet(message)):
        return True
    return any(
        _has_unknown(value)
        for field, value in message.ListFields()
        if field.message_type is not None and not field.is_repeated
    )


def test_scan_never_lets_an_unknown_field_through_and_rejects_only_what_upb_rejects() -> None:
    rng = random.Random(7)
    seeds = [
        bench_payload.build(loss, _SHAPES.get(loss, (2, 3)), "float32", grad=False).SerializeToString()
        for loss in LOSS_NAMES
    ]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            data[at] = rng.randrange(256) if rng.random() < 0.7 else data[at] ^ (1 << rng.randrange(8))
        raw = bytes(data)
        try:
            found = scan(raw, REQUEST)
        except DecodeError:
            with pytest.raises(DecodeError):
                pb.ComputeRequest.FromString(raw)
            continue
        try:
            parsed = pb.ComputeRequest.FromString(raw)
        except DecodeError:
            continue
        if found is None:
            assert not _has_unknown(parsed), raw


def test_strings_past_max_string_bytes_are_refused() -> None:
    def chunking_method(length: int) -> bytes:
        options = pb.LinearCrossEntropyOptions(chunking_method="x" * length)
        return pb.ComputeRequest(linear_cross_entropy=pb.LinearCrossEntropy(options=options)).SerializeToString()

    assert scan(chunking_method(MAX_STRING_BYTES), REQUEST) is None
    with pytest.raises(FieldLimitError, match=r"^chunking_method of linear_cross_entropy.options holds 1025 bytes"):
        scan(chunking_method(MAX_STRING_BYTES + 1), REQUEST)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 2**14 - 1, 2**14, 2**21 - 1, 2**21, 2**21 + 5])
def test_values_of_every_length_are_skipped_exactly(size: int) -> None:
    """A field after a tensor's data of ``size`` bytes (lengths of one to four bytes) is found."""
    data = ld(MSE_LOSS, ld(INPUT, ld(3, bytes(size)) + b"\x28\x01"))
    assert scan(data, REQUEST) == UnknownField(5, ("mse_loss", "input"), "Tensor")
    with pytest.raises(DecodeError):
        scan(data[:-4], REQUEST)  # the data runs past the end of its message


# ----------------------------------------------------------- a protocol that skips unknown fields

def _infer(*inputs: bytes, extra: bytes = b"") -> bytes:
    request = ipb.ModelInferRequest(model_name="mse_loss")
    for sent in inputs:
        request.inputs.add().MergeFromString(sent)
    return request.SerializeToString() + extra


def _oip_scan(data: bytes, max_listed: int = 100, max_fields: int = MAX_FIELDS) -> None:
    assert scan(data, ipb.ModelInferRequest.DESCRIPTOR, skip_unknown=True, listed=ipb.InferTensorContents.DESCRIPTOR,
                max_listed=max_listed, max_fields=max_fields) is None


def _tensor(**contents: list[float] | list[int]) -> bytes:
    return ipb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[len(next(iter(contents.values())))],
                                                  contents=ipb.InferTensorContents(**contents)).SerializeToString()


def test_with_skip_unknown_every_unknown_field_is_skipped_and_counted() -> None:
    unknown = b"\xb8\x01\x01" + ld(24, b"abc") + b"\xc5\x01\x00\x00\x00\x00"  # a varint, bytes, a fixed32
    _oip_scan(_infer(_tensor(fp32_contents=[1.0]), extra=unknown))
    _oip_scan(_infer(_tensor(fp32_contents=[1.0]) + unknown))  # inside an input too
    with pytest.raises(FieldLimitError, match="more than 8 fields"):
        _oip_scan(_infer(extra=b"\xb8\x01\x01" * 8), max_fields=8)
    with pytest.raises(FieldLimitError, match="group"):
        _oip_scan(_infer(extra=b"\xbb\x01\xbc\x01"))  # field 23 as a group: its fields would go uncounted
    with pytest.raises(DecodeError):
        _oip_scan(_infer(extra=b"\xbf\x01"))  # wire type 7


@pytest.mark.parametrize(("contents", "values"), [
    ({"fp32_contents": [0.5] * 60}, 60),  # packed fixed32
    ({"int64_contents": [1, 2**40, -1] * 20}, 60),  # packed varints of 1, 6 and 10 bytes: counted as values
    ({"bool_contents": [True] * 60}, 60),
])
def test_typed_values_count_against_their_own_budget(contents: dict[str, list[Any]], values: int) -> None:
    _oip_scan(_infer(_tensor(**contents)), max_listed=values, max_fields=20)
    _oip_scan(_infer(_tensor(**contents), _tensor(**contents)), max_listed=2 * values, max_fields=20)
    with pytest.raises(FieldLimitError, match=f"more than {2 * values - 1} values in inputs.contents in all"):
        _oip_scan(_infer(_tensor(**contents), _tensor(**contents)), max_listed=2 * values - 1)


def test_unpacked_typed_values_count_too() -> None:
    unpacked = b"".join(b"\x35" + b"\x00\x00\x00\x3f" for _ in range(30))  # fp32_contents (field 6), 30 times
    tensor = ld(1, b"x") + ld(2, b"FP32") + ld(5, unpacked)  # InferInputTensor: name, datatype, contents
    _oip_scan(_infer(tensor), max_listed=30, max_fields=10)
    with pytest.raises(FieldLimitError, match="more than 29 values"):
        _oip_scan(_infer(tensor), max_listed=29)
