"""Every Prometheus metric of the server, created once on a registry passed in.

Only this module imports prometheus_client. Other modules receive the ``Metrics`` object and call
``observe``/``inc``/``dec`` on what ``Metrics.child`` gives (several at once: ``answered``,
``batch``; or on its attributes); label values
come from bounded sets (registered loss names, status code names, device names, the tenants of the
configured API keys), never from a request.

What ``child`` gives is kept in plain Python, without prometheus_client's lock per operation, and
added to the metric in bulk whenever the registry is collected (a scrape, ``get_sample_value``):
a scrape after an observation always sees it. Its memory is fixed (a histogram's bucket counts),
however long nobody scrapes. Its updates come from one thread, the event loop's.
"""

from __future__ import annotations

import bisect
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from remoteloss_server.log_sampling import LogSampler

__all__ = [
    "BYTES_BUCKETS", "LATENCY_BUCKETS", "NO_TENANT", "Answered", "Batch", "Metrics", "MetricsHTTPServer", "serve_http",
]

NO_TENANT = "none"  # the tenant label without API keys (every call is one tenant)

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
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.log_sampler = LogSampler()  # the request_failed lines (telemetry.RequestRecord)
        self._children: dict[tuple[Any, ...], Any] = {}  # see child(), answered() and batch()
        self._buffers: list[_Buffered] = []
        self._flushing = threading.Lock()
        r.register(_Flush(self))  # first: collecting the registry flushes before any metric is read
        self.request_duration = Histogram(
            "remoteloss_request_duration_seconds", "Time from receiving a request to answering it.",
            ["loss", "code"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "remoteloss_requests", "Requests answered, by loss and gRPC status code.", ["loss", "code"], registry=r
        )
        self.protocol_requests = Counter(
            "remoteloss_protocol_requests", "Requests answered, by protocol (native, oip_grpc, oip_http), loss and code.",
            ["protocol", "loss", "code"], registry=r,
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
        self.batch_decisions = Counter(
            "remoteloss_batch_decisions", "Whether queued requests of one loss were batched or computed one at a "
            "time (decision batch or alone), decided from their measured costs.", ["loss", "decision"], registry=r,
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
        self.tenant_requests = Counter(
            "remoteloss_tenant_requests", "Requests answered, by the API key's tenant and gRPC status code.",
            ["tenant", "code"], registry=r,
        )
        self.tenant_compute = Counter(
            "remoteloss_tenant_compute_seconds", "Compute time of the batches of each tenant, forward and backward.",
            ["tenant"], registry=r,
        )
        self.in_flight = Gauge("remoteloss_requests_in_flight", "Requests received and not yet answered.", registry=r)
        self.queue_depth = Gauge("remoteloss_queue_depth", "Requests waiting for a batch.", registry=r)
        self.gpu_memory = Gauge(
            "remoteloss_gpu_memory_bytes", "GPU memory held by torch's allocator.", ["device"], registry=r
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)`` (``metric`` itself without labels) as a buffer with its
        ``observe``/``inc``/``dec``, looked up once: prometheus_client's ``labels`` takes a lock and
        builds a key on every call, and each update takes a lock too, a few microseconds per
        observation on a hot path. Use it from the event loop's thread only."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = _Buffered(metric.labels(*labels) if labels else metric)
            self._buffers.append(found)
        return found

    def answered(self, protocol: str, loss: str, code: str) -> Answered:
        """The children an answered request updates, for these labels: ``child`` of each, looked
        up together once per label set (each lookup builds and hashes a tuple, and every request
        makes them all)."""
        key = ("answered", protocol, loss, code)
        lane: Answered | None = self._children.get(key)
        if lane is None:
            lane = self._children[key] = Answered(
                self.child(self.requests, loss, code), self.child(self.protocol_requests, protocol, loss, code),
                self.child(self.request_duration, loss, code),
                lambda: (self.child(self.response_bytes, loss), self.child(self.elements, loss)),
            )
        return lane

    def batch(self, loss: str, device: str) -> Batch:
        """The children a computed batch updates, as ``answered`` gives a request's."""
        key = ("batch", loss, device)
        lane: Batch | None = self._children.get(key)
        if lane is None:
            lane = self._children[key] = Batch(
                self.child(self.queue_duration, loss), self.child(self.batch_requests, loss),
                self.child(self.batch_elements, loss), self.child(self.compute_duration, loss, device),
            )
        return lane

    def flush(self) -> None:
        """Add what the buffers of ``child`` hold to their metrics (collecting the registry does)."""
        with self._flushing:
            for buffer in list(self._buffers):
                buffer.flush()

    def watch_gpu_memory(self, device: str, read: Callable[[], float]) -> None:
        """Export ``read()`` (bytes) as ``gpu_memory{device}``, called at each scrape."""
        self.gpu_memory.labels(device).set_function(read)

    def watch_templates(self, read: Callable[[], dict[str, int]]) -> None:
        """Export ``read()``, counts by result, as ``remoteloss_request_templates_total{result}``,
        read at each scrape: counted where they happen, as plain integers, at no cost per request."""
        self.registry.register(_Counts(
            "remoteloss_request_templates", "Small requests (calls and stream items) decoded from a request template "
            "(result hit), and templates kept (result learned).", "result", read,
        ))


class Answered:
    """``Metrics.answered``: an answered request's children. Those of an answer's size
    (``sized``: response_bytes, elements) are made at the first answer that has one, so that a
    loss whose requests all failed exports no series of them."""

    __slots__ = ("_make_sized", "_sized", "protocol_requests", "request_duration", "requests")

    def __init__(self, requests: Any, protocol_requests: Any, request_duration: Any,
                 make_sized: Callable[[], tuple[Any, Any]]) -> None:
        self.requests = requests
        self.protocol_requests = protocol_requests
        self.request_duration = request_duration
        self._make_sized = make_sized
        self._sized: tuple[Any, Any] | None = None

    def sized(self) -> tuple[Any, Any]:
        """response_bytes and elements."""
        if self._sized is None:
            self._sized = self._make_sized()
        return self._sized


class Batch(NamedTuple):
    """``Metrics.batch``: a computed batch's children."""

    queue_duration: Any
    batch_requests: Any
    batch_elements: Any
    compute_duration: Any


class _Buffered:
    """One metric child's increments (a counter's, a gauge's) or observations (a histogram's: its
    sum and bucket counts), cumulative, in plain Python; ``flush`` adds what is new to the child."""

    __slots__ = ("_applied", "_bounds", "_child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self._child = child
        bounds = getattr(child, "_upper_bounds", None)  # a histogram's, +Inf last
        self._bounds: list[float] | None = None if bounds is None else list(bounds)
        self.total = 0.0  # the increments' sum, or the observations'
        self.counts = [0] * (len(bounds) if bounds is not None else 0)  # observations per bucket
        self._applied = (0.0, [0] * len(self.counts))  # what the child holds already

    def inc(self, amount: float = 1.0) -> None:
        self.total += amount

    def dec(self, amount: float = 1.0) -> None:
        self.total -= amount

    def observe(self, amount: float) -> None:
        assert self._bounds is not None, "observe() is a histogram's"
        self.total += amount
        if amount == amount:  # NaN falls in no bucket, as prometheus_client has it
            self.counts[bisect.bisect_left(self._bounds, amount)] += 1

    def flush(self) -> None:
        total, counts = self.total, list(self.counts)
        applied_total, applied_counts = self._applied
        self._applied = (total, counts)
        if self._bounds is None:
            if total != applied_total:
                self._child.inc(total - applied_total)
            return
        self._child._sum.inc(total - applied_total)
        for bucket, (now, before) in zip(self._child._buckets, zip(counts, applied_counts, strict=True), strict=True):
            if now != before:
                bucket.inc(now - before)


class _Flush:
    """A collector of no metrics that flushes the buffers of ``Metrics.child`` when collected."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self._metrics.flush()
        return ()


class _Counts:
    """A collector of one counter whose values, by one label, ``read`` gives."""

    def __init__(self, name: str, documentation: str, label: str, read: Callable[[], dict[str, int]]) -> None:
        self._name, self._documentation, self._label, self._read = name, documentation, label, read

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, count in self._read().items():
            family.add_metric([value], count)
        return [family]


# A scrape's connection: at most this long to send its request and to take the answer (a
# slowloris is closed then), and at most this many connections at once (one more is closed at
# once). Without them each connection had a thread of its own for as long as it stayed open.
SCRAPE_TIMEOUT_S = 10.0
MAX_SCRAPERS = 16


class _QuietHandler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT_S  # the socket's timeout (socketserver.StreamRequestHandler)

    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass


class MetricsHTTPServer(socketserver.ThreadingMixIn, WSGIServer):
    """The /metrics endpoint on its own daemon thread, a thread per connection up to
    ``MAX_SCRAPERS``; ``close()`` stops it and frees the port."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog (socketserver's default is 5)
    _thread: threading.Thread

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._scrapers = threading.BoundedSemaphore(MAX_SCRAPERS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._scrapers.acquire(blocking=False):  # every place taken: closed, no thread
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._scrapers.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._scrapers.release()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()


def serve_http(metrics: Metrics, host: str, port: int) -> tuple[MetricsHTTPServer, int]:
    """Serve ``metrics`` in Prometheus' text format over HTTP (any path, ``/metrics`` by custom)
    on ``host:port``; returns the running server and the bound port (``port=0`` picks a free one).
    ``host`` may be bracketed (``[::]``). Raises OSError when the address cannot be bound."""
    host = host.removeprefix("[").removesuffix("]")
    try:
        server = _bind(metrics, host, port)
    except OSError:
        if host not in ("::", ""):
            raise
        server = _bind(metrics, "0.0.0.0", port)  # every interface of a host without IPv6
    server._thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="remoteloss-metrics", daemon=True
    )
    server._thread.start()
    return server, server.server_address[1]


def _bind(metrics: Metrics, host: str, port: int) -> MetricsHTTPServer:
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsHTTPServer", (MetricsHTTPServer,), {"address_family": family})
    server: MetricsHTTPServer = make_server(
        host, port, make_wsgi_app(metrics.registry), server_class, handler_class=_QuietHandler
    )
    return server
