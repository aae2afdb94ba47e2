"""The performance suite: remoteloss against the transport's and the compute's limits, in one run.

    python bench/run.py            # the full suite, about 4 minutes on 2 cores; writes bench/RESULTS.md
    python bench/run.py --quick    # one round of shorter runs, under a minute; a smoke test

It starts every server as a subprocess on a free loopback port (a bare gRPC echo server and
remoteloss servers in the configurations compared), times local torch in a subprocess, drives
each server with ``remoteloss bench`` (a subprocess; the commands are in the report), stops
every server at the end (also on failure), and writes ``RESULTS.md`` (and ``results.json``):
the machine, the commands, each figure, and the ratio against each target with PASS/FAIL.
Latency comparisons run in interleaved rounds and take the median over rounds, since the
machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import report
import sections
from servers import BENCH_DIR, ROOT, Client, Fleet, Server, server_flags

_MIB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    rounds: int  # interleaved repetitions of the latency and throughput comparisons
    duration_s: float  # per small-request measurement
    warmup_s: float
    large_duration_s: float  # 1,000,000-element requests
    big_duration_s: float  # 40 MiB requests
    memory_requests: int  # 32 MiB requests in the memory test (16 in flight)
    big_warmup_s: float = 1.0
    stream_window: int = 64  # requests one streaming caller keeps in flight: the SDK's Client.stream() default


FULL = Plan(rounds=3, duration_s=1.5, warmup_s=0.3, large_duration_s=2.0, big_duration_s=4.0, memory_requests=48)
QUICK = Plan(rounds=1, duration_s=0.6, warmup_s=0.2, large_duration_s=1.0, big_duration_s=2.0, memory_requests=16,
             big_warmup_s=0.5)
SMALL = "1000"
LARGE = "1000000"
BIG = str(40 * _MIB // 8)  # mse_loss input + target: 40 MiB of float32
MEMORY = str(32 * _MIB // 8)  # 32 MiB per request
MEMORY_IN_FLIGHT = 16
QUIET_WAIT_S = 5.0  # after the memory test: two of the server's looks at whether it is quiet, and their trims


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke test, not for the record")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md", help="the report (default: %(default)s)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write the report again from results.json beside it (after "
                             "editing ANALYSIS.md)")
    args = parser.parse_args()
    if args.render:
        text, passed = report.render(json.loads((args.out.parent / "results.json").read_text()))
        _write(args.out, text)
        return 0 if passed else 1
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    load_start = os.getloadavg()
    flags = server_flags()
    features = {
        "batching": "--no-batching" in flags,
        "stream": _has_stream(),
        "workers": "--workers" in flags,
        "malloc": "--malloc-mmap-threshold-bytes" in flags,
    }
    results: dict[str, Any] = {"plan": plan.__dict__, "quick": args.quick, "features": features,
                               "machine": report.machine()}
    client = Client()
    with tempfile.TemporaryDirectory(prefix="remoteloss-bench-") as folder, Fleet() as fleet:
        logs = Path(folder)
        servers = _servers(features, logs, quick=args.quick)
        _log(f"starting {len(servers)} servers")
        fleet.start(*servers.values())
        results["servers"] = {name: server.command for name, server in servers.items()}
        results["local_torch"] = _local_torch(plan)
        _log("small and large requests, one caller")
        results["latency"] = _latency(client, servers, plan)
        _log("64 callers")
        results["concurrency"] = _concurrency(client, servers, plan, features)
        _log("streaming")
        results["stream"] = _stream(client, servers, plan, features, results["latency"])
        _log("40 MiB requests: torch threads and malloc")
        results["big"] = _big(client, servers, plan, features)
        _log("memory")
        results["memory"] = _memory(client, servers, plan, features)
    results["commands"] = client.commands
    results["elapsed_s"] = time.monotonic() - started
    results["load_average"] = {"start": load_start, "end": os.getloadavg()}
    (args.out.parent / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text, passed = report.render(results)
    _write(args.out, text)
    print(report.summary(results))
    _log(f"wrote {args.out} in {results['elapsed_s']:.0f} s")
    return 0 if passed else 1


def _write(path: Path, text: str) -> None:
    """The report, keeping the sections other benchmarks wrote into the previous one (sections.py)."""
    path.write_text(sections.carry(path.read_text() if path.exists() else "", text))


def _servers(features: dict[str, bool], logs: Path, *, quick: bool) -> dict[str, Server]:
    """Every server of the run. A server's default flags are remoteloss-server's own. A quick run
    leaves out the second torch thread and the memory test with glibc's malloc."""
    default_threshold = _default_malloc_threshold() if features["malloc"] else 0
    echo_flags = ["--malloc-mmap-threshold-bytes", str(default_threshold)] if default_threshold else []
    servers = {
        "echo": Server.echo_server("echo", echo_flags, logs=logs),
        "remoteloss": Server.remoteloss("remoteloss", logs=logs),
        "remoteloss-memory": Server.remoteloss("remoteloss-memory", logs=logs),
    }
    if not quick:  # reference points: the echo on remoteloss's own front; the least a Python gRPC loss server does
        servers["echo-native-front"] = Server.echo_server("echo-native-front", [*echo_flags, "--front", "native"],
                                                          logs=logs)
        servers["floor-inline"] = Server.floor_server("floor-inline", logs=logs)
        servers["floor-thread"] = Server.floor_server("floor-thread", ["--thread"], logs=logs)
        servers["remoteloss-torch2"] = Server.remoteloss("remoteloss-torch2", ["--torch-threads", "2"], logs=logs)
        # The same server on grpc.aio's front, where the default is the native front (when built).
        servers["remoteloss-python-front"] = Server.remoteloss("remoteloss-python-front", ["--front", "python"],
                                                               logs=logs)
        # Every small request parsed and checked whole (README, "Request templates").
        servers["remoteloss-no-templates"] = Server.remoteloss("remoteloss-no-templates",
                                                               ["--request-templates", "0"], logs=logs)
    if features["batching"]:
        servers["remoteloss-no-batching"] = Server.remoteloss("remoteloss-no-batching", ["--no-batching"], logs=logs)
    if features["workers"]:
        servers["remoteloss-2-workers"] = Server.remoteloss("remoteloss-2-workers", ["--workers", "2"], logs=logs)
    if features["malloc"]:
        glibc = ["--malloc-mmap-threshold-bytes", "0"]
        servers["remoteloss-glibc-malloc"] = Server.remoteloss("remoteloss-glibc-malloc", glibc, logs=logs)
        if not quick:
            servers["remoteloss-memory-glibc-malloc"] = Server.remoteloss("remoteloss-memory-glibc-malloc", glibc,
                                                                          logs=logs)
    return servers


def _default_malloc_threshold() -> int:
    from remoteloss_server.config import ServerConfig

    return int(ServerConfig().malloc_mmap_threshold_bytes)


def _has_stream() -> bool:
    from remoteloss.v1 import loss_pb2 as pb

    return "ComputeStream" in pb.DESCRIPTOR.services_by_name["LossService"].methods_by_name


def _local_torch(plan: Plan) -> dict[str, Any]:
    out = {}
    for name, shape, grad in (("small", SMALL, False), ("small_grad", SMALL, True), ("large_grad", LARGE, True)):
        argv = [sys.executable, str(BENCH_DIR / "local_torch.py"), "--shape", shape, "--threads", "1",
                "--duration", str(max(plan.duration_s / 2, 0.3))] + (["--grad"] if grad else [])
        answer = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
        out[name] = json.loads(answer.stdout)
        out[name]["command"] = " ".join(["python", "bench/local_torch.py", *argv[2:]])
    return out


def _latency(client: Client, servers: dict[str, Server], plan: Plan) -> dict[str, Any]:
    """p50 of one caller, echo and remoteloss interleaved, for each request kind."""
    kinds = {"small": (SMALL, False, plan.duration_s), "small_grad": (SMALL, True, plan.duration_s),
             "large_grad": (LARGE, True, plan.large_duration_s)}
    out: dict[str, Any] = {}
    for kind, (shape, grad, duration) in kinds.items():
        names = ["echo", "remoteloss"] + [name for name in ("remoteloss-python-front",) if name in servers]
        if kind == "small":
            names += [name for name in ("remoteloss-no-templates", "echo-native-front", "floor-inline", "floor-thread")
                      if name in servers]
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for _ in range(plan.rounds):
            for name, levels in rounds.items():
                run = client.bench(servers[name], shape=shape, grad=grad, duration_s=duration, warmup_s=plan.warmup_s)
                levels.append(run["level"])
        out[kind] = {name: _summary(levels) for name, levels in rounds.items()}
        out[kind]["request_bytes"] = run["request_bytes"]
    return out


def _concurrency(client: Client, servers: dict[str, Server], plan: Plan, features: dict[str, bool]) -> dict[str, Any]:
    """Throughput with 64 callers: echo, remoteloss (batching on / off), 1 and 2 workers."""
    names = ["echo", "remoteloss"] + (["remoteloss-no-batching"] if features["batching"] else [])
    names += [name for name in ("remoteloss-no-templates", "remoteloss-python-front", "echo-native-front",
                                "floor-inline", "floor-thread") if name in servers]
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    worker_rounds: dict[str, list[dict[str, Any]]] = {"remoteloss": [], "remoteloss-2-workers": []}
    for _ in range(plan.rounds):
        for name in names:
            rounds[name].append(client.bench(servers[name], concurrency=64, duration_s=plan.duration_s,
                                             warmup_s=plan.warmup_s)["level"])
        if features["workers"]:
            for name, levels in worker_rounds.items():  # 4 connections: the kernel spreads them over the workers
                levels.append(client.bench(servers[name], concurrency=64, channels=4, duration_s=plan.duration_s,
                                           warmup_s=plan.warmup_s)["level"])
    out = {name: _summary(levels) for name, levels in rounds.items()}
    if features["workers"]:
        out["workers"] = {name: _summary(levels) for name, levels in worker_rounds.items()}
    return out


def _stream(client: Client, servers: dict[str, Server], plan: Plan, features: dict[str, bool],
            latency: dict[str, Any]) -> dict[str, Any] | None:
    """One streaming caller (``stream_window`` requests in flight on one stream) and one in lockstep."""
    if not features["stream"]:
        return None
    pipelined, lockstep = [], []
    for _ in range(plan.rounds):
        pipelined.append(client.bench(servers["remoteloss"], mode="stream", concurrency=plan.stream_window,
                                      duration_s=plan.duration_s, warmup_s=plan.warmup_s)["level"])
        lockstep.append(client.bench(servers["remoteloss"], mode="stream", concurrency=1,
                                     duration_s=plan.duration_s, warmup_s=plan.warmup_s)["level"])
    return {"window": plan.stream_window, "pipelined": _summary(pipelined), "lockstep": _summary(lockstep),
            "unary": latency["small"]["remoteloss"]}


def _big(client: Client, servers: dict[str, Server], plan: Plan, features: dict[str, bool]) -> dict[str, Any]:
    """40 MiB requests (forward and gradient), 2 in flight: torch threads 1 vs 2, malloc tuned vs glibc's."""
    names = [name for name in ("remoteloss", "remoteloss-torch2", "remoteloss-glibc-malloc") if name in servers]
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(max(1, plan.rounds - 1)):
        for name in names:
            run = client.bench(servers[name], shape=BIG, grad=True, concurrency=2, duration_s=plan.big_duration_s,
                               warmup_s=plan.big_warmup_s)
            rounds[name].append(run["level"])
    out: dict[str, Any] = {name: _summary(levels) for name, levels in rounds.items()}
    out["request_bytes"] = run["request_bytes"]
    out["response_bytes"] = run["response_bytes"]
    return out


def _memory(client: Client, servers: dict[str, Server], plan: Plan, features: dict[str, bool]) -> dict[str, Any]:
    """Peak RSS of a fresh server while 16 callers send 32 MiB requests, against idle RSS."""
    out = {}
    names = [name for name in ("remoteloss-memory", "remoteloss-memory-glibc-malloc") if name in servers]
    for name in names:
        server = servers[name]
        client.bench(server, requests=1, warmup_s=0)  # torch's first computation, before "idle"
        time.sleep(0.5)
        idle = server.memory("VmRSS")
        reset = server.reset_peak()
        sampled = [idle]
        done = threading.Event()

        def sample(server: Server, done: threading.Event, sampled: list[int]) -> None:
            while not done.wait(0.02):
                sampled.append(server.memory("VmRSS"))

        sampler = threading.Thread(target=sample, args=(server, done, sampled), daemon=True)
        sampler.start()
        try:
            # Over 4 connections: one connection's budget (max_connection_in_flight_bytes, 1 GiB)
            # holds fewer than 16 such calls with their answers, and refuses the rest.
            run = client.bench(server, shape=MEMORY, grad=True, concurrency=MEMORY_IN_FLIGHT,
                               requests=plan.memory_requests, warmup_s=0, channels=4)
        finally:
            done.set()
            sampler.join()
        peak = max(server.memory("VmHWM") if reset else 0, max(sampled))
        in_flight = MEMORY_IN_FLIGHT * run["request_bytes"]
        after = server.memory("VmRSS")
        time.sleep(QUIET_WAIT_S)  # the server gives freed memory back once quiet (allocator.give_back_when_quiet)
        out[name] = {"idle_rss_bytes": idle, "peak_rss_bytes": peak, "in_flight_bytes": in_flight,
                     "peak_from": "VmHWM after clear_refs" if reset else "VmRSS sampled every 20 ms",
                     "request_bytes": run["request_bytes"], "response_bytes": run["response_bytes"],
                     "after_rss_bytes": after, "quiet_rss_bytes": server.memory("VmRSS"),
                     "quiet_wait_s": QUIET_WAIT_S, "level": run["level"]}
    return out


def _summary(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of p50, p90, p99 and throughput, and every round's figures."""
    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    return {
        "p50_s": median([level["latency_s"]["p50"] for level in levels]),
        "p90_s": median([level["latency_s"]["p90"] for level in levels]),
        "p99_s": median([level["latency_s"]["p99"] for level in levels]),
        "throughput_rps": median([level["throughput_rps"] for level in levels]),
        "requests": sum(level["requests"] for level in levels),
        "rounds": [{"p50_s": level["latency_s"]["p50"], "throughput_rps": level["throughput_rps"]} for level in levels],
    }


_STARTED = time.monotonic()


def _log(message: str) -> None:
    print(f"[bench {time.monotonic() - _STARTED:5.1f} s] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
