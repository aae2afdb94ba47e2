"""Each stage of a small request's path inside a real server, against the same stage in-process.

    python bench/server_stages.py [--duration 4]

``bench/stages.py`` times the request path in a loop in this process; this times the same
functions, with the same timers, inside a ``remoteloss-server`` process that gRPC feeds (one
caller, then 64), and prints each stage's p50 side by side (1,000 float32 ``mse_loss``, forward).
A stage that costs more in the server than in the loop pays for what runs between requests there
(gRPC's Python layer, the event loop), which leaves it with cold caches: a reason to cut the
work a request does in Python, and to weigh a front end that hands requests over in batches.
The timers add about a microsecond to each stage. The in-process loop's stand-in for gRPC's
context holds no metadata, so reading ``x-request-id`` there costs less than gRPC's conversion of
a call's metadata, which the server pays.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servers import BENCH_DIR, Client, Fleet, Server, free_port

# (module, owner in it or "", function, label): the request's path, outermost first.
_STAGES = (
    ("servicer", "LossServicer", "Compute", "Compute (the whole handler)"),
    ("intake", "Intake", "receive", "  a template's match, or scan and parse"),
    ("servicer", "", "caller_request_id", "  read x-request-id (gRPC's metadata)"),
    ("servicer", "LossServicer", "_admit", "  admission (peer, budgets)"),
    ("servicer", "LossServicer", "_compute", "  the call, from checks to answer bytes"),
    ("intake", "Intake", "prepare_now", "    checks, decode, validate"),
    ("losses.spec", "LossSpec", "prepare", "      LossSpec.prepare (no template)"),
    ("templates", "Template", "call", "      Template.call (a template's)"),
    ("batcher", "Batcher", "submit", "    batcher (computed on the spot)"),
    ("executor", "Executor", "run_batch", "      Executor.run_batch"),
    ("framing", "", "answer", "    the answer's bytes"),
)
_times: defaultdict[str, list[float]] = defaultdict(list)


def _timed(function: Callable[..., Any], label: str) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(function):
        @functools.wraps(function)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                _times[label].append(time.perf_counter() - begin)
        return timed_async

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        begin = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _times[label].append(time.perf_counter() - begin)
    return timed


def _install() -> None:
    """Wrap every stage's function in a timer, where its callers look it up."""
    import importlib

    for module_name, owner_name, name, label in _STAGES:
        module = importlib.import_module(f"remoteloss_server.{module_name}")
        owner = getattr(module, owner_name) if owner_name else module
        setattr(owner, name, _timed(getattr(owner, name), label))


def _p50s(skip: int = 200) -> dict[str, float]:
    """Each stage's median in microseconds, leaving out the first ``skip`` (warm-up), and reset."""
    medians = {}
    for label, times in _times.items():
        kept = sorted(times[skip:])
        if kept:
            medians[label] = kept[len(kept) // 2] * 1e6
    _times.clear()
    return medians


def _serve(port: int, out: Path) -> None:
    """A remoteloss-server with timed stages; SIGUSR1 writes the medians so far to ``out`` and
    starts again."""
    _install()
    signal.signal(signal.SIGUSR1, lambda *_: out.write_text(json.dumps(_p50s())))
    from remoteloss_server import cli

    sys.exit(cli.main(["--host", "127.0.0.1", "--port", str(port), "--http-port", "0", "--metrics-port", "0",
                       "--log-level", "WARNING"]))


def _in_process(requests: int) -> dict[str, float]:
    """The same timers around ``LossServicer.Compute`` called in a loop, one request at a time."""
    _install()
    import torch
    from remoteloss_bench.payload import build
    from stages import handler_microseconds

    torch.set_num_threads(1)
    data = build("mse_loss", (1000,), "float32", grad=False).SerializeToString()
    asyncio.run(handler_microseconds(data, "cpu", requests, 1))
    return _p50s(skip=requests)  # the first of its three repeats warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(int(args.serve[0]), Path(args.serve[1]))
        return
    columns = {"in-process": _in_process(2000)}
    client = Client()
    with tempfile.TemporaryDirectory(prefix="remoteloss-stages-") as folder, Fleet() as fleet:
        out, port = Path(folder) / "stages.json", free_port()
        argv = [sys.executable, str(BENCH_DIR / "server_stages.py"), "--serve", str(port), str(out)]
        server = Server("remoteloss-timed", argv, port=port, logs=Path(folder))
        fleet.start(server)
        for callers in (1, 64):
            client.bench(server, concurrency=callers, duration_s=args.duration)
            assert server.process is not None
            server.process.send_signal(signal.SIGUSR1)
            for _ in range(100):
                if out.exists():
                    break
                time.sleep(0.05)
            columns[f"server, {callers} caller{'s' if callers > 1 else ''}"] = json.loads(out.read_text())
            out.unlink()
    labels = [label for *_, label in _STAGES]
    print(f"{'p50 us per request':40s}" + "".join(f"{name:>20s}" for name in columns) + "   server / in-process")
    for label in labels:
        row = [column.get(label) for column in columns.values()]
        cells = "".join(f"{'-' if value is None else f'{value:.1f}':>20s}" for value in row)
        ratios = " / ".join(f"{value / row[0]:.1f}" for value in row[1:] if value is not None and row[0])
        print(f"{label:40s}{cells}   {ratios}")


if __name__ == "__main__":
    main()
