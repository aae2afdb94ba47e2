"""Three server processes behind one target: the load spreads, and losing a replica loses no call.

Three `python -m remoteloss_server` processes listen on loopback. The SDK reaches them (a) with
gRPC's own multi-address target, "ipv4:127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3", balanced by the
`round_robin` policy of its service config, and (b) through nginx as a gRPC load balancer, on
deploy/nginx/nginx.conf with its upstream line pointed at the three replicas. Each replica's own
/metrics (remoteloss_requests_total) shows the spread. Then, while four threads keep calling, one
replica is SIGKILLed: every call still gets an answer, equal to torch's, because the calls it took
down end in UNAVAILABLE, which the SDK's retry policy sends again (through nginx too: nginx.conf
turns its own 502 into a trailers-only UNAVAILABLE, which gRPC may retry; a plain HTTP 502 it
would not). Debian's nginx is installed by CI (.ci/run); without it the nginx tests skip locally
and fail under CI.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import remoteloss
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from remoteloss._channel import SERVICE_CONFIG
from remoteloss_server.servicer import SERVICE_NAME

from .deploy_files import Nginx, free_port, running_nginx
from .server_process import scrape

REPLICAS = 3
STARTUP_S = 90.0  # fresh interpreters importing torch, on a busy machine
CALLS = 60


class Replica:
    """One `python -m remoteloss_server` process on fixed loopback ports (kept across restarts)."""

    def __init__(self, index: int, folder: Path) -> None:
        self.index = index
        self.port = free_port()
        self.metrics_port = free_port()
        self.log = folder / f"replica-{index}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "remoteloss_server", "--host", "127.0.0.1", "--port", str(self.port),
                "--http-port", "0", "--metrics-port", str(self.metrics_port), "--device", "cpu", "--grace-period", "1"]
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def serving(self) -> bool:
        assert self.alive(), f"replica {self.index} exited:\n{self.log.read_text()}"
        with grpc.insecure_channel(self.address) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1
                )
            except grpc.RpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def answered(self) -> float:
        """The requests this replica answered OK, from its own /metrics."""
        return self._sum("remoteloss_requests_total", code="OK")

    def _sum(self, name: str, **labels: str) -> float:
        return scrape(self.metrics_port, name, **labels)

    def in_flight(self) -> float:
        """Requests this replica has received and not yet answered, from its own /metrics."""
        return self._sum("remoteloss_requests_in_flight")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Replicas(list[Replica]):
    def target(self) -> str:
        """gRPC's multi-address target: one scheme, then the addresses, comma separated."""
        return "ipv4:" + ",".join(replica.address for replica in self)

    def revive(self) -> None:
        """Start any replica that is not running (a test killed it) and wait until all serve."""
        for replica in self:
            if not replica.alive():
                replica.start()
        deadline = time.monotonic() + STARTUP_S
        waiting = list(self)
        while waiting:
            waiting = [replica for replica in waiting if not replica.serving()]
            assert time.monotonic() < deadline, f"replicas {[r.index for r in waiting]} never served"
            if waiting:
                time.sleep(0.2)

    def answered(self) -> list[float]:
        return [replica.answered() for replica in self]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    folder = tmp_path_factory.mktemp("replicas")
    started = Replicas(Replica(i, folder) for i in range(REPLICAS))
    try:
        started.revive()
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture
def running(replicas: Replicas) -> Replicas:
    replicas.revive()
    return replicas


@pytest.fixture(scope="module")
def nginx(replicas: Replicas, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    replicas.revive()
    with running_nginx([r.address for r in replicas], tmp_path_factory.mktemp("nginx")) as running:
        yield running


def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((64, 1024)).astype(np.float32), rng.standard_normal((64, 1024)).astype(np.float32)


def expected(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    input = torch.from_numpy(x).requires_grad_()
    loss = F.mse_loss(input, torch.from_numpy(y))
    (grad,) = torch.autograd.grad(loss, input)
    return loss.detach(), grad


def assert_spread(client: remoteloss.Client, replicas: Replicas) -> None:
    rng = np.random.default_rng(0)
    # Until every replica has answered: the SDK's channel connects to each in turn, and nginx
    # skips a replica for fail_timeout after a failure (an earlier test may have killed one).
    first, deadline = replicas.answered(), time.monotonic() + 30
    while not all(now > then for now, then in zip(replicas.answered(), first)):
        assert time.monotonic() < deadline, f"calls per replica: {replicas.answered()}"
        for _ in range(REPLICAS):
            client.mse_loss(*pair(rng))
    before = replicas.answered()
    for _ in range(CALLS):
        client.mse_loss(*pair(rng))
    spread = [now - then for now, then in zip(replicas.answered(), before)]
    assert sum(spread) == CALLS
    assert min(spread) >= CALLS / REPLICAS / 2, f"calls per replica: {spread}"


@dataclass
class Stream:
    """Threads calling value_and_grad back to back until stopped; each answer checked against torch."""

    client: remoteloss.Client
    threads: int = 4
    answers: list[float] = field(default_factory=list)  # completion times
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _work(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            x, y = pair(rng)
            try:
                loss, grads = self.client.value_and_grad("mse_loss", x, y)
                want_loss, want_grad = expected(x, y)
                torch.testing.assert_close(torch.as_tensor(loss), want_loss)
                torch.testing.assert_close(torch.as_tensor(grads["input"]), want_grad)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return
            self.answers.append(time.monotonic())

    def run(self, action: Callable[[], None], *, answers_before: int = 40, answers_after: int = 40,
            seconds_after: float = 1.5) -> float:
        """Call ``action`` once ``answers_before`` calls were answered; go on for ``seconds_after``
        and at least ``answers_after`` answers more. Returns the moment of the action."""
        workers = [threading.Thread(target=self._work, args=(seed,)) for seed in range(self.threads)]
        for worker in workers:
            worker.start()
        try:
            self._wait(lambda: len(self.answers) >= answers_before)
            action()
            moment = time.monotonic()  # after it: the action may wait (kill_mid_call waits for a call in flight)
            done = len(self.answers)
            time.sleep(seconds_after)
            self._wait(lambda: len(self.answers) >= done + answers_after)
        finally:
            self._stop.set()
            for worker in workers:
                worker.join(timeout=60)
        return moment

    def _wait(self, condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition() and not self.errors and time.monotonic() < deadline:
            time.sleep(0.01)


IN_TRANSIT_S = 0.1


def kill_mid_call(victim: Replica) -> None:
    """SIGKILL ``victim`` while its /metrics shows a request in flight (or after 5 s regardless)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and victim.in_flight() < 1:
        pass
    victim.kill()


def assert_no_call_lost(client: remoteloss.Client, replicas: Replicas, victim: Replica) -> None:
    survivors = [replica for replica in replicas if replica is not victim]
    before = [replica.answered() for replica in survivors]
    stream = Stream(client)
    killed_at = stream.run(lambda: kill_mid_call(victim))
    assert not victim.alive()
    assert not stream.errors, f"{len(stream.errors)} calls failed, the first: {stream.errors[0]!r}"
    # Answers the victim wrote just before it died may still be on their way (through nginx).
    after_kill = sum(1 for moment in stream.answers if moment > killed_at + IN_TRANSIT_S)
    assert after_kill >= 40, f"{after_kill} answers after the kill"
    # Every call answered after the kill was answered by a survivor.
    served = sum(replica.answered() for replica in survivors) - sum(before)
    assert served >= after_kill


def test_the_service_config_balances_round_robin_and_retries_unavailable() -> None:
    """gRPC retries every method but ComputeStream, whose requests the SDK sends again itself
    (test_stream_ends.py): the more specific entry, without a retry policy, wins for it."""
    assert SERVICE_CONFIG["loadBalancingConfig"] == [{"round_robin": {}}]
    service, stream = SERVICE_CONFIG["methodConfig"]
    assert service["name"] == [{"service": SERVICE_NAME}]
    assert "UNAVAILABLE" in service["retryPolicy"]["retryableStatusCodes"]
    assert stream == {"name": [{"service": SERVICE_NAME, "method": "ComputeStream"}]}


@pytest.mark.timeout(180)
def test_the_sdk_spreads_calls_over_every_address_of_its_target(running: Replicas) -> None:
    with remoteloss.Client(running.target()) as client:
        assert_spread(client, running)


@pytest.mark.timeout(180)
def test_the_sdk_loses_no_call_when_a_replica_dies(running: Replicas) -> None:
    with remoteloss.Client(running.target()) as client:
        assert_no_call_lost(client, running, running[0])


@pytest.mark.timeout(180)
def test_nginx_spreads_calls_over_the_replicas(running: Replicas, nginx: Nginx) -> None:
    with remoteloss.Client(nginx.target) as client:
        assert_spread(client, running)


@pytest.mark.timeout(180)
def test_through_nginx_no_call_is_lost_when_a_replica_dies(running: Replicas, nginx: Nginx) -> None:
    with remoteloss.Client(nginx.target) as client:
        assert_no_call_lost(client, running, running[1])
    assert nginx.process.poll() is None, nginx.log.read_text()
