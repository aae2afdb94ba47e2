"""LossServicer and translate_errors, called directly with a stand-in context (no network)."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch
import torch.nn.functional as F

from remoteloss import codec
from remoteloss import _wire as wire
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server import framing, intake, status
from remoteloss_server.errors import InvalidArgumentError, ResourceExhaustedError
from remoteloss_server.executor import Executor, Result
from remoteloss_server.intake import UndecodableRequest
from remoteloss_server.limits import Admission
from remoteloss_server.metrics import Metrics
from remoteloss_server.servicer import LossServicer
from remoteloss_server.status import _lenient
from tests.catalog import LOSS_NAMES, NEWER_LOSS_FIELD, newer_loss_field

torch.set_num_threads(1)


class Aborted(Exception):
    """What grpc's context.abort raises, standing in for grpc.aio.AbortError."""


class Context:
    """The part of grpc.aio.ServicerContext the servicer uses."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.metadata = metadata
        self._trailing: tuple[tuple[str, str], ...] = ()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details
        raise Aborted

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing

    def time_remaining(self) -> float | None:
        return None


@pytest.fixture(scope="module")
def servicer() -> Iterator[LossServicer]:
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield LossServicer(Executor("cpu", torch_threads=1), pool)


def compute(servicer: LossServicer, request: pb.ComputeRequest | bytes) -> tuple[pb.ComputeResponse | None, Context]:
    context = Context()
    data = request if isinstance(request, bytes) else request.SerializeToString()

    async def call() -> pb.ComputeResponse | None:
        try:
            return pb.ComputeResponse.FromString(await servicer.Compute(data, context))  # type: ignore[arg-type]
        except Aborted:
            return None

    return asyncio.run(call()), context


def mse_request(**extra: Any) -> pb.ComputeRequest:
    return pb.ComputeRequest(
        mse_loss=pb.MseLoss(
            input=codec.encode(torch.arange(6.0).reshape(2, 3), requires_grad=True),
            target=codec.encode(torch.ones(2, 3)),
        ),
        **extra,
    )


def test_compute_answers_loss_and_gradients(servicer: LossServicer) -> None:
    response, context = compute(servicer, mse_request())
    assert context.code() is None and response is not None
    x = torch.arange(6.0).reshape(2, 3).requires_grad_()
    expected = F.mse_loss(x, torch.ones(2, 3))
    expected.backward()
    torch.testing.assert_close(codec.decode_torch(response.loss, "loss"), expected.detach())
    assert list(response.gradients) == ["input"]
    gradient = response.gradients["input"]
    assert not gradient.requires_grad
    torch.testing.assert_close(codec.decode_torch(gradient, "input"), x.grad)
    assert list(response.warnings) == []


def test_warnings_reach_the_response(servicer: LossServicer) -> None:
    request = pb.ComputeRequest(
        kl_div=pb.KlDiv(input=codec.encode(torch.zeros(2, 3)), target=codec.encode(torch.ones(2, 3) / 3))
    )
    response, _ = compute(servicer, request)
    assert response is not None and response.warnings[0].startswith("reduction: 'mean' divides")


@pytest.mark.parametrize(
    ("request_", "code", "details"),
    [
        (pb.ComputeRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no loss set in the request"),
        (
            pb.ComputeRequest(cross_entropy=pb.CrossEntropy(target=codec.encode(torch.tensor([1])))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "cross_entropy: input is required",
        ),
        (
            mse_request(grad_output=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"x")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "mse_loss: grad_output: data holds 1 bytes, but shape [2] of float32 needs 8",
        ),
        (
            bytes([2 << 3 | 2, 50, 1, 2]),  # field 2 (mse_loss) claims 50 bytes; 2 follow
            grpc.StatusCode.INVALID_ARGUMENT,
            "the request is not a valid remoteloss.v1.ComputeRequest: Error parsing message",
        ),
    ],
    ids=["no_loss", "missing_input", "bad_grad_output", "undecodable"],
)
def test_bad_requests_are_invalid_argument(
    servicer: LossServicer, request_: Any, code: grpc.StatusCode, details: str
) -> None:
    response, context = compute(servicer, request_)
    assert response is None and context.code() == code
    assert context.details().startswith(details)  # protobuf's own reason follows for undecodable bytes


def test_unknown_fields_are_unimplemented(servicer: LossServicer) -> None:
    newer_loss = pb.ComputeRequest.FromString(newer_loss_field())  # a loss added later
    _, context = compute(servicer, newer_loss)
    assert context.code() == grpc.StatusCode.UNIMPLEMENTED
    assert f"field {NEWER_LOSS_FIELD} of ComputeRequest" in context.details()
    newer_option = mse_request()
    newer_option.mse_loss.MergeFromString(bytes([0xB8, 0x01, 0x05]))  # field 23 inside MseLoss
    _, context = compute(servicer, newer_option)
    assert context.code() == grpc.StatusCode.UNIMPLEMENTED and "field 23 of mse_loss" in context.details()
    newer_tensor = mse_request()
    newer_tensor.mse_loss.input.MergeFromString(bytes([0x28, 0x01]))  # field 5 inside a Tensor
    _, context = compute(servicer, newer_tensor)
    assert context.code() == grpc.StatusCode.UNIMPLEMENTED and "field 5 of mse_loss.input" in context.details()


def test_large_requests_with_unknown_fields_are_unimplemented_unparsed(servicer: LossServicer) -> None:
    """From wire.SPLIT_BYTES on, the scan's first unknown field is the answer; nothing after it is read."""
    flood = bytes([0xB8, 0x01, 0x01]) * (wire.SPLIT_BYTES // 3 + 1)
    _, context = compute(servicer, flood + b"\x0f")  # and malformed after it
    assert context.code() == grpc.StatusCode.UNIMPLEMENTED and "field 23 of ComputeRequest" in context.details()
    _, context = compute(servicer, wire.length_delimited(2, flood))
    assert context.code() == grpc.StatusCode.UNIMPLEMENTED and "field 23 of mse_loss" in context.details()
    received = intake.receive(b"\x08\x09" + flood, pb.ComputeStreamRequest)
    assert isinstance(received.message, pb.ComputeStreamRequest) and received.message.id == 9
    assert received.unknown is not None and received.unknown.describe() == "field 23 of ComputeStreamRequest"


def test_floods_of_tiny_fields_never_reach_the_python_walk_of_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """wire.split walks every field in Python: only a request the scan passed may get there."""
    walked: list[int] = []
    split = wire.split
    monkeypatch.setattr(wire, "split", lambda data, descriptor: walked.append(len(data)) or split(data, descriptor))
    floods = {
        "unknown": bytes([0xB8, 0x01, 0x01]) * (wire.SPLIT_BYTES // 3 + 1),
        "options": wire.length_delimited(2, bytes([4 << 3, 1]) * (wire.SPLIT_BYTES // 2)),
        "shape": wire.length_delimited(2, wire.length_delimited(1, wire.length_delimited(2, bytes(2**20)))),
    }
    for name, data in floods.items():
        received = intake.receive(data, pb.ComputeRequest)
        assert received.unknown is not None or isinstance(received.message, UndecodableRequest), name
    assert walked == []
    good = pb.ComputeRequest(mse_loss=pb.MseLoss(input=codec.encode(torch.zeros(2**18)))).SerializeToString()
    assert intake.receive(good, pb.ComputeRequest).payloads is not None and walked == [len(good)]


@pytest.mark.parametrize("size", [2100, wire.SPLIT_BYTES])
def test_too_many_fields_are_invalid_argument(servicer: LossServicer, size: int) -> None:
    options = wire.length_delimited(2, bytes([4 << 3, 1]) * (size // 2))  # mse_loss.reduction, again and again
    _, context = compute(servicer, options)
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details().startswith("the request holds more than 1024 fields"), context.details()
    assert "reduction of mse_loss" in context.details()


def test_status_messages_are_cut_to_a_bound() -> None:
    """A domain error may quote a request's string option of any length (torch's text does)."""
    code, message = status.status_of(InvalidArgumentError("x: " + "y" * 10**6), "Compute")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("x: yyy") and message.endswith(f"... ({10**6 + 3 - 2048} more characters)")
    assert len(message) < 2100


def test_domain_errors_keep_their_code(servicer: LossServicer, monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(*args: Any) -> None:
        raise ResourceExhaustedError("mse_loss: out of memory on cuda:0")

    monkeypatch.setattr(servicer._executor, "run", exhausted)
    _, context = compute(servicer, mse_request())
    assert (context.code(), context.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "mse_loss: out of memory on cuda:0")


def test_anything_else_is_an_opaque_internal_error(
    servicer: LossServicer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def bug(*args: Any) -> None:
        raise KeyError("secret detail")

    monkeypatch.setattr(servicer._executor, "run", bug)
    with caplog.at_level(logging.ERROR, logger="remoteloss_server.servicer"):
        _, context = compute(servicer, mse_request())
    assert (context.code(), context.details()) == (grpc.StatusCode.INTERNAL, "internal error")
    assert "secret detail" in caplog.text and "Traceback" in caplog.text
    monkeypatch.undo()
    response, context = compute(servicer, mse_request())
    assert response is not None and context.code() is None


def test_list_losses(servicer: LossServicer) -> None:
    response = asyncio.run(servicer.ListLosses(pb.ListLossesRequest(), Context()))  # type: ignore[arg-type]
    assert [info.name for info in response.losses] == list(LOSS_NAMES)


def test_lenient_deserializer() -> None:
    parse = _lenient(pb.ComputeRequest)
    assert parse(mse_request().SerializeToString()) == mse_request()
    undecodable = parse(bytes([2 << 3 | 2, 50, 1, 2]))
    assert isinstance(undecodable, UndecodableRequest) and undecodable.type_name == "remoteloss.v1.ComputeRequest"


# ---------------------------------------------------------------------------- large answers


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=g, dtype=torch.int64).to(dtype)


def _upb(result: Result) -> bytes:
    return pb.ComputeResponse(
        loss=codec.encode(result.loss, name="loss", requires_grad=False),
        gradients={name: codec.encode(g, name=name, requires_grad=False) for name, g in result.gradients.items()},
        warnings=result.warnings,
    ).SerializeToString()


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool], ids=str
)
def test_an_answer_written_in_place_is_what_protobuf_writes(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    monkeypatch.setattr(wire, "SPLIT_BYTES", 0)  # every answer through wire.join
    result = Result(_tensor(dtype, shape, seed=2), {"input": _tensor(dtype, shape)}, ["careful"])
    assert framing.answer(result) == _upb(result)


def test_an_answer_keeps_every_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "SPLIT_BYTES", 0)
    gradients = {
        "input": torch.randn(4, 5).t(),  # not contiguous
        "target": torch.randn(3, requires_grad=True) * 2,  # requires_grad, not a leaf
        "välue": torch.tensor(7, dtype=torch.int64),
    }
    result = Result(torch.randn(4), gradients, [])
    answer = pb.ComputeResponse.FromString(framing.answer(result))
    assert answer == pb.ComputeResponse.FromString(_upb(result))
    assert not answer.loss.requires_grad and not any(t.requires_grad for t in answer.gradients.values())


def test_a_large_answer_copies_each_tensor_once() -> None:
    result = Result(torch.randn(1 << 18), {"input": torch.randn(1 << 18)}, [])  # 1 MiB each
    tracemalloc.start()
    try:
        data = framing.answer(result)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data == _upb(result)
    assert peak < len(data) + (64 << 10)


@pytest.mark.parametrize("data", [
    b"\x08\x07\x12\x02\x0a\x05",  # an item whose request does not parse (a length past its end), with an id
    pb.ComputeStreamRequest(id=7, request=mse_request()).SerializeToString() + b"\x18\x01",  # an unknown field
], ids=["undecodable", "unknown-field"])
def test_a_refused_stream_item_leaves_no_cycle_holding_its_bytes(servicer: LossServicer, data: bytes) -> None:
    """A refusal raised from an exception kept in a local holds the handler's frame, and with it
    the item's bytes, in a reference cycle until the garbage collector runs (16 MiB items kept a
    server's RSS up in the attack tests)."""
    before = sys.getrefcount(data)
    gc.disable()
    try:
        context = Context()
        arrival = servicer._arrival(data, context, "s", set())  # type: ignore[arg-type]
        answer, _ = asyncio.run(servicer._stream_item(*arrival, context, set()))  # type: ignore[arg-type]
        del arrival
        assert pb.ComputeStreamResponse.FromString(answer).WhichOneof("result") == "error"
        assert sys.getrefcount(data) == before
    finally:
        gc.enable()


def test_stream_items_read_together_are_admitted_before_any_computes() -> None:
    """``_arrival`` admits an item as the stream reads it, so items read in one go are all in
    flight (``Admission.pending``) before the first computes: the batcher sees them together.
    One past the budget is answered RESOURCE_EXHAUSTED, its refusal holding no frame (no cycle)."""
    admission = Admission(2, 2**20)
    with ThreadPoolExecutor(max_workers=1) as pool:
        servicer = LossServicer(Executor("cpu", torch_threads=1), pool, admission=admission)
        context, unsent = Context(), set()
        items = [pb.ComputeStreamRequest(id=n, request=mse_request()).SerializeToString() for n in (1, 2, 3)]
        third = items[2]
        before = sys.getrefcount(third)
        gc.disable()
        try:
            arrivals = [servicer._arrival(item, context, "s", unsent) for item in items]  # type: ignore[arg-type]
            assert admission.pending == 2 and len(unsent) == 2
            refused = asyncio.run(servicer._stream_item(*arrivals[2], context, set()))  # type: ignore[arg-type]
            error = pb.ComputeStreamResponse.FromString(refused[0]).error
            assert (error.code, "saturated" in error.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], True)
            del arrivals[2], refused
            assert sys.getrefcount(third) == before
        finally:
            gc.enable()
        for ticket in unsent:
            ticket.release()
        assert admission.pending == 0


def test_a_stream_cancelled_before_its_read_items_start_counts_none_in_flight() -> None:
    """Items are recorded (counted in flight) as the stream reads them; a stream cancelled before
    their tasks ran still records each, CANCELLED, and releases its budget."""
    metrics, admission = Metrics(), Admission(64, 2**20)
    items = [pb.ComputeStreamRequest(id=n, request=mse_request()).SerializeToString() for n in (1, 2, 3)]
    in_flight = metrics.registry.get_sample_value

    class Requests:  # three items at once once ``come`` is set, then nothing
        def __init__(self) -> None:
            self.left, self.come = list(items), asyncio.Event()

        def __aiter__(self) -> Requests:
            return self

        async def __anext__(self) -> bytes:
            await self.come.wait()
            if self.left:
                return self.left.pop(0)
            await asyncio.Event().wait()
            raise StopAsyncIteration

    async def cancelled_early() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            servicer = LossServicer(Executor("cpu", torch_threads=1), pool, metrics, admission=admission)

            async def consume() -> None:
                async for _ in servicer.ComputeStream(requests, Context()):  # type: ignore[arg-type]
                    pass

            requests = Requests()
            handler = asyncio.ensure_future(consume())
            for _ in range(3):  # the handler and its reader start, and wait for items
                await asyncio.sleep(0)
            requests.come.set()  # the items and the cancellation in one turn, as the front may hand them
            handler.cancel()  # over: the reader reads all three, then the handler's end cancels their tasks
            with pytest.raises(asyncio.CancelledError):
                await handler
            assert not requests.left  # all three were read

    asyncio.run(cancelled_early())
    assert in_flight("remoteloss_requests_in_flight") == 0
    assert in_flight("remoteloss_requests_total", {"loss": "mse_loss", "code": "CANCELLED"}) == len(items)
    assert admission.pending == 0
