"""``--busy-poll-us``: after its last calls (gRPC on the native front, inferences over HTTP) the
event loop polls for the next one for a moment instead of sleeping. What it may spend is
bounded: CPU for at most the window after each batch of events, none on an idle server, and it
holds back no other caller's work."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import remoteloss

from .deploy_files import free_port
from .server_process import ServerProcess

pytestmark = pytest.mark.skipif(
    not __import__("remoteloss_server.native_front", fromlist=["available"]).available(),
    reason="the native front was not built (busy polling is its event loop's)",
)

_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of process ``pid``, every thread."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@pytest.fixture(scope="module")
def polling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server polling 20 ms after its last calls: a window long enough to measure."""
    server = ServerProcess(tmp_path_factory.mktemp("busy-poll"), "--busy-poll-us", "20000", "--http-port",
                           str(free_port()))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _http_call(connection: http.client.HTTPConnection) -> Callable[[], float]:
    """An inference over the Open Inference Protocol's HTTP port, on one kept-alive connection."""
    body = json.dumps({"inputs": [{"name": n, "datatype": "FP32", "shape": [3], "data": v}
                                  for n, v in (("input", [1.0] * 3), ("target", [0.0] * 3))]}).encode()

    def call() -> float:
        connection.request("POST", "/v2/models/mse_loss/infer", body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        assert answer.status == 200
        return float(json.loads(answer.read())["outputs"][0]["data"][0])

    return call


def _http_port(server: ServerProcess) -> int:
    return int(server.flags[server.flags.index("--http-port") + 1])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_idle_server_stops_polling(polling: ServerProcess, protocol: str) -> None:
    """Calls keep the loop polling; once they stop, it sleeps again: a second idle costs no more
    CPU than the server's housekeeping, where a loop that kept polling would spend a whole core."""
    x, y = np.ones(1000, np.float32), np.zeros(1000, np.float32)
    connection = http.client.HTTPConnection("127.0.0.1", _http_port(polling), timeout=30)
    with remoteloss.Client(polling.target) as client, contextlib.closing(connection):
        call = (lambda: float(client.mse_loss(x, y))) if protocol == "grpc" else _http_call(connection)
        before = _cpu_s(polling.pid)
        begin = time.monotonic()
        while time.monotonic() - begin < 1.0:  # a call every 10 ms: the window never closes
            assert call() == 1.0
            time.sleep(0.01)
        busy = _cpu_s(polling.pid) - before
        time.sleep(0.2)  # the window closes
        before = _cpu_s(polling.pid)
        time.sleep(1.0)
        idle = _cpu_s(polling.pid) - before
    print(f"\n{protocol}, busy poll of 20 ms: {busy:.2f} s of CPU over 1 s of a call every 10 ms; "
          f"{idle:.2f} s over 1 s idle")
    assert busy > 0.3, "the loop did not poll between calls"  # polling: about 1 s; sleeping: 0.05
    assert idle < 0.2, f"an idle server spent {idle:.2f} s of CPU in 1 s"


def test_a_polling_loop_holds_back_no_other_callers_work(polling: ServerProcess) -> None:
    """A caller whose back-to-back small calls keep the loop polling, beside a bystander whose
    calls compute on a compute thread (large requests): the loop yields the CPU and the GIL at
    each turn, so the bystander's calls go on; its slowest call is printed and bounded."""
    rng = np.random.default_rng(0)
    big_x, big_y = (rng.standard_normal(1 << 21).astype(np.float32) for _ in range(2))
    want = F.mse_loss(torch.from_numpy(big_x), torch.from_numpy(big_y)).item()
    stop = threading.Event()

    def chatter() -> None:
        x, y = np.ones(1000, np.float32), np.zeros(1000, np.float32)
        with remoteloss.Client(polling.target) as client:
            while not stop.is_set():
                client.mse_loss(x, y)

    def slowest_call(bystander: remoteloss.Client) -> float:
        slowest = 0.0
        for _ in range(10):
            begin = time.monotonic()
            got = bystander.mse_loss(big_x, big_y)
            slowest = max(slowest, time.monotonic() - begin)
            assert abs(float(got) - want) <= 1e-5 * abs(want)
        return slowest

    thread = threading.Thread(target=chatter)
    with remoteloss.Client(polling.target, timeout=60) as bystander:
        alone = slowest_call(bystander)  # the same calls with no one else calling
        thread.start()
        try:
            beside = slowest_call(bystander)
        finally:
            stop.set()
            thread.join()
    print(f"\nbystander's slowest 16 MiB call: {alone * 1e3:.0f} ms alone, {beside * 1e3:.0f} ms beside a polling loop")
    # The chatter shares the two CPUs (and this process's GIL) with the bystander, so its calls
    # slow down some; a loop that held the CPU or the GIL between turns would stall them outright.
    assert beside < 4 * alone + 0.25, (alone, beside)
