"""Request templates through real servers: a server that keeps them answers every call with the
same bytes, or the same status, as one that does not (``--request-templates 0``).

Every case of the case table in float32 and float64 (each loss, option set, reduction, batched or
not) goes to both servers four times, with values drawn from other seeds: on the one server the
first call's size is remembered, the second becomes a template (a size's second miss), and the
third and fourth match it. Then calls whose values break a check
only values reveal (a class index, CTC's lengths) follow a good call of the same structure,
and must be refused as the server without templates refuses them. The metric of requests
decoded from a template shows the server really took that path.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from remoteloss._request import build_request
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig

from tests.integration.cases import Call, all_cases, differentiable

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ServerThread, ServerThread]]:
    base = {"port": 0, "host": "127.0.0.1", "device": "cpu", "metrics_port": 0, "http_port": 0}
    with ServerThread(ServerConfig(**base)) as kept, ServerThread(ServerConfig(**base, request_templates=0)) as off:
        yield kept, off


def _request(call: Call) -> bytes:
    arguments: dict[str, Any] = dict(zip(call.arg_names, call.args, strict=True))
    arguments.update(call.remote_kwargs())
    return build_request(call.loss, arguments, wrt=differentiable(call)).SerializeToString()


def _answer(channel: grpc.Channel, data: bytes) -> tuple[str, bytes | str]:
    compute = channel.unary_unary("/remoteloss.v1.LossService/Compute")
    try:
        return "OK", compute(data, timeout=60)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def _answers(servers: tuple[ServerThread, ServerThread], requests: list[bytes]) -> list[tuple[Any, Any]]:
    kept, off = servers
    with grpc.insecure_channel(kept.target) as one, grpc.insecure_channel(off.target) as other:
        return [(_answer(one, data), _answer(other, data)) for data in requests]


def _from_templates(server: ServerThread) -> float:
    return server.metrics.registry.get_sample_value("remoteloss_request_templates_total", {"result": "hit"}) or 0.0


def test_every_case_answers_the_same_bytes_with_templates(servers: tuple[ServerThread, ServerThread]) -> None:
    cases = [case for case in all_cases() if case.dtype in (torch.float32, torch.float64) and not case.torch_raises]
    requests = [_request(case.build(seed)) for case in cases for seed in SEEDS]
    before = _from_templates(servers[0])
    answers = _answers(servers, requests)
    differ = [i for i, (kept, off) in enumerate(answers) if kept != off]
    assert not differ, f"{len(differ)} of {len(requests)} differ, e.g. case {cases[differ[0] // len(SEEDS)].id}"
    # Every case is one torch computes (those it refuses were left out), so every answer is a loss:
    # the comparison above is of answers, not of refusals.
    assert all(kept[0] == "OK" for kept, _ in answers), [kept for kept, _ in answers if kept[0] != "OK"][:3]
    assert _from_templates(servers[0]) - before >= len(cases)  # the third and fourth calls of most cases


def _ctc(input_lengths: list[int]) -> bytes:
    generator = torch.Generator().manual_seed(len(input_lengths))
    log_probs = torch.randn(6, 2, 4, generator=generator).log_softmax(-1)
    arguments = {"log_probs": log_probs, "targets": torch.tensor([[1, 2], [3, 1]]),
                 "input_lengths": torch.tensor(input_lengths), "target_lengths": torch.tensor([2, 2])}
    return build_request("ctc_loss", arguments, wrt=("log_probs",)).SerializeToString()


def _classes(loss: str, target: list[int]) -> bytes:
    generator = torch.Generator().manual_seed(sum(target))
    logits = torch.randn(3, 5, generator=generator)
    return build_request(loss, {"input": logits.log_softmax(-1), "target": torch.tensor(target)},
                         wrt=("input",)).SerializeToString()


def test_values_a_template_does_not_know_are_checked(servers: tuple[ServerThread, ServerThread]) -> None:
    pairs = [
        (_ctc([6, 5]), _ctc([6, 9])),  # an input length past the input's
        (_classes("nll_loss", [0, 4, 2]), _classes("nll_loss", [0, 5, 2])),  # a class past the last
        (_classes("cross_entropy", [1, 1, 1]), _classes("cross_entropy", [1, -3, 1])),
        (_classes("multi_margin_loss", [4, 0, 0]), _classes("multi_margin_loss", [4, 0, 7])),
    ]
    for good, bad in pairs:
        assert len(good) == len(bad)
        # The good call twice: by its second it is kept (a size's second miss), and the bad one matches it.
        _, (kept_good, off_good) = _answers(servers, [good, good])
        before = _from_templates(servers[0])
        ((kept_bad, off_bad),) = _answers(servers, [bad])
        assert _from_templates(servers[0]) - before == 1
        assert kept_good == off_good and kept_good[0] == "OK"
        assert kept_bad == off_bad and kept_bad[0] == "INVALID_ARGUMENT", kept_bad
    assert pb.ComputeRequest.FromString(pairs[0][1]).WhichOneof("loss") == "ctc_loss"


def _streamed(server: ServerThread, items: list[bytes]) -> dict[int, bytes]:
    """Each item's answer on one ComputeStream, by its id, each item sent once the one before is
    answered: items read together are all received before the first of them is kept as a
    template, so they would miss whatever their order (test_templates.py's unit tests)."""
    answered = threading.Semaphore(1)

    def one_at_a_time() -> Iterator[bytes]:
        for item in items:
            answered.acquire()
            yield item

    answers = []
    with grpc.insecure_channel(server.target) as channel:
        stream = channel.stream_stream("/remoteloss.v1.LossService/ComputeStream")
        for raw in stream(one_at_a_time(), timeout=120):
            answers.append(pb.ComputeStreamResponse.FromString(raw))
            answered.release()
    return {answer.id: answer.SerializeToString() for answer in answers}


def test_stream_items_answer_the_same_bytes_with_templates(servers: tuple[ServerThread, ServerThread]) -> None:
    cases = [case for case in all_cases() if case.dtype == torch.float32 and not case.torch_raises]
    requests = [_request(case.build(seed)) for case in cases for seed in SEEDS]
    ids = [0 if i == 0 else i + 120 for i in range(len(requests))]  # no id field, then varints of 1 and 2 bytes
    items = [pb.ComputeStreamRequest(id=item_id, request=pb.ComputeRequest.FromString(data)).SerializeToString()
             for item_id, data in zip(ids, requests, strict=True)]
    before = _from_templates(servers[0])
    kept, off = (_streamed(server, items) for server in servers)
    assert kept.keys() == off.keys() == set(ids)
    differ = [item_id for item_id in ids if kept[item_id] != off[item_id]]
    assert not differ, f"{len(differ)} of {len(items)} stream answers differ"
    assert _from_templates(servers[0]) - before >= len(cases)
