"""Operating the server: /metrics over HTTP, x-request-id, failure logs, health, reflection."""

from __future__ import annotations

import logging
import re
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import remoteloss
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server import native_front
from remoteloss_server.app import SERVICE_NAME, ServerThread, StartupError
from remoteloss_server.config import ServerConfig

from .deploy_files import free_port


def config(**changes: Any) -> ServerConfig:
    base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "device": "cpu", "metrics_port": 0, "http_port": 0, "shutdown_grace_s": 0.5}
    return ServerConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """A server of its own, so the counts below are exactly this module's requests."""
    with ServerThread(config(metrics_port=free_port())) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield loss_pb2_grpc.LossServiceStub(channel)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def nll_request(with_target: bool = True) -> pb.ComputeRequest:
    target = codec.encode(torch.tensor([0, 2])) if with_target else None
    return pb.ComputeRequest(nll_loss=pb.NllLoss(input=codec.encode(torch.zeros(2, 3)), target=target))


def test_metrics_over_http_count_what_was_sent(server: ServerThread, stub: Any) -> None:
    assert server.metrics_port is not None
    before = scrape(server.metrics_port)
    with remoteloss.Client(server.target) as client:
        for _ in range(3):
            client.mse_loss(np.zeros(4, np.float32), np.ones(4, np.float32))
        client.l1_loss(np.zeros((2, 5)), np.ones((2, 5)))
        with pytest.raises(remoteloss.InvalidArgumentError):
            client.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 7]))
    with pytest.raises(grpc.RpcError):
        stub.Compute(pb.ComputeRequest(), timeout=30)
    after = scrape(server.metrics_port)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("remoteloss_requests_total", loss="mse_loss", code="OK") == 3
    assert delta("remoteloss_requests_total", loss="l1_loss", code="OK") == 1
    assert delta("remoteloss_requests_total", loss="cross_entropy", code="INVALID_ARGUMENT") == 1
    assert delta("remoteloss_requests_total", loss="none", code="INVALID_ARGUMENT") == 1
    assert delta("remoteloss_request_duration_seconds_count", loss="mse_loss", code="OK") == 3
    assert delta("remoteloss_request_duration_seconds_bucket", loss="mse_loss", code="OK", le="+Inf") == 3
    assert delta("remoteloss_tensor_elements_total", loss="mse_loss") == 3 * 8
    assert delta("remoteloss_tensor_elements_total", loss="l1_loss") == 20
    assert delta("remoteloss_request_bytes_count", loss="cross_entropy") == 1
    assert delta("remoteloss_response_bytes_count", loss="l1_loss") == 1
    assert after[("remoteloss_requests_in_flight", frozenset())] == 0
    labels = {dict(key)["loss"] for name, key in after if name == "remoteloss_requests_total"}
    assert labels <= {"mse_loss", "l1_loss", "cross_entropy", "nll_loss", "none"}
    assert not any(name == "remoteloss_gpu_memory_bytes" for name, _ in after)  # on the CPU


def test_the_request_id_is_echoed(stub: Any) -> None:
    _, call = stub.Compute.with_call(nll_request(), metadata=(("x-request-id", "job-7/step-12"),), timeout=30)
    assert ("x-request-id", "job-7/step-12") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(nll_request(with_target=False), metadata=(("x-request-id", "bad-1"),), timeout=30)
    assert ("x-request-id", "bad-1") in info.value.trailing_metadata()  # type: ignore[attr-defined]


def test_a_request_id_is_made_when_none_is_sent(stub: Any) -> None:
    _, call = stub.Compute.with_call(nll_request(), timeout=30)
    (made,) = [value for key, value in call.trailing_metadata() if key == "x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)


def test_a_failed_request_logs_one_line_with_its_id(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="remoteloss_server"), remoteloss.Client(
        server.target, metadata=(("x-request-id", "sdk-42"),)
    ) as client:
        with pytest.raises(remoteloss.InvalidArgumentError):
            client.nll_loss(np.zeros((2, 3), np.float32), np.array([0, 9]))
        client.mse_loss(np.zeros(2), np.ones(2))  # a success logs nothing at INFO
    lines = [r.getMessage() for r in caplog.records if "sdk-42" in r.getMessage()]
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r'event=request_failed request_id=sdk-42 loss=nll_loss code=INVALID_ARGUMENT duration_ms=\d+\.\d{3} '
        r'details="nll_loss: .*"',
        lines[0],
    )


def test_metrics_close_on_drain_and_lifecycle_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="remoteloss_server.app"), ServerThread(
        config(metrics_port=free_port())
    ) as running:
        port = running.metrics_port
        assert port is not None and scrape(port)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    events = [m.split()[0] for m in (r.getMessage() for r in caplog.records) if m.startswith("event=")]
    assert events == ["event=start", "event=ready", "event=draining", "event=stopped"]
    ready = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("event=ready"))
    assert f"metrics=127.0.0.1:{port}" in ready and "reflection=True" in ready
    if native_front.available():  # the front the config's "auto" picks, and its polling window
        assert f"front=native busy_poll_us={running.config.busy_poll_us} " in ready


def test_a_taken_metrics_port_is_a_startup_error(server: ServerThread) -> None:
    taken = ServerThread(config(metrics_port=server.metrics_port))
    with pytest.raises(StartupError, match=r"for /metrics: .*metrics_port=0"), taken:
        pass


def test_metrics_port_zero_serves_no_http() -> None:
    with ServerThread(config()) as running:
        assert running.metrics_port is None
        assert running.metrics.registry.get_sample_value("remoteloss_requests_in_flight") == 0


def list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
    return {s.name for s in response.list_services_response.service}


def test_reflection_lists_every_service(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        assert list_services(channel) == {
            SERVICE_NAME,
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }


def test_no_reflection() -> None:
    with ServerThread(config(reflection=False)) as running, grpc.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list_services(channel)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
