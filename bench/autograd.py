"""The SDK's own costs, in one interleaved run: the autograd path against ``value_and_grad``, and
one stream shared by many callers against one caller's unary calls.

    python bench/autograd.py            # about a minute on 2 cores
    python bench/autograd.py --quick    # one short round: a smoke test

It starts one remoteloss server (a subprocess on a free loopback port, stopped at the end) and,
in this process, with ``remoteloss.Client``:

- at 1,000 and at 1,000,000 float32 elements, ``client.mse_loss(x, y).backward()`` with ``x`` a
  torch tensor that requires grad (the path of every ``torch.nn`` example), against
  ``client.value_and_grad("mse_loss", x, y)`` with numpy arrays, calls of the two alternating;
  the p50 latency and the client's CPU time per call (``time.process_time``: every thread of
  this process, gRPC's included) of each, and their ratio (target: at most 1.1); and, as a
  floor, ``value_and_grad`` followed by a bare ``torch.autograd.Function`` over its answer (what
  torch's own autograd costs on top of the numpy path, whatever the SDK does);
- 64 threads sharing one ``client.stream()`` (each waits for its own answer before the next
  call), against one thread's unary calls, rounds alternating; the ratio of their rates
  (target: at least 2.5). The same ratio for ``remoteloss bench`` (a raw gRPC client in a
  subprocess: ``--mode stream --concurrency 64`` against ``--concurrency 1``), which measures the
  server's stream path without the SDK's.

Prints a table and, with ``--json PATH``, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import remoteloss
from servers import Client, Fleet, Server

SIZES = (1_000, 1_000_000)
STREAM_CALLERS = 64


def _autograd_call(client: remoteloss.Client, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        x.grad = None
        client.mse_loss(x, y).backward()

    return call


def _value_and_grad_call(client: remoteloss.Client, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> Callable[[], None]:
    def call() -> None:
        client.value_and_grad("mse_loss", x, y)

    return call


class _Given(torch.autograd.Function):
    """An autograd node whose loss and gradient are given: torch's own cost of a node, no more."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, given: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ctx.gradient = given[1]
        return given[0]

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        gradient, ctx.gradient = ctx.gradient, None  # handed over: torch keeps it as .grad, no copy
        return gradient, None


def _floor_call(client: remoteloss.Client, x: torch.Tensor, x_np: np.ndarray[Any, Any],
                y_np: np.ndarray[Any, Any]) -> Callable[[], None]:
    """``value_and_grad`` with numpy, then torch's own autograd node over its answer: the least an
    autograd path can cost."""
    def call() -> None:
        x.grad = None
        loss, gradients = client.value_and_grad("mse_loss", x_np, y_np)
        given = (torch.from_numpy(loss), torch.from_numpy(gradients["input"]))
        _Given.apply(x, given).backward()  # type: ignore[no-untyped-call]

    return call


def _paths(client: remoteloss.Client, size: int, seconds: float, rounds: int) -> dict[str, Any]:
    """Calls of the two paths alternating, ``seconds`` per path per round; each call's wall and CPU time."""
    generator = np.random.default_rng(size)
    x_np = generator.standard_normal(size, dtype=np.float32)
    y_np = generator.standard_normal(size, dtype=np.float32)
    x = torch.from_numpy(x_np.copy()).requires_grad_()
    y = torch.from_numpy(y_np.copy())
    calls = {"autograd": _autograd_call(client, x, y), "value_and_grad": _value_and_grad_call(client, x_np, y_np),
             "floor": _floor_call(client, x, x_np, y_np)}
    walls: dict[str, list[float]] = {name: [] for name in calls}
    cpus: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm up both
        for _ in range(3):
            call()
    batch = 20 if size <= 10_000 else 2  # calls in a row of one path before the other's
    for _ in range(rounds):
        end = time.monotonic() + 2 * seconds
        while time.monotonic() < end:
            for name, call in calls.items():
                for _ in range(batch):
                    wall, cpu = time.perf_counter(), time.process_time()
                    call()
                    walls[name].append(time.perf_counter() - wall)
                    cpus[name].append(time.process_time() - cpu)
    out: dict[str, Any] = {}
    for name in calls:
        out[name] = {"p50_s": statistics.median(walls[name]), "cpu_s": statistics.fmean(cpus[name]),
                     "calls": len(walls[name])}
    out["ratio_p50"] = out["autograd"]["p50_s"] / out["value_and_grad"]["p50_s"]
    out["ratio_cpu"] = out["autograd"]["cpu_s"] / out["value_and_grad"]["cpu_s"]
    out["floor_ratio_p50"] = out["floor"]["p50_s"] / out["value_and_grad"]["p50_s"]
    out["floor_ratio_cpu"] = out["floor"]["cpu_s"] / out["value_and_grad"]["cpu_s"]
    return out


def _unary_rate(client: remoteloss.Client, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], seconds: float) -> float:
    count, start = 0, time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        client.value_and_grad("mse_loss", x, y)
        count += 1
    return count / (time.perf_counter() - start)


def _stream_rate(client: remoteloss.Client, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], seconds: float,
                 callers: int) -> float:
    counts = [0] * callers
    barrier = threading.Barrier(callers + 1)
    stop = threading.Event()

    def caller(index: int, stream: remoteloss.Stream) -> None:
        barrier.wait()
        while not stop.is_set():
            stream.value_and_grad("mse_loss", x, y).result()
            counts[index] += 1

    with client.stream(window=callers) as stream:
        threads = [threading.Thread(target=caller, args=(i, stream), daemon=True) for i in range(callers)]
        for thread in threads:
            thread.start()
        barrier.wait()
        time.sleep(min(0.3, seconds / 4))  # warm up
        before, start = sum(counts), time.perf_counter()
        time.sleep(seconds)
        done, elapsed = sum(counts) - before, time.perf_counter() - start
        stop.set()
        for thread in threads:
            thread.join()
    return done / elapsed


def _stream(client: remoteloss.Client, seconds: float, rounds: int) -> dict[str, Any]:
    """One caller's unary rate and ``STREAM_CALLERS`` callers sharing one stream, rounds alternating."""
    generator = np.random.default_rng(0)
    x = generator.standard_normal(1_000, dtype=np.float32)
    y = generator.standard_normal(1_000, dtype=np.float32)
    _unary_rate(client, x, y, 0.2)
    unary, stream = [], []
    for _ in range(rounds):
        unary.append(_unary_rate(client, x, y, seconds))
        stream.append(_stream_rate(client, x, y, seconds, STREAM_CALLERS))
    ratios = [s / u for s, u in zip(stream, unary, strict=True)]
    return {"unary_rps": statistics.median(unary), "stream_rps": statistics.median(stream),
            "ratio": statistics.median(ratios), "rounds": {"unary_rps": unary, "stream_rps": stream}}


def _raw_stream(server: Server, seconds: float, rounds: int) -> dict[str, Any]:
    """``remoteloss bench``: 64 requests in flight on one stream against one unary caller, alternating."""
    client = Client()
    unary, stream = [], []
    for _ in range(rounds):
        for mode, concurrency, rates in (("unary", 1, unary), ("stream", STREAM_CALLERS, stream)):
            level = client.bench(server, mode=mode, concurrency=concurrency, duration_s=seconds, grad=True)["level"]
            rates.append(level["throughput_rps"])
    ratios = [s / u for s, u in zip(stream, unary, strict=True)]
    return {"unary_rps": statistics.median(unary), "stream_rps": statistics.median(stream),
            "ratio": statistics.median(ratios), "rounds": {"unary_rps": unary, "stream_rps": stream},
            "commands": client.commands}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke test, not for the record")
    parser.add_argument("--target", help="an address of a running server instead of starting one")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--only", choices=("autograd", "stream"), help="measure only this part")
    parser.add_argument("--sizes", type=lambda text: tuple(int(n) for n in text.split(",")), default=SIZES,
                        help="elements of the autograd comparison, comma-separated (default: 1000,1000000)")
    args = parser.parse_args()
    rounds, seconds = (1, 0.5) if args.quick else (3, 1.5)
    torch.set_num_threads(1)
    results: dict[str, Any] = {"rounds": rounds, "seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="remoteloss-bench-") as folder, Fleet() as fleet:
        if args.target is None:
            server = Server.remoteloss("remoteloss", logs=Path(folder))
            fleet.start(server)
        else:
            host, port = args.target.rsplit(":", 1)
            server = Server("remoteloss", [], port=int(port), logs=Path(folder))  # not started here
        target = args.target or server.target
        with remoteloss.Client(target, timeout=300) as client:
            if args.only != "stream":
                for size in args.sizes:
                    results[f"autograd_{size}"] = _paths(client, size, seconds, rounds)
            if args.only != "autograd":
                results["stream"] = _stream(client, seconds, rounds)
                results["raw_stream"] = _raw_stream(server, seconds, rounds)
    print(_table(results, args.sizes))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _table(results: dict[str, Any], sizes: tuple[int, ...]) -> str:
    lines = ["| measure | autograd / stream | value_and_grad / unary | ratio | target |", "|---|---|---|---|---|"]
    for size in sizes:
        if f"autograd_{size}" not in results:
            continue
        paths = results[f"autograd_{size}"]
        auto, vag = paths["autograd"], paths["value_and_grad"]
        lines.append(f"| {size:,} elements, p50 | {auto['p50_s'] * 1e3:.3f} ms | {vag['p50_s'] * 1e3:.3f} ms "
                     f"| {paths['ratio_p50']:.2f} | <= 1.1 |")
        lines.append(f"| {size:,} elements, client CPU per call | {auto['cpu_s'] * 1e3:.3f} ms "
                     f"| {vag['cpu_s'] * 1e3:.3f} ms | {paths['ratio_cpu']:.2f} | <= 1.1 |")
        floor = paths["floor"]
        lines.append(f"| {size:,} elements, floor (value_and_grad + torch's own autograd node), p50 / CPU "
                     f"| {floor['p50_s'] * 1e3:.3f} / {floor['cpu_s'] * 1e3:.3f} ms | | "
                     f"{paths['floor_ratio_p50']:.2f} / {paths['floor_ratio_cpu']:.2f} | |")
    stream = results.get("stream")
    if stream is None:
        return "\n".join(lines)
    lines.append(f"| SDK: {STREAM_CALLERS} callers on one stream vs 1 unary caller, req/s | {stream['stream_rps']:,.0f} "
                 f"| {stream['unary_rps']:,.0f} | {stream['ratio']:.2f} | >= 2.5 |")
    raw = results["raw_stream"]
    lines.append(f"| remoteloss bench: {STREAM_CALLERS} in flight on one stream vs 1 unary caller, req/s "
                 f"| {raw['stream_rps']:,.0f} | {raw['unary_rps']:,.0f} | {raw['ratio']:.2f} | >= 2.5 |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
