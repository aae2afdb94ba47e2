"""ComputeStream: many requests on one stream, raw and through the SDK (Client.stream, AsyncClient.stream).

Answers carry their request's id; a bad item fails alone, with the status a unary call would get,
and the stream goes on; every value equals torch computed here.
"""

from __future__ import annotations

import asyncio
import time
import warnings
import zlib
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import remoteloss
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb

from tests.catalog import NEWER_LOSS_FIELD, newer_loss_field

from .cases import LOSS_NAMES, Call, Case, cases, differentiable, with_grad
from .helpers import assert_same_tensor, raw_request

METHOD = "/remoteloss.v1.LossService/ComputeStream"


def _first(loss: str, reduction: str = "mean") -> Case:
    """The float64, batched, default-options case of a loss (kl_div: "batchmean", which does not warn)."""
    if loss == "kl_div" and reduction == "mean":
        reduction = "batchmean"
    return next(
        c
        for c in cases(loss)
        if c.dtype == torch.float64 and c.option_set.name == "default" and c.reduction == reduction and c.batched
    )


def _incoming(case: Case, like: torch.Tensor) -> torch.Tensor:
    rng = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    return torch.randn(like.shape, generator=rng, dtype=like.dtype)


def _submit(target: Any, call: Call) -> Any:
    return getattr(target, call.loss)(*call.args, **call.remote_kwargs())


# ---------------------------------------------------------------------------- the wire


def _raw_stream(channel: grpc.Channel) -> Any:
    """ComputeStream with bytes in, so that items can be malformed on purpose."""
    return channel.stream_stream(
        METHOD, request_serializer=lambda b: b, response_deserializer=pb.ComputeStreamResponse.FromString
    )


def _item(key: int, request: pb.ComputeRequest) -> bytes:
    return pb.ComputeStreamRequest(id=key, request=request).SerializeToString()


def test_raw_stream_answers_every_id_with_its_own_outcome(channel: grpc.Channel) -> None:
    rng = torch.Generator().manual_seed(0)
    good = {key: (torch.randn(3, 4, generator=rng, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
            for key in range(100, 140)}
    items = {key: _item(key, raw_request("mse_loss", {"input": x, "target": y})) for key, (x, y) in good.items()}
    out_of_range = raw_request("cross_entropy", {"input": torch.zeros(2, 3), "target": torch.tensor([0, 7])})
    bad = {
        1: (_item(1, pb.ComputeRequest()), grpc.StatusCode.INVALID_ARGUMENT, "no loss set in the request"),
        2: (_item(2, out_of_range), grpc.StatusCode.INVALID_ARGUMENT, "cross_entropy: target holds class 7"),
        # The request's bytes do not parse, but the id still reads.
        3: (b"\x08\x03\x12\x02\xff\xff", grpc.StatusCode.INVALID_ARGUMENT,
            "not a valid remoteloss.v1.ComputeStreamRequest"),
        # A newer client's field: of the stream item, and of the loss oneof.
        4: (_item(4, pb.ComputeRequest()) + b"\x28\x01", grpc.StatusCode.UNIMPLEMENTED, "field 5"),
        5: (pb.ComputeStreamRequest(id=5).SerializeToString() + b"\x12" + bytes([len(newer_loss_field())])
            + newer_loss_field(), grpc.StatusCode.UNIMPLEMENTED, f"field {NEWER_LOSS_FIELD}"),
        # Unset request: the empty ComputeRequest.
        6: (pb.ComputeStreamRequest(id=6).SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "no loss set"),
    }
    payloads = list(items.values())
    for position, (key, (payload, _, _)) in enumerate(bad.items()):  # interleaved with the good ones
        payloads.insert(position * 7, payload)
    answers = list(_raw_stream(channel)(iter(payloads), timeout=60))
    by_id = {answer.id: answer for answer in answers}
    assert len(answers) == len(payloads) and set(by_id) == set(good) | set(bad)
    for key, (x, y) in good.items():
        answer = by_id[key]
        assert answer.WhichOneof("result") == "response", answer.error
        torch.testing.assert_close(codec.decode_torch(answer.response.loss, "loss"), F.mse_loss(x, y))
    for key, (_, code, text) in bad.items():
        answer = by_id[key]
        assert answer.WhichOneof("result") == "error", f"item {key} was computed"
        assert answer.error.code == code.value[0], (key, answer.error)
        assert text in answer.error.message, (key, answer.error.message)


def test_small_and_large_items_sent_at_once_are_each_answered(channel: grpc.Channel) -> None:
    """The native front reads a stream's small items back to back, several to a batch, and a
    large one (over 16 KiB) ends such a run: every item is still answered, each with its own."""
    rng = torch.Generator().manual_seed(1)
    shapes = {key: (64, 64) if key % 10 == 3 else (3, 4) for key in range(300)}  # 32 KiB or 96 B of each tensor
    sent = {key: (torch.randn(shape, generator=rng, dtype=torch.float64), torch.randn(shape, generator=rng,
                                                                                       dtype=torch.float64))
            for key, shape in shapes.items()}
    payloads = [_item(key, raw_request("mse_loss", {"input": x, "target": y})) for key, (x, y) in sent.items()]
    answers = {answer.id: answer for answer in _raw_stream(channel)(iter(payloads), timeout=60)}
    assert set(answers) == set(sent)
    for key, (x, y) in sent.items():
        assert answers[key].WhichOneof("result") == "response", answers[key].error
        assert torch.equal(codec.decode_torch(answers[key].response.loss, "loss"), F.mse_loss(x, y))


def test_an_item_whose_id_cannot_be_read_ends_the_stream(channel: grpc.Channel) -> None:
    good = _item(1, raw_request("mse_loss", {"input": torch.ones(2), "target": torch.zeros(2)}))
    with pytest.raises(grpc.RpcError) as info:
        list(_raw_stream(channel)(iter([good, b"\x12\x05ab"]), timeout=60))  # a truncated field
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "ComputeStreamRequest" in info.value.details()  # type: ignore[attr-defined]


def test_an_empty_stream_ends_cleanly(channel: grpc.Channel) -> None:
    assert list(_raw_stream(channel)(iter([]), timeout=60)) == []


# ---------------------------------------------------------------------------- Client.stream


def test_sync_stream_every_loss_matches_torch_with_errors_interleaved(client: Any) -> None:
    calls = [_first(loss).build() for loss in LOSS_NAMES]
    with client.stream(window=8) as stream:
        futures = []
        errors = []
        for call in calls:
            futures.append(_submit(stream, call))
            errors.append(stream.cross_entropy(np.zeros((2, 3)), np.array([0, 7])))
        with pytest.raises(remoteloss.InvalidArgumentError, match="reduction"):  # rejected here, never sent
            stream.mse_loss(np.ones(2), np.ones(2), reduction="average")
        numpy_future = stream.mse_loss(np.ones(3), np.zeros(3))
    for call, future in zip(calls, futures, strict=True):
        assert future.done()
        assert_same_tensor(future.result(), call.local(), torch.float64, what=call.loss)
    for error in errors:
        with pytest.raises(remoteloss.InvalidArgumentError, match="class 7") as info:
            error.result()
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    value = numpy_future.result()
    assert isinstance(value, np.ndarray) and value == 1.0


def test_sync_stream_autograd_and_value_and_grad(client: Any) -> None:
    for reduction in ("mean", "none"):
        case = _first("cross_entropy", reduction)
        call = case.build()
        names = differentiable(call)
        local_call, local_leaves = with_grad(call, names)
        expected = local_call.local()
        incoming = _incoming(case, expected)  # "none": a second call carries it
        expected.backward(incoming)
        remote_call, remote_leaves = with_grad(call, names)
        with client.stream() as stream:
            future = _submit(stream, remote_call)
            pair = stream.value_and_grad("cross_entropy", *call.args, **call.remote_kwargs(), wrt=names,
                                         grad_output=incoming)
        result = future.result()
        assert result.grad_fn is not None and future.result() is result  # one node, however often asked
        result.backward(incoming)
        value, grads = pair.result()
        assert_same_tensor(value, expected, torch.float64)
        for name in names:
            assert_same_tensor(remote_leaves[name].grad, local_leaves[name].grad, torch.float64, what=name)
            assert_same_tensor(grads[name], local_leaves[name].grad, torch.float64, what=name)


def test_sync_stream_reraises_warnings_at_result(client: Any) -> None:
    with client.stream() as stream:
        future = stream.mse_loss(np.ones((2, 3)), np.ones(3))  # broadcast: torch warns
    with pytest.warns(UserWarning, match="target size") as record:
        future.result()
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        future.result()  # once only


def test_sync_stream_many_threads_share_one_stream(client: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    xs = [np.full(4, float(i)) for i in range(64)]
    with client.stream(window=4) as stream, ThreadPoolExecutor(8) as pool:
        futures = list(pool.map(lambda x: stream.l1_loss(x, np.zeros(4)), xs))
    assert [float(f.result()) for f in futures] == [float(i) for i in range(64)]


def test_sync_stream_of_large_requests_after_an_answer(client: Any) -> None:
    """Large items, some sent after an answer came: the server asks for the next items as soon as
    it has taken one, which once raced the end of that item's read (the stream then waited
    forever for a read nobody had started)."""
    x = torch.linspace(-1, 1, 500_000, dtype=torch.float64)  # 4 MB per tensor
    expected = F.l1_loss(x, x * 0.5)
    with client.stream(timeout=60) as stream:
        for _ in range(3):
            first = [stream.l1_loss(x, x * 0.5) for _ in range(4)]
            first[0].result()
            futures = first + [stream.l1_loss(x, x * 0.5) for _ in range(4)]
            assert all(torch.equal(future.result(), expected) for future in futures)


def test_sync_stream_closed_cancelled_and_deadline(client: Any) -> None:
    with client.stream() as stream:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        stream.mse_loss(np.ones(2), np.ones(2))

    with pytest.raises(KeyError), client.stream() as stream:
        futures = [stream.mse_loss(np.ones(1000), np.zeros(1000)) for _ in range(50)]
        raise KeyError("leaves the block")
    for future in futures:  # answered before the cancel, or failed by it
        assert future.done()
        if future.exception() is not None:
            assert isinstance(future.exception(), remoteloss.CancelledError)

    stream = client.stream(timeout=0.2)
    time.sleep(0.6)
    with pytest.raises(remoteloss.DeadlineExceededError):
        stream.mse_loss(np.ones(2), np.ones(2))
    stream.close()


# ---------------------------------------------------------------------------- AsyncClient.stream


def test_async_stream_every_loss_matches_torch_with_errors_interleaved(server: Any) -> None:
    calls = [_first(loss).build() for loss in LOSS_NAMES]

    async def main() -> list[Any]:
        async with remoteloss.AsyncClient(server.target) as aclient, aclient.stream(window=8) as stream:
            work = []
            for call in calls:
                work.append(_submit(stream, call))
                work.append(stream.nll_loss(np.zeros((2, 3)), np.array([1, -5])))
            return await asyncio.gather(*work, return_exceptions=True)

    outcomes = asyncio.run(main())
    for call, outcome in zip(calls, outcomes[0::2], strict=True):
        assert_same_tensor(outcome, call.local(), torch.float64, what=call.loss)
    for outcome in outcomes[1::2]:
        assert isinstance(outcome, remoteloss.InvalidArgumentError), outcome
        assert "nll_loss" in str(outcome)


def test_async_stream_autograd_with_a_second_call(server: Any) -> None:
    case = _first("mse_loss", "none")
    call = case.build()
    local_call, local_leaves = with_grad(call, ("input", "target"))
    expected = local_call.local()
    incoming = _incoming(case, expected)
    expected.backward(incoming)
    remote_call, remote_leaves = with_grad(call, ("input", "target"))

    async def main() -> None:
        async with remoteloss.AsyncClient(server.target) as aclient:
            async with aclient.stream() as stream:
                result = await _submit(stream, remote_call)
                value, grads = await stream.value_and_grad("mse_loss", *call.args, **call.remote_kwargs())
            result.backward(incoming)  # not uniform: a blocking second call
        assert_same_tensor(result, expected, torch.float64)
        assert_same_tensor(value, expected, torch.float64)
        leaf = call.args[0].detach().clone().requires_grad_()
        F.mse_loss(leaf, call.args[1], **call.local_kwargs()).sum().backward()
        assert_same_tensor(grads["input"], leaf.grad, torch.float64, what="value_and_grad")

    asyncio.run(main())
    for name in ("input", "target"):
        assert_same_tensor(remote_leaves[name].grad, local_leaves[name].grad, torch.float64, what=name)


def test_async_stream_closed_and_cancelled(server: Any) -> None:
    async def main() -> None:
        async with remoteloss.AsyncClient(server.target) as aclient:
            async with aclient.stream() as stream:
                assert await stream.mse_loss(np.ones(2), np.zeros(2)) == 1.0
            with pytest.raises(RuntimeError, match="closed"):
                await stream.mse_loss(np.ones(2), np.ones(2))

            stream = aclient.stream()
            tasks = [asyncio.create_task(stream.mse_loss(np.ones(1000), np.zeros(1000))) for _ in range(50)]
            await asyncio.sleep(0)
            stream.cancel()
            await stream.aclose()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            for outcome in outcomes:
                assert isinstance(outcome, np.ndarray | remoteloss.CancelledError), outcome

    asyncio.run(main())


def test_each_item_is_recorded_as_a_request(server: Any, channel: grpc.Channel) -> None:
    registry = server.metrics.registry

    def count(loss: str, code: str) -> float:
        return registry.get_sample_value("remoteloss_requests_total", {"loss": loss, "code": code}) or 0.0

    before = (count("huber_loss", "OK"), count("nll_loss", "INVALID_ARGUMENT"))
    good = _item(1, raw_request("huber_loss", {"input": torch.ones(2), "target": torch.zeros(2)}))
    bad = _item(2, raw_request("nll_loss", {"input": torch.zeros(2, 3), "target": torch.tensor([0, 9])}))
    call = _raw_stream(channel)(iter([good, good, bad]), timeout=60, metadata=(("x-request-id", "stream-7"),))
    assert len(list(call)) == 3
    assert (count("huber_loss", "OK"), count("nll_loss", "INVALID_ARGUMENT")) == (before[0] + 2, before[1] + 1)
    assert ("x-request-id", "stream-7") in tuple(call.trailing_metadata())


def test_async_stream_rejects_bad_arguments_when_awaited(server: Any) -> None:
    async def main() -> None:
        async with remoteloss.AsyncClient(server.target) as aclient, aclient.stream() as stream:
            pending = stream.mse_loss(np.ones(2), np.ones(2), reduction="average")  # no exception yet
            with pytest.raises(remoteloss.InvalidArgumentError, match="reduction"):
                await pending
            with pytest.warns(UserWarning, match="target size") as record:
                await stream.mse_loss(np.ones((2, 3)), np.ones(3))
            assert record[0].filename == __file__

    asyncio.run(main())
