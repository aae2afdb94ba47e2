"""Start, serve, drain: the gRPC server with LossService, health checking and reflection.

``serve(config)`` runs in the foreground until SIGTERM or SIGINT; ``ServerThread(config)`` runs
the same server on its own event loop in a background thread, for tests and notebooks.
Shutdown, in order: health goes NOT_SERVING, open ComputeStreams stop reading, answer what they
took and end (``LossServicer.drain``), gRPC refuses new RPCs and gives in-flight ones
``shutdown_grace_s`` to finish, the batcher computes what is still queued (refusing new work with
UNAVAILABLE), then the compute threads wind down and /metrics closes. A second
signal while draining takes the signal's default action: an immediate exit. SIGHUP (or
``ServerThread.reload()``) reads the API keys and the TLS certificate files again, without dropping
a call; unusable ones keep the old. Lifecycle events are logged as one
``event=start|ready|reload|draining|stopped key=value ...`` line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from remoteloss_server import __version__, allocator, auth, grpc_front, native_front, oip_grpc, workers
from remoteloss_server.batcher import Batcher
from remoteloss_server.config import ServerConfig
from remoteloss_server.descriptors import ensure_open_files
from remoteloss_server.executor import Executor
from remoteloss_server.intake import Intake
from remoteloss_server.limits import Admission, Budget
from remoteloss_server.metrics import Metrics, MetricsHTTPServer, serve_http
from remoteloss_server.oip_serve import OpenInference
from remoteloss_server.scheduling import SchedulingPolicy
from remoteloss_server.servicer import SERVICE_NAME, LossServicer, add_to_server
from remoteloss_server.status import register_foreign
from remoteloss_server.ready_log import log_ready

__all__ = ["SERVICE_NAME", "ServerThread", "StartupError", "WorkerError", "serve"]

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_RELOAD_SIGNAL = signal.SIGHUP
_OTHER_FILES = 1024  # descriptors beside the connections: libraries, threads' pipes, /metrics, logs
_WILDCARD_HOSTS = frozenset({"[::]", "::", "0.0.0.0", ""})
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]  # the stubs lack asyncio


WorkerError = workers.WorkerError


class StartupError(Exception):
    """The server could not start: an unusable device or an address it cannot bind."""


@dataclass
class _Running:
    server: grpc_front.Server
    health: Any  # grpc_health's asyncio HealthServicer
    pool: ThreadPoolExecutor
    port: int
    metrics: Metrics
    metrics_http: MetricsHTTPServer | None = None
    batcher: Batcher | None = None
    trimmer: asyncio.Task[None] | None = None
    servicer: LossServicer | None = None
    security: auth.Security | None = None
    oip: OpenInference | None = None  # the Open Inference Protocol's front ends

    async def stop(self, grace_s: float) -> None:
        logger.info("event=draining grace_s=%.1f", grace_s)
        if self.trimmer is not None:
            self.trimmer.cancel()
        await self.health.enter_graceful_shutdown()
        if self.servicer is not None:  # open streams answer what they took and end now
            self.servicer.drain()
        if self.oip is not None:
            self.oip.drain()
        await asyncio.gather(self.server.stop(grace_s), *(() if self.oip is None else (self.oip.stop(grace_s),)))
        if self.batcher is not None:
            await self.batcher.close()
        await asyncio.to_thread(self.pool.shutdown, wait=True, cancel_futures=True)
        if self.metrics_http is not None:
            await asyncio.to_thread(self.metrics_http.close)
        logger.info("event=stopped")

    def reload(self) -> bool:
        return self.security.reload() if self.security is not None else True


async def _start(config: ServerConfig, worker: int | None = None) -> _Running:
    """Everything a server runs, started in order; what was started is stopped again (the exit
    stack, last first) when a later step fails, so a failed start leaks no thread, port or task."""
    logger.info("event=start version=%s torch=%s device=%s", __version__, torch.__version__, config.device)
    security = _security(config)
    try:
        executor = Executor(config.device, config.torch_threads)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    async with contextlib.AsyncExitStack() as stack:
        pool = allocator.TrimmablePool(max_workers=config.compute_threads, thread_name_prefix="remoteloss-compute")
        stack.callback(pool.shutdown, wait=False, cancel_futures=True)
        helpers = allocator.TrimmablePool(thread_name_prefix="remoteloss-helper")  # asyncio.to_thread's
        asyncio.get_running_loop().set_default_executor(helpers)  # shut down with the loop
        if grpc_front.kind(config) == "native" and not native_front.available():
            raise StartupError("front native: this installation has no native front (gRPC's C++ library was missing)")
        server = grpc_front.server(config, security.interceptor, security.certificates)
        stack.push_async_callback(server.stop, None)
        metrics = Metrics()
        if executor.device.type == "cuda":
            metrics.watch_gpu_memory(str(executor.device), executor.memory_reserved)
        budgets, policy = admission(config), scheduling_policy(config, executor.device.type)
        arriving = grpc_front.arriving(server)
        batcher = Batcher(
            executor, pool, metrics, policy,
            # No other request in flight or on its way: a batch could only form by waiting.
            alone=lambda: budgets.pending == 1 and not arriving(),
            tenant_weights=dict(config.tenant_weights),
        )
        intake = Intake(policy, max_elements=config.max_elements, max_request_elements=config.max_request_elements,
                        templates=config.request_templates)
        metrics.watch_templates(intake.templates.counts)
        servicer = LossServicer(executor, pool, metrics, worker=worker, intake=intake, batcher=batcher, admission=budgets)
        registry = cast(grpc.aio.Server, server)  # either front registers handlers as grpc.aio does
        add_to_server(servicer, registry)
        oip = OpenInference(registry, metrics, intake, batcher, budgets)
        health_servicer = _add_health_and_reflection(registry, config.reflection)
        port = _bind(server, config, security.certificates)
        metrics_http, metrics_address = _serve_metrics(config, metrics)
        if metrics_http is not None:
            stack.callback(metrics_http.close)
        try:
            http_address = await oip.start_http(config, security)
        except OSError as exc:
            raise StartupError(str(exc)) from None
        stack.push_async_callback(oip.stop, 0.0)
        await batcher.start()
        stack.push_async_callback(batcher.close)
        quiet_trims = allocator.give_back_when_quiet(budgets.take_peak, pools=(pool, helpers))
        trimmer = asyncio.create_task(quiet_trims, name="remoteloss-trim")
        stack.callback(trimmer.cancel)
        await server.start()
        for service in ("", SERVICE_NAME, oip_grpc.SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log_ready(config, port, executor, metrics_address, security, http_address)
        stack.pop_all()  # from here on, _Running.stop stops them, in the drain's order
    return _Running(
        server, health_servicer, pool, port, metrics, metrics_http,
        batcher=batcher, trimmer=trimmer, servicer=servicer, security=security, oip=oip,
    )


def _add_health_and_reflection(registry: grpc.aio.Server, with_reflection: bool) -> Any:
    """gRPC's health service (its servicer returned, for the server's status) and, if asked,
    reflection, for every service of the port."""
    health_servicer = _HealthServicer()
    register_foreign(registry, health_pb2, health.SERVICE_NAME, health_servicer, health_pb2_grpc.HealthServicer)
    if with_reflection:
        names = (SERVICE_NAME, oip_grpc.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        # The asyncio servicer on either front (enable_server_reflection picks by the server's class).
        servicer_class = reflection.aio.ReflectionServicer  # type: ignore[attr-defined]  # the stubs lack asyncio
        register_foreign(
            registry, reflection_pb2, reflection.SERVICE_NAME, servicer_class(names),
            reflection_pb2_grpc.ServerReflectionServicer,
        )
    return health_servicer


def _bind(server: grpc_front.Server, config: ServerConfig, certificates: auth.ServerCertificates | None) -> int:
    address = f"{config.host}:{config.port}"
    try:
        if certificates is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, certificates.credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot bind {address}: {exc}") from None


def _serve_metrics(config: ServerConfig, metrics: Metrics) -> tuple[MetricsHTTPServer | None, str]:
    """/metrics over HTTP when ``metrics_port`` is set, and its address for the ready line."""
    if not config.metrics_port:
        return None, "off"
    host = config.metrics_host or config.host
    address = f"{host}:{config.metrics_port}"
    try:
        http, _ = serve_http(metrics, host, config.metrics_port)
    except OSError as exc:
        raise StartupError(f"cannot bind {address} for /metrics: {exc} (metrics_port=0 turns /metrics off)") from None
    return http, address


def scheduling_policy(config: ServerConfig, device_type: str) -> SchedulingPolicy:
    """The scheduling policy of ``config`` on a device of ``device_type`` ("cpu", "cuda")."""
    return SchedulingPolicy.for_device(
        device_type,
        batching=config.batching,
        max_batch_size=config.max_batch_size,
        max_batch_elements=config.max_batch_elements,
        max_batch_delay_s=config.max_batch_delay_s,
        concurrency=config.compute_threads,
    )


def admission(config: ServerConfig) -> Admission:
    """The in-flight budgets of ``config``: the server's, each tenant's and each connection's."""
    return Admission(
        config.max_in_flight,
        config.max_in_flight_bytes,
        tenant=Budget(config.max_tenant_in_flight, config.max_tenant_in_flight_bytes, "max_tenant_in_flight"),
        connection=Budget(
            config.max_connection_in_flight, config.max_connection_in_flight_bytes, "max_connection_in_flight"
        ),
    )


def _security(config: ServerConfig) -> auth.Security:
    """The API keys (none: open) and TLS credentials (none: plaintext), as SIGHUP reloads them;
    StartupError for unusable ones."""
    try:
        keys = auth.load_keys(config.api_keys_file, config.api_keys)
    except (OSError, ValueError) as exc:  # the messages name the file and entry, never a key
        raise StartupError(f"API keys: {exc}") from None
    certificates = None
    if config.tls_cert is not None and config.tls_key is not None:
        try:
            certificates = auth.ServerCertificates(config.tls_cert, config.tls_key, config.tls_client_ca)
        except (OSError, ValueError) as exc:
            raise StartupError(f"TLS: {exc}") from None
    interceptor = None if keys is None else auth.ApiKeyInterceptor(keys)
    return auth.Security(config.api_keys_file, config.api_keys, interceptor, certificates)


def serve(config: ServerConfig, *, worker: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return. Raises StartupError.

    With ``config.workers > 1`` this process only supervises that many server processes
    (``workers.run``; raises ``WorkerError`` if any fails); ``worker`` is the index of one of them.
    """
    logging.basicConfig(level=config.log_level, format=_LOG_FORMAT)
    if config.workers > 1 and worker is None:
        workers.run(config, _serve_worker)
        return
    # Process-wide, so only here: a ServerThread leaves its host process's allocator alone.
    allocator.configure(config.malloc_mmap_threshold_bytes)
    ensure_open_files(2 * config.max_connections + _OTHER_FILES)  # both ports' connections
    asyncio.run(_serve(config, worker))


def _serve_worker(config: ServerConfig, index: int) -> None:
    """One of ``--workers N`` processes (``workers.Target``): exit status 1 if it cannot start."""
    try:
        serve(config, worker=index)
    except StartupError as exc:
        logger.error("event=startup_failed error=%s", json.dumps(str(exc)))
        sys.exit(1)


async def _serve(config: ServerConfig, worker: int | None = None) -> None:
    running = await _start(config, worker)
    # What start-up made lives as long as the process. Out of the collector's sight, a full
    # collection scans only what requests leave, where it scanned 230,000 objects: about 90 ms of
    # the event loop, every caller's, a few times a minute under load.
    gc.freeze()
    logger.info("event=gc_frozen objects=%d", gc.get_freeze_count())
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        logger.info("event=signal signal=%s", signum.name)
        for s in _SIGNALS:  # a second signal takes the default action
            loop.remove_signal_handler(s)
        stopping.set()

    def on_reload() -> None:
        logger.info("event=signal signal=%s", _RELOAD_SIGNAL.name)
        running.reload()

    for s in _SIGNALS:
        loop.add_signal_handler(s, on_signal, s)
    loop.add_signal_handler(_RELOAD_SIGNAL, on_reload)
    try:
        await stopping.wait()
    finally:
        loop.remove_signal_handler(_RELOAD_SIGNAL)
        await running.stop(config.shutdown_grace_s)


class ServerThread:
    """The server on a private event loop in a daemon thread; a context manager.

    >>> with ServerThread(ServerConfig(port=0)) as server:  # doctest: +SKIP
    ...     channel = grpc.insecure_channel(server.target)
    """

    def __init__(self, config: ServerConfig) -> None:
        config.validate()
        if config.workers != 1:
            raise ValueError(f"workers: a ServerThread is one server in this process, got workers={config.workers}")
        self.config = config
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._port: int | None = None
        self._running: _Running | None = None

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one for ``port=0``)."""
        if self._port is None:
            raise RuntimeError("the server is not running")
        return self._port

    @property
    def metrics(self) -> Metrics:
        """The running server's metrics (also served over HTTP when ``metrics_port`` is set)."""
        if self._running is None:
            raise RuntimeError("the server is not running")
        return self._running.metrics

    @property
    def metrics_port(self) -> int | None:
        """The port of /metrics, or None when ``metrics_port`` is 0."""
        if self._running is None:
            raise RuntimeError("the server is not running")
        http = self._running.metrics_http
        return None if http is None else http.server_address[1]

    @property
    def target(self) -> str:
        """Where a client on this machine reaches the server, e.g. ``"127.0.0.1:50051"``."""
        host = "127.0.0.1" if self.config.host in _WILDCARD_HOSTS else self.config.host
        return f"{host}:{self.port}"

    def reload(self) -> bool:
        """Read the API keys and TLS certificate files again, as SIGHUP does for ``serve``; True
        if every one was replaced (an unusable one keeps the old, and is logged)."""
        loop, running = self._loop, self._running
        if loop is None or running is None or loop.is_closed():
            raise RuntimeError("the server is not running")

        async def reload() -> bool:
            return running.reload()

        return asyncio.run_coroutine_threadsafe(reload(), loop).result(timeout=60)

    def __enter__(self) -> ServerThread:
        if self._thread is not None:
            raise RuntimeError("a ServerThread runs once")
        self._thread = threading.Thread(target=self._run, name="remoteloss-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # handed to the thread waiting in __enter__
            if self._ready.is_set():
                logger.exception("server thread failed")
            else:
                self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        running = await _start(self.config)
        self._port = running.port
        self._running = running
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await running.stop(self.config.shutdown_grace_s)
