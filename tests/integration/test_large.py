"""Requests and answers above the split size (1 MiB), whose tensors the server reads in place from
the received bytes and whose gradients it writes once, and which the SDK writes and reads with one
copy of each tensor: the same answers as torch, writable, through every client."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import remoteloss
from remoteloss import codec
from remoteloss import _wire as wire
from remoteloss.v1 import loss_pb2 as pb

from .helpers import rpc_error

pytestmark = pytest.mark.filterwarnings("error::UserWarning")  # e.g. torch's warning about read-only buffers

_ELEMENTS = 2 * wire.SPLIT_BYTES // 4  # float32 elements in 2 MiB: every tensor alone passes the size


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


def _large_pair(seed: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(_ELEMENTS, dtype=np.float32), rng.standard_normal(_ELEMENTS, dtype=np.float32)


def _check_numpy(got: Any, expected: torch.Tensor) -> None:
    assert isinstance(got, np.ndarray) and got.flags.writeable and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    got += 1  # its own memory


def _check_torch(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.detach(), expected.detach())
    got.detach().add_(1)  # writable: no read-only buffer behind it (warnings are errors here)


def test_large_calls_through_the_client_in_numpy_and_torch(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    joined, read = _spy(monkeypatch)
    xn, yn = _large_pair(20)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)
    _check_numpy(client.mse_loss(xn, yn, reduction="none"), F.mse_loss(x, y, reduction="none"))
    loss, gradients = client.value_and_grad("mse_loss", xn, yn, wrt=("input", "target"), reduction="none")
    leaf, target = x.clone().requires_grad_(), y.clone().requires_grad_()
    expected = F.mse_loss(leaf, target, reduction="none")
    expected.sum().backward()
    _check_numpy(loss, expected)
    assert leaf.grad is not None and target.grad is not None
    _check_numpy(gradients["input"], leaf.grad)
    _check_numpy(gradients["target"], target.grad)
    remote, local = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = client.huber_loss(remote, y, reduction="none")
    expected = F.huber_loss(local, y, reduction="none")
    incoming = torch.from_numpy(_large_pair(21)[0])
    got.backward(incoming)  # a second call, large, carrying grad_output
    expected.backward(incoming)
    _check_torch(got, expected)
    assert remote.grad is not None and local.grad is not None
    _check_torch(remote.grad, local.grad)
    assert len(joined) == 4 and read == [True] * 4  # every request and answer took the large path


def _spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[bool]]:
    """The sizes of the requests the SDK writes with ``wire.join``, and whether each answer it
    read was split (the in-process server's own parses and joins are left out)."""
    joined: list[int] = []
    read: list[bool] = []
    join, parse = wire.join, wire.parse
    answers = (pb.ComputeResponse, pb.ComputeStreamResponse)

    def spy_join(stripped: Any, descriptor: Any, payloads: Any) -> bytes:
        data = join(stripped, descriptor, payloads)
        if descriptor is not pb.ComputeResponse.DESCRIPTOR:  # the server writes answers with it
            joined.append(len(data))
        return data

    def spy_parse(data: bytes, message_type: Any) -> Any:
        message, payloads = parse(data, message_type)
        if message_type in answers:
            read.append(payloads is not None)
        return message, payloads

    monkeypatch.setattr(wire, "join", spy_join)
    monkeypatch.setattr(wire, "parse", spy_parse)
    return joined, read


def test_large_calls_through_the_async_client(server: Any) -> None:
    xn, yn = _large_pair(22)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)

    async def main() -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
        async with remoteloss.AsyncClient(server.target) as aclient:
            numpy_loss = await aclient.l1_loss(xn, yn, reduction="none")
            _, gradients = await aclient.value_and_grad("l1_loss", xn, yn)
            leaf = x.clone().requires_grad_()
            torch_loss = await aclient.mse_loss(leaf, y, reduction="none")
            torch_loss.backward(torch.from_numpy(yn))  # a second call, on the blocking channel
            assert leaf.grad is not None
            return numpy_loss, gradients["input"], torch_loss, leaf.grad

    numpy_loss, numpy_grad, torch_loss, torch_grad = asyncio.run(main())
    _check_numpy(numpy_loss, F.l1_loss(x, y, reduction="none"))
    local = x.clone().requires_grad_()
    F.l1_loss(local, y).backward()
    assert local.grad is not None
    _check_numpy(numpy_grad, local.grad)
    local = x.clone().requires_grad_()
    expected = F.mse_loss(local, y, reduction="none")
    expected.backward(y)
    assert local.grad is not None
    _check_torch(torch_loss, expected)
    _check_torch(torch_grad, local.grad)


def test_large_answers_on_streams(client: Any, server: Any) -> None:
    xn, yn = _large_pair(23)
    x, y = torch.from_numpy(xn.copy()), torch.from_numpy(yn)
    remote = x.clone().requires_grad_()
    with client.stream() as stream:
        numpy_future = stream.mse_loss(xn, yn, reduction="none")
        torch_future = stream.mse_loss(remote, y, reduction="none")
        xn[:] = 0  # after the call, before the answer: what is sent was fixed by the call
    _check_numpy(numpy_future.result(), F.mse_loss(x, y, reduction="none"))
    got = torch_future.result()
    local = x.clone().requires_grad_()
    expected = F.mse_loss(local, y, reduction="none")
    got.sum().backward()
    expected.sum().backward()
    _check_torch(got, expected)
    assert remote.grad is not None and local.grad is not None
    _check_torch(remote.grad, local.grad)

    async def main() -> Any:
        async with remoteloss.AsyncClient(server.target) as aclient, aclient.stream() as astream:
            return await asyncio.gather(astream.l1_loss(yn, x.numpy(), reduction="none"), astream.l1_loss(yn, yn))

    large, small = asyncio.run(main())
    _check_numpy(large, F.l1_loss(y, x, reduction="none"))
    assert small == 0.0


_KEPT_SHAPE = (3, 333_337)  # no other test uses it: the server's tensors of the calls below are found by it


def _kept(shape: tuple[int, ...], wait_s: float = 5.0) -> list[tuple[int, ...]]:
    """The tensors of ``shape`` alive in this process (the in-process server's, the test holding
    none), once a moment for the answers' last references to go has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        gc.collect()
        # type(), not isinstance(): the latter reads __class__, which some objects of torch warn on
        kept = [tuple(o.shape) for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.shape == shape]
        if not kept or time.monotonic() > deadline:
            return kept
        time.sleep(0.2)


def _expected(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    input = torch.from_numpy(x).requires_grad_()
    loss = F.mse_loss(input, torch.from_numpy(y))
    (grad,) = torch.autograd.grad(loss, input)
    return loss.item(), grad.numpy().copy()


def test_the_server_keeps_no_tensor_of_an_answered_call(client: Any) -> None:
    """Once its answer is out, nothing of a large call stays referenced in the server while it
    waits for the next one, on a unary call or an open idle stream (the batcher's loop kept the
    last batch: after a burst of 32 MiB requests, 128 MiB pinned until the next call came)."""
    rng = np.random.default_rng(9)
    x, y = (rng.standard_normal(_KEPT_SHAPE).astype(np.float32) for _ in range(2))
    want_loss, want_grad = _expected(x, y)
    with ThreadPoolExecutor(4) as pool:  # a burst: calls queue for the batcher (a lone call skips its queue)
        answers = list(pool.map(lambda _: client.value_and_grad("mse_loss", x, y), range(8)))
    assert all(float(loss) == want_loss and np.array_equal(grads["input"], want_grad) for loss, grads in answers)
    del answers
    assert _kept(_KEPT_SHAPE) == []
    with client.stream() as stream:
        loss, grads = stream.value_and_grad("mse_loss", x, y).result(timeout=60)
        assert float(loss) == want_loss and np.array_equal(grads["input"], want_grad)
        assert _kept(_KEPT_SHAPE) == []


def test_the_batchers_loop_keeps_no_tensor_of_its_last_batch() -> None:
    """The same, where every call goes through the batcher's queue and loop: with a batch delay
    no call computes on the spot, so even a lone call is a batch the loop hands out (the burst
    above needs calls to meet, and on an idle machine some do not)."""
    from remoteloss_server.app import ServerThread
    from remoteloss_server.config import ServerConfig

    rng = np.random.default_rng(12)
    x, y = (rng.standard_normal(_KEPT_SHAPE).astype(np.float32) for _ in range(2))
    want_loss, want_grad = _expected(x, y)
    config = ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0, max_batch_delay_s=0.001)
    with ServerThread(config) as running, remoteloss.Client(running.target) as sdk:
        loss, grads = sdk.value_and_grad("mse_loss", x, y)
        assert float(loss) == want_loss and np.array_equal(grads["input"], want_grad)
        del loss, grads
        batches = running.metrics.registry.get_sample_value("remoteloss_batch_requests_count", {"loss": "mse_loss"})
        assert batches == 1.0  # the call was a batch of the loop's
        assert _kept(_KEPT_SHAPE) == []


def _held_by_the_server(wait_s: float = 5.0) -> list[int]:
    """The sizes of the blocks of 1 MiB or more, traced since ``tracemalloc.start``, that code of
    the in-process server allocated and that are still alive, once a moment has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        gc.collect()
        held = [
            trace.size for trace in tracemalloc.take_snapshot().traces
            if trace.size >= 1 << 20 and any("remoteloss_server" in frame.filename for frame in trace.traceback)
        ]
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


def test_an_idle_stream_holds_nothing_of_its_last_call_in_the_server(client: Any) -> None:
    """A stream left open after its answers holds neither its last request's bytes nor its last
    answer's in the server: every loop on the way (the front's, the checks', the budgets') held
    its last item while it waited for the next, so many idle streams could each pin a large
    request and answer beyond every budget."""
    rng = np.random.default_rng(10)
    x, y = (rng.standard_normal(1 << 20).astype(np.float32) for _ in range(2))
    want_loss, want_grad = _expected(x, y)
    with client.stream() as stream:
        stream.value_and_grad("mse_loss", x, y).result(timeout=60)  # the stream and its tasks are up
        tracemalloc.start(8)
        try:
            loss, grads = stream.value_and_grad("mse_loss", x, y).result(timeout=60)
            held = _held_by_the_server()
        finally:
            tracemalloc.stop()
    assert float(loss) == want_loss and np.array_equal(grads["input"], want_grad)
    assert held == []


def test_an_idle_inference_stream_holds_nothing_of_its_last_request_in_the_server(channel: grpc.Channel) -> None:
    """The same over the Open Inference Protocol's ModelStreamInfer: its loop held its last
    answer, and the loops it shares with ComputeStream their last request."""
    import queue

    from remoteloss_server.inference import grpc_service_pb2 as ipb

    rng = np.random.default_rng(11)
    x, y = (rng.standard_normal(1 << 19).astype(np.float32) for _ in range(2))  # answers under gRPC's 4 MiB
    request = ipb.ModelInferRequest(model_name="mse_loss", id="1")
    for name, array in (("input", x), ("target", y)):
        request.inputs.add(name=name, datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    request.inputs[0].parameters["requires_grad"].bool_param = True  # a 2 MiB answer: grad_input
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                   request_serializer=ipb.ModelInferRequest.SerializeToString,
                                   response_deserializer=ipb.ModelStreamInferResponse.FromString)
    outbox: queue.SimpleQueue[ipb.ModelInferRequest | None] = queue.SimpleQueue()
    answers = stream(iter(outbox.get, None), timeout=60)
    want_loss, want_grad = _expected(x, y)
    want = [np.float32(want_loss).tobytes(), want_grad.tobytes()]
    try:
        outbox.put(request)
        assert next(answers).infer_response.raw_output_contents == want  # the stream is up
        tracemalloc.start(8)
        try:
            outbox.put(request)
            answer = next(answers)
            held = _held_by_the_server()
        finally:
            tracemalloc.stop()
    finally:
        outbox.put(None)
        assert list(answers) == []
    assert not answer.error_message and answer.infer_response.raw_output_contents == want
    assert held == []
