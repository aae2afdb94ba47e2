"""``remoteloss bench``: latency and throughput of a server, level by level, like perf_analyzer.

    remoteloss bench --loss mse_loss --shape 64x1000 --grad --concurrency 1,4,16,64 --duration 5

One request is built (random data of ``--shape`` and ``--dtype``; see ``remoteloss_bench.payload``) and
serialized once; a probe sends it and checks the answer, then each concurrency level keeps that
many requests in flight for ``--duration`` seconds (or ``--requests`` requests) after
``--warmup`` seconds. It prints p50/p90/p99 latency and throughput per level, optionally writes
them as JSON (``--json``) and a latency-vs-throughput plot (``--plot``, needs matplotlib: the
``bench`` extra). The exit status is 1 when any request failed.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

import remoteloss
from remoteloss_bench import payload as payloads
from remoteloss_bench.load import (
    COMPUTE_METHOD,
    STREAM_METHOD,
    Level,
    Progress,
    open_channels,
    run_level,
    stream_answer,
    stream_item,
)
from remoteloss._request import LOSS_NAMES
from remoteloss.v1 import loss_pb2 as pb

__all__ = ["add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (__doc__ or "").split("\n\n")[0]
    parser.add_argument("--loss", default="mse_loss", choices=LOSS_NAMES, metavar="LOSS",
                        help="the torch.nn.functional name (default: mse_loss)")
    parser.add_argument("--shape", default="1000", type=_shape,
                        help="shape of the main argument, e.g. 1000 or 64x1000 (default: 1000)")
    parser.add_argument("--dtype", default="float32", choices=payloads.DTYPES, help="(default: float32)")
    parser.add_argument("--grad", action="store_true", help="also ask for the main argument's gradient")
    parser.add_argument("--mode", default="unary", choices=("unary", "stream"),
                        help="one Compute call per request, or ComputeStream (default: unary)")
    parser.add_argument("--concurrency", default=[1, 4, 16, 64], type=_levels, metavar="N[,N...]",
                        help="requests in flight, one level after another (default: 1,4,16,64)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--duration", type=_positive(float), metavar="SECONDS",
                        help="measure each level for this long (default: 3)")
    amount.add_argument("--requests", type=_positive(int), metavar="N", help="measure N requests per level")
    parser.add_argument("--warmup", type=_non_negative, default=0.5, metavar="SECONDS",
                        help="unrecorded time before each level (default: 0.5)")
    parser.add_argument("--streams", type=_positive(int), default=1, metavar="N",
                        help="with --mode stream: streams sharing each level's requests in flight; each "
                             "keeps its share in flight, pipelined (default: 1)")
    parser.add_argument("--channels", type=_positive(int), default=1, metavar="N",
                        help="gRPC channels (connections) shared by the callers (default: 1); more "
                             "than one spreads the load over the processes of --workers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random request data")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="plot latency against throughput")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    # For comparing with a bare echo server: the answer is the request, so do not parse it.
    parser.add_argument("--raw-response", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from remoteloss.cli import UsageError

    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'remoteloss-server[bench]'")
    try:
        request = payloads.build(args.loss, args.shape, args.dtype, grad=args.grad, seed=args.seed)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    if args.duration is None and args.requests is None:
        args.duration = 3.0
    payload = request.SerializeToString()
    credentials, metadata = _security(args)
    channels = open_channels(args.target, args.channels, credentials=credentials)
    try:
        calls, probe = _calls(args.mode, channels, payload, args.timeout)
        if metadata:
            calls = [functools.partial(call, metadata=metadata) for call in calls]
            probe = _with_metadata(probe, metadata)
        report: dict[str, Any] = _header(args, len(payload))
        try:
            answer = probe()
            if not args.raw_response:
                pb.ComputeResponse.FromString(answer)
            report["response_bytes"] = len(answer)
        except grpc.RpcError as exc:
            code = exc.code()
            report["error"] = f"{code.name if code is not None else 'UNKNOWN'}: {exc.details()}"
            _write(args, report, [])
            print(f"remoteloss bench: the first request failed: {report['error']}", file=sys.stderr)
            return 1
        print(_title(report))
        print(_ROW.format("concurrency", "requests", "failed", "req/s", "p50 ms", "p90 ms", "p99 ms"))
        progress = Progress(enabled=False) if args.quiet else Progress()
        levels = []
        for concurrency in args.concurrency:
            level = run_level(calls, payload, concurrency, duration_s=args.duration, requests=args.requests,
                              warmup_s=args.warmup, timeout_s=args.timeout, progress=progress,
                              label=f"concurrency {concurrency}:",
                              streams=args.streams if args.mode == "stream" else None)
            levels.append(level)
            print(_row(level), flush=True)
    finally:
        for channel in channels:
            channel.close()
    _write(args, report, levels)
    failed = sum(level.errors for level in levels)
    if failed:
        first = next(level.first_error for level in levels if level.first_error)
        print(f"remoteloss bench: {failed} request(s) failed; the first: {first}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m remoteloss_bench ARGS`` is ``remoteloss bench ARGS``."""
    from remoteloss import cli

    return cli.main(["bench", *(sys.argv[1:] if argv is None else argv)])


def _security(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    """TLS credentials and API-key metadata from the CLI's connection flags (none without them)."""
    from remoteloss import cli

    connection = getattr(cli, "connection", None)  # the flags --api-key, --tls, --tls-ca, ...
    if connection is None or not hasattr(args, "tls"):
        return None, ()
    from remoteloss._channel import api_key_metadata, tls_credentials

    settings = connection(args)
    credentials = tls_credentials(tls=settings["tls"], root_certificates=settings["root_certificates"],
                                  client_cert=settings["client_cert"], client_key=settings["client_key"])
    return credentials, api_key_metadata(args.target, settings["api_key"], secure=credentials is not None)


def _with_metadata(probe: Callable[..., bytes], metadata: tuple[tuple[str, str], ...]) -> Callable[[], bytes]:
    return lambda: probe(metadata=metadata)


def _calls(mode: str, channels: Sequence[grpc.Channel], payload: bytes,
           timeout_s: float | None) -> tuple[list[Callable[..., Any]], Callable[..., bytes]]:
    """The callables the callers use and a probe that sends one request and returns the answer
    (it takes the calls' ``metadata``)."""
    if mode == "unary":
        # _registered_method: as the generated stubs call it (the stubs of grpc lack the argument).
        calls = [channel.unary_unary(COMPUTE_METHOD, _registered_method=True)  # type: ignore[call-arg]
                 for channel in channels]

        def unary_probe(metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
            answer: bytes = calls[0](payload, timeout=timeout_s, metadata=metadata)
            return answer

        return list(calls), unary_probe
    streams = [channel.stream_stream(STREAM_METHOD, _registered_method=True)  # type: ignore[call-arg]
               for channel in channels]

    def probe(metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
        (answer,) = list(streams[0](iter([stream_item(payload, 1)]), timeout=timeout_s, metadata=metadata))
        _, failure = stream_answer(answer)
        if failure is not None:
            raise _ItemError(*failure)
        answer_message = pb.ComputeStreamResponse.FromString(answer)
        return answer_message.response.SerializeToString()

    return list(streams), probe


class _ItemError(grpc.RpcError):
    """A failed ComputeStream item, raised like a failed unary call."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self._code = grpc.StatusCode[code] if code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
        self._message = message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message


def _header(args: argparse.Namespace, request_bytes: int) -> dict[str, Any]:
    import numpy as np

    return {
        "tool": "remoteloss bench",
        "version": remoteloss.__version__,
        "target": args.target,
        "loss": args.loss,
        "shape": list(args.shape),
        "dtype": args.dtype,
        "grad": args.grad,
        "mode": args.mode,
        "channels": args.channels,
        "streams": args.streams if args.mode == "stream" else None,
        "duration_s": args.duration,
        "requests": args.requests,
        "warmup_s": args.warmup,
        "timeout_s": args.timeout,
        "request_bytes": request_bytes,
        "response_bytes": None,
        "client": {"python": platform.python_version(), "grpc": grpc.__version__, "numpy": np.__version__},
    }


def _title(report: dict[str, Any]) -> str:
    shape = "x".join(map(str, report["shape"])) or "scalar"
    return (f"{report['loss']} {report['dtype']} {shape}{' +grad' if report['grad'] else ''}, "
            f"{report['mode']}, {report['target']}, request {_size(report['request_bytes'])}, "
            f"answer {_size(report['response_bytes'])}")


_ROW = "{:>11}  {:>9}  {:>6}  {:>9}  {:>8}  {:>8}  {:>8}"


def _row(level: Level) -> str:
    latency = level.latency()

    def ms(key: str) -> str:
        return f"{latency[key] * 1e3:.3f}" if key in latency else "-"

    return _ROW.format(level.concurrency, level.requests, level.errors, f"{level.throughput_rps:.1f}",
                       ms("p50"), ms("p90"), ms("p99"))


def _write(args: argparse.Namespace, report: dict[str, Any], levels: Sequence[Level]) -> None:
    report = {**report, "levels": [level.to_dict() for level in levels],
              "failed": sum(level.errors for level in levels) + ("error" in report)}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot is not None and levels:
        _plot(args.plot, report)


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [level for level in report["levels"] if level["latency_s"]]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    throughput = [level["throughput_rps"] for level in levels]
    for key, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        axes.plot(throughput, [level["latency_s"][key] * 1e3 for level in levels], style, label=key)
    for level, x in zip(levels, throughput, strict=True):
        axes.annotate(f"c={level['concurrency']}", (x, level["latency_s"]["p50"] * 1e3),
                      textcoords="offset points", xytext=(4, -12), fontsize=8)
    axes.set_xlabel("throughput (requests/s)")
    axes.set_ylabel("latency (ms)")
    axes.set_title(_title(report), fontsize=8)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _size(count: int | None) -> str:
    if count is None:
        return "?"
    for unit in ("B", "KiB", "MiB"):
        if count < 1024 or unit == "MiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return str(count)


def _shape(text: str) -> tuple[int, ...]:
    try:
        return payloads.parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"must be positive integers joined by commas, e.g. 1,4,16, got {text!r}")
    return levels


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
