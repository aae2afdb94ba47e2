"""Triton's ``perf_analyzer`` against remoteloss and against Triton (PyTriton) serving the same job.

    python bench/perf_analyzer.py            # 3 interleaved rounds, about 7 minutes on 2 cores
    python bench/perf_analyzer.py --quick    # 1 round of short windows: a smoke test

Both servers run on free loopback ports of this machine: ``remoteloss-server`` (gRPC and, with
``--http-port``, REST) and ``python bench/peers.py serve pytriton`` (PyTriton: model ``mse_loss``,
inputs ``input`` and ``target``, FP32 [-1]). For a small (1,000) and a large (1,000,000 float32)
``mse_loss``, perf_analyzer runs the plain command of the protocol, over gRPC, gRPC with
``--streaming`` and HTTP, against one server then the other (the order alternating by round), and
the medians over rounds go into the ``perf-analyzer`` section of ``bench/RESULTS.md`` (the rest of
the report is kept; ``bench/run.py`` keeps this section too). perf_analyzer itself comes from
``scripts/install_perf_analyzer.sh``. Without ``bench/peers.py`` (or with ``--no-triton``) only
remoteloss is measured.

perf_analyzer's measurement: ``--concurrency-range C`` callers, 3 windows of at least N requests
each (``--measurement-mode count_windows``: a window of fixed time on a busy machine may see no
answer at all, which fails the run); ``--stability-percentage 1000`` makes it report those windows
instead of retrying until they agree within 10% (a shared machine never settles).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sections
from servers import BENCH_DIR, ROOT, Server, free_port

SIZES = {"small": 1000, "large": 1_000_000}
MODES = ("grpc", "grpc-streaming", "http")
SECTION = "perf-analyzer"


@dataclass(frozen=True)
class Plan:
    rounds: int
    window: dict[str, int]  # requests per measurement window, by size
    concurrency: dict[str, tuple[int, ...]]  # callers, by size


FULL = Plan(rounds=3, window={"small": 1000, "large": 60}, concurrency={"small": (1, 8), "large": (1,)})
QUICK = Plan(rounds=1, window={"small": 200, "large": 10}, concurrency={"small": (1,), "large": (1,)})


class OipServer(Server):
    """A server speaking the Open Inference Protocol on a gRPC port and an HTTP port; ready when
    ``/v2/models/mse_loss/ready`` answers 200 (Triton is ready before its models are loaded)."""

    def __init__(self, name: str, argv: list[str], *, port: int, http_port: int, logs: Path) -> None:
        super().__init__(name, argv, port=port, kind="oip", logs=logs)
        self.http_port = http_port

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log_path}:\n{self._log_tail()}")
            if http_status(self.http_port, "/v2/models/mse_loss/ready") == 200:
                return
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} was not ready in {timeout_s:.0f} s; see {self.log_path}")

    def address(self, mode: str) -> str:
        return f"127.0.0.1:{self.http_port if mode == 'http' else self.port}"


def http_status(port: int, path: str) -> int:
    """The status of GET ``path`` on 127.0.0.1:``port``; 0 when nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return 0
    finally:
        connection.close()


def remoteloss_server(logs: Path) -> OipServer:
    port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "remoteloss_server", "--host", "127.0.0.1", "--port", str(port),
            "--http-port", str(http_port), "--metrics-port", "0", "--log-level", "WARNING"]
    return OipServer("remoteloss", argv, port=port, http_port=http_port, logs=logs)


def triton_server(logs: Path) -> OipServer:
    port, http_port = free_port(), free_port()
    argv = [sys.executable, str(BENCH_DIR / "peers.py"), "serve", "pytriton", "--grpc-port", str(port),
            "--http-port", str(http_port), "--metrics-port", str(free_port()), "--loss-only"]
    return OipServer("triton", argv, port=port, http_port=http_port, logs=logs)


def install() -> str:
    """The perf_analyzer command (scripts/install_perf_analyzer.sh installs it when missing)."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install_perf_analyzer.sh")], capture_output=True,
                          text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"scripts/install_perf_analyzer.sh failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def command(mode: str, address: str, size: int, concurrency: int, window: int | str) -> list[str]:
    """perf_analyzer's arguments: the plain command of the protocol, then the measurement's flags."""
    words = ["-m", "mse_loss", "-u", address, "-i", "http" if mode == "http" else "grpc",
             "--shape", f"input:{size}", "--shape", f"target:{size}"]
    if mode == "grpc-streaming":
        words.append("--streaming")
    return words + ["--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
                    "--measurement-request-count", str(window), "--stability-percentage", "1000", "--max-trials", "3"]


class Failed(RuntimeError):
    """perf_analyzer failed; ``reason`` is its error line."""

    def __init__(self, arguments: list[str], status: int, output: str) -> None:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower() or "fail" in line.lower() or "restricted" in line]
        self.reason = (errors or lines or [f"exit status {status}"])[-1]
        super().__init__(f"perf_analyzer {' '.join(arguments)} failed ({status}):\n{output[-3000:]}")


def measure(program: str, arguments: list[str], timeout_s: float) -> dict[str, float]:
    """One perf_analyzer run: throughput (req/s) and latencies (seconds) from its CSV report;
    raises Failed."""
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as folder:
        report = Path(folder) / "report.csv"
        done = subprocess.run([program, *arguments, "-f", str(report)], capture_output=True, text=True,
                              check=False, cwd=folder, timeout=timeout_s)
        if done.returncode != 0 or not report.exists():
            raise Failed(arguments, done.returncode, done.stdout + done.stderr)
        rows = list(csv.DictReader(report.read_text().splitlines()))
    row = rows[-1]
    return {
        "throughput_rps": float(row["Inferences/Second"]),
        "p50_s": float(row["p50 latency"]) * 1e-6,
        "p90_s": float(row["p90 latency"]) * 1e-6,
        "p99_s": float(row["p99 latency"]) * 1e-6,
    }


def run(plan: Plan, servers: list[OipServer], program: str) -> dict[str, Any]:
    """Every case against every server, ``plan.rounds`` times; the order of the servers alternates.
    A case that fails against a server is not tried again there; its entry is ``{"failed": reason}``."""
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    failed: dict[str, dict[str, str]] = {}
    timeout_s = 300.0
    # A fresh server's first calls (lazy initialisation) would fall into the first measurement.
    for server in servers:
        for mode in MODES:
            for size in SIZES.values():
                try:
                    measure(program, command(mode, server.address(mode), size, 1, 5), timeout_s)
                except Failed as exc:
                    _log(f"warm-up {mode} {size} {server.name}: {exc.reason}")
    for round_index in range(plan.rounds):
        order = servers if round_index % 2 == 0 else servers[::-1]
        for size_name, size in SIZES.items():
            for mode in MODES:
                for concurrency in plan.concurrency[size_name]:
                    key = f"{size_name}/{mode}/c{concurrency}"
                    for server in order:
                        if server.name in failed.get(key, {}):
                            continue
                        arguments = command(mode, server.address(mode), size, concurrency, plan.window[size_name])
                        try:
                            figures = measure(program, arguments, timeout_s)
                        except Failed as exc:
                            failed.setdefault(key, {})[server.name] = exc.reason
                            _log(f"round {round_index + 1} {key} {server.name}: FAILED {exc.reason}")
                            continue
                        samples.setdefault(key, {}).setdefault(server.name, []).append(figures)
                        _log(f"round {round_index + 1} {key} {server.name}: {figures['throughput_rps']:.0f} req/s, "
                             f"p50 {figures['p50_s'] * 1e3:.3f} ms")
    keys = dict.fromkeys([*samples, *failed])
    return {key: {server.name: {"failed": failed[key][server.name]} if server.name in failed.get(key, {})
                  else _median(samples[key][server.name]) for server in servers} for key in keys}


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {field: statistics.median(run[field] for run in runs) for field in runs[0]}


def render(results: dict[str, Any]) -> str:
    plan, names = results["plan"], results["servers"]
    lines = ["## perf_analyzer: remoteloss and Triton over the Open Inference Protocol\n"]
    add = lines.append
    load = results["load_average"]
    add(f"Written by `python bench/perf_analyzer.py{' --quick' if results['quick'] else ''}` "
        f"({results['date']}, {results['elapsed_s']:.0f} s, load average {load[0]:.1f} before): Triton's "
        f"perf_analyzer ({results['perf_analyzer']}) against each server on this machine's loopback, "
        f"`mse_loss`, medians over {plan['rounds']} interleaved round(s); each run reports 3 windows of "
        f"{plan['window']['small']} (1,000) or {plan['window']['large']} (1,000,000) requests."
        + (" **Quick run: a smoke test, not for the record.**" if results["quick"] else "") + "\n")
    add("perf_analyzer asks for every output a model's config lists: remoteloss's `mse_loss` lists `loss` "
        "only (the gradients are outputs a caller asks for by name), so it computes the loss alone; the PyTriton "
        "model is started with `--loss-only` (`bench/peer_serve.py`: no `grad_input` output), the same job.\n")
    if "triton" not in names:
        add(f"Triton: not measured ({results.get('triton_missing', 'no bench/peers.py')}).\n")
    header = "| request | protocol | callers | " + " | ".join(f"{n} req/s | {n} p50 | {n} p99" for n in names)
    add(header + (" | remoteloss / triton req/s |" if "triton" in names else " |"))
    add("|" + "---|" * (3 + 3 * len(names) + ("triton" in names)))
    reasons: dict[str, int] = {}
    for key, by_server in results["figures"].items():
        size_name, mode, callers = key.split("/")
        cells = [f"{SIZES[size_name]:,} float32", mode, callers.removeprefix("c")]
        for name in names:
            s = by_server[name]
            if "failed" in s:
                note = reasons.setdefault(f"{name}: {s['failed']}", len(reasons) + 1)
                cells += [f"failed ({note})", "", ""]
            else:
                cells += [f"{s['throughput_rps']:.0f}", f"{s['p50_s'] * 1e3:.3f} ms", f"{s['p99_s'] * 1e3:.3f} ms"]
        if "triton" in names:
            both = [by_server[name].get("throughput_rps") for name in ("remoteloss", "triton")]
            cells.append(f"{both[0] / both[1]:.2f}" if all(both) else "-")
        add("| " + " | ".join(cells) + " |")
    if reasons:
        add("\nFailed runs, perf_analyzer's error:\n")
        for reason, note in reasons.items():
            add(f"{note}. {reason}")
    add("\nServers (`$PORT` gRPC, `$HTTP_PORT` REST, free loopback ports):\n")
    add("```sh")
    add("\n".join(results["commands"]["servers"]))
    add("```\n")
    add("perf_analyzer (`$ADDRESS`: `127.0.0.1:$PORT`, or `127.0.0.1:$HTTP_PORT` for `-i http`; "
        "`$(scripts/install_perf_analyzer.sh)` prints its path):\n")
    add("```sh")
    add("\n".join(results["commands"]["perf_analyzer"]))
    add("```")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of short windows: a smoke test")
    parser.add_argument("--no-triton", action="store_true", help="measure remoteloss only")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md", help="the report (default: %(default)s)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    started, load = time.monotonic(), os.getloadavg()
    program = install()
    results: dict[str, Any] = {"plan": plan.__dict__, "quick": args.quick, "load_average": load,
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="remoteloss-perf-analyzer-") as folder:
        servers = [remoteloss_server(Path(folder))]
        if args.no_triton:
            results["triton_missing"] = "--no-triton"
        elif not (BENCH_DIR / "peers.py").exists():
            results["triton_missing"] = "bench/peers.py is missing"
        else:
            servers.append(triton_server(Path(folder)))
        try:
            for server in servers:
                server.start()
            for server in servers:
                server.wait_ready()
            results["figures"] = run(plan, servers, program)
        finally:
            for server in servers:
                server.stop()
    results["servers"] = [server.name for server in servers]
    results["perf_analyzer"] = "the binary of the tritonclient 2.50.0 wheel"
    results["commands"] = {
        "servers": [_server_line(server) for server in servers],
        "perf_analyzer": sorted({"perf_analyzer " + " ".join(command(mode, "$ADDRESS", size, c, plan.window[size_name]))
                                 for size_name, size in SIZES.items() for mode in MODES
                                 for c in plan.concurrency[size_name]}),
    }
    results["elapsed_s"] = time.monotonic() - started
    (args.out.parent / "perf_analyzer.json").write_text(json.dumps(results, indent=2) + "\n")
    sections.write(args.out, SECTION, render(results))
    _log(f"wrote the {SECTION} section of {args.out} in {results['elapsed_s']:.0f} s")
    return 1 if any("failed" in s for by_server in results["figures"].values() for s in by_server.values()) else 0


def _server_line(server: OipServer) -> str:
    line = server.command.replace(str(server.http_port), "$HTTP_PORT")
    return line + f"  # {server.name}"


def _log(message: str) -> None:
    print(f"[perf_analyzer] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
