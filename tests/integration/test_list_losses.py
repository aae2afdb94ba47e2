"""ListLosses describes exactly the 22 losses, with torch's defaults and torch's differentiability."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from .cases import LOSS_NAMES, arg_names, cases, probe, reductions


@pytest.fixture(scope="module")
def listed(stub: Any) -> dict[str, Any]:
    from remoteloss.v1 import loss_pb2 as pb

    response = stub.ListLosses(pb.ListLossesRequest(), timeout=30)
    return {info.name: info for info in response.losses}


def _descriptor(loss: str) -> Any:
    from remoteloss.v1 import loss_pb2 as pb

    return pb.ComputeRequest.DESCRIPTOR.fields_by_name[loss].message_type


def _tensor_fields(loss: str) -> list[str]:
    from remoteloss.v1 import loss_pb2 as pb

    return [f.name for f in _descriptor(loss).fields if f.message_type is pb.Tensor.DESCRIPTOR]


def test_exactly_the_oneof_losses_in_order(stub: Any, client: Any) -> None:
    from remoteloss.v1 import loss_pb2 as pb

    response = stub.ListLosses(pb.ListLossesRequest(), timeout=30)
    names = [info.name for info in response.losses]
    oneof = [f.name for f in pb.ComputeRequest.DESCRIPTOR.oneofs_by_name["loss"].fields]
    assert names == oneof
    assert tuple(names) == LOSS_NAMES
    assert [info.name for info in client.list_losses().losses] == names


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_loss_info(listed: dict[str, Any], loss: str) -> None:
    info = listed[loss]
    assert info.message_type == _descriptor(loss).full_name
    module = getattr(torch.nn, info.module)
    assert issubclass(module, torch.nn.modules.loss._Loss)
    assert f"F.{loss}(" in inspect.getsource(module.forward), f"torch.nn.{info.module} does not compute {loss}"
    assert info.summary.strip()
    assert hasattr(F, loss)


def _torch_positional_order(loss: str) -> list[str]:
    return list(inspect.signature(getattr(F, loss)).parameters)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_tensor_arguments(listed: dict[str, Any], loss: str) -> None:
    from remoteloss.v1 import loss_pb2 as pb

    info = listed[loss]
    names = [t.name for t in info.tensors]
    assert set(names) == set(_tensor_fields(loss))
    order = _torch_positional_order(loss)
    assert names == sorted(names, key=order.index), "tensors must be listed in torch's order"
    required = {t.name for t in info.tensors if t.required}
    torch_required = set(arg_names(loss))  # the arguments without a default
    if loss == "gaussian_nll_loss":  # var may also travel as var_float
        assert required - {"var"} == torch_required - {"var"}
    else:
        assert required == torch_required
    for t in info.tensors:
        assert t.dtypes, f"{t.name}: no dtypes"
        assert pb.DTYPE_UNSPECIFIED not in t.dtypes
        assert t.shape.strip(), f"{t.name}: no shape rule"
    first = info.tensors[0]
    assert {pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64} <= set(first.dtypes)


def _probed(loss: str) -> dict[str, set[str]]:
    """For each tensor, how torch treats requires_grad on it across the float64 cases of the table."""
    found: dict[str, set[str]] = {}
    for case in cases(loss):
        if case.dtype == torch.float64:
            for name, kind in probe(case.build()).items():
                found.setdefault(name, set()).add(kind)
    return found


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_differentiable_flags_match_torch(listed: dict[str, Any], loss: str) -> None:
    """True where torch gives a gradient in some case; False where it never can (integers) or
    refuses (raises); either where torch accepts requires_grad but the loss ignores the tensor."""
    flags = {t.name: t.differentiable for t in listed[loss].tensors}
    wrong = []
    for name, kinds in _probed(loss).items():
        if "yes" in kinds and not flags[name]:
            wrong.append(f"{name}: torch differentiates it ({sorted(kinds)}), but the flag is False")
        if kinds <= {"integer", "raises"} and flags[name]:
            wrong.append(f"{name}: torch cannot differentiate it ({sorted(kinds)}), but the flag is True")
    assert not wrong, wrong


def _option_type(field: Any) -> str:
    if field.enum_type is not None:
        return field.enum_type.name
    if field.message_type is not None:
        return field.message_type.name
    return {
        field.TYPE_BOOL: "bool",
        field.TYPE_INT64: "int64",
        field.TYPE_DOUBLE: "double",
        field.TYPE_STRING: "string",
    }[field.type]


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_options_and_defaults(listed: dict[str, Any], loss: str) -> None:
    from remoteloss.v1 import loss_pb2 as pb

    info = listed[loss]
    fields = {f.name: f for f in _descriptor(loss).fields if f.message_type is not pb.Tensor.DESCRIPTOR}
    names = [o.name for o in info.options]
    assert set(names) == set(fields)
    signature = inspect.signature(getattr(F, loss)).parameters
    in_torch = [n for n in names if n in signature]
    order = list(signature)
    assert in_torch == sorted(in_torch, key=order.index), "options must be listed in torch's order"
    for option in info.options:
        assert option.type == _option_type(fields[option.name]), option.name
        assert option.deprecated == (option.name in ("size_average", "reduce")), option.name
        value = json.loads(option.default_value)
        if option.name in signature:
            default = signature[option.name].default
            assert default is not inspect.Parameter.empty
            if default is None or isinstance(default, bool | str):
                assert value == default and type(value) is type(default), f"{option.name}: {option.default_value}"
            else:
                assert isinstance(value, int | float) and not isinstance(value, bool), (
                    f"{option.name}: {option.default_value}"
                )
                assert value == default, f"{option.name}: {option.default_value} != {default!r}"
        else:
            assert option.name == "var_float", option.name  # the float form of var: no default
        if option.name == "reduction":
            assert set(option.allowed_values) == set(reductions(loss))
