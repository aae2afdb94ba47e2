"""AsyncClient: every loss through grpc.aio equals torch, forward and backward; the rest of its API.

Each test runs its own event loop (``asyncio.run``) with its own client, against the session's server.
"""

from __future__ import annotations

import asyncio
import inspect
import warnings
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import remoteloss

from .cases import LOSS_NAMES, Case, cases, differentiable, with_grad
from .helpers import assert_same_tensor, remote

_T = TypeVar("_T")


def _first(loss: str, reduction: str) -> Case:
    if loss == "kl_div" and reduction == "mean":
        reduction = "batchmean"  # "mean" warns
    return next(
        c
        for c in cases(loss)
        if c.dtype == torch.float64 and c.option_set.name == "default" and c.reduction == reduction and c.batched
    )


def _with_client(server: Any, body: Callable[[remoteloss.AsyncClient], Awaitable[_T]], **kwargs: Any) -> _T:
    async def main() -> _T:
        async with remoteloss.AsyncClient(server.target, **kwargs) as aclient:
            return await body(aclient)

    return asyncio.run(main())


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_forward_and_backward_match_torch(server: Any, loss: str) -> None:
    """A scalar reduction (backward needs no call) and "none" with a random incoming gradient
    (backward makes a second, blocking call)."""
    for reduction in ("mean", "none"):
        case = _first(loss, reduction)
        call = case.build()
        names = differentiable(call)
        local_call, local_leaves = with_grad(call, names)
        expected = local_call.local()
        rng = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
        incoming = None if case.scalar_output else torch.randn(expected.shape, generator=rng, dtype=expected.dtype)
        expected.backward(incoming)
        remote_call, remote_leaves = with_grad(call, names)

        async def body(
            aclient: remoteloss.AsyncClient, remote_call: Any = remote_call, incoming: Any = incoming
        ) -> Any:
            pending = remote(aclient, remote_call)
            assert inspect.isawaitable(pending)
            result = await pending
            result.backward(incoming)  # while the client is open: it may need a second call
            return result

        actual = _with_client(server, body)
        assert actual.grad_fn is not None
        assert_same_tensor(actual, expected, torch.float64, what=f"{loss} {reduction}")
        for name in names:
            assert_same_tensor(remote_leaves[name].grad, local_leaves[name].grad, torch.float64, what=f"d/d {name}")


def test_backward_makes_a_blocking_channel_only_when_it_needs_a_second_call(server: Any) -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64)

    async def body(aclient: remoteloss.AsyncClient) -> None:
        (await aclient.mse_loss(x, y, reduction="none")).mean().backward()  # uniform: no call
        assert not aclient._transport.channels.has_blocking_channel
        weights = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)
        x.grad = None
        ((await aclient.mse_loss(x, y, reduction="none")) * weights).sum().backward()
        assert aclient._transport.channels.has_blocking_channel
        torch.testing.assert_close(x.grad, 2 * (x - y).detach() * weights)

    _with_client(server, body)


def test_numpy_in_numpy_out_and_value_and_grad(server: Any) -> None:
    x, y = np.arange(6.0).reshape(2, 3), np.ones((2, 3))

    async def body(aclient: remoteloss.AsyncClient) -> tuple[Any, Any]:
        value = await aclient.huber_loss(x, y, delta=0.5)
        pair = await aclient.value_and_grad("huber_loss", x, y, delta=0.5, wrt=("input", "target"))
        return value, pair

    value, (again, grads) = _with_client(server, body)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.tensor(y, requires_grad=True)
    expected = F.huber_loss(tx, ty, delta=0.5)
    expected.backward()
    assert isinstance(value, np.ndarray) and isinstance(again, np.ndarray)
    np.testing.assert_allclose(value, expected.item())
    np.testing.assert_allclose(grads["input"], tx.grad.numpy())
    np.testing.assert_allclose(grads["target"], ty.grad.numpy())


def test_many_calls_at_once_on_one_channel(server: Any) -> None:
    async def body(aclient: remoteloss.AsyncClient) -> list[Any]:
        return await asyncio.gather(*(aclient.l1_loss(np.full(3, float(i)), np.zeros(3)) for i in range(50)))

    assert [float(v) for v in _with_client(server, body)] == [float(i) for i in range(50)]


def test_errors_raise_the_unary_classes(server: Any) -> None:
    async def body(aclient: remoteloss.AsyncClient) -> None:
        with pytest.raises(remoteloss.InvalidArgumentError, match="class 7") as info:
            await aclient.cross_entropy(np.zeros((2, 3)), np.array([0, 7]))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert isinstance(info.value.__cause__, grpc.RpcError)
        with pytest.raises(remoteloss.InvalidArgumentError, match="reduction"):  # rejected locally
            await aclient.mse_loss(np.ones(2), np.ones(2), reduction="average")
        with pytest.raises(TypeError):
            await aclient.triplet_margin_with_distance_loss(
                np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2)), distance_function=lambda a, b: a
            )

    _with_client(server, body)


def test_warnings_point_at_the_awaiting_line(server: Any) -> None:
    async def body(aclient: remoteloss.AsyncClient) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = inspect.stack()[0].lineno + 1
            await aclient.mse_loss(np.ones((2, 3)), np.ones(3))  # broadcast: torch warns
        assert len(caught) == 1 and "target size" in str(caught[0].message)
        assert (caught[0].filename, caught[0].lineno) == (__file__, line)

    _with_client(server, body)


def test_list_losses_with_options_and_close(server: Any) -> None:
    async def body(aclient: remoteloss.AsyncClient) -> None:
        assert [info.name for info in (await aclient.list_losses()).losses] == list(LOSS_NAMES)
        copy = aclient.with_options(timeout=5.0, metadata=(("x-request-id", "async-copy"),))
        assert isinstance(copy, remoteloss.AsyncClient) and copy.timeout == 5.0 and aclient.timeout == 30.0
        await copy.aclose()  # the copy does not own the channel
        assert await aclient.mse_loss(np.ones(2), np.zeros(2)) == 1.0
        assert repr(aclient) == f"AsyncClient(target={server.target!r}, timeout=30.0)"

    _with_client(server, body)

    async def closed() -> None:
        aclient = remoteloss.AsyncClient(server.target)
        await aclient.aclose()
        await aclient.aclose()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            await aclient.mse_loss(np.ones(2), np.ones(2))

    asyncio.run(closed())


def test_remoteloss_nn_refuses_an_async_client(server: Any) -> None:
    import remoteloss.nn

    with pytest.raises(TypeError, match="synchronous"):
        remoteloss.nn.MSELoss(client=remoteloss.AsyncClient(server.target))
