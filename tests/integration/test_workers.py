"""``--workers 2``: two server processes on one port, as a real subprocess.

Each new connection lands on one worker (SO_REUSEPORT); the ``remoteloss-worker`` trailing metadata
says which one answered. SIGHUP to the parent reaches both; SIGTERM drains both and exits 0; a
worker that dies on its own is logged, the other keeps serving, and the parent's exit status
reports the failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc

from .deploy_files import free_port

STARTUP_S = 90.0  # two fresh interpreters importing torch, on a busy machine


class Workers:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.target = f"127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text()

    def pids(self) -> list[int]:
        found = re.search(r"event=workers_started workers=2 port=\d+ pids=(\d+),(\d+)", self.output())
        assert found, self.output()
        return [int(pid) for pid in found.groups()]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    port = free_port()
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "remoteloss_server", "--workers", "2", "--host", "127.0.0.1", "--port", str(port),
            "--device", "cpu", "--http-port", "0", "--metrics-port", "0", "--grace-period", "5"]
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    running = Workers(process, port, log)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _ask(target: str, value: float) -> tuple[float, str] | None:
    """One Compute on a new connection: the loss and the worker that answered, or None before
    that worker serves."""
    request = pb.ComputeRequest(
        l1_loss=pb.L1Loss(input=codec.encode(np.full(3, value)), target=codec.encode(np.zeros(3)))
    )
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, not a shared one
    with grpc.insecure_channel(target, options=options) as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                return None
            response, call = loss_pb2_grpc.LossServiceStub(channel).Compute.with_call(request, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                return None
            raise
    metadata = dict(call.trailing_metadata() or ())
    return float(codec.decode_numpy(response.loss, "loss")), str(metadata["remoteloss-worker"])


def _until_both_answer(workers: Workers) -> None:
    seen: set[str] = set()
    deadline = time.monotonic() + STARTUP_S
    value = 0.0
    while seen != {"0", "1"}:
        assert workers.process.poll() is None, workers.output()
        assert time.monotonic() < deadline, f"only workers {sorted(seen)} answered:\n{workers.output()}"
        value += 1.0
        answer = _ask(workers.target, value)
        if answer is None:
            time.sleep(0.1)
            continue
        assert answer[0] == value  # l1_loss of (v, v, v) against zeros
        seen.add(answer[1])


def test_two_workers_answer_on_one_port_and_drain_on_sigterm(workers: Workers) -> None:
    _until_both_answer(workers)
    workers.process.send_signal(signal.SIGHUP)  # forwarded: each worker reloads (no keys or TLS here)
    deadline = time.monotonic() + 30
    while workers.output().count("event=reload what=nothing") < 2:
        assert workers.process.poll() is None and time.monotonic() < deadline, workers.output()
        time.sleep(0.05)
    assert _ask(workers.target, 1.0) is not None
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(timeout=60) == 0, workers.output()
    output = workers.output()
    assert output.count("event=worker_exited") == 2 and "expected=false" not in output, output
    for pid in workers.pids():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_that_dies_is_logged_and_the_other_serves_on(workers: Workers) -> None:
    _until_both_answer(workers)
    first = workers.pids()[0]
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "expected=false" not in workers.output():
        assert time.monotonic() < deadline, workers.output()
        time.sleep(0.05)
    exited = rf"ERROR .*event=worker_exited worker=worker-0 pid={first} status=-9 expected=false"
    assert re.search(exited, workers.output())
    for value in (1.0, 2.0, 3.0):  # every new connection now reaches the survivor
        answer = _ask(workers.target, value)
        assert answer == (value, "1"), workers.output()
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(timeout=60) == 1, workers.output()
    assert "1 of 2 workers failed: worker-0 exited with status -9" in workers.output()
