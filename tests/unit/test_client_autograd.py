"""The autograd node of remote losses, with the RPC replaced by a local torch evaluation."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import remoteloss
from remoteloss import codec
from remoteloss._request import Request
from remoteloss._transport import Answer, Transport
from remoteloss.v1 import loss_pb2 as pb

torch.set_num_threads(1)

_REDUCTIONS = {pb.REDUCTION_NONE: "none", pb.REDUCTION_MEAN: "mean", pb.REDUCTION_SUM: "sum"}


class LocalServer:
    """Answers Compute requests for the losses whose options are all tensors or a reduction."""

    def __init__(self) -> None:
        self.requests: list[pb.ComputeRequest] = []

    def __call__(self, request: pb.ComputeRequest) -> pb.ComputeResponse:
        self.requests.append(request)
        loss = request.WhichOneof("loss")
        assert loss is not None
        message = getattr(request, loss)
        kwargs: dict[str, Any] = {"reduction": _REDUCTIONS[message.reduction]}
        wrt: dict[str, torch.Tensor] = {}
        for field, value in message.ListFields():
            if field.message_type is pb.Tensor.DESCRIPTOR:
                kwargs[field.name] = codec.decode_torch(value, field.name).requires_grad_(value.requires_grad)
                if value.requires_grad:
                    wrt[field.name] = kwargs[field.name]
        with warnings.catch_warnings(record=True) as caught, torch.enable_grad():
            warnings.simplefilter("always")
            value = getattr(F, loss)(**kwargs)
        response = pb.ComputeResponse(loss=codec.encode(value.detach()), warnings=[str(w.message) for w in caught])
        if wrt:
            has = request.HasField("grad_output")
            grad_output = codec.decode_torch(request.grad_output) if has else torch.ones_like(value)
            grads = torch.autograd.grad(value, list(wrt.values()), grad_output)
            for name, grad in zip(wrt, grads, strict=True):
                response.gradients[name].CopyFrom(codec.encode(grad))
        return response


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> LocalServer:
    local = LocalServer()
    def compute_rpc(self: Any, request: Request) -> Answer:
        return Answer(local(pb.ComputeRequest.FromString(request.serialize())))

    monkeypatch.setattr(Transport, "compute", compute_rpc)
    return local


@pytest.fixture
def client(server: LocalServer) -> Any:
    with remoteloss.Client("localhost:1") as client:
        yield client


def _leaves(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.clone().requires_grad_(), x.clone().requires_grad_()


@pytest.mark.parametrize(
    ("reduction", "reduce", "calls"),
    [
        ("mean", lambda out: out, 1),
        ("sum", lambda out: out * 3.0, 1),
        ("none", lambda out: out.sum(), 1),
        ("none", lambda out: out.mean(), 1),
        ("none", lambda out: (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum(), 2),
    ],
    ids=["mean", "scaled-sum", "none-sum", "none-mean", "none-weighted"],
)
def test_backward_matches_torch_with_as_few_calls_as_possible(
    client: Any, server: LocalServer, reduction: str, reduce: Any, calls: int
) -> None:
    remote_input, local_input = _leaves(4, 3)
    remote_target, local_target = _leaves(4, 3, seed=1)
    ours = client.mse_loss(remote_input, remote_target, reduction=reduction)
    theirs = F.mse_loss(local_input, local_target, reduction=reduction)
    assert ours.grad_fn is not None
    torch.testing.assert_close(ours, theirs)
    reduce(ours).backward()
    reduce(theirs).backward()
    assert len(server.requests) == calls
    torch.testing.assert_close(remote_input.grad, local_input.grad)
    torch.testing.assert_close(remote_target.grad, local_target.grad)



def test_a_retained_graph_gives_the_same_gradients_again(client: Any, server: LocalServer) -> None:
    """The first backward hands the received gradients over (torch keeps them as .grad without a
    copy); a second backward of the retained graph asks again, and a .grad changed in place in
    between changes nothing else."""
    remote_input, local_input = _leaves(4, 3)
    target = torch.ones(4, 3, dtype=torch.float64)
    ours = client.mse_loss(remote_input, target)
    theirs = F.mse_loss(local_input, target)
    ours.backward(retain_graph=True)
    theirs.backward(retain_graph=True)
    torch.testing.assert_close(remote_input.grad, local_input.grad, rtol=0, atol=0)
    assert len(server.requests) == 1
    assert remote_input.grad is not None
    remote_input.grad.mul_(10.0)
    local_input.grad.mul_(10.0)
    ours.backward(retain_graph=True)
    theirs.backward(retain_graph=True)
    (ours * 2.0).backward()
    (theirs * 2.0).backward()
    torch.testing.assert_close(remote_input.grad, local_input.grad, rtol=0, atol=0)
    assert len(server.requests) == 3  # the second backward's call; the third's gradients are the second's


def test_create_graph_gives_first_gradients_and_refuses_a_second_derivative(client: Any) -> None:
    remote_input, local_input = _leaves(5)
    target = torch.zeros(5, dtype=torch.float64)
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)  # a grad_output with a graph
    loss = client.mse_loss(remote_input, target)
    (ours,) = torch.autograd.grad(loss, remote_input, grad_outputs=scale, create_graph=True)
    (theirs,) = torch.autograd.grad(F.mse_loss(local_input, target), local_input)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ours.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        ours.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gradients_have_the_inputs_dtype_and_are_writable(client: Any, dtype: torch.dtype) -> None:
    remote_input = torch.arange(6, dtype=dtype).reshape(2, 3).requires_grad_()
    local_input = remote_input.detach().clone().requires_grad_()
    target = torch.ones(2, 3, dtype=dtype)
    loss = client.mse_loss(remote_input, target)
    expected = F.mse_loss(local_input, target)
    assert loss.dtype == expected.dtype and loss.shape == expected.shape
    loss.backward()
    expected.backward()
    assert remote_input.grad is not None and local_input.grad is not None
    assert remote_input.grad.dtype == dtype and remote_input.grad.shape == (2, 3)
    torch.testing.assert_close(remote_input.grad, local_input.grad, rtol=0, atol=0)
    remote_input.grad.add_(1)  # its own memory: writable

def test_every_tensor_argument_gets_its_gradient(client: Any) -> None:
    pairs = [_leaves(4, 3, seed=seed) for seed in range(3)]
    var = [(v.abs() + 0.1).detach().requires_grad_() for v in _leaves(4, 1, seed=3)]
    ours = client.gaussian_nll_loss(pairs[0][0], pairs[1][0], var[0], reduction="none")
    theirs = F.gaussian_nll_loss(pairs[0][1], pairs[1][1], var[1], reduction="none")
    (ours * pairs[2][0]).sum().backward()
    (theirs * pairs[2][1]).sum().backward()
    for remote, local in (*pairs, var):
        assert remote.grad is not None
        torch.testing.assert_close(remote.grad, local.grad)


def test_only_tensors_that_require_grad_are_asked_for(client: Any, server: LocalServer) -> None:
    remote_input, _ = _leaves(3)
    client.mse_loss(remote_input, torch.zeros(3, dtype=torch.float64))
    assert server.requests[-1].mse_loss.input.requires_grad
    assert not server.requests[-1].mse_loss.target.requires_grad
    with torch.no_grad():
        assert client.mse_loss(remote_input, torch.zeros(3, dtype=torch.float64)).grad_fn is None
    assert not server.requests[-1].mse_loss.input.requires_grad


def test_numpy_in_numpy_out(client: Any) -> None:
    out = client.mse_loss(np.arange(3.0), [1.0, 1.0, 1.0], reduction="none")
    assert type(out) is np.ndarray and out.dtype == np.float64 and out.flags.writeable
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0])
    scalar = client.mse_loss(np.arange(3.0), np.ones(3))
    assert type(scalar) is np.ndarray and scalar.shape == ()


def test_value_and_grad(client: Any) -> None:
    loss, grads = client.value_and_grad("mse_loss", np.arange(3.0), np.ones(3), wrt=("input", "target"),
                                        reduction="none", grad_output=[1.0, 2.0, 3.0])
    np.testing.assert_array_equal(loss, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(grads["input"], [-2.0, 0.0, 6.0])
    np.testing.assert_array_equal(grads["target"], [2.0, 0.0, -6.0])
    with pytest.raises(remoteloss.InvalidArgumentError, match="wrt names 'weight'"):
        client.value_and_grad("mse_loss", [1.0], [1.0], wrt="weight")


def test_server_warnings_are_raised_at_the_callers_line(client: Any) -> None:
    with pytest.warns(UserWarning, match="Using a target size") as record:
        client.mse_loss(torch.ones(3, 1), torch.ones(3))
    assert [w.filename for w in record] == [__file__]
    with pytest.warns(UserWarning, match="Using a target size") as record:
        client.mse_loss(torch.ones(3, 1, requires_grad=True), torch.ones(3))
    assert [w.filename for w in record] == [__file__]
    with pytest.warns(UserWarning, match="Using a target size") as record:
        client.value_and_grad("mse_loss", np.ones((3, 1)), np.ones(3))
    assert [w.filename for w in record] == [__file__]


def test_the_transport_shows_no_metadata(client: Any) -> None:
    keyed = remoteloss.Client("localhost:1", api_key="k" * 32, metadata=[("x-a", "secret-value")])
    assert "k" * 32 not in repr(keyed._transport) and "secret-value" not in repr(keyed._transport)
    assert "k" * 32 not in repr(keyed.with_options(timeout=1.0)._transport)
    keyed.close()


def test_with_options_shares_the_channel(client: Any) -> None:
    fast = client.with_options(timeout=0.5)
    assert (fast.timeout, client.timeout) == (0.5, 30.0)
    assert fast.with_options(timeout=None).timeout is None
    fast.close()
    client.mse_loss([1.0], [1.0])  # still open
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        fast.list_losses()
