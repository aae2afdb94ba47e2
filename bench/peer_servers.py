"""The servers of ``bench/peers.py``: each peer's virtual environment, and one server's process.

Each peer is installed from PyPI into its own virtual environment under ``bench/.peers/``, the CPU
torch of this machine included. A server runs in a session of its own; ``Proc.pids`` finds every
process of it (Ray's and LitServe's workers too), to pause, resume and kill them all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from servers import free_port, process_tree

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".peers"
TORCH = "torch==2.13.0"  # the CPU build that scripts/install.sh takes
VENVS: dict[str, tuple[str, ...]] = {
    "pytriton": (TORCH, "numpy<2", "nvidia-pytriton==0.7.0", "tritonclient[grpc]"),
    "ray": (TORCH, "ray[serve]==2.60.0", "numpy", "requests"),
    "litserve": (TORCH, "litserve==0.2.19", "numpy", "requests"),
}
DISTRIBUTIONS = {"pytriton": ("nvidia-pytriton", "tritonclient", "torch", "numpy"),
                 "ray": ("ray", "torch", "numpy", "requests"),
                 "litserve": ("litserve", "torch", "numpy", "requests"),
                 "remoteloss": ("remoteloss", "remoteloss-server", "torch", "numpy", "grpcio")}


def venv(peer: str, *, install: bool = True) -> Path:
    """The Python of the peer's virtual environment, made and installed on first use."""
    folder = CACHE / peer
    python, stamp = folder / "bin" / "python", folder / ".installed"
    wanted = " ".join(VENVS[peer])
    if install and not (stamp.exists() and stamp.read_text() == wanted):
        CACHE.mkdir(exist_ok=True)
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        log = CACHE / f"{peer}.install.log"
        print(f"installing {peer} into {folder.relative_to(ROOT)} (log: {log.relative_to(ROOT)})", flush=True)
        with open(log, "w") as out:
            done = subprocess.run([str(python), "-m", "pip", "install", "--progress-bar", "off", *VENVS[peer]],
                                  stdout=out, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pip install {wanted} failed; see {log}")
        stamp.write_text(wanted)
    return python


def peer_env(peer: str, python: Path) -> dict[str, str]:
    """PyTriton's Python stub links libpython3.11.so: point it at this interpreter's own."""
    if peer != "pytriton":
        return {}
    libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    return {"LD_LIBRARY_PATH": os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)}


def versions(python: Path | str, names: Sequence[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\nfound = {}\nfor name in sys.argv[1:]:\n"
            "    try: found[name] = m.version(name)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(found))")
    done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=False)
    return dict(json.loads(done.stdout)) if done.returncode == 0 else {}


class Proc:
    """One server: its session, readiness probe, pause/resume and stop."""

    def __init__(self, name: str, peer: str, argv: list[str], address: str, probe: Callable[[], bool],
                 client: str, env: dict[str, str]) -> None:
        self.name, self.peer, self.argv, self.address = name, peer, argv, address
        self.probe, self.client, self.env = probe, client, env
        self.process: subprocess.Popen[bytes] | None = None
        self.log = CACHE / "logs" / f"{name.replace(' ', '-')}.log"

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env={**os.environ, **self.env}, start_new_session=True)
        return self

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                tail = self.log_text().splitlines()[-5:]
                raise RuntimeError(f"exited early: {' / '.join(tail)}")
            try:
                if self.probe():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not ready in {timeout_s:.0f} s; see {self.log}")

    def pids(self) -> list[int]:
        """The processes of its session and their descendants (Ray's and LitServe's workers too)."""
        return [] if self.process is None else process_tree(self.process.pid)

    def signal_all(self, number: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, number)
            except OSError:
                pass

    def stop(self) -> None:
        if self.process is None:
            return
        pids = self.pids()
        self.signal_all(signal.SIGCONT)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for pid in set(pids) | set(self.pids()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.wait()

    @property
    def command(self) -> str:
        words = [self.argv[0] if not self.argv[0].startswith(str(CACHE)) else
                 str(Path(self.argv[0]).relative_to(ROOT)), *self.argv[1:]]
        words = ["python" if w == sys.executable else w for w in words]
        words = [str(Path(w).relative_to(ROOT)) if w.startswith(str(ROOT)) else w for w in words]
        env = " ".join(f"{k}=$({words[0]} -c \"import sysconfig; print(sysconfig.get_config_var('LIBDIR'))\")"
                       for k in self.env)
        return (env + " " if env else "") + " ".join(_port_words(words))


def _port_words(words: list[str]) -> list[str]:
    """Port numbers as ``$PORT``, ``$GRPC_PORT``...: the flag's name."""
    return [f"${words[i - 1].lstrip('-').replace('-', '_').upper()}"
            if i and words[i - 1].startswith("--") and words[i - 1].endswith("port") and w.isdigit() and w != "0"
            else w for i, w in enumerate(words)]


def _http_ok(url: str, body: bytes | None = None, content_type: str = "application/octet-stream") -> bool:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return bool(answer.status == 200)


def _grpc_ready(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def make_server(peer: str, batching: bool, ports: Sequence[int] = (), extra: Sequence[str] = ()) -> Proc:
    """The server's process (not started yet) on the given ports, else free loopback ports: the
    gRPC, HTTP and metrics ports for pytriton, one port for the others."""
    name = f"{peer}{'' if batching else ' --no-batching'}"
    off = [*([] if batching else ["--no-batching"]), *extra]
    port, http, metrics = [*ports, *(free_port() for _ in range(3 - len(ports)))]
    if peer == "remoteloss":
        argv = [sys.executable, "-m", "remoteloss_server", "--host", "127.0.0.1", "--port", str(port),
                "--http-port", "0", "--metrics-port", "0", "--log-level", "WARNING", *off]
        return Proc(name, peer, argv, f"127.0.0.1:{port}", lambda: _grpc_ready(f"127.0.0.1:{port}"),
                    sys.executable, {})
    python = venv(peer, install=False)
    serve = [str(python), str(BENCH / "peer_serve.py"), peer]
    if peer == "pytriton":
        argv = [*serve, "--grpc-port", str(port), "--http-port", str(http), "--metrics-port", str(metrics), *off]
        probe: Callable[[], bool] = lambda: _http_ok(f"http://127.0.0.1:{http}/v2/models/mse_loss/ready")  # noqa: E731
    elif peer == "ray":
        argv = [*serve, "--port", str(port), *off]
        probe = lambda: _http_ok(f"http://127.0.0.1:{port}/", bytes(8))  # noqa: E731
    else:
        argv = [*serve, "--port", str(port), *off]
        body = json.dumps({"input": "AAAAAA==", "target": "AAAAAA=="}).encode()
        probe = lambda: _http_ok(f"http://127.0.0.1:{port}/predict", body, "application/json")  # noqa: E731
    return Proc(name, peer, argv, f"127.0.0.1:{port}", probe, str(python), peer_env(peer, python))
