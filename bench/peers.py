"""remoteloss beside PyTriton, Ray Serve and LitServe on the same job; writes ``bench/PEERS.md``.

    python bench/peers.py [--quick] [--rounds N] [--peers pytriton,ray,litserve]
    python bench/peers.py serve pytriton --grpc-port P --http-port Q [--no-batching]
    python bench/peers.py setup
    python bench/peers.py report

Run it with the project's virtual environment (it starts remoteloss servers with its Python).
Each peer is installed from PyPI into its own virtual environment under ``bench/.peers/`` (ignored
by git), the CPU torch of this machine included; ``setup`` only installs them. ``serve`` starts
one peer's server alone, in the foreground, until SIGINT or SIGTERM; ``report`` writes PEERS.md
again from the last run's figures (``bench/.peers/peers.json``). The servers' processes are in
``peer_servers.py``, their code in ``peer_serve.py``, the callers in ``peer_load.py``, the report
in ``peers_report.py``.

Every process started here runs in a session of its own and is killed at the end, also when the
run fails or is interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import report as bench_report  # noqa: E402
from peer_servers import CACHE, DISTRIBUTIONS, VENVS, Proc, make_server, venv, versions  # noqa: E402


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
    """``report.machine()`` (the CPUs, the kernel, the versions), its memory and its load now."""
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {**bench_report.machine(), "memory_gib": memory, "load": load}


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
    from peers_report import render

    started = datetime.datetime.now(datetime.timezone.utc)
    meta: dict[str, Any] = {"machine": machine(), "quick": args.quick, "rounds": args.rounds,
                            "duration_s": args.duration, "warmup_s": args.warmup,
                            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
                            "command": " ".join(["python bench/peers.py", *args.argv])}
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
    for server in servers:  # the Triton that PyTriton bundles says its version in its log
        if server.peer == "pytriton" and (found := re.search(r"server_version\W+([\w.]+)", server.log_text())):
            meta["versions"]["pytriton"]["bundled tritonserver"] = found.group(1)
    commands = ["# servers (each on free loopback ports)", *[s.command for s in servers],
                "# callers, per workload, with the Python that has the server's client", *load_commands]
    names = [s.name for s in servers]
    if "remoteloss" in names:
        names.insert(names.index("remoteloss") + 1, "remoteloss stream")
    meta["took_min"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    CACHE.mkdir(exist_ok=True)
    (CACHE / "peers.json").write_text(json.dumps({"meta": meta, "records": records, "failed": failed,
                                                  "servers": names, "commands": commands}, indent=1))
    args.out.write_text(render(meta, records, names, commands, failed))
    print(f"wrote {args.out} in {meta['took_min']:.1f} min", flush=True)


def report(out: Path) -> None:
    """PEERS.md again from the last run's figures (``bench/.peers/peers.json``)."""
    from peers_report import render

    data = json.loads((CACHE / "peers.json").read_text())
    out.write_text(render(data["meta"], data["records"], data["servers"], data["commands"], data["failed"]))


def serve(args: argparse.Namespace) -> None:
    """One peer's server in the foreground (its log in ``bench/.peers/logs/``); says when it is
    ready; SIGINT or SIGTERM stops it and everything it started."""
    venv(args.peer)
    ports = [args.grpc_port, args.http_port, args.metrics_port] if args.peer == "pytriton" else [args.port]
    server = make_server(args.peer, args.batching, ports, ['--loss-only'] if args.loss_only else [])
    server.log = CACHE / "logs" / f"serve-{args.peer}-{ports[0]}.log"
    server.start()
    try:
        server.wait_ready(600)
        where = f"gRPC 127.0.0.1:{args.grpc_port}, HTTP 127.0.0.1:{args.http_port}" if args.peer == "pytriton" \
            else f"HTTP 127.0.0.1:{args.port}"
        print(f"ready: {server.name} serving mse_loss on {where} (log: {server.log.relative_to(ROOT)}); "
              "stop with Ctrl-C or SIGTERM", flush=True)
        assert server.process is not None
        server.process.wait()
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        server.stop()


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT (also where a shell started this in the background, ignoring SIGINT) end
    the run through the finally blocks that stop every server."""
    def handler(number: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, handler)


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
    one.add_argument("--loss-only", action="store_true", help="pytriton: the loss alone, as perf_analyzer asks remoteloss")
    again = commands.add_parser("report", help="write PEERS.md again from the last run's figures")
    again.add_argument("--out", type=Path, default=BENCH / "PEERS.md")
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
    _stop_on_signals()
    if args.action == "serve":
        serve(args)
        return
    if args.action == "report":
        report(args.out)
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
