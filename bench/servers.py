"""Servers as subprocesses on free loopback ports, their readiness, memory, and the bench client.

Every process this module starts runs in its own session (process group) and is stopped by
``Server.stop`` (SIGTERM, then SIGKILL of that group); ``Fleet`` stops all of its servers on exit,
also when a measurement fails.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
_HEALTH = "/grpc.health.v1.Health/Check"
_COMPUTE = "/remoteloss.v1.LossService/Compute"


def native_echo_binary() -> Path | None:
    """``native_echo.cc`` built into ``bench/.native/echo`` (again when the source is newer); None
    where gRPC's C++ library is missing (Debian: ``apt-get install libgrpc++-dev``) or the build fails."""
    source, binary = BENCH_DIR / "native_echo.cc", BENCH_DIR / ".native" / "echo"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True, check=False)
    if flags.returncode != 0:
        return None
    binary.parent.mkdir(exist_ok=True)
    built = subprocess.run(["c++", "-O2", "-o", str(binary), str(source), *flags.stdout.split()],
                           capture_output=True, text=True, check=False)
    return binary if built.returncode == 0 else None


def process_tree(root: int) -> list[int]:
    """``root``, the processes of its session (it leads one when started with
    ``start_new_session``; servers that daemonize workers leave them there) and their descendants."""
    parents: dict[int, int] = {}
    found = {root}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(entry.name)] = int(fields[1])
            if int(fields[3]) == root:  # its session
                found.add(int(entry.name))
    grown = True
    while grown:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grown = bool(more)
    return sorted(found)


def self_signed(folder: Path) -> tuple[Path, Path] | None:
    """A certificate for 127.0.0.1 and its key, made by ``openssl`` in ``folder`` (the
    certificate is its own CA: a client trusts it with ``--tls-ca``); None without openssl."""
    cert, key = folder / "server.pem", folder / "server.key"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return cert, key


# Ports to hand out, below Linux's default ephemeral range (32768-60999): a port the kernel picked
# for us (bind to 0) comes from that range, where every client connection of the run takes its
# local port too, so one could take it between the probe and the server's bind (it happened:
# EADDRINUSE in a CI run). Here only listeners can collide: the probe rules out those already
# listening, and ``_HANDED`` the ports this process gave to servers not yet started (a fleet takes
# all its ports before its servers bind, so two could draw the same). The tests take their
# ports from here too (tests/integration/deploy_files.py).
_PORTS = range(20000, 32768)
_HANDED: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, outside the ephemeral range, and that
    this process has not handed out before."""
    for port in random.sample(_PORTS, 200):
        if port in _HANDED:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED.add(port)
        return port
    raise OSError("no free port in 20000-32767")  # pragma: no cover


def server_flags() -> str:
    """``remoteloss-server --help``: which flags this version has."""
    return subprocess.run([sys.executable, "-m", "remoteloss_server", "--help"], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout


class Server:
    """One server process (a remoteloss server or the echo server) on a free port."""

    def __init__(self, name: str, argv: Sequence[str], *, port: int, kind: str = "remoteloss", workers: int = 1,
                 env: dict[str, str] | None = None, logs: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.kind = kind  # "remoteloss", "echo" or "floor"
        self.echo = kind == "echo"
        self.workers = workers
        self.env = dict(env or {})
        self.tls_ca: Path | None = None  # a TLS server's certificate (or CA) for its clients; None: plaintext
        self.log_path = logs / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def remoteloss(cls, name: str, flags: Sequence[str] = (), *, env: dict[str, str] | None = None,
                   logs: Path) -> Server:
        port = free_port()
        argv = [sys.executable, "-m", "remoteloss_server", "--host", "127.0.0.1", "--port", str(port),
                "--http-port", "0", "--metrics-port", "0", "--log-level", "WARNING", *flags]
        workers = int(flags[list(flags).index("--workers") + 1]) if "--workers" in flags else 1
        return cls(name, argv, port=port, workers=workers, env=env, logs=logs)

    @classmethod
    def echo_server(cls, name: str, flags: Sequence[str] = (), *, logs: Path) -> Server:
        port = free_port()
        argv = [sys.executable, str(BENCH_DIR / "echo_server.py"), "--port", str(port), *flags]
        return cls(name, argv, port=port, kind="echo", logs=logs)

    @classmethod
    def native_echo(cls, name: str, binary: Path, *, logs: Path) -> Server:
        """The C++ echo (``native_echo_binary``): the transport's cost without Python."""
        port = free_port()
        return cls(name, [str(binary), str(port)], port=port, kind="echo", logs=logs)

    @classmethod
    def floor_server(cls, name: str, flags: Sequence[str] = (), *, logs: Path) -> Server:
        port = free_port()
        argv = [sys.executable, str(BENCH_DIR / "floor_server.py"), "--port", str(port), *flags]
        return cls(name, argv, port=port, kind="floor", logs=logs)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def command(self) -> str:
        """The command line, as a person would type it (the port as $PORT)."""
        words = ["python" if word == sys.executable else word for word in self.argv]
        words = ["$PORT" if word == str(self.port) else word for word in words]
        words = [str(Path(word).relative_to(ROOT)) if word.startswith(str(ROOT)) else word for word in words]
        prefix = " ".join(f"{key}={value}" for key, value in self.env.items())
        return (prefix + " " if prefix else "") + " ".join(words)

    def start(self) -> Server:
        environment = {**os.environ, **self.env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env=environment, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until the server answers (every worker, for ``--workers N``); raises RuntimeError."""
        deadline = time.monotonic() + timeout_s
        seen: set[str] = set()
        answers = 0
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log_path}:\n{self._log_tail()}")
            try:
                seen.add(self._probe())
                answers += 1
            except grpc.RpcError:
                time.sleep(0.2)
                continue
            # Each fresh connection lands on some worker; without worker metadata, many answers suffice.
            if len(seen - {""}) >= self.workers or (self.workers == 1 or answers >= 20 * self.workers):
                return
        raise RuntimeError(f"{self.name} did not become ready in {timeout_s:.0f} s; see {self.log_path}")

    def _probe(self) -> str:
        """One call on a fresh connection; returns which worker answered ("" when one process)."""
        options = [("grpc.use_local_subchannel_pool", 1)]
        secure = None if self.tls_ca is None else grpc.ssl_channel_credentials(self.tls_ca.read_bytes())
        with (grpc.insecure_channel(self.target, options=options) if secure is None
              else grpc.secure_channel(self.target, secure, options=options)) as channel:
            if self.echo:
                if channel.unary_unary(_COMPUTE)(b"ping", timeout=2.0) != b"ping":
                    raise RuntimeError(f"{self.name}: the echo server did not echo")
                return ""
            if self.kind == "floor":  # no health service; an empty request fails, but it answers
                try:
                    channel.unary_unary(_COMPUTE)(b"", timeout=2.0)
                except grpc.RpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                return ""
            from grpc_health.v1 import health_pb2

            check = channel.unary_unary(_HEALTH, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                        response_deserializer=health_pb2.HealthCheckResponse.FromString)
            response, call = check.with_call(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                raise grpc.RpcError()
            if self.workers == 1:
                return ""
            # Compute answers carry the worker's index; an empty request is INVALID_ARGUMENT.
            try:
                _, call = channel.unary_unary(_COMPUTE).with_call(b"", timeout=2.0)
            except grpc.RpcError as exc:
                call = exc  # type: ignore[assignment]
            metadata = dict(call.trailing_metadata() or ())  # type: ignore[union-attr]
            return str(metadata.get("remoteloss-worker", ""))

    def pids(self) -> list[int]:
        """The server process and its descendants (the workers of ``--workers N``)."""
        return [] if self.process is None else process_tree(self.process.pid)

    def memory(self, field: str = "VmRSS") -> int:
        """``VmRSS`` (now) or ``VmHWM`` (peak) in bytes, summed over the server's processes."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field + ":"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total

    def reset_peak(self) -> bool:
        """Reset ``VmHWM`` to the current RSS (``/proc/PID/clear_refs``); False where not allowed."""
        try:
            for pid in self.pids():
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group this module created for it
            self.process.wait()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""


class Fleet:
    """Servers started together (they boot in parallel) and all stopped on exit."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def start(self, *servers: Server) -> None:
        for server in servers:
            self.servers.append(server.start())
        for server in servers:
            server.wait_ready()

    def stop(self, *servers: Server) -> None:
        for server in servers:
            server.stop()

    def __enter__(self) -> Fleet:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for server in self.servers:
            server.stop()


class Client:
    """Runs ``remoteloss bench`` in a subprocess and keeps every command it ran."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def bench(self, server: Server, *, concurrency: int | str = 1, duration_s: float | None = None,
              requests: int | None = None, warmup_s: float = 0.3, loss: str = "mse_loss", shape: str = "1000",
              grad: bool = False, mode: str = "unary", streams: int = 1, channels: int = 1) -> dict[str, Any]:
        """One ``remoteloss bench`` run; its JSON report (the last level is ``report["level"]``)."""
        options = ["--loss", loss, "--shape", shape, "--concurrency", str(concurrency), "--warmup", str(warmup_s),
                   "--mode", mode, "--channels", str(channels)]
        options += ["--duration", str(duration_s)] if requests is None else ["--requests", str(requests)]
        if grad:
            options.append("--grad")
        if mode == "stream":
            options += ["--streams", str(streams)]
        if server.echo:
            options.append("--raw-response")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "bench.json"
            tls = [] if server.tls_ca is None else ["--tls-ca", str(server.tls_ca)]
            argv = [sys.executable, "-m", "remoteloss.cli", "--target", server.target, "--timeout", "300",
                    *tls, "bench", *options, "--quiet", "--json", str(path)]
            self.commands.append(f"remoteloss --target $TARGET --timeout 300 {'--tls-ca $CERT ' if tls else ''}"
                                 f"bench {' '.join(options)}  # against {server.name}")
            finished = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=900, check=False)
            if not path.exists():
                raise RuntimeError(f"bench against {server.name} failed ({finished.returncode}):\n"
                                   f"{finished.stderr[-2000:]}")
            report: dict[str, Any] = json.loads(path.read_text())
        if finished.returncode != 0 or report.get("failed"):
            raise RuntimeError(f"bench against {server.name}: {report.get('error') or finished.stderr[-2000:]}")
        report["level"] = report["levels"][-1]
        return report
