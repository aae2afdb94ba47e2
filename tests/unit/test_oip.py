"""``oip``: the losses as the Open Inference Protocol's models, derived from the catalog; requests
to native requests (no network)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server import oip, oip_grpc, oip_json
from remoteloss_server.errors import InvalidArgumentError, NotFoundError
from remoteloss_server.inference import grpc_service_pb2 as ipb
from remoteloss_server.losses import LOSSES, describe
from tests.catalog import LOSS_NAMES


def _request(model: str, inputs: dict[str, Any], outputs: list[str] | None = None, **parameters: Any) -> oip.InferRequest:
    sent = [oip.InferInput(name, dt, np.shape(v), np.asarray(v).tobytes(), p) for name, (dt, v, p) in inputs.items()]
    return oip.InferRequest(model, "", "", parameters, sent, None if outputs is None else [(n, {}) for n in outputs])


X = ("FP32", np.zeros(3, dtype=np.float32), {})


def test_one_model_per_loss_with_the_catalogs_arguments() -> None:
    assert list(oip.MODELS) == list(LOSS_NAMES)
    for name, spec in LOSSES.items():
        info, model = describe(spec), oip.MODELS[name]
        metadata, config = model.metadata(), model.config()
        assert [i["name"] for i in metadata["inputs"]] == [t.name for t in info.tensors if t.required]
        assert all(i["shape"] == [-1] for i in metadata["inputs"])
        assert [i["name"] for i in config["input"]] == [i["name"] for i in metadata["inputs"]]
        assert [o["name"] for o in metadata["outputs"]] == [o["name"] for o in config["output"]] == ["loss"]
        gradients = ", ".join(f"grad_{t.name}" for t in info.tensors if t.differentiable)
        assert config["parameters"]["gradient_outputs"]["string_value"] == gradients
        assert config["max_batch_size"] == 0
        optional = [t.name for t in info.tensors if not t.required] + ["grad_output"]
        assert config["parameters"]["optional_inputs"]["string_value"] == ", ".join(optional)
        for entry in metadata["inputs"]:  # the advertised datatype is one the argument takes
            sent = next(t for t in info.tensors if t.name == entry["name"])
            assert oip.DATATYPES[entry["datatype"]] in sent.dtypes


def test_a_request_becomes_the_native_request() -> None:
    request = _request(
        "cross_entropy", {"input": ("FP32", np.zeros((2, 3), np.float32), {"requires_grad": True}),
                          "target": ("INT64", np.array([0, 2]), {})},
        reduction="sum", label_smoothing=0.1, ignore_index=1,
    )
    compute, payloads, wanted = oip.MODELS["cross_entropy"].to_compute(request)
    message = compute.cross_entropy
    assert message.reduction == pb.REDUCTION_SUM and message.label_smoothing == 0.1 and message.ignore_index == 1
    assert message.input.dtype == pb.DTYPE_FLOAT32 and list(message.input.shape) == [2, 3]
    assert message.input.requires_grad and not message.target.requires_grad
    assert bytes(payloads.resolve(message.target.data)) == np.array([0, 2]).tobytes()
    assert wanted == ("loss", "grad_input")


def test_asking_a_gradients_output_asks_for_the_gradient() -> None:
    compute, _, wanted = oip.MODELS["mse_loss"].to_compute(_request("mse_loss", {"input": X, "target": X}, ["grad_target"]))
    assert compute.mse_loss.target.requires_grad and not compute.mse_loss.input.requires_grad
    assert wanted == ("grad_target",)


def test_options_that_are_messages_or_floats_for_tensors() -> None:
    model = oip.MODELS["triplet_margin_with_distance_loss"]
    inputs = {n: X for n in ("anchor", "positive", "negative")}
    compute, _, _ = model.to_compute(_request(model.name, inputs, distance_function='{"cosine_distance": {"dim": 0}}'))
    assert compute.triplet_margin_with_distance_loss.distance_function.cosine_distance.dim == 0
    compute, _, _ = oip.MODELS["gaussian_nll_loss"].to_compute(
        _request("gaussian_nll_loss", {"input": X, "target": X}, var=0.5))
    assert compute.gaussian_nll_loss.var_float == 0.5


@pytest.mark.parametrize(("inputs", "outputs", "parameters", "message"), [
    ({"input": X, "target": X, "bias": X}, None, {}, "mse_loss: no input 'bias'; inputs: input, target, weight, grad_output"),
    ({"input": ("UINT32", np.zeros(3, np.uint32), {}), "target": X}, None, {},
     "mse_loss: input has datatype 'UINT32'; this server takes BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64"),
    ({"input": X, "target": X}, ["loss", "logits"], {}, "mse_loss: no output 'logits'; outputs: loss, grad_input, grad_target, grad_weight"),
    ({"input": X, "target": X}, ["grad_weight"], {}, "mse_loss: output grad_weight was asked, but no input weight was sent"),
    ({"input": X, "target": X}, None, {"reduction": "average"},
     "mse_loss: reduction must be one of none, mean, sum, batchmean, got 'average'"),
    ({"input": X, "target": X}, None, {"reduction": 1}, "mse_loss: reduction must be one of none, mean, sum, batchmean, got 1"),
    ({"input": X, "target": X}, None, {"beta": 1.0}, "mse_loss: no option 'beta'; options: size_average, reduce, reduction"),
    ({"input": X, "target": X}, None, {"size_average": 1}, "mse_loss: size_average must be a bool, got an int"),
    ({"input": ("FP32", np.zeros(3, np.float32), {"requires_grad": 1}), "target": X}, None, {},
     "mse_loss: input input: requires_grad must be a bool, got an int"),
])
def test_what_only_this_protocol_can_get_wrong(
    inputs: dict[str, Any], outputs: list[str] | None, parameters: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        oip.MODELS["mse_loss"].to_compute(_request("mse_loss", inputs, outputs, **parameters))
    assert str(caught.value) == message


def test_unknown_models_and_versions_are_not_found() -> None:
    assert oip.find("mse_loss", "1") is oip.find("mse_loss") is oip.MODELS["mse_loss"]
    with pytest.raises(NotFoundError, match="no model 'mse'"):
        oip.find("mse")
    with pytest.raises(NotFoundError, match="no version '2'"):
        oip.find("mse_loss", "2")


def test_typed_contents_past_the_listed_limit_are_refused_before_they_are_read() -> None:
    """Each typed value becomes a Python object on the event loop: large tensors must come raw."""
    def message(values: int) -> ipb.ModelInferRequest:
        sent = ipb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[values])
        sent.contents.fp32_contents.extend([0.5] * values)
        return ipb.ModelInferRequest(model_name="mse_loss", inputs=[sent])

    assert oip_grpc.infer_request(message(oip.MAX_LISTED_ELEMENTS)).inputs[0].data[:4] == b"\x00\x00\x00?"
    with pytest.raises(InvalidArgumentError, match="send large tensors in raw_input_contents"):
        oip_grpc.infer_request(message(oip.MAX_LISTED_ELEMENTS + 1))


@pytest.mark.parametrize(("datatype", "field", "values"), [
    ("INT8", "int_contents", [300]), ("INT16", "int_contents", [-40_000]), ("UINT8", "uint_contents", [256]),
])
def test_typed_contents_out_of_their_datatypes_range_are_refused_not_wrapped(
    datatype: str, field: str, values: list[int]
) -> None:
    """INT8's values travel in int_contents (int32): 300 is refused, where a cast would make it 44."""
    sent = ipb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=[len(values)])
    getattr(sent.contents, field).extend(values)
    with pytest.raises(InvalidArgumentError, match=f"out of {datatype}'s range"):
        oip_grpc.infer_request(ipb.ModelInferRequest(model_name="mse_loss", inputs=[sent]))
    getattr(sent.contents, field)[:] = [1]
    assert oip_grpc.infer_request(ipb.ModelInferRequest(model_name="mse_loss", inputs=[sent])).inputs[0].data[:1] == b"\x01"


def test_the_messages_rpcs_skip_fields_this_trimmed_protocol_lacks_at_any_size() -> None:
    """ModelMetadata and the other message RPCs parse as any protobuf reader does: a field the
    trimmed copy of the protocol lacks is skipped, even in a large request (the native API's
    deserializer would leave a large request with an unknown field unparsed)."""
    from remoteloss import _wire as wire

    class Server:  # what status.register calls on a grpc.aio server
        def __init__(self) -> None:
            self.handlers: dict[str, Any] = {}

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            self.handlers = handlers

    server = Server()
    oip_grpc.add_to_server(oip_grpc.InferenceServicer(None), server)  # type: ignore[arg-type]
    unknown = wire.length_delimited(99, bytes(wire.SPLIT_BYTES))  # a field this copy does not have
    data = ipb.ModelMetadataRequest(name="mse_loss").SerializeToString() + unknown
    parsed = server.handlers["ModelMetadata"].request_deserializer(data)
    assert isinstance(parsed, ipb.ModelMetadataRequest) and parsed.name == "mse_loss"


def _json_input(datatype: str, shape: list[int], data: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}).encode()


@pytest.mark.parametrize("body", [
    b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ' + b"[" * 5_000 + b"]" * 5_000 + b"}]}",
])
def test_json_nested_too_deeply_is_invalid_argument(body: bytes) -> None:
    """Python's JSON parser raises RecursionError past its depth; the caller gets its 400, not a 500."""
    with pytest.raises(InvalidArgumentError, match="nested too deeply"):
        oip_json.infer_request("mse_loss", "", body, None)


@pytest.mark.parametrize(("datatype", "data", "refused"), [
    ("FP32", [True, False], "values of bool in FP32 data"),
    ("INT64", [True], "values of bool in INT64 data"),
    ("BOOL", [1, 0], "values of int64 in BOOL data"),
    ("BOOL", [True, False], None),
    ("INT64", [], None),  # an empty list is float64 to numpy: no values, nothing to refuse
    ("INT32", [2**40], r"values outside \[-2147483648, 2147483647\]"),  # a cast would wrap it around
    ("UINT8", [-1], r"values outside \[0, 255\]"),
    ("INT64", [2**63 - 1, -(2**63)], None),
    ("FP16", [1e6], None),  # past FP16's range: inf, as a cast gives it (without a warning)
    ("FP32", [True, 2], "values of bool in FP32 data"),  # numpy alone would read [1, 2]
    ("FP32", [[1.5], [False]], "values of bool in FP32 data"),
    ("BF16", [True, 2.0], "values of bool in BF16 data"),
])
def test_json_data_of_the_wrong_kind(datatype: str, data: list[Any], refused: str | None) -> None:
    """true and false are BOOL's values and only theirs (Triton refuses them elsewhere too); an
    integer outside its datatype's range is refused, not wrapped around."""
    body = _json_input(datatype, list(np.shape(data)), data)
    if refused is None:
        (sent,) = oip_json.infer_request("mse_loss", "", body, None).inputs
        with np.errstate(over="ignore"):
            assert bytes(sent.data) == np.asarray(data).astype(oip_json._NUMPY[datatype]).tobytes()
        return
    with pytest.raises(InvalidArgumentError, match=refused):
        oip_json.infer_request("mse_loss", "", body, None)


def test_a_true_elsewhere_in_the_json_leaves_numbers_alone() -> None:
    """The look for booleans runs only when the JSON holds true or false; numbers pass it."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 1], "data": [[1.5], [2]]}],
                       "parameters": {"binary_data_output": True}}).encode()
    (sent,) = oip_json.infer_request("mse_loss", "", body, None).inputs
    assert bytes(sent.data) == np.array([1.5, 2], dtype="<f4").tobytes()
