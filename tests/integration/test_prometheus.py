"""A real Prometheus scrapes a real server: the counts and the p99 it reports match what was sent.

The `prometheus` and `promtool` programs come from Debian's `prometheus` package, which CI
installs (.ci/run); without them these tests skip, except under CI (CI=true), where they fail.
The test starts its own `prometheus` on a free loopback port with the shipped
deploy/prometheus/prometheus.yml, its target and intervals rewritten, and a data folder in tmp.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import remoteloss
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig
from remoteloss_server.metrics import LATENCY_BUCKETS

from .. import tools
from .deploy_files import free_port

DEPLOY = tools.ROOT / "deploy" / "prometheus"
HINT = "apt-get install prometheus"
WAIT_S = 15.0


@pytest.mark.parametrize(
    ("args", "path"),
    [(("check", "config"), "prometheus.yml"), (("check", "rules"), "remoteloss.rules.yml")],
    ids=["config", "rules"],
)
def test_shipped_config_passes_promtool(args: tuple[str, ...], path: str) -> None:
    promtool = tools.find("promtool", HINT)
    done = tools.run([promtool, *args, str(DEPLOY / path)], timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


class Prometheus:
    """A `prometheus` process on 127.0.0.1 and its HTTP API."""

    def __init__(self, binary: str, folder: Path, target: str) -> None:
        config = (DEPLOY / "prometheus.yml").read_text()
        assert config.count("localhost:9464") == 1 and config.count("15s") == 2, "update this test with the config"
        (folder / "prometheus.yml").write_text(config.replace("localhost:9464", target).replace("15s", "1s"))
        shutil.copy(DEPLOY / "remoteloss.rules.yml", folder / "remoteloss.rules.yml")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector: [{"metric": {...}, "value": [time, "text"]}, ...]."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if check():
                    return
            except OSError:  # not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus: {what} not seen within {WAIT_S} s:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", metrics_port=free_port(), http_port=0, shutdown_grace_s=0.5)
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def first_mix(server: ServerThread) -> tuple[Counter[tuple[str, str]], list[float]]:
    """The mix, sent once before Prometheus starts, so that its first scrape sees every series."""
    return send_mix(server.target)


@pytest.fixture(scope="module")
def binary() -> str:
    return tools.find("prometheus", HINT)


@pytest.fixture(scope="module")
def prometheus(
    binary: str,
    server: ServerThread,
    first_mix: tuple[Counter[tuple[str, str]], list[float]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    running = Prometheus(binary, tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.metrics_port}")
    try:
        total = sum(first_mix[0].values())
        running.wait_for("the first scrape", lambda: running.scalar("sum(remoteloss_requests_total)") == total)
        yield running
    finally:
        running.stop()


def send_mix(target: str) -> tuple[Counter[tuple[str, str]], list[float]]:
    """A known mix of requests: several losses, some invalid. Returns the count per (loss, code)
    and each request's latency as this client measured it."""
    sent: Counter[tuple[str, str]] = Counter()
    latencies: list[float] = []

    def timed(loss: str, code: str, call: Callable[[], object]) -> None:
        started = time.perf_counter()
        try:
            call()
        except (remoteloss.LossServiceError, grpc.RpcError):
            assert code != "OK"
        else:
            assert code == "OK"
        latencies.append(time.perf_counter() - started)
        sent[loss, code] += 1

    x, y = np.zeros((4, 3), np.float32), np.ones((4, 3), np.float32)
    with remoteloss.Client(target) as client, grpc.insecure_channel(target) as channel:
        stub = loss_pb2_grpc.LossServiceStub(channel)
        for _ in range(4):
            timed("mse_loss", "OK", lambda: client.mse_loss(x, y))
        for _ in range(3):
            timed("cross_entropy", "OK", lambda: client.cross_entropy(x, np.array([0, 1, 2, 0])))
        for _ in range(2):
            timed("huber_loss", "OK", lambda: client.huber_loss(x, y, delta=0.5))
        for _ in range(2):  # class 7 of 3
            timed("cross_entropy", "INVALID_ARGUMENT", lambda: client.cross_entropy(x, np.array([0, 7, 1, 0])))
        timed("none", "INVALID_ARGUMENT", lambda: stub.Compute(pb.ComputeRequest(), timeout=30))
    return sent, latencies


def bucket_bounds(seconds: float) -> tuple[float, float]:
    """The (lower, upper] bounds of the latency bucket that holds ``seconds``."""
    lower = 0.0
    for upper in LATENCY_BUCKETS:
        if seconds <= upper:
            return lower, upper
        lower = upper
    return lower, math.inf


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative bucket counts {upper bound: count}."""
    bounds = sorted(buckets)
    rank = q * buckets[math.inf]
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return previous_bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    raise AssertionError("no +Inf bucket")  # pragma: no cover


@pytest.mark.timeout(60)
def test_prometheus_sees_what_was_sent(
    server: ServerThread, first_mix: tuple[Counter[tuple[str, str]], list[float]], prometheus: Prometheus
) -> None:
    first, first_latencies = first_mix
    second, second_latencies = send_mix(server.target)
    sent, latencies = first + second, first_latencies + second_latencies
    prometheus.wait_for(
        "the second mix", lambda: prometheus.scalar("sum(remoteloss_requests_total)") == sum(sent.values())
    )

    # Counts by loss and code: exactly what was sent.
    counts = {
        (r["metric"]["loss"], r["metric"]["code"]): float(r["value"][1])
        for r in prometheus.query("sum by (loss, code) (remoteloss_requests_total)")
    }
    assert counts == {key: float(n) for key, n in sent.items()}
    assert prometheus.scalar("remoteloss_requests_in_flight") == 0

    # p99 over the whole run, from the scraped cumulative buckets: exactly what the server's own
    # registry gives, and within the bucket bounds of what the client measured.
    scraped = prometheus.scalar("histogram_quantile(0.99, sum by (le) (remoteloss_request_duration_seconds_bucket))")
    registry = server.metrics.registry
    own: dict[float, float] = {}
    for family in registry.collect():
        if family.name == "remoteloss_request_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    own[bound] = own.get(bound, 0.0) + sample.value
    assert scraped is not None and scraped == pytest.approx(histogram_quantile(0.99, own), rel=1e-9)
    assert 0 < scraped <= bucket_bounds(max(latencies))[1]

    # p99 from rate(), as the README writes it: above zero, and no higher than the upper bound of
    # the bucket holding the slowest latency the client measured (each server-side duration is
    # shorter than the client's round trip). With two samples per series, rate()'s extrapolation
    # weighs series unevenly (a bucket that was empty at the first sample is not extrapolated
    # back), so the bound is over both mixes, not the second alone.
    recent = prometheus.scalar(
        "histogram_quantile(0.99, sum by (le) (rate(remoteloss_request_duration_seconds_bucket[1m])))"
    )
    assert recent is not None and 0 < recent <= bucket_bounds(max(latencies))[1]
    by_loss = prometheus.query(
        "histogram_quantile(0.99, sum by (loss, le) (rate(remoteloss_request_duration_seconds_bucket[1m])))"
    )
    assert {r["metric"]["loss"] for r in by_loss} == {loss for loss, _ in sent}

    # The shipped recording rule gives a p99 for each loss too.
    prometheus.wait_for(
        "the recording rule", lambda: len(prometheus.query("remoteloss:request_duration_seconds:p99_5m")) == len(by_loss)
    )
