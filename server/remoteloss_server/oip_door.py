"""The Open Inference Protocol's way into the server, shared by its gRPC and HTTP front ends
(no grpc, no HTTP here): the same budgets (``limits.Admission``), checks (``intake``), batcher,
metrics and request log as the native API, and the per-model statistics Triton's extension reports.

``Door.infer`` takes a request as a protocol received it (``oip.InferRequest``) and gives the
outputs asked for, or raises the domain errors of ``errors``; the front end turns either into its
protocol's answer and releases the request's ``Ticket`` once that answer has left.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from typing import Any

from remoteloss_server import framing, oip
from remoteloss_server.batcher import Batcher
from remoteloss_server.executor import Result
from remoteloss_server.intake import Intake, Received
from remoteloss_server.limits import Admission, Ticket
from remoteloss_server.metrics import Metrics
from remoteloss_server.telemetry import TENANT, RequestRecord

__all__ = ["Answer", "Door", "Statistics"]

_TIMEOUT_PARAMETER = "timeout"  # Triton's request parameter: a deadline in microseconds


@dataclass(frozen=True)
class Answer:
    """What ``Door.infer`` gives: the model, its outputs (``size``: their tensors' bytes), the
    result and the request's budgets."""

    model: oip.Model
    outputs: list[oip.Output]
    result: Result
    ticket: Ticket | None
    size: int


@dataclass
class _Counts:
    success: list[int] = field(default_factory=lambda: [0, 0])  # count, nanoseconds
    fail: list[int] = field(default_factory=lambda: [0, 0])
    last_inference_ms: int = 0


class Statistics:
    """Triton's ModelStatistics per model: successes and failures, their time, the last inference.
    The time of a success is reported as ``compute_infer`` too (queueing is in the metrics)."""

    def __init__(self) -> None:
        self._counts = {name: _Counts() for name in oip.MODELS}

    def record(self, model: str, ok: bool, nanoseconds: int) -> None:
        counts = self._counts.get(model)
        if counts is None:
            return
        pair = counts.success if ok else counts.fail
        pair[0] += 1
        pair[1] += nanoseconds
        if ok:
            counts.last_inference_ms = int(time.time() * 1000)

    def report(self, name: str = "", version: str = "") -> dict[str, Any]:
        """ModelStatisticsResponse as JSON (numbers as numbers): ``name`` "" means every model."""
        names = [oip.find(name, version).name] if name else list(oip.MODELS)
        return {"model_stats": [self._model(n) for n in names]}

    def _model(self, name: str) -> dict[str, Any]:
        counts = self._counts[name]
        ok = {"count": counts.success[0], "ns": counts.success[1]}
        zero = {"count": counts.success[0], "ns": 0}
        return {
            "name": name,
            "version": oip.VERSION,
            "last_inference": counts.last_inference_ms,
            "inference_count": counts.success[0],
            "execution_count": counts.success[0],
            "inference_stats": {
                "success": ok, "fail": {"count": counts.fail[0], "ns": counts.fail[1]},
                "queue": zero, "compute_input": zero, "compute_infer": ok, "compute_output": zero,
                "cache_hit": {"count": 0, "ns": 0}, "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [],
        }


class Door:
    """The server's pieces, as a protocol front end uses them. ``ready`` is False once the
    server drains (ServerReady, ModelReady and /v2/health/ready then say so)."""

    def __init__(self, metrics: Metrics, intake: Intake, batcher: Batcher, admission: Admission | None = None) -> None:
        self.metrics = metrics
        self._intake = intake
        self._batcher = batcher
        self._admission = admission
        self.statistics = Statistics()
        self.ready = True
        self.draining = asyncio.Event()  # set by drain(): streams read no more requests

    def drain(self) -> None:
        self.ready = False
        self.draining.set()

    @property
    def inline_bytes(self) -> int:
        """Up to this many bytes, a request is read and answered on the event loop."""
        return self._intake.inline_bytes

    def admit(self, size: int, connection: str | None) -> Ticket | None:
        """A place in the in-flight budgets for a request of ``size`` bytes (ResourceExhaustedError
        when one is spent), before the request is read; the front end releases it once answered."""
        if self._admission is None:
            return None
        return self._admission.admit(size, tenant=TENANT.get(), connection=connection)

    def record(self, model: str, request_id: str, size: int | None, protocol: str) -> RequestRecord:
        """The request's metrics and log line, counted from now; ``finish`` it with its code."""
        return RequestRecord(self.metrics, model if model in oip.MODELS else "unknown", request_id, size, protocol=protocol)

    async def infer(
        self, request: oip.InferRequest, size: int, record: RequestRecord, ticket: Ticket | None,
        remaining_s: float | None, check: Callable[[Mapping[str, int]], None] | None = None,
    ) -> Answer:
        """The outputs of ``request`` (``size`` bytes as received), admitted under ``ticket``,
        within ``remaining_s`` (None: no deadline; Triton's ``timeout`` parameter, in
        microseconds, may shorten it). ``check`` may refuse the outputs (raising) from their
        sizes (name: elements): before computing, from the least each will hold, and once
        computed, before the answer counts as given. Records the outcome in the statistics and
        ``record``, except for a failure, which the caller records with its status (``failed``)."""
        started = time.perf_counter_ns()
        model = oip.find(request.model, request.version)
        compute, payloads, wanted = model.to_compute(request)
        prepared = await self._intake.prepare(Received(compute, size, payloads))
        record.elements = prepared.elements
        if check is not None:  # a gradient's size is known now: refused before it is computed
            check(model.least_sizes(prepared.call, wanted))
        if ticket is not None:
            ticket.reserve(*framing.held_bytes(prepared.call), prepared.loss)
        remaining_s = _deadline(request, remaining_s)
        deadline = None if remaining_s is None else self._batcher.clock() + remaining_s
        result = await self._batcher.submit(prepared.call, prepared.grad_output, deadline, tenant=record.tenant)
        outputs = model.outputs_of(result, wanted)
        if check is not None:
            check({output.name: output.tensor.numel() for output in outputs})
        size_out = sum(o.data.nbytes for o in outputs)
        if ticket is not None:
            ticket.answered(framing.HELD_COPIES * size_out)
        self.statistics.record(model.name, True, time.perf_counter_ns() - started)
        record.finish("OK", size_out)
        return Answer(model, outputs, result, ticket, size_out)

    def failed(self, record: RequestRecord, model: str, code: str, details: str, nanoseconds: int) -> None:
        """Record a request that failed with status ``code``."""
        self.statistics.record(model, False, nanoseconds)
        record.finish(code, details=details)


def _deadline(request: oip.InferRequest, remaining_s: float | None) -> float | None:
    timeout = request.parameters.get(_TIMEOUT_PARAMETER)
    if isinstance(timeout, int) and not isinstance(timeout, bool) and timeout > 0:
        seconds = timeout / 1e6
        return seconds if remaining_s is None else min(seconds, remaining_s)
    return remaining_s
