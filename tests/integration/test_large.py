"""Requests and answers above the server's split size (1 MiB), whose tensors the server reads in
place from the received bytes and whose gradients it writes once: the same answers as torch."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server import servicer

from .helpers import rpc_error

pytestmark = pytest.mark.filterwarnings("error::UserWarning")  # e.g. torch's warning about read-only buffers

_ELEMENTS = 2 * servicer._SPLIT_BYTES // 4  # float32 elements in 2 MiB: every tensor alone passes the size


def _leaves(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    return base.clone().requires_grad_(), base.clone().requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_large_request_and_its_gradient_match_torch(client: Any, dtype: torch.dtype) -> None:
    remote, local = _leaves(_ELEMENTS, dtype=dtype)
    target = torch.randn(_ELEMENTS, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = client.mse_loss(remote, target)
    expected = F.mse_loss(local, target)
    got.backward()
    expected.backward()
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype in (torch.float16, torch.bfloat16) else {}
    torch.testing.assert_close(got.detach(), expected.detach(), **tolerance)
    assert remote.grad is not None and local.grad is not None
    torch.testing.assert_close(remote.grad, local.grad, **tolerance)


def test_large_class_scores_with_weights_and_an_unreduced_grad_output(client: Any) -> None:
    remote, local = _leaves(1024, 512)
    target = torch.randint(0, 512, (1024,), generator=torch.Generator().manual_seed(2))
    weight = torch.rand(512, generator=torch.Generator().manual_seed(3))
    incoming = torch.rand(1024, generator=torch.Generator().manual_seed(4))
    got = client.cross_entropy(remote, target, weight=weight, reduction="none", label_smoothing=0.1)
    expected = F.cross_entropy(local, target, weight=weight, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(got.detach(), expected.detach())
    got.backward(incoming)  # a second call, carrying grad_output
    expected.backward(incoming)
    assert remote.grad is not None and local.grad is not None
    torch.testing.assert_close(remote.grad, local.grad)


def test_large_ctc(client: Any) -> None:
    steps, batch, classes = 128, 16, 160  # log_probs of 1.25 MiB
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(steps, batch, classes, generator=generator)
    remote = scores.log_softmax(2).detach().requires_grad_()
    local = remote.detach().clone().requires_grad_()
    targets = torch.randint(1, classes, (batch, 30), generator=generator)
    input_lengths = torch.full((batch,), steps, dtype=torch.long)
    target_lengths = torch.randint(10, 30, (batch,), generator=generator)
    got = client.ctc_loss(remote, targets, input_lengths, target_lengths)
    expected = F.ctc_loss(local, targets, input_lengths, target_lengths)
    got.backward()
    expected.backward()
    torch.testing.assert_close(got.detach(), expected.detach())
    assert remote.grad is not None and local.grad is not None
    torch.testing.assert_close(remote.grad, local.grad)


def test_large_items_on_a_stream(client: Any) -> None:
    inputs = [torch.randn(_ELEMENTS, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    with client.stream() as stream:
        futures = [stream.l1_loss(x.numpy(), np.zeros(_ELEMENTS, dtype=np.float32)) for x in inputs]
        small = stream.l1_loss(np.ones(3), np.zeros(3))
    for x, future in zip(inputs, futures, strict=True):
        np.testing.assert_allclose(future.result(), F.l1_loss(x, torch.zeros(_ELEMENTS)).numpy(), rtol=1e-6)
    assert small.result() == 1.0


def test_a_truncated_large_request_is_invalid_argument(channel: grpc.Channel, client: Any) -> None:
    x = torch.randn(_ELEMENTS)
    request = pb.ComputeRequest(mse_loss=pb.MseLoss(input=codec.encode(x), target=codec.encode(x)))
    data = request.SerializeToString()
    compute = channel.unary_unary("/remoteloss.v1.LossService/Compute")
    exc = rpc_error(lambda: compute(data[: len(data) - 10], timeout=30))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid remoteloss.v1.ComputeRequest" in (exc.details() or "")
    assert client.mse_loss(np.ones(2), np.zeros(2)) == 1.0  # and the server still answers


def test_a_large_request_with_a_wrong_data_length_names_the_argument(channel: grpc.Channel) -> None:
    x = torch.randn(_ELEMENTS)
    target = codec.encode(x)
    target.shape[0] += 1  # one element more than the bytes hold
    request = pb.ComputeRequest(mse_loss=pb.MseLoss(input=codec.encode(x), target=target))
    compute = channel.unary_unary("/remoteloss.v1.LossService/Compute")
    exc = rpc_error(lambda: compute(request.SerializeToString(), timeout=30))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (exc.details() or "").startswith("mse_loss: target: data holds")
