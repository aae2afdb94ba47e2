"""The load generator of ``remoteloss bench``: closed-loop callers, one level at a time.

Each of ``concurrency`` callers is a thread that sends one pre-serialized request, waits for
the answer and sends the next, so exactly ``concurrency`` requests are in flight (gRPC's sync
API releases the GIL while it waits). The request bytes are built once, so the figures are
the server's and the transport's, not the SDK's encoding. Callers share ``channels`` channels
round-robin; with more than one, each channel has its own connection (a local subchannel
pool), which is what spreads load over the processes of ``remoteloss-server --workers N``.

A level runs ``warmup_s`` unrecorded, then either ``duration_s`` seconds (requests that start
in the window are recorded) or exactly ``requests`` requests.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc
import numpy as np

from remoteloss._channel import create_channel

__all__ = [
    "COMPUTE_METHOD",
    "STREAM_METHOD",
    "Level",
    "Progress",
    "open_channels",
    "run_level",
    "stream_answer",
    "stream_item",
]

COMPUTE_METHOD = "/remoteloss.v1.LossService/Compute"
STREAM_METHOD = "/remoteloss.v1.LossService/ComputeStream"
_PERCENTILES = (50, 90, 99)


@dataclass
class Level:
    """What one concurrency level measured. Latencies in seconds."""

    concurrency: int
    requests: int = 0  # recorded requests that succeeded
    errors: int = 0  # recorded requests that failed
    error_codes: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None
    duration_s: float = 0.0  # first recorded start to last recorded end
    latencies_s: list[float] = field(default_factory=list, repr=False)

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def latency(self) -> dict[str, float]:
        """p50/p90/p99, mean, min and max of the successful requests, in seconds."""
        if not self.latencies_s:
            return {}
        values = np.asarray(self.latencies_s)
        stats = {f"p{p}": float(np.percentile(values, p)) for p in _PERCENTILES}
        stats.update(mean=float(values.mean()), min=float(values.min()), max=float(values.max()))
        return stats

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "error_codes": dict(self.error_codes),
            "first_error": self.first_error,
            "duration_s": self.duration_s,
            "throughput_rps": self.throughput_rps,
            "latency_s": self.latency(),
        }


def open_channels(target: str, count: int, options: Sequence[tuple[str, Any]] = (), *,
                  credentials: grpc.ChannelCredentials | None = None) -> list[grpc.Channel]:
    """``count`` channels to ``target`` with the SDK's settings (TLS with ``credentials``); each
    has its own connection when ``count`` > 1."""
    extra = list(options)
    if count > 1:
        extra.append(("grpc.use_local_subchannel_pool", 1))
    return [create_channel(target, credentials=credentials, options=extra) for _ in range(count)]


class Progress:
    """A one-line progress bar on a terminal; silent when ``stream`` is not a TTY."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._width = 0

    def show(self, fraction: float, text: str) -> None:
        if not self.enabled:
            return
        fraction = min(max(fraction, 0.0), 1.0)
        filled = round(fraction * 30)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}% {text}"
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)

    def clear(self) -> None:
        if self.enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0


class _Run:
    """State shared by the callers of one level."""

    def __init__(self, requests: int | None) -> None:
        self.lock = threading.Lock()
        self.remaining = requests
        self.record_from = float("inf")  # perf_counter time at which recording starts
        self.stop_at = float("inf")
        self.stopped = threading.Event()
        self.done = 0  # recorded requests so far, for the progress line (updated without a lock)
        self.failed = 0
        self.latencies: list[float] = []
        self.spans: list[tuple[float, float]] = []  # each caller's first recorded start, last end
        self.failures: list[tuple[str, str]] = []

    def take(self, now: float) -> bool:
        """Whether a caller may send another request now."""
        if self.stopped.is_set() or now >= self.stop_at:
            return False
        if self.remaining is None or now < self.record_from:
            return True
        with self.lock:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
            return True

    def fraction(self, now: float, begin: float, duration_s: float | None, requests: int | None) -> float:
        if duration_s is not None:
            total = self.stop_at - begin
            return (now - begin) / total if total > 0 else 1.0
        if now < self.record_from:
            return 0.0
        return self.done / requests if requests else 1.0


def run_level(
    calls: Sequence[Callable[..., Any]],
    payload: Any,
    concurrency: int,
    *,
    duration_s: float | None = None,
    requests: int | None = None,
    warmup_s: float = 0.0,
    timeout_s: float | None = None,
    progress: Progress | None = None,
    label: str = "",
    streams: int | None = None,
) -> Level:
    """Measure one level. Unary (``streams`` None): ``concurrency`` callers, each calling
    ``calls[i % len(calls)](payload, timeout=timeout_s)`` in a loop. Streaming: ``streams``
    callers, each with one stream opened by ``calls[i % len(calls)]`` (a ComputeStream
    callable), which together keep ``concurrency`` items in flight. Give exactly one of
    ``duration_s`` and ``requests``."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s and requests")
    run = _Run(requests)
    cycle = itertools.cycle(calls)
    if streams is None:
        callers = [
            threading.Thread(target=_caller, args=(run, next(cycle), payload, timeout_s), name=f"bench-caller-{i}",
                             daemon=True)
            for i in range(concurrency)
        ]
    else:
        count = min(streams, concurrency)
        windows = [concurrency // count + (i < concurrency % count) for i in range(count)]
        callers = [
            threading.Thread(target=_stream_caller, args=(run, next(cycle), payload, window, timeout_s),
                             name=f"bench-stream-{i}", daemon=True)
            for i, window in enumerate(windows)
        ]
    begin = time.perf_counter()
    run.record_from = begin + warmup_s
    if duration_s is not None:
        run.stop_at = run.record_from + duration_s
    for thread in callers:
        thread.start()
    try:
        for thread in callers:
            while thread.is_alive():
                thread.join(0.1)
                if progress is not None:
                    fraction = run.fraction(time.perf_counter(), begin, duration_s, requests)
                    progress.show(fraction, f"{label} {run.done} requests, {run.failed} failed")
    finally:
        run.stopped.set()
        for thread in callers:
            thread.join()
        if progress is not None:
            progress.clear()
    return _level(run, concurrency)


def _level(run: _Run, concurrency: int) -> Level:
    codes = Counter(code for code, _ in run.failures)
    level = Level(concurrency, requests=len(run.latencies), errors=len(run.failures), error_codes=dict(codes))
    if run.failures:
        code, details = run.failures[0]
        level.first_error = f"{code}: {details}"
    if run.spans:
        level.duration_s = max(end for _, end in run.spans) - min(start for start, _ in run.spans)
    level.latencies_s = run.latencies
    return level


def _caller(run: _Run, call: Callable[..., Any], payload: Any, timeout_s: float | None) -> None:
    tally = _Tally(run)
    try:
        while True:
            start = time.perf_counter()
            if not run.take(start):
                break
            try:
                call(payload, timeout=timeout_s)
                failure = None
            except grpc.RpcError as exc:
                failure = _failure(exc)
            tally.add(start, time.perf_counter(), failure)
    finally:
        tally.merge()


@dataclass
class _Tally:
    """One caller's recorded requests; ``merge`` adds them to the run when the caller stops."""

    run: _Run
    latencies: list[float] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    first: float | None = None  # the first recorded start
    last: float | None = None  # the last recorded end

    def add(self, start: float, end: float, failure: tuple[str, str] | None) -> None:
        """One request, unless it started before the run records."""
        if start < self.run.record_from:
            return
        self.first = start if self.first is None else self.first
        self.last = end
        if failure is None:
            self.latencies.append(end - start)
        else:
            self.failures.append(failure)
            self.run.failed += 1
        self.run.done += 1

    def merge(self) -> None:
        with self.run.lock:
            self.run.latencies.extend(self.latencies)
            self.run.failures.extend(self.failures)
            if self.first is not None and self.last is not None:
                self.run.spans.append((self.first, self.last))


def _failure(exc: grpc.RpcError) -> tuple[str, str]:
    code = exc.code()
    return code.name if code is not None else "UNKNOWN", str(exc.details())


def stream_item(payload: bytes, item_id: int) -> bytes:
    """A serialized ``ComputeStreamRequest{id, request}`` around a serialized ``ComputeRequest``."""
    return _varint_field(1, item_id) + b"\x12" + _varint(len(payload)) + payload


def stream_answer(data: bytes) -> tuple[int, tuple[str, str] | None]:
    """The id of a serialized ``ComputeStreamResponse`` and, for an ``error`` answer, its code
    name and message; reads only the first bytes of a ``response`` answer (no copy of tensors)."""
    item_id, position = 0, 0
    if data[:1] == b"\x08":  # field 1 (id) first, as protobuf serializes; absent when 0
        item_id, position = _read_varint(data, 1)
    if data[position:position + 1] == b"\x12":  # field 2: response
        return item_id, None
    from remoteloss.v1 import loss_pb2 as pb

    answer = pb.ComputeStreamResponse.FromString(data)
    if answer.WhichOneof("result") == "response":
        return answer.id, None
    return answer.id, (_CODE_NAMES.get(answer.error.code, str(answer.error.code)), answer.error.message)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        shift += 7
        if not byte & 0x80:
            return value, position


def _stream_caller(run: _Run, call: Callable[..., Any], payload: bytes, window: int,
                   timeout_s: float | None) -> None:
    """One stream with up to ``window`` items in flight. Items are built once per id (ids 1..window
    are reused once answered), so sending copies nothing."""
    items = {item_id: stream_item(payload, item_id) for item_id in range(1, window + 1)}
    free = list(items)
    sent: dict[int, float] = {}
    slots = threading.Semaphore(window)
    done = threading.Event()
    tally = _Tally(run)

    def requests() -> Any:
        while True:
            while not slots.acquire(timeout=0.05):
                if done.is_set() or run.stopped.is_set():
                    return
            now = time.perf_counter()
            if not run.take(now):
                return
            item_id = free.pop()
            sent[item_id] = now
            yield items[item_id]

    try:
        # A stream has one deadline: the level's end plus one request's timeout.
        remaining = run.stop_at - time.perf_counter()
        deadline = None if timeout_s is None or remaining == float("inf") else remaining + timeout_s
        answers = call(requests(), timeout=deadline)
        for data in answers:
            end = time.perf_counter()
            item_id, failure = stream_answer(data)
            start = sent.pop(item_id)
            free.append(item_id)
            slots.release()
            tally.add(start, end, failure)
    except grpc.RpcError as exc:  # the stream failed: every item in flight failed with it
        tally.failures.extend([_failure(exc)] * max(len(sent), 1))
    finally:
        done.set()
        tally.merge()
