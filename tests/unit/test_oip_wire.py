"""oip_wire: a large ModelInferRequest's raw entries as views, and answers with raw entries appended,
against what upb makes of the same messages."""

from __future__ import annotations

import numpy as np
from remoteloss import _wire as wire

from remoteloss_server import oip_wire
from remoteloss_server.inference import grpc_service_pb2 as ipb


def _request(*contents: bytes) -> ipb.ModelInferRequest:
    tensor = ipb.ModelInferRequest.InferInputTensor
    request = ipb.ModelInferRequest(
        model_name="mse_loss", id="7",
        inputs=[tensor(name=f"t{i}", datatype="FP32", shape=[len(c) // 4]) for i, c in enumerate(contents)],
        outputs=[ipb.ModelInferRequest.InferRequestedOutputTensor(name="loss")],
        raw_input_contents=list(contents),
    )
    request.parameters["reduction"].string_param = "sum"
    return request


def test_a_large_requests_raw_entries_are_views_and_the_rest_parses_as_upb_parses_it() -> None:
    big = [np.random.default_rng(i).random(300_000, dtype=np.float32).tobytes() for i in range(2)]
    data = _request(*big, b"").SerializeToString()
    assert len(data) >= wire.SPLIT_BYTES
    split = oip_wire.split(data)
    assert split is not None
    rest, raw = split
    assert [bytes(v) for v in raw] == [*big, b""]
    assert all(isinstance(v, memoryview) and v.obj is data for v in raw)
    parsed = ipb.ModelInferRequest.FromString(rest)
    expected = ipb.ModelInferRequest.FromString(data)
    del expected.raw_input_contents[:]
    assert parsed == expected


def test_upb_parses_what_split_leaves_alone() -> None:
    small = _request(b"\0" * 16).SerializeToString()
    assert oip_wire.split(small) is None  # below SPLIT_BYTES: upb is faster
    flood = b"\x08\x01" * (wire.SPLIT_BYTES // 2)  # a field 1 varint, over and over: past _MAX_FIELDS
    assert oip_wire.split(flood) is None
    truncated = _request(b"\0" * wire.SPLIT_BYTES).SerializeToString()[:-1]
    assert oip_wire.split(truncated) is None


def test_an_answer_with_raw_entries_appended_is_the_response_upb_would_serialize() -> None:
    outputs = [b"\1\2\3\4", np.arange(1000, dtype=np.float32).tobytes(), b""]
    head = ipb.ModelInferResponse(
        model_name="mse_loss", model_version="1", id="7",
        outputs=[ipb.ModelInferResponse.InferOutputTensor(name=f"o{i}") for i in range(3)],
    )
    data = oip_wire.answer(head.SerializeToString(), [outputs[0], memoryview(outputs[1]), outputs[2]])
    expected = ipb.ModelInferResponse()
    expected.CopyFrom(head)
    expected.raw_output_contents.extend(outputs)
    assert ipb.ModelInferResponse.FromString(data) == expected
