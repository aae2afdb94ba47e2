"""Both gRPC fronts serve the same service, call for call.

The native front (gRPC's C++ core, ``native_front``) is the default where it was built, so the
rest of the suite runs on it; grpc.aio's serves TLS and ``--front python``. This module runs each
kind of call and each thing a handler asks of its call on both: a unary call with raw bytes
(Compute) and with messages (ListLosses), a bidirectional stream (ComputeStream), a server stream
(health's Watch), reflection, undecodable requests, the Open Inference Protocol's door, an unknown method, statuses with
trailing metadata, the API keys' interceptor (a refusal, and the tenant it gives the handler), a
deadline that passes while the call waits, a call its client cancels, and "localhost" bound as
gRPC binds it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import remoteloss
from remoteloss import codec
from remoteloss.v1 import loss_pb2, loss_pb2_grpc
from remoteloss_server import grpc_front, native_front
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig
from remoteloss_server.losses import LOSSES
from remoteloss_server.inference import grpc_service_pb2 as oip_pb2
from tests import tools

KEY = "alice-key-0123456789abcdef"
BEARER = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture(scope="module", params=["native", "python"])
def served(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    if request.param == "native" and not native_front.available():
        tools.missing("the native front was not built: gRPC's C++ library (libgrpc++-dev, pkg-config) was missing")
    config = ServerConfig(
        port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0, front=request.param, api_keys=f"alice:{KEY}",
    )
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def channel(served: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.target) as plain:
        yield plain


def test_the_default_front_is_native_where_it_was_built() -> None:
    if not native_front.available():
        tools.missing("the native front was not built: gRPC's C++ library (libgrpc++-dev, pkg-config) was missing")
    assert grpc_front.kind(ServerConfig()) == "native"
    assert grpc_front.kind(ServerConfig(tls_cert="cert.pem", tls_key="key.pem")) == "native"  # TLS too


def test_unary_and_stream_answers_are_torchs_with_gradients(served: ServerThread) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (3,), generator=generator)
    local = x.clone().requires_grad_()
    expected = F.cross_entropy(local, y, label_smoothing=0.1)
    expected.backward()
    with remoteloss.Client(served.target, api_key=KEY) as client:
        remote = x.clone().requires_grad_()
        loss = client.cross_entropy(remote, y, label_smoothing=0.1)
        loss.backward()
        with client.stream() as stream:
            futures = [stream.cross_entropy(x.numpy(), y.numpy(), label_smoothing=0.1) for _ in range(20)]
        catalog = client.list_losses()
    assert torch.equal(loss.detach(), expected.detach()) and torch.equal(remote.grad, local.grad)
    assert all(np.array_equal(f.result(), expected.detach().numpy()) for f in futures)
    assert len(catalog.losses) == len(LOSSES)


def test_calls_that_arrive_together_share_batches_with_the_default_settings(
    served: ServerThread, channel: grpc.Channel
) -> None:
    """No batch delay (the default): only calls that reach the server together can meet. The
    native front hands its handlers what arrived in one batch, one after another, and each ran
    to its end before the next began: a call alone in the budgets took itself for alone and
    computed on the spot, so under any load every batch was a batch of one. grpc.aio's front
    starts each call as a task that runs to its end before the next one starts: there, calls meet
    only in the queue a batch delay makes (test_batch_invariance.py)."""
    if served.config.front == "python":
        pytest.skip("grpc.aio's calls meet only with a batch delay: each runs to its end before the next starts")
    registry = served.metrics.registry

    def counts() -> tuple[float, float]:
        labels = {"loss": "mse_loss"}
        return (registry.get_sample_value("remoteloss_batch_requests_sum", labels) or 0.0,
                registry.get_sample_value("remoteloss_batch_requests_count", labels) or 0.0)

    x = torch.linspace(-1, 1, 100)
    expected = F.mse_loss(x, -x)
    request = loss_pb2.ComputeRequest(mse_loss=loss_pb2.MseLoss(input=codec.encode(x), target=codec.encode(-x)))
    compute = loss_pb2_grpc.LossServiceStub(channel).Compute
    requests_before, batches_before = counts()
    for _ in range(20):  # bursts of calls sent at once, until some of them met
        futures = [compute.future(request, metadata=BEARER, timeout=30) for _ in range(32)]
        for future in futures:
            assert torch.equal(codec.decode_torch(future.result().loss, "loss"), expected)
        requests, batches = counts()
        if batches - batches_before < requests - requests_before:
            break
    assert requests - requests_before >= 32
    assert batches - batches_before < requests - requests_before, "every batch was a batch of one"


def test_a_status_carries_its_message_and_trailing_metadata(channel: grpc.Channel) -> None:
    stub = loss_pb2_grpc.LossServiceStub(channel)
    request = loss_pb2.ComputeRequest()  # no loss set
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(request, metadata=(*BEARER, ("x-request-id", "fronts-1")), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert ("x-request-id", "fronts-1") in tuple(info.value.trailing_metadata())
    with pytest.raises(grpc.RpcError) as unknown:
        channel.unary_unary("/remoteloss.v1.LossService/NoSuchMethod")(b"", metadata=BEARER, timeout=10)
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_bytes_that_are_not_the_methods_message_fail_that_call_alone(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    """Health's Check and reflection's stream get bytes protobuf cannot parse: those calls fail
    with INVALID_ARGUMENT naming the message, and only those, whatever else arrived with them;
    health's List, which its servicer does not implement, is UNIMPLEMENTED; nothing is logged
    (health's and reflection's generated code would answer UNKNOWN and UNIMPLEMENTED, and
    grpc.aio log an ERROR with a traceback for each)."""
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    good = health_pb2.HealthCheckRequest(service="remoteloss.v1.LossService").SerializeToString()
    futures = [(check.future(b"\xff\xff\xff" if i % 2 else good, timeout=10), i % 2) for i in range(100)]
    for future, garbage in futures:
        if garbage:
            assert future.code() == grpc.StatusCode.INVALID_ARGUMENT, future.details()
            assert "the request is not a valid grpc.health.v1.HealthCheckRequest" in future.details()
        else:
            assert health_pb2.HealthCheckResponse.FromString(future.result()).status == health_pb2.HealthCheckResponse.SERVING
    info = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.RpcError) as refused:
        list(info(iter([b"\xff\xff\xff"]), metadata=BEARER, timeout=10))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as missing:
        channel.unary_unary("/grpc.health.v1.Health/List")(b"", timeout=10)
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED, missing.value  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records[:3]


def test_the_interceptor_refuses_a_call_without_a_key_and_names_the_tenant_of_one(served: ServerThread) -> None:
    registry = served.metrics.registry

    def alices() -> float:
        return registry.get_sample_value("remoteloss_tenant_requests_total", {"tenant": "alice", "code": "OK"}) or 0.0

    before = alices()
    with remoteloss.Client(served.target) as anonymous, pytest.raises(remoteloss.UnauthenticatedError):
        anonymous.mse_loss(np.ones(3, np.float32), np.zeros(3, np.float32))
    with remoteloss.Client(served.target, api_key=KEY) as client:
        client.mse_loss(np.ones(3, np.float32), np.zeros(3, np.float32))
    assert alices() == before + 1


def test_a_server_stream_reflection_and_the_open_inference_protocol(channel: grpc.Channel) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="remoteloss.v1.LossService"))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([ask]), metadata=BEARER)
    names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"remoteloss.v1.LossService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    live = channel.unary_unary(
        "/inference.GRPCInferenceService/ServerLive",
        request_serializer=oip_pb2.ServerLiveRequest.SerializeToString,
        response_deserializer=oip_pb2.ServerLiveResponse.FromString,
    )
    assert live(oip_pb2.ServerLiveRequest(), metadata=BEARER, timeout=10).live


def test_a_deadline_that_passes_in_the_queue_and_a_cancelled_call_leave_the_server_serving(
    served: ServerThread,
) -> None:
    """Callers that keep the compute thread busy; one caller's deadline passes while it waits, and
    another cancels: both end as asked, and the server's in-flight count returns to nothing."""
    x, y = np.ones(2**20, np.float32), np.zeros(2**20, np.float32)
    stop = threading.Event()
    with remoteloss.Client(served.target, api_key=KEY) as busy:

        def load() -> None:
            while not stop.is_set():
                busy.value_and_grad("mse_loss", x, y)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            stub = loss_pb2_grpc.LossServiceStub(grpc.insecure_channel(served.target))
            request = loss_pb2.ComputeRequest.FromString(_mse_bytes(x, y))
            with pytest.raises(grpc.RpcError) as late:
                stub.Compute(request, metadata=BEARER, timeout=0.002)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            future = stub.Compute.future(request, metadata=BEARER, timeout=30)
            future.cancel()
            assert future.cancelled() or future.code() == grpc.StatusCode.CANCELLED
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    registry = served.metrics.registry
    deadline = time.monotonic() + 10
    while (registry.get_sample_value("remoteloss_requests_in_flight") or 0.0) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registry.get_sample_value("remoteloss_requests_in_flight") == 0.0
    with remoteloss.Client(served.target, api_key=KEY) as client:
        assert client.mse_loss(np.ones(3, np.float32), np.zeros(3, np.float32)) == 1.0


def _mse_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    request = loss_pb2.ComputeRequest()
    request.mse_loss.input.CopyFrom(codec.encode(x))
    request.mse_loss.target.CopyFrom(codec.encode(y))
    return bytes(request.SerializeToString())


def test_a_call_the_native_front_cannot_dispatch_fails_alone() -> None:
    """An interceptor that waits (the native front runs interceptors on the spot, and this server's
    never wait) fails its call with INTERNAL; the calls beside it are answered."""
    if not native_front.available():
        tools.missing("the native front was not built: gRPC's C++ library (libgrpc++-dev, pkg-config) was missing")

    class Waits(grpc.aio.ServerInterceptor):  # type: ignore[misc]
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            if details.method.endswith("/Wait"):
                await asyncio.sleep(0)
            return await continuation(details)

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo)
    ready, stop = threading.Event(), threading.Event()
    ports: list[int] = []

    async def serve() -> None:
        server = native_front.NativeServer([Waits()], [])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.S", {"Echo": handler, "Wait": handler})])
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        await server.stop(1.0)

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(30)
        with grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as plain:
            calls = [(plain.unary_unary(f"/t.S/{m}").future(b"x", timeout=10), m) for m in ("Echo", "Wait") * 20]
            for future, method in calls:
                if method == "Echo":
                    assert future.result() == b"x"
                else:
                    assert future.code() == grpc.StatusCode.INTERNAL
    finally:
        stop.set()
        thread.join()


def test_localhost_is_both_loopback_addresses(served: ServerThread) -> None:
    """As gRPC binds "localhost" (both loopback addresses, whatever /etc/hosts says), so does the
    native front, which binds its own listening sockets; a host without IPv6 has only one."""
    config = ServerConfig(host="localhost", port=0, device="cpu", metrics_port=0, http_port=0, front=served.config.front)
    with ServerThread(config) as running:
        targets = [f"127.0.0.1:{running.port}"] + ([f"[::1]:{running.port}"] if _has_ipv6_loopback() else [])
        for target in targets:
            with remoteloss.Client(target, timeout=10) as client:
                assert client.mse_loss(np.ones(3, np.float32), np.zeros(3, np.float32)) == 1.0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True
