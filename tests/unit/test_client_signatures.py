"""Each Client loss method has exactly its torch.nn.functional twin's signature, and maps onto its message."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from remoteloss import Client
from remoteloss._request import LOSS_NAMES, tensor_names
from remoteloss.v1 import loss_pb2 as pb

torch.set_num_threads(1)


def _parameters(function: object) -> list[tuple[str, inspect._ParameterKind, object, type]]:
    """Name, kind, default and the default's type (so 0 and 0.0 differ) of each parameter."""
    parameters = list(inspect.signature(function).parameters.values())  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default, type(p.default)) for p in parameters]


def test_every_loss_of_the_proto_is_a_method() -> None:
    assert LOSS_NAMES == tuple(f.name for f in pb.ComputeRequest.DESCRIPTOR.oneofs_by_name["loss"].fields)
    assert [name for name in LOSS_NAMES if not callable(getattr(Client, name, None))] == []


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_signature_equals_torch(loss: str) -> None:
    ours = _parameters(getattr(Client, loss))
    assert ours[0][0] == "self"
    assert ours[1:] == _parameters(getattr(F, loss))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_argument_is_a_field_of_the_loss_message(loss: str) -> None:
    fields = getattr(pb.ComputeRequest(), loss).DESCRIPTOR.fields_by_name
    arguments = [name for name in inspect.signature(getattr(Client, loss)).parameters if name != "self"]
    assert [name for name in arguments if name not in fields] == []
    # The only fields torch has no argument for are the float forms of tensor arguments.
    extra = sorted(set(fields) - set(arguments))
    assert all(name.removesuffix("_float") in tensor_names(loss) for name in extra), extra


def test_value_and_grad_takes_the_loss_name_positionally() -> None:
    parameters = inspect.signature(Client.value_and_grad).parameters
    assert list(parameters) == ["self", "loss_name", "args", "wrt", "grad_output", "kwargs"]
    assert parameters["loss_name"].kind is inspect.Parameter.POSITIONAL_ONLY
    assert parameters["wrt"].default == ("input",)
