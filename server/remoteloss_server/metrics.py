"""Every Prometheus metric of the server, created once on a registry passed in.

Only this module imports prometheus_client. Other modules receive the ``Metrics`` object and call
``observe``/``inc``/``set`` on its attributes; label values come from bounded sets (registered
loss names, status code names, device names), never from a request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["BYTES_BUCKETS", "LATENCY_BUCKETS", "Metrics"]

# 25 us .. 10 s, roughly x2.5 apart: a loopback round trip is ~0.5 ms, a large GPU batch seconds.
LATENCY_BUCKETS = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# 64 B .. 1 GiB, x4 apart.
BYTES_BUCKETS = tuple(float(64 * 4**i) for i in range(13))
BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_ELEMENT_BUCKETS = tuple(float(10**i) for i in range(10))


class Metrics:
    """The server's metrics. A fresh ``CollectorRegistry`` per instance unless one is given."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "remoteloss_request_duration_seconds", "Time from receiving a request to answering it.",
            ["loss", "code"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "remoteloss_requests", "Requests answered, by loss and gRPC status code.", ["loss", "code"], registry=r
        )
        self.queue_duration = Histogram(
            "remoteloss_queue_duration_seconds", "Time a request waited before its batch started computing.",
            ["loss"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.compute_duration = Histogram(
            "remoteloss_compute_duration_seconds", "Time one batch spent computing, forward and backward.",
            ["loss", "device"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_requests = Histogram(
            "remoteloss_batch_requests", "Requests computed together in one batch.",
            ["loss"], buckets=BATCH_REQUEST_BUCKETS, registry=r,
        )
        self.batch_elements = Histogram(
            "remoteloss_batch_elements", "Tensor elements computed together in one batch.",
            ["loss"], buckets=BATCH_ELEMENT_BUCKETS, registry=r,
        )
        self.request_bytes = Histogram(
            "remoteloss_request_bytes", "Size of a serialized request.", ["loss"], buckets=BYTES_BUCKETS, registry=r
        )
        self.response_bytes = Histogram(
            "remoteloss_response_bytes", "Size of a serialized response.", ["loss"], buckets=BYTES_BUCKETS, registry=r
        )
        self.elements = Counter(
            "remoteloss_tensor_elements", "Tensor elements received in requests.", ["loss"], registry=r
        )
        self.in_flight = Gauge("remoteloss_requests_in_flight", "Requests received and not yet answered.", registry=r)
        self.queue_depth = Gauge("remoteloss_queue_depth", "Requests waiting for a batch.", registry=r)
        self.gpu_memory = Gauge(
            "remoteloss_gpu_memory_bytes", "GPU memory held by torch's allocator.", ["device"], registry=r
        )
