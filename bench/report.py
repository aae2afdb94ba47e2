"""``RESULTS.md`` from the suite's results: the machine, the targets with PASS/FAIL, every figure,
the commands, and the hand-written analysis of ``ANALYSIS.md``."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_MIB = 1024 * 1024


def machine() -> dict[str, Any]:
    import google.protobuf
    import grpc
    import numpy
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "libc": libc,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpc": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "numpy": numpy.__version__,
    }


@dataclass(frozen=True)
class Target:
    name: str
    text: str
    limit: float
    at_most: bool  # ratio <= limit passes (else ratio >= limit)
    compute: Callable[[dict[str, Any]], tuple[float, str] | None]  # (ratio, how) or None: not measured

    def check(self, results: dict[str, Any]) -> tuple[str, str, str]:
        try:
            found = self.compute(results)
        except (KeyError, TypeError, ZeroDivisionError):
            found = None
        if found is None or math.isnan(found[0]):
            return "-", "not measured", "NOT MEASURED"
        ratio, how = found
        ok = ratio <= self.limit if self.at_most else ratio >= self.limit
        return f"{ratio:.2f}", how, "PASS" if ok else "FAIL"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _latency_target(kind: str, local: str) -> Callable[[dict[str, Any]], tuple[float, str]]:
    def compute(results: dict[str, Any]) -> tuple[float, str]:
        remote = results["latency"][kind]["remoteloss"]["p50_s"]
        echo = results["latency"][kind]["echo"]["p50_s"]
        torch_s = results["local_torch"][local]["p50_s"]
        return remote / (echo + torch_s), f"{_ms(remote)} / ({_ms(echo)} + {_ms(torch_s)})"

    return compute


def _c64_vs_echo(results: dict[str, Any]) -> tuple[float, str]:
    remote = results["concurrency"]["remoteloss"]["throughput_rps"]
    echo = results["concurrency"]["echo"]["throughput_rps"]
    return remote / echo, f"{remote:.0f} / {echo:.0f} req/s"


def _batching(results: dict[str, Any]) -> tuple[float, str] | None:
    if "remoteloss-no-batching" not in results["concurrency"]:
        return None
    on = results["concurrency"]["remoteloss"]["throughput_rps"]
    off = results["concurrency"]["remoteloss-no-batching"]["throughput_rps"]
    return on / off, f"{on:.0f} / {off:.0f} req/s"


def _stream(results: dict[str, Any]) -> tuple[float, str] | None:
    if not results.get("stream"):
        return None
    stream = results["stream"]["pipelined"]["throughput_rps"]
    unary = results["stream"]["unary"]["throughput_rps"]
    return stream / unary, f"{stream:.0f} / {unary:.0f} req/s"


def _memory(results: dict[str, Any]) -> tuple[float, str]:
    run = results["memory"]["remoteloss-memory"]
    extra = run["peak_rss_bytes"] - run["idle_rss_bytes"]
    return extra / run["in_flight_bytes"], (
        f"({run['peak_rss_bytes'] / _MIB:.0f} - {run['idle_rss_bytes'] / _MIB:.0f} MiB) / "
        f"{run['in_flight_bytes'] / _MIB:.0f} MiB"
    )


TARGETS = (
    Target("small", "Small request (mse_loss, 1,000 float32, forward): remoteloss p50 / (echo p50 + local torch)",
           1.2, True, _latency_target("small", "small")),
    Target("small_grad", "Small request with gradient: remoteloss p50 / (echo p50 + local torch)",
           1.2, True, _latency_target("small_grad", "small_grad")),
    Target("large_grad", "Large (1,000,000 float32 per tensor, forward + gradient): remoteloss p50 / (echo p50 + "
           "local torch)", 1.3, True, _latency_target("large_grad", "large_grad")),
    Target("c64", "64 callers, small, one worker: remoteloss throughput / echo throughput", 0.8, False, _c64_vs_echo),
    Target("batching", "64 callers, small: batching on / off throughput", 1.0, False, _batching),
    Target("stream", "One caller, small: streaming throughput / unary throughput", 2.0, False, _stream),
    Target("memory", "Memory: (peak RSS - idle RSS) / bytes in flight, 16 x 32 MiB requests", 3.0, True, _memory),
)


def render(results: dict[str, Any]) -> tuple[str, bool]:
    """The Markdown report, and whether every measured target passed."""
    lines: list[str] = []
    add = lines.append
    checks = [(target, *target.check(results)) for target in TARGETS]
    m = results["machine"]
    add("# remoteloss performance results\n")
    add("Generated by `python bench/run.py" + (" --quick" if results["quick"] else "") + "`; do not edit by hand "
        "(the analysis comes from `bench/ANALYSIS.md`)." + (" **Quick run: a smoke test, not for the record.**"
                                                            if results["quick"] else "") + "\n")
    add("## Machine\n")
    add(f"- {m['cpus']} CPUs, {m['cpu_model']}; Linux {m['kernel']}; {m['libc']}")
    add(f"- Python {m['python']}, torch {m['torch']}, grpcio {m['grpc']}, protobuf {m['protobuf']}, numpy {m['numpy']}")
    load = results.get("load_average", {})
    load_text = (f" Load average (1 min) before the suite started: {load['start'][0]:.1f}; other work on the "
                 "machine skews every figure, since the suite itself keeps both cores busy." if load else "")
    add(f"- Client and servers share the machine (loopback); the suite took {results['elapsed_s']:.0f} s. "
        f"Medians over {results['plan']['rounds']} interleaved round(s).{load_text}\n")
    add("## Targets\n")
    add("| target | ratio | bound | figures | result |")
    add("|---|---|---|---|---|")
    for target, ratio, how, verdict in checks:
        bound = f"{'≤' if target.at_most else '≥'} {target.limit}"
        add(f"| {target.text} | {ratio} | {bound} | {how} | **{verdict}** |")
    add("")
    _figures(results, add)
    add("## Commands\n")
    add("Servers (each on a free loopback port, `$PORT`):\n")
    add("```sh")
    for name, command in results["servers"].items():
        add(f"{command}  # {name}")
    add("```\n")
    add("Local torch and clients (`$TARGET` is the server's `127.0.0.1:$PORT`):\n")
    add("```sh")
    for entry in results["local_torch"].values():
        add(entry["command"])
    for command in dict.fromkeys(results["commands"]):
        add(command)
    add("```\n")
    analysis = _HERE / "ANALYSIS.md"
    if analysis.exists():
        add(analysis.read_text().rstrip() + "\n")
    passed = all(verdict != "FAIL" for *_, verdict in checks)
    return "\n".join(lines), passed


def _figures(results: dict[str, Any], add: Callable[[str], None]) -> None:
    add("## Figures\n")
    add("One caller (p50 / p90 / p99; medians over rounds):\n")
    add("| request | server | p50 | p90 | p99 | req/s |")
    add("|---|---|---|---|---|---|")
    for kind, label in (("small", "1,000 float32, forward"), ("small_grad", "1,000 float32, + gradient"),
                        ("large_grad", "1,000,000 float32, + gradient")):
        data = results["latency"][kind]
        for name in [key for key in data if key != "request_bytes"]:
            s = data[name]
            add(f"| {label} ({data['request_bytes']:,} B) | {name} | {_ms(s['p50_s'])} | {_ms(s['p90_s'])} | "
                f"{_ms(s['p99_s'])} | {s['throughput_rps']:.0f} |")
    add("\n`floor-inline` and `floor-thread` (`bench/floor_server.py`) are reference points, not products: "
        "grpc.aio parsing the request, decoding two tensors, `F.mse_loss` and encoding the answer, with nothing "
        "else (no validation, metrics or batching), on the event loop or on one worker thread. "
        "`echo-native-front` is the echo's handler on remoteloss's native front (`bench/echo_server.py --front "
        "native`): what the server's transport and front cost a call, the rest of `remoteloss`'s time being its "
        "handler's. `remoteloss-python-front` is remoteloss on grpc.aio's front (`--front python`); `remoteloss` "
        "runs the default, the native front where it was built (README, \"The gRPC front\"). "
        "`remoteloss-no-templates` is remoteloss with `--request-templates 0`: every small request parsed and "
        "checked whole (README, \"Request templates\").")
    local = results["local_torch"]
    add(f"\nLocal torch (1 thread, compute only): forward {_ms(local['small']['p50_s'])}, with gradient "
        f"{_ms(local['small_grad']['p50_s'])} (1,000); {_ms(local['large_grad']['p50_s'])} (1,000,000 with gradient).\n")
    add("64 callers, small requests (forward):\n")
    add("| server | req/s | p50 | p99 |")
    add("|---|---|---|---|")
    concurrency = results["concurrency"]
    for name, s in concurrency.items():
        if name != "workers":
            add(f"| {name} | {s['throughput_rps']:.0f} | {_ms(s['p50_s'])} | {_ms(s['p99_s'])} |")
    if "workers" in concurrency:
        for name, s in concurrency["workers"].items():
            add(f"| {name}, 4 connections | {s['throughput_rps']:.0f} | {_ms(s['p50_s'])} | {_ms(s['p99_s'])} |")
    else:
        add("| --workers 2 | not measured (no --workers flag) | | |")
    if "remoteloss-no-batching" not in concurrency:
        add("| --no-batching | not measured (no batching flag) | | |")
    stream = results.get("stream")
    add("")
    if stream:
        add(f"Streaming, one caller, small requests: {stream['pipelined']['throughput_rps']:.0f} req/s with "
            f"{stream['window']} in flight on one stream (p50 {_ms(stream['pipelined']['p50_s'])}); "
            f"{stream['lockstep']['throughput_rps']:.0f} req/s in lockstep (1 in flight, p50 "
            f"{_ms(stream['lockstep']['p50_s'])}); unary one caller {stream['unary']['throughput_rps']:.0f} req/s.\n")
    else:
        add("Streaming: not measured (no ComputeStream RPC).\n")
    big = results["big"]
    add(f"40 MiB requests (mse_loss, {big['request_bytes'] / _MIB:.0f} MiB in, "
        f"{big['response_bytes'] / _MIB:.0f} MiB gradient out), 2 in flight:\n")
    add("| server | req/s | MiB/s in | p50 |")
    add("|---|---|---|---|")
    for name, s in big.items():
        if isinstance(s, dict):
            add(f"| {name} | {s['throughput_rps']:.2f} | {s['throughput_rps'] * big['request_bytes'] / _MIB:.0f} | "
                f"{_ms(s['p50_s'])} |")
    peak_from = next(iter(results["memory"].values()), {}).get("peak_from", "VmHWM")
    add(f"\nMemory, 16 callers sending 32 MiB requests (forward + gradient) to a fresh server (idle: VmRSS after "
        f"one small request; peak: {peak_from}):\n")
    wait = next(iter(results["memory"].values()), {}).get("quiet_wait_s")
    quiet = f" | RSS {wait:g} s later" if wait else ""
    add(f"| server | idle RSS | peak RSS | bytes in flight | (peak - idle) / in flight | RSS at the end{quiet} |")
    add("|---|---|---|---|---|---|" + ("---|" if wait else ""))
    for name, run in results["memory"].items():
        extra = (run["peak_rss_bytes"] - run["idle_rss_bytes"]) / run["in_flight_bytes"]
        later = f" {run['quiet_rss_bytes'] / _MIB:.0f} MiB |" if wait else ""
        add(f"| {name} | {run['idle_rss_bytes'] / _MIB:.0f} MiB | {run['peak_rss_bytes'] / _MIB:.0f} MiB | "
            f"{run['in_flight_bytes'] / _MIB:.0f} MiB | {extra:.2f} | {run['after_rss_bytes'] / _MIB:.0f} MiB |{later}")
    add("")


def summary(results: dict[str, Any]) -> str:
    """One line per target, for the terminal."""
    out = []
    for target in TARGETS:
        ratio, how, verdict = target.check(results)
        out.append(f"{verdict:12s} {ratio:>6s} ({'<=' if target.at_most else '>='} {target.limit})  {target.name}: {how}")
    return "\n".join(out)
