"""What ``Stream`` and ``AsyncStream`` share: ids, the deadline, the resend policy, the unanswered
calls, and turning an answer or a stream's failure into each call's outcome."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from remoteloss._calls import Plan, plan_loss, plan_value_and_grad
from remoteloss._errors import CancelledError, InternalServerError, LossServiceError, _connection_lost, _error_from_code
from remoteloss._losses import LossMethods
from remoteloss._transport import Answer
from remoteloss._wire import Payloads
from remoteloss.v1 import loss_pb2 as pb

__all__ = ["RESENDS", "RESEND_BACKOFF_S", "RESEND_MAX_BACKOFF_S", "StreamBase", "copy_error", "settle"]

_CODES = {code.value[0]: code for code in grpc.StatusCode}
RESENDS = 5  # new streams in a row, after UNAVAILABLE, that get no answer before the calls fail
RESEND_BACKOFF_S = 0.05  # the wait before the first; doubled each time, up to RESEND_MAX_BACKOFF_S
RESEND_MAX_BACKOFF_S = 1.0

# A call's future: ``LossFuture`` (``Stream``) or an asyncio future (``AsyncStream``).
_F = TypeVar("_F", bound="concurrent.futures.Future[Any] | asyncio.Future[Answer]")


class StreamBase(LossMethods, Generic[_F]):
    """Ids, the unanswered calls, and turning an answer or a stream failure into outcomes."""

    def __init__(self, timeout: float | None, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._timeout = timeout
        self._deadline: float | None = None  # time.monotonic() of the deadline, once the call starts
        self._window = window
        self._ids = itertools.count(1)
        self._failure: LossServiceError | None = None  # what ended the stream, once it ended badly
        self._closed = False
        self._cancelled = False  # cancel() was called: nothing is sent again
        self._pending: dict[int, tuple[_F, bytes]] = {}  # each unanswered call and its request's bytes

    def _call_timeout(self) -> float | None:
        """The timeout of the next ComputeStream call: what is left of the stream's deadline."""
        if self._timeout is None:
            return None
        if self._deadline is None:
            self._deadline = time.monotonic() + self._timeout
            return self._timeout
        return max(0.0, self._deadline - time.monotonic())

    def _resend_delay(self, failure: LossServiceError | None, attempts: int) -> float | None:
        """How long to wait before sending the unanswered requests again on a new call (None: do
        not): after UNAVAILABLE, ``attempts`` new calls in a row without an answer so far."""
        if failure is None or self._cancelled:
            return None
        if not _connection_lost(failure.code, failure.details):
            return None
        if attempts >= RESENDS:
            return None
        delay = min(RESEND_MAX_BACKOFF_S, RESEND_BACKOFF_S * 2.0**attempts) * random.uniform(0.5, 1.0)
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            return None
        return delay

    def value_and_grad(
        self,
        loss_name: str,
        /,
        *args: Any,
        wrt: str | Sequence[str] = ("input",),
        grad_output: Any = None,
        **kwargs: Any,
    ) -> Any:
        """``Client.value_and_grad`` on the stream: a future (``Stream``) or a coroutine (``AsyncStream``)."""
        return self._submit(lambda: plan_value_and_grad(loss_name, args, kwargs, wrt, grad_output))

    def _compute(self, loss: str, arguments: dict[str, Any]) -> Any:
        return self._submit(lambda: plan_loss(loss, arguments))

    def _submit(self, make_plan: Callable[[], Plan]) -> Any:
        """Send the planned request: at once (``Stream``), or when the coroutine runs (``AsyncStream``)."""
        raise NotImplementedError

    def _open(self, items: list[bytes]) -> None:
        """Start a new ComputeStream call that sends ``items`` first (each stream class its own)."""
        raise NotImplementedError

    def _reopen(self) -> LossServiceError | None:
        """A new call that sends the unanswered requests again; or, when the client was closed
        while the stream was open (``_open`` raises RuntimeError), the failure that ends it."""
        try:
            self._open(self._unanswered_items())
        except RuntimeError as exc:
            return CancelledError(f"the stream was cancelled: {exc}")
        return None

    def _unanswered_items(self) -> list[bytes]:
        """The unanswered requests' bytes, in id order: what a new call sends again first."""
        return [item for _, (_, item) in sorted(self._pending.items())]

    def _end(self, failure: LossServiceError | None) -> tuple[LossServiceError | None, list[_F]]:
        """Mark the stream ended; why (None: cleanly, every call answered) and the calls it leaves
        unanswered, for the caller to fail with that."""
        unanswered = [future for future, _ in self._pending.values()]
        self._pending = {}
        failure = _ended(failure, len(unanswered))
        self._failure = failure
        self._closed = True
        return failure, unanswered

    def _check_open(self) -> None:
        if self._failure is not None:
            raise copy_error(self._failure)
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")


def settle(
    future: concurrent.futures.Future[Any] | asyncio.Future[Answer],
    answer: pb.ComputeStreamResponse,
    payloads: Payloads | None,
) -> None:
    """Resolve a call's future with its answer, or with the error a unary call would have raised."""
    outcome = _outcome(answer, payloads)
    if isinstance(outcome, LossServiceError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _outcome(answer: pb.ComputeStreamResponse, payloads: Payloads | None) -> Answer | LossServiceError:
    """The answer's response, or the exception a unary call would have raised for its error."""
    kind = answer.WhichOneof("result")
    if kind == "response":
        return Answer(answer.response, payloads)
    if kind == "error":
        return _error_from_code(_CODES.get(answer.error.code, grpc.StatusCode.UNKNOWN), answer.error.message)
    return InternalServerError(f"the stream's answer {answer.id} holds neither a response nor an error")


def _ended(failure: LossServiceError | None, unanswered: int) -> LossServiceError | None:
    """Why the stream ended, for the calls it leaves unanswered (None: it ended cleanly)."""
    if failure is None and unanswered:
        return InternalServerError(f"the stream ended with {unanswered} requests unanswered")
    return failure


def copy_error(error: LossServiceError) -> LossServiceError:
    """A fresh exception like ``error`` (each raise gets its own traceback), caused by the same."""
    fresh = type(error)(error.details, error.code)
    fresh.__cause__ = error.__cause__
    return fresh

