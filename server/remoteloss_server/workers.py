"""``--workers N``: N server processes on one port, as in gRPC's multiprocessing example.

The parent binds nothing. It starts N children with the ``spawn`` method (no forked gRPC or
torch state); each runs the function it is given, ``target(config, i)``, as uvicorn's
supervisors are given theirs: ``app`` gives the ordinary server, with ``grpc.so_reuseport``
on, bound to the same explicit port (this module imports no server), and the kernel spreads incoming
connections over them. Every child has its own compute threads (and batcher); on a GPU they
all share it.

Signals: SIGTERM or SIGINT to the parent is forwarded to every child, which drains exactly as
a single server does; a second one, forwarded too, makes them exit at once. SIGHUP is forwarded
too: each child reloads its API keys and TLS certificate. The children run in
their own process group, so a terminal's Ctrl-C reaches only the parent, which forwards it
once. A child whose parent dies drains and exits. ``run`` returns once every child has exited
and raises ``WorkerError`` if any exited with a non-zero status; a child that dies while the
others serve is logged, and the others keep serving.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from remoteloss_server.config import ServerConfig

__all__ = ["Target", "WorkerError", "run", "worker_config"]

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


# What a worker runs: (its settings, its index) -> None once drained. A module-level function, so
# that a spawned child can import it; it raises SystemExit with a non-zero status if it cannot start.
Target = Callable[[ServerConfig, int], None]


class WorkerError(Exception):
    """A worker process exited with a non-zero status."""


def worker_config(config: ServerConfig, index: int) -> ServerConfig:
    """The settings of worker ``index``: the same, except that its /metrics port (when on) is
    ``metrics_port + index``, since each process has its own metrics."""
    if config.metrics_port == 0:
        return config
    return dataclasses.replace(config, metrics_port=config.metrics_port + index)


def run(config: ServerConfig, target: Target) -> None:
    """Run ``target`` in ``config.workers`` processes until SIGTERM or SIGINT; raise WorkerError if any failed."""
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker, args=(target, worker_config(config, i), i), name=f"worker-{i}")
        for i in range(config.workers)
    ]
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        logger.info("event=signal signal=%s forwarded_to=workers", signal.Signals(signum).name)
        stopping = stopping or signum != signal.SIGHUP  # SIGHUP: each worker reloads keys and certificates
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:  # exited since
                    pass

    previous = {s: signal.signal(s, forward) for s in (*_SIGNALS, signal.SIGHUP)}
    try:
        for process in processes:
            if not stopping:
                process.start()
        started = [p for p in processes if p.pid is not None]
        pids = ",".join(str(p.pid) for p in started)
        logger.info("event=workers_started workers=%d port=%d pids=%s", len(started), config.port, pids)
        alive = {p.sentinel: p for p in started}
        while alive:
            for sentinel in multiprocessing.connection.wait(list(alive)):
                process = alive.pop(int(sentinel))  # type: ignore[arg-type]  # process sentinels are fds
                process.join()
                level = logging.INFO if stopping else logging.ERROR  # a worker that died by itself
                logger.log(
                    level,
                    "event=worker_exited worker=%s pid=%d status=%s expected=%s workers_left=%d",
                    process.name,
                    process.pid,
                    process.exitcode,
                    str(stopping).lower(),
                    len(alive),
                )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    failed = [p for p in processes if p.pid is not None and p.exitcode != 0]
    if failed:
        statuses = ", ".join(f"{p.name} exited with status {p.exitcode}" for p in failed)
        raise WorkerError(f"{len(failed)} of {len(processes)} workers failed: {statuses}")


def _worker(target: Target, config: ServerConfig, index: int) -> None:
    """A child: its own process group, then ``target``. Exit status 0 after a clean drain,
    ``target``'s if it could not start (1), 130 when forced by a second SIGINT."""
    os.setpgrp()
    logging.basicConfig(level=config.log_level, format=_LOG_FORMAT)
    _drain_when_orphaned()
    try:
        target(config, index)
    except KeyboardInterrupt:
        sys.exit(130)


def _drain_when_orphaned() -> None:
    """SIGTERM this process, which drains it, when the parent process ends (even by SIGKILL)."""
    parent = multiprocessing.parent_process()
    if parent is None:  # pragma: no cover - always set in a spawned child
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        logger.warning("event=orphaned action=drain")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="remoteloss-parent-watch", daemon=True).start()
