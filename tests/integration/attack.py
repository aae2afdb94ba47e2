"""The adversarial suite's harness: a bystander that measures its slowest call, and the server's
memory sampled while an attack runs (HOUSE_STYLE §9).

An attack test drives a real server process (``ServerProcess``) as a hostile or careless caller
would, inside ``Watch(server)``: a ``Bystander`` (its own channel, small ``mse_loss`` calls compared
with torch) runs all along, and ``/proc/PID/status`` is sampled every few milliseconds. On leaving,
``Watch`` checks the targets of every attack: the server is alive and SERVING, the bystander's
slowest call is within ``slowest_s`` and it got no wrong answer, peak RSS is within
``peak_over_bytes`` of where it started, and RSS comes back within ``after_over_bytes`` once the
attacker is gone; ``retries=True`` gives the bystander the SDK's retry policy, for an attack whose
harm to others is a call that gRPC sheds and the SDK sends again. Each watch's figures are printed at the end of the run (``pytest_terminal_summary``
in ``conftest.py``), so the closing note quotes measured numbers.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import grpc
import numpy as np
import torch
import torch.nn.functional as F
from remoteloss import codec
from remoteloss._channel import create_channel
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc

from .server_process import ServerProcess

MiB = 1024 * 1024
_RNG = np.random.default_rng(11)
_X = _RNG.standard_normal((8, 4)).astype(np.float32)
_Y = _RNG.standard_normal((8, 4)).astype(np.float32)
BYSTANDER_REQUEST = pb.ComputeRequest(mse_loss=pb.MseLoss(input=codec.encode(_X), target=codec.encode(_Y)))
BYSTANDER_EXPECTED = float(F.mse_loss(torch.from_numpy(_X), torch.from_numpy(_Y)))


class Bystander:
    """A well-behaved caller: small ``mse_loss`` calls in a loop on its own channel, each checked
    against torch; it records the slowest call and anything that went wrong. ``retries``: the
    channel has the SDK's retry policy; else none, so every failure counts."""

    def __init__(
        self, target: str, *, metadata: tuple[tuple[str, str], ...] = (), pause_s: float = 0.01, retries: bool = False
    ) -> None:
        self._channel = create_channel(target) if retries else grpc.insecure_channel(target)
        self._stub = loss_pb2_grpc.LossServiceStub(self._channel)
        self._metadata = metadata
        self._pause_s = pause_s
        self.calls = 0
        self.slowest_s = 0.0
        self.latencies: list[float] = []
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            begin = time.perf_counter()
            try:
                answer = self._stub.Compute(BYSTANDER_REQUEST, timeout=30, metadata=self._metadata)
            except grpc.RpcError as exc:
                self.problems.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
                continue
            finally:
                elapsed = time.perf_counter() - begin
                self.latencies.append(elapsed)
                self.slowest_s = max(self.slowest_s, elapsed)
            value = float(codec.decode_numpy(answer.loss, "loss"))
            if value != BYSTANDER_EXPECTED:
                self.problems.append(f"wrong answer {value!r}, torch gives {BYSTANDER_EXPECTED!r}")
            self.calls += 1
            self._stop.wait(self._pause_s)

    def start(self) -> Self:
        # One call first, so connecting is not counted as the slowest call.
        self._stub.Compute(BYSTANDER_REQUEST, timeout=60, metadata=self._metadata, wait_for_ready=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._channel.close()

    def p99_s(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


class RssSampler:
    """The server process's VmRSS, sampled every ``every_s`` on a thread: ``peak`` since start."""

    def __init__(self, server: ServerProcess, every_s: float = 0.005) -> None:
        self._server = server
        self._every_s = every_s
        self.before = server.rss_bytes()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._server.rss_bytes())
            except (OSError, AssertionError):  # the process is gone; the watch reports it
                return
            self._stop.wait(self._every_s)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class Figures:
    """One attack's measurements, as the closing note reports them."""

    attack: str
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    slowest_s: float = 0.0
    bystander_calls: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        extra = f"; {'; '.join(self.notes)}" if self.notes else ""
        return (
            f"{self.attack}: RSS {self.rss_before / MiB:.0f} -> peak {self.rss_peak / MiB:.0f} -> "
            f"after {self.rss_after / MiB:.0f} MiB; bystander slowest {self.slowest_s * 1000:.0f} ms "
            f"over {self.bystander_calls} calls{extra}"
        )


class Watch:
    """A bystander and an RSS sampler around an attack, and the targets checked on leaving.

    ``peak_over_bytes``: how far above its starting RSS the server may go (the configured budgets
    plus 256 MiB, by the issue's target); ``after_over_bytes``: how far above it the server may
    stay once the attacker is gone (64 MiB); ``slowest_s``: the bystander's slowest call (1 s).
    """

    report: ClassVar[list[Figures]] = []

    def __init__(
        self,
        server: ServerProcess,
        attack: str,
        *,
        peak_over_bytes: int = 256 * MiB,
        after_over_bytes: int = 64 * MiB,
        slowest_s: float = 1.0,
        settle_s: float = 20.0,
        metadata: tuple[tuple[str, str], ...] = (),
        retries: bool = False,
    ) -> None:
        self.server = server
        self.figures = Figures(attack)
        self.peak_over_bytes = peak_over_bytes
        self.after_over_bytes = after_over_bytes
        self.slowest_s = slowest_s
        self.settle_s = settle_s
        self.bystander = Bystander(server.target, metadata=metadata, retries=retries)
        self.rss: RssSampler | None = None

    def __enter__(self) -> Self:
        self.bystander.start()
        self.rss = RssSampler(self.server).start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: Any) -> None:
        assert self.rss is not None
        self.bystander.stop()
        self.rss.stop()
        f = self.figures
        f.rss_before, f.rss_peak = self.rss.before, self.rss.peak
        f.slowest_s, f.bystander_calls = self.bystander.slowest_s, self.bystander.calls
        if exc_type is not None:
            return
        assert self.server.alive(), f"the server died:\n{self.server.log.read_text()[-4000:]}"
        f.rss_after = self._settled_rss()
        Watch.report.append(f)
        assert self.server.health() == "SERVING", f"{f.attack}: health is {self.server.health()} after the attack"
        assert not self.bystander.problems, f"{f.attack}: the bystander saw {self.bystander.problems[:5]}"
        assert self.bystander.calls > 0, f"{f.attack}: the bystander got no answer"
        assert f.slowest_s <= self.slowest_s, f"{f.line()}: slowest call over {self.slowest_s} s"
        assert f.rss_peak - f.rss_before <= self.peak_over_bytes, (
            f"{f.line()}: peak over the start by more than {self.peak_over_bytes / MiB:.0f} MiB"
        )
        assert f.rss_after - f.rss_before <= self.after_over_bytes, (
            f"{f.line()}: stays more than {self.after_over_bytes / MiB:.0f} MiB above the start"
        )

    def _settled_rss(self) -> int:
        """RSS once it is back within bounds, or the last reading after ``settle_s``."""
        deadline = time.monotonic() + self.settle_s
        rss = self.server.rss_bytes()
        while rss - self.figures.rss_before > self.after_over_bytes and time.monotonic() < deadline:
            time.sleep(0.1)
            rss = self.server.rss_bytes()
        return rss


def is_open(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock``'s connection open: what it sent is read and
    dropped, then the connection either ends (closed) or has nothing more to read (open)."""
    sock.setblocking(False)
    try:
        while sock.recv(4096):
            pass
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)
