"""Batching on / off: throughput ratios at 1, 4, 16 and 64 callers, small and large requests.

    python bench/batching.py                 # 3 interleaved rounds; about 5 minutes on 2 cores
    python bench/batching.py --rounds 1 --duration 0.5   # a smoke test
    python bench/batching.py --json out.json

Two servers run side by side as subprocesses (the default, and ``--no-batching``); each round
drives both with ``remoteloss bench`` (float32 mse_loss and the gradient of its input) at each
number of callers and size, one after the other, so that the machine's noise falls on both
alike. The ratio of a cell is the median over rounds of that round's on / off throughput (the
target: at least 1.0 everywhere on a CPU). A third server, a second ``--no-batching`` one, is
measured in the same rounds as a control: its ratio to the first (A/A) is what this machine's
noise alone makes of two identical servers, the band in which an on / off ratio says nothing;
"on/both" sets the batching server against the mean of the two without, which halves the weight
of one process's bias. Each measurement also reads the server's own CPU time
(as bench/server_cpu.py does), printed per request: on a shared machine it is steadier than the
throughput. The batching server's decisions (``remoteloss_batch_decisions_total``) are printed at
the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from server_cpu import _cpu_seconds
from servers import Client, Fleet, Server, free_port

CALLERS = (1, 4, 16, 64)
SIZES = {"small": "1000", "large": "1000000"}


def _decisions(metrics_port: int) -> dict[str, float]:
    """The batching server's decision counters, by ``loss/decision``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("remoteloss_batch_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.removeprefix("remoteloss_batch_decisions_total")] = float(value)
    return found


def measure(rounds: int, duration_s: float, large_duration_s: float, warmup_s: float, logs: Path,
            callers: tuple[int, ...] = CALLERS, sizes: tuple[str, ...] = tuple(SIZES)) -> dict[str, Any]:
    """Every cell, ``rounds`` times, each server in turn; the figures by cell and server."""
    client = Client()
    metrics_port = free_port()
    on = Server.remoteloss("batching-on", ["--metrics-port", str(metrics_port)], logs=logs)
    off = Server.remoteloss("batching-off", ["--no-batching"], logs=logs)
    control = Server.remoteloss("control", ["--no-batching"], logs=logs)  # the same as ``off``: the noise
    servers = (on, off, control)
    cells: dict[str, dict[str, list[float]]] = {}
    with Fleet() as fleet:
        fleet.start(*servers)
        for server in servers:  # first requests, torch's first call: before anything is measured
            for shape in SIZES.values():
                client.bench(server, concurrency=4, shape=shape, grad=True, duration_s=0.5, warmup_s=warmup_s)
        for round_index in range(rounds):
            for size in sizes:
                duration = duration_s if size == "small" else large_duration_s
                for count in callers:
                    cell = cells.setdefault(f"{size} x{count}", {
                        "on": [], "off": [], "ratio": [], "aa_ratio": [], "on_cpu_us": [], "off_cpu_us": []})
                    # Rotate which server goes first, so none always meets a warmer machine.
                    shift = round_index % len(servers)
                    rates = {}
                    for server in servers[shift:] + servers[:shift]:
                        # A warm-up at the cell's load first: a server idle while the others were
                        # measured has given its heap back (allocator.give_back_when_quiet), and
                        # large requests would page-fault it in again inside the measurement.
                        if warmup_s > 0:
                            client.bench(server, concurrency=count, shape=SIZES[size], grad=True,
                                         duration_s=warmup_s, warmup_s=0)
                        before = _cpu_seconds(server)
                        level = client.bench(server, concurrency=count, shape=SIZES[size], grad=True,
                                             duration_s=duration, warmup_s=0)["level"]
                        rates[server.name] = level["throughput_rps"]
                        used = (_cpu_seconds(server) - before) / max(level["requests"], 1) * 1e6
                        if server is not control:
                            cell["on_cpu_us" if server is on else "off_cpu_us"].append(used)
                    cell["on"].append(rates["batching-on"])
                    cell["off"].append(rates["batching-off"])
                    cell["ratio"].append(rates["batching-on"] / rates["batching-off"])
                    cell["aa_ratio"].append(rates["control"] / rates["batching-off"])
        decisions = _decisions(metrics_port)
    return {"cells": cells, "decisions": decisions, "commands": sorted(set(client.commands)),
            "servers": [server.command for server in servers]}


def _print(result: dict[str, Any]) -> None:
    print(f"{'cell':<14} {'on req/s':>10} {'off req/s':>10} {'on/off':>7} {'A/A':>5} {'on/both':>7} "
          f"{'CPU us/req on':>14} {'off':>6} {'off/on':>7}  on/off by round; A/A (control/off) by round")
    for name, cell in result["cells"].items():
        ratio, aa = statistics.median(cell["ratio"]), statistics.median(cell["aa_ratio"])
        # on against both servers without batching: one process's bias (A/A) weighs half
        both = statistics.median(r / ((1 + a) / 2) for r, a in zip(cell["ratio"], cell["aa_ratio"], strict=True))
        rounds = " ".join(f"{r:.2f}" for r in cell["ratio"])
        aa_rounds = " ".join(f"{r:.2f}" for r in cell["aa_ratio"])
        cpu_on, cpu_off = statistics.median(cell["on_cpu_us"]), statistics.median(cell["off_cpu_us"])
        print(f"{name:<14} {statistics.median(cell['on']):>10.0f} {statistics.median(cell['off']):>10.0f} "
              f"{ratio:>7.2f} {aa:>5.2f} {both:>7.2f} {cpu_on:>14.0f} {cpu_off:>6.0f} {cpu_off / cpu_on:>7.2f}  "
              f"{rounds}; {aa_rounds}")
    print("decisions:", json.dumps(result["decisions"], indent=None))
    print("servers:", *result["servers"], sep="\n  ")
    print("load:", *result["commands"], sep="\n  ")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per small-request measurement")
    parser.add_argument("--large-duration", type=float, default=2.0, help="seconds per large-request measurement")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of load before each measurement")
    parser.add_argument("--callers", default=",".join(map(str, CALLERS)), help="comma-separated (default: %(default)s)")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    callers = tuple(int(c) for c in args.callers.split(","))
    sizes = tuple(args.sizes.split(","))
    with tempfile.TemporaryDirectory() as folder:
        result = measure(args.rounds, args.duration, args.large_duration, args.warmup, Path(folder), callers, sizes)
    _print(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
