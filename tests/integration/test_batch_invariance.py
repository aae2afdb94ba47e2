"""Batch invariance on the CPU: an answer does not depend on who else was in its batch.

32 callers at once send a mix of float32 requests (mse_loss; cross_entropy with label smoothing;
kl_div with batchmean; nll_loss with a class weight; huber_loss) of many batch sizes, with the
gradient of the input, to a real server (one torch thread, as this process: the server runs in
it). Every loss and every gradient must be bitwise equal to torch.nn.functional computed here:
``torch.equal`` and the same bytes (which also tells -0.0 from 0.0 and one NaN from another).
The server's metrics must show that requests really shared batches, else the test proves nothing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
import torch.nn.functional as F

from remoteloss import codec
from remoteloss._request import build_request
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server import grpc_front
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig

CALLERS = 32
PER_CALLER = 20
CLASSES = 10
LOSSES = ("mse_loss", "cross_entropy", "kl_div", "nll_loss", "huber_loss")
WEIGHT = torch.linspace(0.3, 1.7, CLASSES)  # nll_loss's class weight, the same in every call


@dataclass
class Request:
    loss: str
    arguments: dict[str, Any]
    wrt: tuple[str, ...]


def _arguments(loss: str, rng: random.Random) -> dict[str, Any]:
    """One call's arguments: float32, a batch of 1 to 40 rows (some calls unbatched)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    rows = rng.randint(1, 40)
    if loss in ("mse_loss", "huber_loss"):
        shape = (rows, rng.randint(1, 9))
        extra = {"delta": rng.choice((0.5, 1.0))} if loss == "huber_loss" else {}
        return {"input": torch.randn(shape, generator=gen), "target": torch.randn(shape, generator=gen), **extra}
    logits = torch.randn(rows, CLASSES, generator=gen)
    target = torch.randint(0, CLASSES, (rows,), generator=gen)
    if loss == "cross_entropy":
        if rng.random() < 0.2:  # an unbatched call: (C) logits and a 0-d target
            logits, target = logits[0], target[0]
        return {"input": logits, "target": target, "label_smoothing": 0.1}
    if loss == "nll_loss":
        return {"input": logits.log_softmax(-1), "target": target, "weight": WEIGHT}
    probabilities = torch.randn(rows, CLASSES, generator=gen).softmax(-1)
    return {"input": logits.log_softmax(-1), "target": probabilities, "reduction": "batchmean"}


def _requests() -> list[Request]:
    rng = random.Random(12)
    out = []
    for i in range(CALLERS * PER_CALLER):
        loss = LOSSES[i % len(LOSSES)]
        wrt = ("input", "target") if loss == "mse_loss" and i % 3 == 0 else ("input",)
        out.append(Request(loss, _arguments(loss, rng), wrt))
    return out


def _local(request: Request) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """torch here: the loss and d loss / d each argument of ``wrt`` (backward seeded with ones)."""
    leaves = {name: request.arguments[name].detach().clone().requires_grad_() for name in request.wrt}
    out = getattr(F, request.loss)(**{**request.arguments, **leaves})
    grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
    return out.detach(), dict(zip(request.wrt, grads, strict=True))


def _same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return (
        actual.dtype == expected.dtype
        and actual.shape == expected.shape
        and torch.equal(actual, expected)
        and actual.contiguous().numpy().tobytes() == expected.contiguous().numpy().tobytes()
    )


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    # A short batch delay lets the callers' requests surely meet in batches.
    config = ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0, max_batch_delay_s=0.003)
    with ServerThread(config) as running:
        yield running


def _counts(server: ServerThread, loss: str) -> tuple[float, float, float]:
    """Requests computed in batches, batches, and decisions to batch, for ``loss`` so far."""
    registry = server.metrics.registry
    requests = registry.get_sample_value("remoteloss_batch_requests_sum", {"loss": loss}) or 0.0
    batches = registry.get_sample_value("remoteloss_batch_requests_count", {"loss": loss}) or 0.0
    decisions = registry.get_sample_value("remoteloss_batch_decisions_total", {"loss": loss, "decision": "batch"})
    return requests, batches, decisions or 0.0


def test_every_answer_under_concurrent_load_is_bitwise_torchs(server: ServerThread) -> None:
    assert torch.get_num_threads() == 1  # the server's setting, in this same process
    requests = _requests()
    built = [build_request(r.loss, r.arguments, wrt=r.wrt) for r in requests]
    before = {loss: _counts(server, loss) for loss in LOSSES}

    with grpc.insecure_channel(server.target) as channel:
        stub = loss_pb2_grpc.LossServiceStub(channel)

        def caller(index: int) -> list[Any]:
            mine = range(index, len(built), CALLERS)  # each caller cycles through every loss
            return [(i, stub.Compute(built[i], timeout=60)) for i in mine]

        with ThreadPoolExecutor(max_workers=CALLERS) as pool:
            answers = dict(pair for chunk in pool.map(caller, range(CALLERS)) for pair in chunk)

    _compare(requests, answers)
    for loss in LOSSES:
        batched, batches, decisions = (a - b for a, b in zip(_counts(server, loss), before[loss], strict=True))
        assert batched == len(requests) / len(LOSSES)
        assert batches < batched, f"{loss}: no two requests shared a batch, so the test proves nothing"
        assert decisions > 0, f"{loss}: the batcher never decided to batch"


def test_every_answer_on_streams_is_bitwise_torchs(server: ServerThread) -> None:
    """The same mix on 4 streams, each sending all its requests at once: the items a stream
    reads together are admitted together and batched with each other and with other streams'."""
    requests = _requests()
    built = [build_request(r.loss, r.arguments, wrt=r.wrt) for r in requests]
    before = {loss: _counts(server, loss) for loss in LOSSES}
    streams = 4

    with grpc.insecure_channel(server.target) as channel:
        stub = loss_pb2_grpc.LossServiceStub(channel)

        def caller(index: int) -> list[Any]:
            items = (pb.ComputeStreamRequest(id=i + 1, request=built[i]) for i in range(index, len(built), streams))
            return [(answer.id - 1, answer.response) for answer in stub.ComputeStream(items, timeout=120)]

        with ThreadPoolExecutor(max_workers=streams) as pool:
            answers = dict(pair for chunk in pool.map(caller, range(streams)) for pair in chunk)

    _compare(requests, answers)
    batched, batches = (sum(_counts(server, loss)[k] - before[loss][k] for loss in LOSSES) for k in (0, 1))
    assert batched == len(requests)
    if grpc_front.kind(server.config) == "native":  # it reads a stream's items several at a time
        assert batches < batched, "no two stream items shared a batch, so the test proves nothing"


def _compare(requests: list[Request], answers: dict[int, Any]) -> None:
    """Every answer's loss and gradients have torch's bits, computed here."""
    differ = []
    for i, request in enumerate(requests):
        loss, grads = _local(request)
        response = answers[i]
        if not _same_bits(codec.decode_torch(response.loss, "loss"), loss):
            differ.append(f"{i} {request.loss}: loss")
        assert set(response.gradients) == set(grads)
        for name, grad in grads.items():
            if not _same_bits(codec.decode_torch(response.gradients[name], name), grad):
                differ.append(f"{i} {request.loss}: d loss / d {name}")
    assert not differ, f"{len(differ)} answers differ from torch's bits: {differ[:10]}"
