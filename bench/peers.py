"""remoteloss beside PyTriton, Ray Serve and LitServe on the same job; writes ``bench/PEERS.md``.

    python bench/peers.py [--quick] [--rounds N] [--peers pytriton,ray,litserve]
    python bench/peers.py serve pytriton --grpc-port P --http-port Q [--no-batching]
    python bench/peers.py setup

Run it with the project's virtual environment (it starts remoteloss servers with its Python).
Each peer is installed from PyPI into its own virtual environment under ``bench/.peers/`` (ignored
by git), the CPU torch of this machine included; ``setup`` only installs them. ``serve`` starts
one peer's server alone, in the foreground, until SIGINT or SIGTERM (the server code is in
``peer_serve.py``, the callers in ``peer_load.py``, the report in ``peers_report.py``).

Every process started here runs in a session of its own and is killed at the end, also when the
run fails or is interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                tail = self.log.read_text(errors="replace").splitlines()[-5:]
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
        if self.process is None:
            return []
        parents: dict[int, int] = {}
        found = {self.process.pid}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                parents[int(entry.name)] = int(fields[1])
                if int(fields[3]) == self.process.pid:  # its session
                    found.add(int(entry.name))
        grown = True
        while grown:
            more = {pid for pid, parent in parents.items() if parent in found} - found
            found |= more
            grown = bool(more)
        return sorted(found)

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


def make_server(peer: str, batching: bool) -> Proc:
    """The server's process (not started yet) on free loopback ports."""
    name = f"{peer}{'' if batching else ' --no-batching'}"
    off = [] if batching else ["--no-batching"]
    if peer == "remoteloss":
        port = free_port()
        argv = [sys.executable, "-m", "remoteloss_server", "--host", "127.0.0.1", "--port", str(port),
                "--metrics-port", "0", "--log-level", "WARNING", *off]
        return Proc(name, peer, argv, f"127.0.0.1:{port}", lambda: _grpc_ready(f"127.0.0.1:{port}"),
                    sys.executable, {})
    python = venv(peer, install=False)
    serve = [str(python), str(BENCH / "peer_serve.py"), peer]
    port = free_port()
    if peer == "pytriton":
        http, metrics = free_port(), free_port()
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


def measure(server: Proc, others: Sequence[Proc], client: str, elements: int, callers: int,
            duration_s: float, warmup_s: float) -> dict[str, Any]:
    """One measurement with every other server paused; the callers' JSON figures."""
    for other in others:
        other.signal_all(signal.SIGSTOP)
    try:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "load.json"
            argv = [server.client, str(BENCH / "peer_load.py"), client, server.address, "--elements", str(elements),
                    "--callers", str(callers), "--duration", str(duration_s), "--warmup", str(warmup_s),
                    "--json", str(out)]
            done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False,
                                  timeout=120 + 4 * (duration_s + warmup_s), start_new_session=True)
            if done.returncode != 0 or not out.exists():
                raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1][:300])
            return dict(json.loads(out.read_text()))
    finally:
        for other in others:
            other.signal_all(signal.SIGCONT)


def load_command(client: str, peer: str, workload: Any, duration_s: float, warmup_s: float) -> str:
    python = "python" if client == sys.executable else str(Path(client).relative_to(ROOT))
    address = "$GRPC_ADDRESS" if peer == "pytriton" else "$ADDRESS"
    return (f"{python} bench/peer_load.py {peer.replace(' ', '-')} {address} --elements {workload.elements} "
            f"--callers {workload.callers} --duration {duration_s:g} --warmup {warmup_s:g}")


def rounds(servers: Sequence[Proc], args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Every workload on every server, ``args.rounds`` times, in an order rotated each round."""
    from peers_report import WORKLOADS

    records: list[dict[str, Any]] = []
    commands: set[str] = set()
    for number in range(args.rounds):
        for workload in WORKLOADS:
            # (label, server, client): remoteloss's stream shares the batched server, in B only.
            runs = [(s.name, s, s.peer) for s in servers]
            if workload.key == "B" and servers and servers[0].name == "remoteloss":
                runs.insert(1, ("remoteloss stream", servers[0], "remoteloss-stream"))
            shift = number % len(runs)
            for label, server, client in runs[shift:] + runs[:shift]:
                record: dict[str, Any] = {"round": number, "workload": workload.key, "server": label}
                commands.add(load_command(server.client, client, workload, args.duration, args.warmup))
                try:
                    record.update(measure(server, [s for s in servers if s is not server], client,
                                          workload.elements, workload.callers, args.duration, args.warmup))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    record["error"] = str(exc)
                records.append(record)
                shown = record.get(workload.metric, record.get("error"))
                print(f"round {number + 1} {workload.key} {label}: {shown}", flush=True)
    return records, sorted(commands)


def machine() -> dict[str, Any]:
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "")
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": memory, "kernel": platform.release(),
            "python": platform.python_version(), "load": load}


def start_all(peers: Sequence[str], servers: list[Proc]) -> dict[str, str]:
    """remoteloss and each peer, batching on and off, into ``servers`` as they start (so that the
    caller can stop them whatever happens); those that fail to install or start are left out."""
    failed: dict[str, str] = {}
    for peer in ["remoteloss", *peers]:
        try:
            if peer != "remoteloss":
                venv(peer)
            pair = [make_server(peer, True), make_server(peer, False)]
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            failed[peer] = str(exc)
            continue
        for server in pair:
            servers.append(server)
            server.start()
            try:
                server.wait_ready(240)
            except RuntimeError as exc:
                failed[server.name] = str(exc)
                servers.remove(server)
                server.stop()
        print(f"started {peer}", flush=True)
    return failed


def run(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(BENCH))
    from peers_report import render

    started = datetime.datetime.now(datetime.timezone.utc)
    meta: dict[str, Any] = {"machine": machine(), "quick": args.quick, "rounds": args.rounds,
                            "duration_s": args.duration, "warmup_s": args.warmup,
                            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
                            "command": "python bench/peers.py " + " ".join(args.argv)}
    servers: list[Proc] = []
    try:
        failed = start_all(args.peers, servers)
        records, load_commands = rounds(servers, args)
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):  # a second signal does not cut the cleanup short
            signal.signal(number, signal.SIG_IGN)
        for server in servers:
            server.stop()
    meta["versions"] = {"remoteloss": versions(sys.executable, DISTRIBUTIONS["remoteloss"])}
    for peer in args.peers:
        if peer not in failed:
            meta["versions"][peer] = versions(venv(peer, install=False), DISTRIBUTIONS[peer])
    commands = ["# servers (each on free loopback ports)", *[s.command for s in servers],
                "# callers, per workload, with the Python that has the server's client", *load_commands]
    names = [s.name for s in servers]
    if "remoteloss" in names:
        names.insert(names.index("remoteloss") + 1, "remoteloss stream")
    CACHE.mkdir(exist_ok=True)
    (CACHE / "peers.json").write_text(json.dumps({"meta": meta, "records": records, "failed": failed}, indent=1))
    args.out.write_text(render(meta, records, names, commands, failed))
    took = datetime.datetime.now(datetime.timezone.utc) - started
    print(f"wrote {args.out} in {took.total_seconds() / 60:.1f} min", flush=True)


def serve(args: argparse.Namespace) -> None:
    """One peer's server in the foreground; SIGINT or SIGTERM stops it and everything it started."""
    python = venv(args.peer)
    argv = [str(python), str(BENCH / "peer_serve.py"), args.peer, "--port", str(args.port),
            "--grpc-port", str(args.grpc_port), "--http-port", str(args.http_port),
            "--metrics-port", str(args.metrics_port), *([] if args.batching else ["--no-batching"])]
    server = Proc(args.peer, args.peer, argv, "", lambda: True, str(python), peer_env(args.peer, python))
    server.log = Path(os.devnull)
    server.process = subprocess.Popen(argv, env={**os.environ, **server.env}, start_new_session=True)
    try:
        server.process.wait()
    finally:
        server.stop()


def _stop_on_sigterm() -> None:
    def handler(number: int, frame: Any) -> None:
        raise KeyboardInterrupt  # the finally blocks stop every server

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="action")
    one = commands.add_parser("serve", help="start one peer's server alone, until SIGINT or SIGTERM")
    one.add_argument("peer", choices=tuple(VENVS))
    one.add_argument("--port", type=int, default=8000, help="HTTP port (ray, litserve)")
    one.add_argument("--grpc-port", type=int, default=8001, help="Triton's gRPC port (pytriton)")
    one.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP port (pytriton)")
    one.add_argument("--metrics-port", type=int, default=8002, help="Triton's metrics port (pytriton)")
    one.add_argument("--no-batching", dest="batching", action="store_false")
    setup = commands.add_parser("setup", help="only install the peers' virtual environments")
    setup.add_argument("--peers", default=",".join(VENVS), help="comma-separated, of: " + ", ".join(VENVS))
    parser.add_argument("--quick", action="store_true", help="short rounds: a smoke run (about 5 minutes)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 2)")
    parser.add_argument("--duration", type=float, help="seconds recorded per measurement (default 5; --quick 1)")
    parser.add_argument("--warmup", type=float, help="seconds before recording (default 1; --quick 0.3)")
    parser.add_argument("--peers", default=",".join(VENVS), help="comma-separated, of: " + ", ".join(VENVS))
    parser.add_argument("--out", type=Path, default=BENCH / "PEERS.md")
    args = parser.parse_args(argv)
    args.argv = argv
    _stop_on_sigterm()
    if args.action == "serve":
        serve(args)
        return
    args.peers = [p for p in args.peers.split(",") if p]
    if unknown := set(args.peers) - set(VENVS):
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    if args.action == "setup":
        for peer in args.peers:
            venv(peer)
        return
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.duration = args.duration or (1.0 if args.quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0)
    run(args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
