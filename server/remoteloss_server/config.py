"""``ServerConfig``: every server setting, its default and its validation, in one place."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["FRONTS", "LOG_LEVELS", "ServerConfig", "parse_tenant_weights"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FRONTS = ("auto", "native", "python")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC keeps message limits in a signed 32-bit int
_MAX_MALLOC_THRESHOLD_BYTES = 2**30  # mallopt takes a C int, and the trim threshold is twice this
_MAX_IDLE_S = 2_000_000  # gRPC takes the idle time in milliseconds as a signed 32-bit int
_MAX_REQUEST_TEMPLATES = 4096  # each keeps at most a few KiB of a request (templates.MAX_KEPT_BYTES)
_MAX_BUSY_POLL_US = 100_000  # a window longer than a caller's pause between calls only spends CPU
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a tenant name, as in an API keys file (auth)


@dataclass(frozen=True)
class ServerConfig:
    """Server settings. Each field is also a flag (``--torch-threads``) and an environment
    variable (``REMOTELOSS_TORCH_THREADS``); see ``cli``."""

    host: str = "localhost"  # loopback only; "[::]" (every interface) is for deployments, set explicitly
    port: int = 50051  # 0 picks a free port
    device: str = "auto"  # "auto" (cuda:0 when CUDA is available, else cpu), "cpu", "cuda", "cuda:N"
    torch_threads: int = 1  # torch.set_num_threads: intra-op threads of each CPU computation
    compute_threads: int = 1  # computations run at once, each on its own worker thread
    max_message_bytes: int = 512 * 1024 * 1024  # largest request or response gRPC accepts
    log_level: str = "INFO"
    shutdown_grace_s: float = 10.0  # how long in-flight RPCs may finish after SIGTERM
    workers: int = 1  # server processes sharing the port with SO_REUSEPORT; > 1 needs an explicit port
    metrics_port: int = 9464  # Prometheus /metrics over HTTP (the exporters' customary port); 0 turns it off
    http_port: int = 8000  # the Open Inference Protocol over HTTP/REST (Triton's port), on ``host``; 0 turns it off
    metrics_host: str | None = None  # address for /metrics; None means the gRPC ``host``
    reflection: bool = True  # serve gRPC server reflection (grpc.reflection.v1alpha)
    # What carries the gRPC port's calls: "native" (gRPC's C++ core, which hands the event loop its
    # calls in batches: native_front), "python" (grpc.aio), or "auto": native where it was built,
    # else python.
    front: str = "auto"
    # After the last calls (the native front's, and inferences over HTTP), the event loop polls
    # this long for the next instead of sleeping (busy_poll): back-to-back calls skip a wake-up
    # each, for up to that much CPU after each batch of calls; 0: sleep at once.
    busy_poll_us: int = 250
    # Request sizes whose recent structures the server keeps (templates): a small request (a call's,
    # or a stream item's) whose bytes match one outside its tensors' data skips the parse and
    # checks it passed before (its loss's value checks still run); 0: off.
    request_templates: int = 64
    # glibc malloc: allocations up to this size reuse heap memory instead of fresh mmap pages (and
    # up to twice this stays with the process after a burst); 0 keeps glibc's defaults. See allocator.
    malloc_mmap_threshold_bytes: int = 256 * 1024 * 1024
    batching: bool = True  # compute queued requests of one loss, options and shapes as one batch
    max_batch_size: int = 64  # requests in one batch
    # Tensor elements in one batch (one request may exceed it alone); 0: by device, 2**18 on a CPU
    # (where larger batches fall out of cache and are slower than calls alone), 2**24 on a GPU.
    max_batch_elements: int = 0
    max_batch_delay_s: float = 0.0  # how long a batch may wait for more requests; 0: only what queued meanwhile
    # Fair queueing between the tenants of the API keys: under contention each tenant's share of
    # compute time, as (tenant, weight) pairs; an unlisted tenant weighs 1. Flag/env "alice=3,bob=1".
    tenant_weights: tuple[tuple[str, float], ...] = ()
    # Tensor elements a request may declare, summed over all its tensors and read from their
    # shapes before anything is decoded (a 1-byte dtype packs 2**29 elements in 512 MiB).
    max_request_elements: int = 2**28
    # Requests accepted whose answers have not left yet (queued, computing, or answered and waiting
    # for the caller to read), by count and by bytes (request and answer); past either, a request
    # fails at once with RESOURCE_EXHAUSTED. The same bounds per tenant (API key) and per client
    # connection, so that one caller meets its own bound before it spends everyone's. A holder with
    # nothing in flight is always admitted one request.
    max_in_flight: int = 1024
    max_in_flight_bytes: int = 2 * 1024**3
    max_tenant_in_flight: int = 512
    max_tenant_in_flight_bytes: int = 1024**3
    max_connection_in_flight: int = 512
    max_connection_in_flight_bytes: int = 1024**3
    # Open client connections on each port (gRPC's, and HTTP's): one more is closed at once (HTTP
    # first answers 503), so that leaked or hostile connections cannot take every file descriptor
    # or grow memory without bound; connections already open go on.
    max_connections: int = 4096
    # A gRPC connection without a call for this long is closed (GOAWAY: a client reconnects when it
    # next calls), reclaiming what a client that opens a channel per call and never closes it
    # leaves behind; HTTP's idle keep-alive connections close after 75 s. 0: never.
    connection_idle_s: float = 300.0
    # Tensor elements one request may make the server hold: each tensor it sends and each that its
    # arguments imply (a broadcast, linear_cross_entropy's logits, ctc_loss's alignment table).
    max_elements: int = 2**30
    # Security (README, "Security"); all off by default. API keys: "tenant:key" entries.
    api_keys_file: str | None = None  # a file of API keys; with it (or api_keys) every call needs a key
    api_keys: str | None = field(default=None, repr=False)  # keys themselves (REMOTELOSS_API_KEYS); never logged
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, the port serves TLS only
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA certificates: clients must present a certificate they signed

    def validate(self) -> None:
        """Raise ValueError, with a one-line message naming the setting, if any is invalid."""
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.compute_threads < 1:
            raise ValueError(f"compute_threads must be >= 1, got {self.compute_threads}")
        if not 1 <= self.max_message_bytes <= _MAX_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must be in [1, {_MAX_MESSAGE_BYTES}], got {self.max_message_bytes}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not (math.isfinite(self.shutdown_grace_s) and self.shutdown_grace_s >= 0):
            raise ValueError(f"shutdown_grace_s must be a finite number >= 0, got {self.shutdown_grace_s}")
        if not 0 <= self.malloc_mmap_threshold_bytes <= _MAX_MALLOC_THRESHOLD_BYTES:
            raise ValueError(
                f"malloc_mmap_threshold_bytes must be in [0, {_MAX_MALLOC_THRESHOLD_BYTES}] (0 keeps glibc's "
                f"default), got {self.malloc_mmap_threshold_bytes}"
            )
        for name, most in (("busy_poll_us", _MAX_BUSY_POLL_US), ("request_templates", _MAX_REQUEST_TEMPLATES)):
            if not 0 <= getattr(self, name) <= most:
                raise ValueError(f"{name} must be in [0, {most}] (0: off), got {getattr(self, name)}")
        if self.front not in FRONTS:
            raise ValueError(f"front must be one of {', '.join(FRONTS)}, got {self.front!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.workers > 1 and self.port == 0:
            raise ValueError("workers > 1 needs an explicit port: with port 0 each worker would pick its own")
        for name, served in (("http_port", "HTTP"), ("metrics_port", "/metrics")):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535] (0 turns {served} off), got {getattr(self, name)}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_batch_elements < 0:
            raise ValueError(f"max_batch_elements must be >= 0 (0 picks by device), got {self.max_batch_elements}")
        if not (math.isfinite(self.max_batch_delay_s) and 0 <= self.max_batch_delay_s <= 1):
            raise ValueError(f"max_batch_delay_s must be in [0, 1] seconds, got {self.max_batch_delay_s}")
        if self.max_elements < 1:
            raise ValueError(f"max_elements must be >= 1, got {self.max_elements}")
        for name in (
            "max_request_elements", "max_in_flight", "max_in_flight_bytes", "max_tenant_in_flight",
            "max_tenant_in_flight_bytes", "max_connection_in_flight", "max_connection_in_flight_bytes",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.connection_idle_s <= _MAX_IDLE_S:  # NaN included
            raise ValueError(f"connection_idle_s must be in [0, {_MAX_IDLE_S}] seconds, got {self.connection_idle_s}")
        self._validate_security()
        self._validate_tenant_weights()
        if self.metrics_host == "":
            raise ValueError("metrics_host must not be empty")
        if self.metrics_port and self.metrics_port + self.workers - 1 > 65535:
            raise ValueError(
                f"workers: worker i serves /metrics on metrics_port + i, and {self.metrics_port} + {self.workers - 1} "
                "exceeds 65535"
            )

    def _validate_security(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both to serve TLS, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("api_keys_file", "tls_cert", "tls_key", "tls_client_ca"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty")

    def _validate_tenant_weights(self) -> None:
        seen: set[str] = set()
        for tenant, weight in self.tenant_weights:
            if not _TENANT.fullmatch(tenant):
                raise ValueError(
                    f"tenant_weights: {tenant!r} is not a tenant name (1 to 64 letters, digits or '_.-', "
                    "starting with a letter or digit)"
                )
            if tenant in seen:
                raise ValueError(f"tenant_weights: {tenant} is listed twice")
            seen.add(tenant)
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise ValueError(f"tenant_weights: the weight of {tenant} must be a finite number > 0, got {weight!r}")


def parse_tenant_weights(text: str) -> tuple[tuple[str, float], ...]:
    """``"alice=3,bob=1"`` -> ``(("alice", 3.0), ("bob", 1.0))``; blank entries are skipped.
    Raises ValueError naming the entry; ``ServerConfig.validate`` checks names and values."""
    pairs: list[tuple[str, float]] = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        tenant, sep, weight = entry.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((tenant.strip(), float(weight)))
        except ValueError:
            raise ValueError(f"tenant_weights: {entry!r} is not tenant=weight (e.g. alice=3,bob=1)") from None
    return tuple(pairs)
