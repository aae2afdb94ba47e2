"""What each Compute request leaves behind: its metrics, its request id and, when it fails, one log line.

The servicer reads the request id from the call's metadata and echoes it; this module never sees a
``ServicerContext``. Log lines are ``key=value`` pairs (logfmt): values are bare when they hold no
space, quote or ``=``, and JSON-quoted otherwise, e.g.
``event=request_failed request_id=4f1c... loss=mse_loss code=INVALID_ARGUMENT duration_ms=0.412 details="mse_loss: target is required"``.
With API keys on, ``tenant=<name>`` (the caller's key's tenant, never the key) follows the request id,
and ``tenant_requests{tenant,code}`` counts the request under it (``"none"`` without keys).
"""

from __future__ import annotations

import contextvars
import json
import logging
import random
import re
import time
from collections.abc import Callable

from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.metrics import NO_TENANT, Metrics

__all__ = ["NATIVE", "REQUEST_ID_KEY", "TENANT", "RequestRecord", "loss_label", "quote", "request_id"]

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
NATIVE = "native"  # the ``protocol`` label of remoteloss.v1.LossService's requests
# The caller's tenant, set by auth.ApiKeyInterceptor for the RPC's task; None when API keys are off.
TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("remoteloss_tenant", default=None)
_REQUEST_ID = re.compile(r"[\w.~:/+=-]{1,128}", re.ASCII)  # UUIDs, ULIDs, base64: bare in a log line
_BARE = re.compile(r'[^\s"=\\]+')
# Failures that point at the server rather than at the request get a louder log level.
_LEVELS = {"INTERNAL": logging.ERROR, "UNKNOWN": logging.ERROR, "DATA_LOSS": logging.ERROR,
           "RESOURCE_EXHAUSTED": logging.WARNING, "UNAVAILABLE": logging.WARNING}


def request_id(sent: str | None) -> str:
    """The id the client sent when it is at most 128 ASCII letters, digits or ``_.~:/+=-``;
    otherwise a new random one (32 hex digits). An id must be unique, not secret: 128 bits of
    ``random`` (seeded from the OS at start, and again in a forked child) cost no system call,
    where ``os.urandom`` costs one on every request's path."""
    if sent is not None and _REQUEST_ID.fullmatch(sent):
        return sent
    return f"{random.getrandbits(128):032x}"


def loss_label(request: object, unknown: bool | None = None) -> str:
    """The ``loss`` label: the request's oneof name (a name of this schema, so a bounded set),
    ``"none"`` when no loss is set, ``"unknown"`` when the bytes did not parse or carry a field
    this server does not know (a newer client's loss). ``unknown``: whether they do, when the
    caller knows (the servicer's scan of the request's bytes)."""
    if not isinstance(request, pb.ComputeRequest):
        return "unknown"
    name = request.WhichOneof("loss")
    if name is not None:
        return str(name)
    if unknown is None:
        # Found in C (sizes with and without them), never listed one Python object each.
        known = pb.ComputeRequest()
        known.CopyFrom(request)
        known.DiscardUnknownFields()
        unknown = known.ByteSize() != request.ByteSize()
    return "unknown" if unknown else "none"


def quote(value: object) -> str:
    """A logfmt value: bare when safe, JSON-quoted otherwise (which also escapes newlines)."""
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


class RequestRecord:
    """One request from receipt to answer; ``finish`` records it exactly once.

    Created when the handler starts: counts the request in flight and observes its size in bytes
    as received (None: not observed, for bytes that did not parse). ``elements``, the tensor
    elements of the loss's arguments, is set by the handler once it knows them, and counted
    for answered requests.
    """

    def __init__(
        self,
        metrics: Metrics,
        loss: str,
        request_id: str,
        size: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
        protocol: str = NATIVE,
    ) -> None:
        self.metrics = metrics
        self.protocol = protocol
        self.request_id = request_id
        self.tenant = TENANT.get()
        self.loss = loss
        self.elements = 0
        self._clock = clock
        self._started = clock()
        self._finished = False
        metrics.child(metrics.in_flight).inc()
        if size is not None:
            metrics.child(metrics.request_bytes, loss).observe(size)

    def finish(self, code: str, response_size: int | None = None, details: str = "") -> None:
        """Record the answer: ``code`` is a status code name ("OK" with the answer's size in bytes)."""
        if self._finished:
            return
        self._finished = True
        duration_s = self._clock() - self._started
        m, loss = self.metrics, self.loss
        m.child(m.in_flight).dec()
        lane = m.answered(self.protocol, loss, code)
        lane.requests.inc()
        lane.protocol_requests.inc()
        m.child(m.tenant_requests, self.tenant or NO_TENANT, code).inc()
        lane.request_duration.observe(duration_s)
        if response_size is not None:
            response_bytes, elements = lane.sized()
            response_bytes.observe(response_size)
            if self.elements:
                elements.inc(self.elements)
        who = "" if self.tenant is None else f" tenant={self.tenant}"  # tenant names are bare words
        if code == "OK":
            logger.debug(
                "event=request request_id=%s%s loss=%s code=OK duration_ms=%.3f",
                self.request_id, who, loss, duration_s * 1e3,
            )
        else:
            m.log_sampler.log(  # at most LOG_LINES_PER_S a second of each code and tenant
                logger, _LEVELS.get(code, logging.INFO), ("request_failed", code, self.tenant),
                "event=request_failed request_id=%s%s loss=%s code=%s duration_ms=%.3f details=%s",
                self.request_id, who, loss, code, duration_s * 1e3, quote(details),
            )
