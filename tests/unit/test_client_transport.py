"""remoteloss._request.prepare_request and remoteloss._transport: what the SDK sends is what
build_request's message serializes to, byte for byte; large answers decode with one copy."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest
import torch

from remoteloss import _calls, codec
from remoteloss import _wire as wire
from remoteloss._request import LOSS_NAMES, Request, build_request, prepare_request, tensor_names
from remoteloss._samples import ENTRIES
from remoteloss._transport import Answer, read_answer, read_stream_answer
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_bench import payload as bench_payload



@pytest.fixture
def split_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request and answer takes the large path, however small."""
    monkeypatch.setattr(wire, "SPLIT_BYTES", 0)


def _same_bytes(loss: str, arguments: dict[str, Any], **kwargs: Any) -> Request:
    request = prepare_request(loss, arguments, **kwargs)
    expected = build_request(loss, arguments, **kwargs)
    assert request.serialize() == expected.SerializeToString()
    item = pb.ComputeStreamRequest(id=2**63 + 1, request=expected).SerializeToString()
    assert request.serialize_item(2**63 + 1) == item
    return request


@pytest.mark.usefixtures("split_always")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_a_split_request_serializes_as_upb_does_for_every_loss(loss: str, dtype: str) -> None:
    arguments = bench_payload.arguments(loss, ENTRIES[loss].batched, dtype)
    request = _same_bytes(loss, arguments, wrt=(tensor_names(loss)[0],), grad_output=np.float32(2.0))
    assert request.payloads is not None and len(request.payloads) == len(arguments) + 1


@pytest.mark.usefixtures("split_always")
def test_a_split_request_with_options_torch_tensors_and_empty_ones() -> None:
    x = torch.randn(4, 3, dtype=torch.float64).t()  # not contiguous
    options = pb.LinearCrossEntropyOptions(batch_chunk_size=2, chunking_method="none", acc_dtype=pb.DTYPE_FLOAT32)
    arguments = {
        "input": x,
        "linear_weight": -torch.randn(5, 4, dtype=torch.float64),  # a negative view
        "target": np.array([0, 4, 2]),
        "options": options,
        "label_smoothing": 0.1,
    }
    _same_bytes("linear_cross_entropy", arguments, wrt=("input",), grad_output=torch.ones(3))
    distance = pb.DistanceFunction(pairwise_distance=pb.PairwiseDistance(p=float("inf")))
    empty = {"anchor": np.zeros((0, 3)), "positive": np.zeros((0, 3)), "negative": np.zeros((0, 3))}
    request = _same_bytes("triplet_margin_with_distance_loss", {**empty, "distance_function": distance})
    assert request.payloads is not None and len(request.payloads) == 0  # no data field to fill
    _same_bytes("mse_loss", {"input": torch.tensor(1.5, dtype=torch.bfloat16), "target": 2.0})


def test_a_small_request_keeps_its_bytes_in_the_message() -> None:
    request = prepare_request("mse_loss", {"input": np.ones(3), "target": np.zeros(3)})
    assert request.payloads is None
    assert request.message == build_request("mse_loss", {"input": np.ones(3), "target": np.zeros(3)})
    for key in (1, 127, 128, 2**32, 2**64 - 1):  # a stream item's bytes, written without protobuf's copy
        item = pb.ComputeStreamRequest(id=key, request=request.message).SerializeToString()
        assert request.serialize_item(key) == item


def test_a_large_request_leaves_the_arguments_bytes_in_place_until_serialized() -> None:
    x = np.random.default_rng(0).standard_normal(1 << 19).astype(np.float32)  # 2 MiB
    tracemalloc.start()
    try:
        request = prepare_request("mse_loss", {"input": x, "target": x})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert request.payloads is not None and request.payloads.nbytes == 2 * x.nbytes
    assert peak < 64 << 10
    assert request.serialize() == build_request("mse_loss", {"input": x, "target": x}).SerializeToString()


def _response(loss: torch.Tensor, **gradients: torch.Tensor) -> bytes:
    message = pb.ComputeResponse(loss=codec.encode(loss, requires_grad=False), warnings=["w"])
    for name, gradient in gradients.items():
        message.gradients[name].CopyFrom(codec.encode(gradient, requires_grad=False))
    return message.SerializeToString()


@pytest.mark.usefixtures("split_always")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_split_answer_decodes_as_a_parsed_one(dtype: torch.dtype) -> None:
    loss, gradient = torch.randn(3, 2).to(dtype), torch.randn(3, 2).to(dtype)
    data = _response(loss, input=gradient)
    answer = read_answer(data)
    assert answer.payloads is not None and answer.message.warnings == ["w"]
    plain = Answer(pb.ComputeResponse.FromString(data))
    torch_arguments = {"input": torch.zeros(3, 2, dtype=dtype), "target": torch.zeros(3, 2, dtype=dtype)}
    numpy_arguments = {"input": np.zeros((3, 2)), "target": np.zeros((3, 2))}
    for arguments in (torch_arguments, numpy_arguments):
        got = _calls.results(answer, "mse_loss", arguments, ("input",))
        expected = _calls.results(plain, "mse_loss", arguments, ("input",))
        for a, b in ((got[0], expected[0]), (got[1]["input"], expected[1]["input"])):
            assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
            if isinstance(a, np.ndarray):
                assert a.flags.writeable and a.flags.owndata
                np.testing.assert_array_equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
                a.add_(1)  # writable, no warning about a read-only buffer
    if dtype is torch.bfloat16:
        numpy_loss = _calls.results(answer, "mse_loss", numpy_arguments, ())[0]
        np.testing.assert_array_equal(numpy_loss, loss.float().numpy())


@pytest.mark.usefixtures("split_always")
def test_a_split_answer_without_a_loss_is_malformed() -> None:
    answer = read_answer(pb.ComputeResponse(warnings=["w"]).SerializeToString())
    assert answer.data(answer.message.loss) is None
    with pytest.raises(_calls.InternalServerError, match="dtype is unset"):
        _calls.results(answer, "mse_loss", {"input": np.zeros(1)}, ())


@pytest.mark.usefixtures("split_always")
def test_a_split_stream_answer_resolves_in_its_payloads() -> None:
    gradient = torch.randn(5)
    inner = pb.ComputeResponse.FromString(_response(torch.tensor(0.5), input=gradient))
    message, payloads = read_stream_answer(pb.ComputeStreamResponse(id=3, response=inner).SerializeToString())
    assert message.id == 3 and isinstance(payloads, wire.Payloads) and len(payloads) == 2
    answer = Answer(message.response, payloads)
    view = answer.data(message.response.gradients["input"])
    assert view is not None and bytes(view) == inner.gradients["input"].data


def test_a_small_answer_is_parsed_by_protobuf() -> None:
    data = _response(torch.tensor(0.5))
    assert read_answer(data) == (pb.ComputeResponse.FromString(data), None)
    assert read_stream_answer(pb.ComputeStreamResponse(id=1).SerializeToString())[1] is None
