"""docs/VALIDATION.md against a real server: each option rule torch enforces, and the limits on
what a request may make the server build (ranks, absurd sizes, broadcasts, implied tensors).

Each rejection is INVALID_ARGUMENT whose message names the loss and the argument; before these
checks some of these requests reached the client as INTERNAL, or made the server allocate
gigabytes from a few hundred kilobytes of request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import remoteloss
import torch
from google.protobuf import json_format
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig
from remoteloss_server.losses import LOSSES
from remoteloss_server.losses.spec import MAX_DIMS

from .cases import Case, OptionSet
from .helpers import (
    assert_rpc_invalid_argument,
    assert_server_answers,
    raw_request,
    rpc_error,
)

RULES = [(spec.name, rule) for spec in LOSSES.values() for rule in spec.rejects]
LIMIT = 1000  # max_elements of the small server


def good_request(loss: str) -> pb.ComputeRequest:
    call = Case(loss, torch.float64, True, OptionSet("good", {}), "mean").build()
    values = dict(zip(call.arg_names, call.args, strict=True))
    return raw_request(loss, {name: value for name, value in values.items() if value is not None})


def tensor(shape: tuple[int, ...] | list[int], dtype: int = pb.DTYPE_FLOAT32, fill: bytes | None = None) -> pb.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    size = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_INT64: 8}[dtype]
    return pb.Tensor(dtype=dtype, shape=shape, data=fill if fill is not None else bytes(numel * size))


def compute(stub: Any, loss: str, **fields: Any) -> grpc.RpcError:
    message = pb.ComputeRequest.DESCRIPTOR.fields_by_name[loss].message_type
    request = pb.ComputeRequest(**{loss: getattr(pb, message.name)(**fields)})
    return rpc_error(lambda: stub.Compute(request, timeout=60))


@pytest.fixture(scope="module")
def small() -> Iterator[Any]:
    """A server whose requests may imply at most LIMIT elements."""
    config = ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0, max_elements=LIMIT)
    with ServerThread(config) as running, grpc.insecure_channel(running.target) as channel:
        yield loss_pb2_grpc.LossServiceStub(channel)


@pytest.mark.parametrize(("loss", "rule"), RULES, ids=[f"{loss}-{rule.argument}" for loss, rule in RULES])
def test_each_option_rule_torch_enforces(stub: Any, client: Any, loss: str, rule: Any) -> None:
    request = good_request(loss)
    message = getattr(request, loss)
    assert stub.Compute(request, timeout=60).HasField("loss")  # good as it is
    for name in rule.clear:
        message.ClearField(name)
    json_format.ParseDict(rule.example, message)  # merged into the good request
    exc = rpc_error(lambda: stub.Compute(request, timeout=60))
    assert_rpc_invalid_argument(exc, loss, (rule.argument.rsplit(".", 1)[-1],))
    assert_server_answers(client)


# ------------------------------------------------------------------------------ shapes


def test_more_dimensions_than_the_limit(stub: Any) -> None:
    shape = [1] * (MAX_DIMS + 1)
    exc = compute(stub, "mse_loss", input=tensor(shape), target=tensor(shape))
    assert_rpc_invalid_argument(exc, "mse_loss", ("input",))
    assert f"more than the limit of {MAX_DIMS}" in (exc.details() or "")
    ok = [1] * MAX_DIMS
    stub.Compute(pb.ComputeRequest(mse_loss=pb.MseLoss(input=tensor(ok), target=tensor(ok))), timeout=60)


def test_a_grad_output_of_too_many_dimensions(stub: Any) -> None:
    request = pb.ComputeRequest(
        mse_loss=pb.MseLoss(input=tensor([2]), target=tensor([2])), grad_output=tensor([1] * (MAX_DIMS + 1))
    )
    assert_rpc_invalid_argument(rpc_error(lambda: stub.Compute(request, timeout=60)), "mse_loss", ("grad_output",))


@pytest.mark.parametrize("shape", [[2**62, 2**62, 0], [0, 2**31, 2**31, 2**31], [2**63 - 1, 2, 0]])
def test_empty_tensors_of_absurd_sizes(stub: Any, client: Any, shape: list[int]) -> None:
    """Zero elements and no data, but sizes whose product overflows: torch raises from its
    allocator; this reached the client as INTERNAL."""
    exc = compute(stub, "mse_loss", input=tensor(shape), target=tensor([0]))
    assert_rpc_invalid_argument(exc, "mse_loss", ("input",))
    assert "too large" in (exc.details() or "")
    assert_server_answers(client)


def test_an_empty_tensor_of_large_sizes_is_fine(stub: Any) -> None:
    """torch takes (2**40, 0): zero elements, and the sizes multiply within int64."""
    response = stub.Compute(
        pb.ComputeRequest(mse_loss=pb.MseLoss(input=tensor([2**40, 0]), target=tensor([2**40, 0]), reduction=3)),
        timeout=60,
    )
    assert codec.decode_numpy(response.loss).item() == 0.0


# ---------------------------------------------------------------------------- max_elements


def test_a_sent_tensor_over_the_limit(small: Any) -> None:
    exc = compute(small, "mse_loss", input=tensor([LIMIT + 1]), target=tensor([1]))
    assert_rpc_invalid_argument(exc, "mse_loss", ("input",))
    assert f"exceed the limit of {LIMIT}" in (exc.details() or "")


@pytest.mark.parametrize(
    ("loss", "fields", "names"),
    [
        ("mse_loss", {"input": [LIMIT + 1, 1], "target": [1, 1]}, ("input",)),  # the tensor itself
        ("mse_loss", {"input": [40, 1], "target": [1, 26]}, ("input [40, 1] and target [1, 26]",)),
        ("cosine_embedding_loss", {"input1": [40, 1], "input2": [1, 26], "target": [40]}, ("input1", "input2")),
        ("triplet_margin_loss", {"anchor": [40, 1], "positive": [1, 26], "negative": [1, 1]}, ("anchor",)),
        ("margin_ranking_loss", {"input1": [40, 1], "input2": [1, 26], "target": [1, 1]}, ("input1",)),
    ],
)
def test_a_broadcast_over_the_limit(small: Any, loss: str, fields: dict[str, list[int]], names: tuple[str, ...]) -> None:
    """40 x 26 = 1040 elements from 66 sent; at full size, 50000 x 50000 from 400 kB."""
    exc = compute(small, loss, **{name: tensor(shape) for name, shape in fields.items()})
    assert_rpc_invalid_argument(exc, loss, names)
    assert str(LIMIT) in (exc.details() or "")


def test_a_broadcast_at_the_limit_is_computed(small: Any) -> None:
    small.Compute(pb.ComputeRequest(mse_loss=pb.MseLoss(input=tensor([40, 1]), target=tensor([1, 25]))), timeout=60)


def test_linear_cross_entropy_logits_over_the_limit(small: Any) -> None:
    exc = compute(
        small,
        "linear_cross_entropy",
        input=tensor([40, 1]),
        linear_weight=tensor([26, 1]),
        target=tensor([40], pb.DTYPE_INT64),
    )
    assert_rpc_invalid_argument(exc, "linear_cross_entropy", ("logits",))
    assert "[40, 26]" in (exc.details() or "")


def test_ctc_alignment_table_over_the_limit(small: Any) -> None:
    """(N, T, 2 S + 1) = 1 x 40 x 41 from 40 + 20 elements."""
    exc = compute(
        small,
        "ctc_loss",
        log_probs=tensor([40, 1, 2]),
        targets=tensor([1, 20], pb.DTYPE_INT64, np.ones(20, np.int64).tobytes()),
        input_lengths=tensor([1], pb.DTYPE_INT64, np.array([40]).tobytes()),
        target_lengths=tensor([1], pb.DTYPE_INT64, np.array([20]).tobytes()),
    )
    assert_rpc_invalid_argument(exc, "ctc_loss", ("alignment table",))


def test_the_full_size_broadcast_is_refused_quickly(stub: Any) -> None:
    """The default limit (2**30) on the session's server: 50000 x 50000 would be 10 GB of float32."""
    exc = compute(stub, "mse_loss", input=tensor([50000, 1]), target=tensor([1, 50000]))
    assert_rpc_invalid_argument(exc, "mse_loss", ("input", "target"))


# ---------------------------------------------------------------------------- other gaps


def test_cosine_distance_dim_out_of_range_names_the_option(client: Any) -> None:
    x = np.ones((3, 4), np.float32)
    with pytest.raises(remoteloss.InvalidArgumentError, match=r"distance_function\.cosine_distance\.dim is 2"):
        client.triplet_margin_with_distance_loss(x, x, x, distance_function=remoteloss.CosineDistance(dim=2))
    client.triplet_margin_with_distance_loss(x, x, x, distance_function=remoteloss.CosineDistance(dim=-2))


def test_binary_cross_entropy_target_outside_0_1_as_torch_on_a_cpu(client: Any) -> None:
    x, y = torch.full((2, 2), 0.5), torch.full((2, 2), 1.5)
    with pytest.raises(RuntimeError):  # torch on the CPU, as the session's server
        torch.nn.functional.binary_cross_entropy(x, y)
    with pytest.raises(remoteloss.InvalidArgumentError, match="binary_cross_entropy: .*target"):
        client.binary_cross_entropy(x, y)


def test_nan_in_inputs_is_computed_as_torch_does(client: Any) -> None:
    x, y = torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, float("inf")])
    expected = torch.nn.functional.mse_loss(x, y, reduction="none")
    torch.testing.assert_close(client.mse_loss(x, y, reduction="none"), expected, equal_nan=True)
