"""A `python -m remoteloss_server` subprocess on fixed loopback ports, for tests that signal,
kill or restart it, or read its memory (the fault, shutdown and soak tests)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from remoteloss_server.servicer import SERVICE_NAME

from .deploy_files import free_port

STARTUP_S = 90.0  # a fresh interpreter importing torch, on a busy machine


def scrape(metrics_port: int, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` with ``labels`` on 127.0.0.1:``metrics_port``/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


class ServerProcess:
    """One server process; its ports stay the same across restarts."""

    def __init__(self, folder: Path, *flags: str, name: str = "server") -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.flags = flags
        self.log = folder / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, wait: bool = True) -> None:
        argv = [sys.executable, "-m", "remoteloss_server", "--host", "127.0.0.1", "--port", str(self.port),
                "--http-port", "0", "--metrics-port", str(self.metrics_port), "--device", "cpu", *self.flags]
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_serving()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self) -> str:
        """The health status of LossService, or the gRPC code name when the check fails."""
        with grpc.insecure_channel(self.target) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2
                )
            except grpc.RpcError as exc:
                return str(exc.code().name)  # type: ignore[attr-defined]
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))

    def wait_serving(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert self.alive(), f"the server exited:\n{self.log.read_text()}"
            if self.health() == "SERVING":
                return
            assert time.monotonic() < deadline, f"the server never served:\n{self.log.read_text()}"
            time.sleep(0.1)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples ``name`` with ``labels``, from the server's own /metrics."""
        return scrape(self.metrics_port, name, **labels)

    def rss_bytes(self) -> int:
        """The server's resident set size (VmRSS of /proc/PID/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")  # pragma: no cover

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.alive():
            self.signal(signal.SIGKILL)
            self.wait()

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit; the exit status (None if it was not running)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()
