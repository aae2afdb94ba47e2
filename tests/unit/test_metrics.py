"""Metrics: names and types on a fresh registry, the GPU memory callback, /metrics over HTTP."""

from __future__ import annotations

import re
import select
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from remoteloss_server.metrics import LATENCY_BUCKETS, Metrics, serve_http

# attribute -> (name as exported: counters gain _total in the text format, type, labels)
METRICS = {
    "request_duration": ("remoteloss_request_duration_seconds", "histogram", ("loss", "code")),
    "requests": ("remoteloss_requests", "counter", ("loss", "code")),
    "protocol_requests": ("remoteloss_protocol_requests", "counter", ("protocol", "loss", "code")),
    "queue_duration": ("remoteloss_queue_duration_seconds", "histogram", ("loss",)),
    "compute_duration": ("remoteloss_compute_duration_seconds", "histogram", ("loss", "device")),
    "batch_requests": ("remoteloss_batch_requests", "histogram", ("loss",)),
    "batch_elements": ("remoteloss_batch_elements", "histogram", ("loss",)),
    "batch_decisions": ("remoteloss_batch_decisions", "counter", ("loss", "decision")),
    "request_bytes": ("remoteloss_request_bytes", "histogram", ("loss",)),
    "response_bytes": ("remoteloss_response_bytes", "histogram", ("loss",)),
    "elements": ("remoteloss_tensor_elements", "counter", ("loss",)),
    "tenant_requests": ("remoteloss_tenant_requests", "counter", ("tenant", "code")),
    "tenant_compute": ("remoteloss_tenant_compute_seconds", "counter", ("tenant",)),
    "in_flight": ("remoteloss_requests_in_flight", "gauge", ()),
    "queue_depth": ("remoteloss_queue_depth", "gauge", ()),
    "gpu_memory": ("remoteloss_gpu_memory_bytes", "gauge", ("device",)),
}
# Registered by a watch_* method, read from their owner at each scrape.
WATCHED = {"templates": ("remoteloss_request_templates", "counter", ("result",))}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_every_metric_is_named_typed_and_labelled(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    assert {family.name: family.type for family in registry.collect()} == {
        name: kind for name, kind, _ in METRICS.values()
    }
    for attribute, (_, _, labels) in METRICS.items():
        assert tuple(getattr(metrics, attribute)._labelnames) == labels


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.requests.labels("mse_loss", "OK").inc()
    assert first.registry.get_sample_value("remoteloss_requests_total", {"loss": "mse_loss", "code": "OK"}) == 1
    assert second.registry.get_sample_value("remoteloss_requests_total", {"loss": "mse_loss", "code": "OK"}) is None


def test_latency_buckets_are_increasing_seconds() -> None:
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    assert LATENCY_BUCKETS[0] < 0.001 and LATENCY_BUCKETS[-1] > 1  # sub-millisecond loopback to slow GPU batches


def test_gpu_memory_is_read_at_each_scrape(registry: CollectorRegistry) -> None:
    held = [1024.0]
    Metrics(registry).watch_gpu_memory("cuda:0", lambda: held[0])
    assert registry.get_sample_value("remoteloss_gpu_memory_bytes", {"device": "cuda:0"}) == 1024
    held[0] = 4096.0
    assert registry.get_sample_value("remoteloss_gpu_memory_bytes", {"device": "cuda:0"}) == 4096


def test_no_gpu_memory_sample_until_a_device_is_watched(registry: CollectorRegistry) -> None:
    Metrics(registry)
    assert registry.get_sample_value("remoteloss_gpu_memory_bytes", {"device": "cuda:0"}) is None


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        sample.name + repr(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_serve_http_on_a_free_port_then_close(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics.requests.labels("mse_loss", "OK").inc(3)
    server, port = serve_http(metrics, "127.0.0.1", 0)
    try:
        assert port > 0
        samples = scrape(port)
        assert samples["remoteloss_requests_total[('code', 'OK'), ('loss', 'mse_loss')]"] == 3
        metrics.in_flight.inc()
        assert scrape(port)["remoteloss_requests_in_flight[]"] == 1  # read at each scrape
    finally:
        server.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_serve_http_accepts_a_bracketed_wildcard(registry: CollectorRegistry) -> None:
    server, port = serve_http(Metrics(registry), "[::]", 0)
    try:
        assert "remoteloss_requests_in_flight[]" in scrape(port)
    finally:
        server.close()


def test_idle_connections_hold_at_most_max_scrapers_threads_and_not_for_long(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 connections that never send a request (a flood, or a slowloris): 16 get a thread, the
    rest are closed at once; the 16 are closed once the scrape timeout (here 3 s) passes, and a
    scrape is served again. Each connection used to hold a thread for as long as it stayed open."""
    from remoteloss_server import metrics as metrics_module

    monkeypatch.setattr(metrics_module._QuietHandler, "timeout", 3.0)
    before = threading.active_count()
    server, port = serve_http(Metrics(registry), "127.0.0.1", 0)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    try:
        deadline = time.monotonic() + 2.5  # within the timeout: the places past the first 16 close at once
        while len(_closed(socks)) < 50 - metrics_module.MAX_SCRAPERS and time.monotonic() < deadline:
            time.sleep(0.02)
        assert threading.active_count() <= before + 1 + metrics_module.MAX_SCRAPERS
        assert len(_closed(socks)) == 50 - metrics_module.MAX_SCRAPERS
        deadline = time.monotonic() + 10
        while len(_closed(socks)) < 50:
            assert time.monotonic() < deadline, "the idle connections were not closed after the scrape timeout"
            time.sleep(0.05)
        assert "remoteloss_requests_in_flight[]" in scrape(port)
    finally:
        for sock in socks:
            sock.close()
        server.close()


def _closed(socks: list[socket.socket]) -> list[socket.socket]:
    """The sockets the server has closed (it sends nothing before closing here), looked at once."""
    def closed(sock: socket.socket) -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:  # reset
            return True

    return [sock for sock in select.select(socks, [], [], 0)[0] if closed(sock)]


def test_serve_http_refuses_a_taken_port(registry: CollectorRegistry) -> None:
    server, port = serve_http(Metrics(registry), "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            serve_http(Metrics(CollectorRegistry()), "127.0.0.1", port)
    finally:
        server.close()


def test_the_readme_lists_every_metric(registry: CollectorRegistry) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(remoteloss_\w+)` \| (\w+) \|([^|]*)\|", readme, flags=re.MULTILINE)
    documented = {name: (kind, tuple(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}
    expected = {}
    for name, kind, labels in (*METRICS.values(), *WATCHED.values()):
        expected[name + "_total" if kind == "counter" else name] = (kind, labels)
    assert documented == expected


def test_template_counts_are_read_at_each_scrape(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    counts = {"hit": 0, "learned": 1}
    metrics.watch_templates(lambda: dict(counts))
    name = WATCHED["templates"][0] + "_total"
    assert registry.get_sample_value(name, {"result": "learned"}) == 1
    assert registry.get_sample_value(name, {"result": "hit"}) == 0
    counts["hit"] = 5
    assert registry.get_sample_value(name, {"result": "hit"}) == 5


def test_buffered_children_reach_every_collection_once(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    duration = metrics.child(metrics.request_duration, "mse_loss", "OK")
    requests = metrics.child(metrics.requests, "mse_loss", "OK")
    in_flight = metrics.child(metrics.in_flight)
    assert metrics.child(metrics.requests, "mse_loss", "OK") is requests  # looked up once
    for seconds in (0.00001, 0.0003, 0.0003, 20.0):
        duration.observe(seconds)
        requests.inc()
    in_flight.inc(2)
    in_flight.dec()
    labels = {"loss": "mse_loss", "code": "OK"}

    def sample(name: str, **extra: str) -> float | None:
        return registry.get_sample_value(name, {**labels, **extra})

    for _ in range(2):  # a second collection adds nothing
        assert sample("remoteloss_requests_total") == 4
        assert sample("remoteloss_request_duration_seconds_count") == 4
        assert sample("remoteloss_request_duration_seconds_sum") == pytest.approx(20.0006)
        assert sample("remoteloss_request_duration_seconds_bucket", le="2.5e-05") == 1
        assert sample("remoteloss_request_duration_seconds_bucket", le="0.0005") == 3
        assert sample("remoteloss_request_duration_seconds_bucket", le="10.0") == 3
        assert registry.get_sample_value("remoteloss_requests_in_flight") == 1
    duration.observe(0.0005)  # on a bound: in its bucket, as prometheus_client counts it
    metrics.in_flight.inc()  # the metric itself still counts at once, beside its buffer
    assert sample("remoteloss_request_duration_seconds_bucket", le="0.00025") == 1
    assert sample("remoteloss_request_duration_seconds_bucket", le="0.0005") == 4
    assert registry.get_sample_value("remoteloss_requests_in_flight") == 2
