"""RequestRecord, loss labels, request ids and logfmt quoting; a fresh registry per test."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.metrics import Metrics
from remoteloss_server.intake import UndecodableRequest
from remoteloss_server.log_sampling import LOG_LINES_PER_S, LogSampler
from remoteloss_server.telemetry import RequestRecord, loss_label, quote, request_id
from tests.catalog import LOSS_NAMES, newer_loss_field


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def mse_request() -> pb.ComputeRequest:
    return pb.ComputeRequest(
        mse_loss=pb.MseLoss(input=codec.encode(torch.zeros(2, 3)), target=codec.encode(torch.ones(2, 3)))
    )


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_successful_request(caplog: pytest.LogCaptureFixture) -> None:
    metrics, clock, request = Metrics(), Clock(), mse_request()
    record = RequestRecord(metrics, loss_label(request), "req-1", request.ByteSize(), clock=clock)
    record.elements = 12
    assert value(metrics, "remoteloss_requests_in_flight") == 1
    clock.now += 0.25
    response = pb.ComputeResponse(loss=codec.encode(torch.tensor(1.0)))
    with caplog.at_level(logging.DEBUG, logger="remoteloss_server.telemetry"):
        record.finish("OK", response.ByteSize())
        record.finish("OK", response.ByteSize())  # a second finish records nothing
    assert value(metrics, "remoteloss_requests_in_flight") == 0
    assert value(metrics, "remoteloss_requests_total", loss="mse_loss", code="OK") == 1
    assert value(metrics, "remoteloss_request_duration_seconds_count", loss="mse_loss", code="OK") == 1
    assert value(metrics, "remoteloss_request_duration_seconds_sum", loss="mse_loss", code="OK") == 0.25
    assert value(metrics, "remoteloss_request_duration_seconds_bucket", loss="mse_loss", code="OK", le="0.1") == 0
    assert value(metrics, "remoteloss_request_duration_seconds_bucket", loss="mse_loss", code="OK", le="0.25") == 1
    assert value(metrics, "remoteloss_request_bytes_sum", loss="mse_loss") == request.ByteSize()
    assert value(metrics, "remoteloss_response_bytes_sum", loss="mse_loss") == response.ByteSize()
    assert value(metrics, "remoteloss_tensor_elements_total", loss="mse_loss") == 12  # input and target, 2x3 each
    assert [r.getMessage() for r in caplog.records] == [
        "event=request request_id=req-1 loss=mse_loss code=OK duration_ms=250.000"
    ]


@pytest.mark.parametrize(
    ("code", "level"),
    [("INVALID_ARGUMENT", logging.INFO), ("RESOURCE_EXHAUSTED", logging.WARNING), ("INTERNAL", logging.ERROR)],
)
def test_a_failed_request_logs_one_line(caplog: pytest.LogCaptureFixture, code: str, level: int) -> None:
    metrics, clock = Metrics(), Clock()
    request = pb.ComputeRequest(nll_loss=pb.NllLoss(input=codec.encode(torch.zeros(2, 3))))
    record = RequestRecord(metrics, loss_label(request), "abc", request.ByteSize(), clock=clock)
    record.elements = 6
    clock.now += 0.0015
    with caplog.at_level(logging.DEBUG, logger="remoteloss_server.telemetry"):
        record.finish(code, details="nll_loss: target is required")
    (line,) = caplog.records
    assert line.levelno == level
    assert line.getMessage() == (
        f"event=request_failed request_id=abc loss=nll_loss code={code} duration_ms=1.500 "
        'details="nll_loss: target is required"'
    )
    assert value(metrics, "remoteloss_requests_total", loss="nll_loss", code=code) == 1
    assert value(metrics, "remoteloss_request_duration_seconds_count", loss="nll_loss", code=code) == 1
    assert value(metrics, "remoteloss_request_bytes_count", loss="nll_loss") == 1
    assert value(metrics, "remoteloss_response_bytes_count", loss="nll_loss") is None
    assert value(metrics, "remoteloss_tensor_elements_total", loss="nll_loss") is None  # counted for answers only
    assert value(metrics, "remoteloss_requests_in_flight") == 0


def test_an_undecodable_request_is_labelled_unknown() -> None:
    metrics = Metrics()
    RequestRecord(metrics, loss_label(UndecodableRequest("remoteloss.v1.ComputeRequest", "bad")), "x").finish(
        "INVALID_ARGUMENT"
    )
    assert value(metrics, "remoteloss_requests_total", loss="unknown", code="INVALID_ARGUMENT") == 1
    assert value(metrics, "remoteloss_request_bytes_count", loss="unknown") is None


def test_loss_labels_are_bounded() -> None:
    assert loss_label(mse_request()) == "mse_loss"
    assert loss_label(pb.ComputeRequest()) == "none"
    assert loss_label(pb.ComputeRequest.FromString(newer_loss_field())) == "unknown"  # a newer client's loss
    assert loss_label(UndecodableRequest("remoteloss.v1.ComputeRequest", "bad")) == "unknown"
    assert {loss_label(pb.ComputeRequest(**{name: {}})) for name in LOSS_NAMES} == set(LOSS_NAMES)


@pytest.mark.parametrize("sent", ["abc", "0f8c2d1e-7a55-4b2e-9a0b-5b8e0c1d2e3f", "01HZX3K6Q9", "dGVzdA==", "a" * 128])
def test_a_well_formed_request_id_is_kept(sent: str) -> None:
    assert request_id(sent) == sent


@pytest.mark.parametrize("sent", [None, "", "two words", "line\nbreak", 'quote"d', "a" * 129, "é"])
def test_any_other_request_id_is_replaced(sent: str | None) -> None:
    made = request_id(sent)
    assert re.fullmatch(r"[0-9a-f]{32}", made) and made != request_id(sent)


def test_quote() -> None:
    assert quote("INVALID_ARGUMENT") == "INVALID_ARGUMENT"
    assert quote("two words") == '"two words"'
    assert quote('a "b"\nc=d') == '"a \\"b\\"\\nc=d"'
    assert quote("") == '""'


def test_at_most_log_lines_per_s_of_a_kind_and_then_how_many_were_held() -> None:
    now = [100.2]
    sampler = LogSampler(3, clock=lambda: now[0])
    assert [sampler.admit("a") for _ in range(5)] == [0, 0, 0, None, None]
    assert sampler.admit("b") == 0  # each kind has its own second
    now[0] = 100.9
    assert sampler.admit("a") is None
    now[0] = 101.1
    assert sampler.admit("a") == 3  # the three held back in the second before
    assert sampler.admit("a") == 0
    now[0] = 105.0
    assert sampler.admit("a") == 0


def test_a_flood_of_failures_logs_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    """A flood of one code and tenant: LOG_LINES_PER_S lines a second, the next one saying how
    many were held back; another code has lines of its own; the metrics count every failure."""
    caplog.set_level(logging.INFO, logger="remoteloss_server.telemetry")
    metrics, now = Metrics(), [7.0]
    metrics.log_sampler = LogSampler(clock=lambda: now[0])
    for _ in range(100):
        RequestRecord(metrics, "mse_loss", "r", 10).finish("INVALID_ARGUMENT", details="bad")
    RequestRecord(metrics, "mse_loss", "r", 10).finish("INTERNAL", details="bug")
    now[0] = 8.0
    RequestRecord(metrics, "mse_loss", "r", 10).finish("INVALID_ARGUMENT", details="bad")
    lines = [r.getMessage() for r in caplog.records if "event=request_failed" in r.getMessage()]
    assert len(lines) == LOG_LINES_PER_S + 2
    assert sum("code=INTERNAL" in line for line in lines) == 1
    assert lines[-1].endswith(f"suppressed={100 - LOG_LINES_PER_S}")
    assert value(metrics, "remoteloss_requests_total", loss="mse_loss", code="INVALID_ARGUMENT") == 101
