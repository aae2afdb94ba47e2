"""The catalog matches the proto and torch; describe() reports torch's own defaults."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn.functional as F

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.losses import LOSSES, LossSpec, TensorArg, describe, describe_all
from remoteloss_server.losses.spec import FLOATING

torch.set_num_threads(1)

ONEOF = [f.name for f in pb.ComputeRequest.DESCRIPTOR.oneofs_by_name["loss"].fields]


def test_one_spec_per_oneof_field_in_proto_order() -> None:
    assert list(LOSSES) == ONEOF


@pytest.mark.parametrize("name", ONEOF)
def test_spec_matches_message_and_torch(name: str) -> None:
    spec = LOSSES[name]
    # torch's own function, or one that wraps it (multi_margin_loss: an empty batch's reduction)
    assert inspect.unwrap(spec.function) is getattr(F, name)
    assert issubclass(getattr(torch.nn, spec.module), torch.nn.Module)
    tensor_fields = {f.name for f in spec.descriptor.fields if f.message_type is pb.Tensor.DESCRIPTOR}
    assert {t.name for t in spec.tensors} == tensor_fields
    for arg in spec.tensors:
        assert arg.dtypes and arg.shape
        assert arg.name in spec.signature.parameters
        if not arg.dtypes & FLOATING:
            assert not arg.differentiable


def test_a_spec_that_disagrees_with_its_message_fails_at_import() -> None:
    with pytest.raises(TypeError, match="mse_loss: spec tensors differ"):
        LossSpec("mse_loss", "MSELoss", (TensorArg("input", FLOATING, "any"),))
    with pytest.raises(TypeError, match="no decoder for field 'var_float'"):
        LossSpec(
            "gaussian_nll_loss",
            "GaussianNLLLoss",
            tuple(TensorArg(n, FLOATING, "any") for n in ("input", "target", "var")),
        )


@pytest.mark.parametrize("name", ONEOF)
def test_describe_uses_torch_order_and_defaults(name: str) -> None:
    spec, info = LOSSES[name], describe(LOSSES[name])
    parameters = inspect.signature(getattr(F, name)).parameters
    order = list(parameters)
    assert info.name == name and info.module == spec.module
    assert info.message_type == f"remoteloss.v1.{spec.descriptor.name}"
    assert info.summary == inspect.getdoc(getattr(F, name)).splitlines()[0]  # type: ignore[union-attr]
    names = [t.name for t in info.tensors]
    assert names == sorted(names, key=order.index)
    for tensor in info.tensors:
        arg = next(t for t in spec.tensors if t.name == tensor.name)
        assert tensor.required == arg.required and tensor.differentiable == arg.differentiable
        assert set(tensor.dtypes) == {codec.dtype_from_torch(d) for d in arg.dtypes}
    fields = spec.descriptor.fields_by_name
    assert {o.name for o in info.options} == set(fields) - set(names)
    for option in info.options:
        parameter = parameters.get(option.name)
        if parameter is not None:
            default = None if parameter.default is inspect.Parameter.empty else parameter.default
            assert json.loads(option.default_value) == default, option.name
        assert option.deprecated == (option.name in ("size_average", "reduce"))
        if option.name == "reduction":
            assert option.type == "Reduction"
            expected = ["none", "mean", "sum"] + (["batchmean"] if name == "kl_div" else [])
            assert list(option.allowed_values) == expected
        else:
            assert not option.allowed_values


def test_describe_types_and_special_options() -> None:
    options = {o.name: o for o in describe(LOSSES["gaussian_nll_loss"]).options}
    assert [o for o in options] == ["var_float", "full", "eps", "reduction"]
    assert (options["var_float"].type, options["var_float"].default_value) == ("double", "null")
    assert (options["eps"].type, options["eps"].default_value) == ("double", "1e-06")
    options = {o.name: o for o in describe(LOSSES["cross_entropy"]).options}
    assert (options["ignore_index"].type, options["ignore_index"].default_value) == ("int64", "-100")
    assert (options["size_average"].type, options["size_average"].default_value) == ("bool", "null")
    options = {o.name: o for o in describe(LOSSES["triplet_margin_with_distance_loss"]).options}
    assert (options["distance_function"].type, options["distance_function"].default_value) == (
        "DistanceFunction",
        "null",
    )
    options = {o.name: o for o in describe(LOSSES["linear_cross_entropy"]).options}
    assert (options["options"].type, options["ignore_index"].default_value) == ("LinearCrossEntropyOptions", "null")


def test_describe_all_is_in_proto_order() -> None:
    assert [info.name for info in describe_all(LOSSES.values()).losses] == ONEOF
