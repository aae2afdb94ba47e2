"""ServerThread on loopback: LossService, health, reflection, limits, startup errors, draining."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server import grpc_front, native_front
from remoteloss_server.app import SERVICE_NAME, ServerThread, StartupError
from remoteloss_server.config import ServerConfig

torch.set_num_threads(1)

CONFIG = ServerConfig(
    host="127.0.0.1", port=0, max_message_bytes=64 * 1024, shutdown_grace_s=0.5, metrics_port=0, http_port=0
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(CONFIG) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as plain:
        yield plain


def test_target_is_the_bound_loopback_port(server: ServerThread) -> None:
    assert server.port > 0 and server.target == f"127.0.0.1:{server.port}"


def test_compute(channel: grpc.Channel) -> None:
    stub = loss_pb2_grpc.LossServiceStub(channel)
    request = pb.ComputeRequest(
        nll_loss=pb.NllLoss(input=codec.encode(torch.zeros(2, 3)), target=codec.encode(torch.tensor([0, 2])))
    )
    response = stub.Compute(request, timeout=30)
    assert codec.decode_torch(response.loss, "loss").item() == 0.0
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(pb.ComputeRequest(nll_loss=pb.NllLoss(input=request.nll_loss.input)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "nll_loss: target is required"


def test_undecodable_bytes_are_invalid_argument(channel: grpc.Channel) -> None:
    raw = channel.unary_unary(f"/{SERVICE_NAME}/Compute", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        raw(bytes([2 << 3 | 2, 50, 1, 2]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_message_size_limit(channel: grpc.Channel) -> None:
    stub = loss_pb2_grpc.LossServiceStub(channel)
    big = codec.encode(torch.zeros(32 * 1024))  # 128 KiB, over the 64 KiB limit
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(pb.ComputeRequest(mse_loss=pb.MseLoss(input=big, target=big)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_health_is_serving(channel: grpc.Channel, service: str) -> None:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = stub.ServerReflectionInfo(iter([request]), timeout=30)
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_shutdown_reports_not_serving_then_stops() -> None:
    with ServerThread(CONFIG) as running, grpc.insecure_channel(running.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        running.__exit__(None, None, None)  # drain while the watch is open
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError):
            loss_pb2_grpc.LossServiceStub(channel).ListLosses(pb.ListLossesRequest(), timeout=5)


def test_a_taken_port_is_a_startup_error(server: ServerThread) -> None:
    taken = ServerThread(ServerConfig(host="127.0.0.1", port=server.port))
    with pytest.raises(StartupError, match=r"cannot bind 127\.0\.0\.1"), taken:
        pass


def test_a_start_that_fails_half_way_leaks_nothing() -> None:
    """/metrics cannot bind after the gRPC port was: what was started is stopped again (the exit
    stack), so the gRPC port is free and no compute or server thread is left behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        threads = {t.name for t in threading.enumerate()}
        config = ServerConfig(host="127.0.0.1", port=0, device="cpu", metrics_port=taken.getsockname()[1], http_port=0)
        for _ in range(3):
            with pytest.raises(StartupError, match="for /metrics"), ServerThread(config):
                pass
    left = {t.name for t in threading.enumerate()} - threads
    assert not {name for name in left if name.startswith(("remoteloss", "ThreadPoolExecutor"))}, left


def test_a_missing_device_is_a_startup_error() -> None:
    missing = ServerThread(ServerConfig(host="127.0.0.1", port=0, device="cuda:7"))
    with pytest.raises(StartupError, match="cuda:7"), missing:
        pass


def test_without_the_native_front_auto_serves_on_grpc_aio_and_native_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(native_front, "_front", None)  # an install without gRPC's C++ library
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", metrics_port=0, http_port=0)
    assert grpc_front.kind(config) == "python"
    with ServerThread(config) as running, grpc.insecure_channel(running.target) as channel:
        assert loss_pb2_grpc.LossServiceStub(channel).ListLosses(pb.ListLossesRequest(), timeout=10).losses
    with pytest.raises(StartupError, match="front native: this installation has no native front"):
        with ServerThread(dataclasses.replace(config, front="native")):
            pass


def test_an_invalid_config_is_rejected_up_front() -> None:
    with pytest.raises(ValueError, match="compute_threads"):
        ServerThread(ServerConfig(compute_threads=0))
