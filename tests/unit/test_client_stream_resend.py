"""When a stream sends its unanswered requests again (remoteloss._stream_base): after UNAVAILABLE (a
drain's end, a lost connection), grpc.aio's lost status or a proxy's reset, a bounded number of
times in a row, within the stream's deadline, never after cancel(); and the drain's metadata key is
the server's. When a unary call is sent again (remoteloss._transport.Resend): after the same
failures, once, with what is left of its deadline."""

from __future__ import annotations

import time

import grpc
import pytest

from remoteloss import _errors, _stream_base
from remoteloss._transport import UNARY_RESENDS, Resend
from remoteloss._errors import InternalServerError, InvalidArgumentError, LossServiceError, ServiceUnavailableError
from remoteloss_server.servicer import DRAINED_METADATA_KEY

DRAINED = ServiceUnavailableError("the server is draining: ...", grpc.StatusCode.UNAVAILABLE)
RESET = "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"  # as gRPC words nginx's reset


def base(timeout: float | None = None) -> _stream_base.StreamBase:
    stream = _stream_base.StreamBase(timeout, window=4)
    stream._call_timeout()  # the first call starts: the deadline runs from now
    return stream


@pytest.mark.parametrize(
    "failure",
    [DRAINED, InternalServerError(_errors.LOST_STATUS, grpc.StatusCode.INTERNAL), InternalServerError(RESET)],
    ids=["unavailable", "grpc.aio lost status", "a proxy's reset"],
)
def test_unavailable_and_a_lost_status_are_resent_with_a_growing_backoff(failure: LossServiceError) -> None:
    stream = base()
    delays = [stream._resend_delay(failure, attempts) for attempts in range(_stream_base.RESENDS)]
    assert all(d is not None and 0 < d <= _stream_base.RESEND_MAX_BACKOFF_S for d in delays), delays
    assert delays[0] is not None and delays[0] <= _stream_base.RESEND_BACKOFF_S
    assert stream._resend_delay(failure, _stream_base.RESENDS) is None  # the calls fail now


@pytest.mark.parametrize(
    "failure",
    [
        None,  # a clean end
        InvalidArgumentError("the stream request holds no id", grpc.StatusCode.INVALID_ARGUMENT),
        InternalServerError("internal error", grpc.StatusCode.INTERNAL),  # the server's own INTERNAL
    ],
    ids=["clean end", "invalid argument", "server internal"],
)
def test_other_ends_are_not_resent(failure: LossServiceError | None) -> None:
    assert base()._resend_delay(failure, 0) is None


def test_no_resend_after_cancel_or_past_the_deadline() -> None:
    cancelled = base()
    cancelled._cancelled = True
    assert cancelled._resend_delay(DRAINED, 0) is None
    nearly_over = base(timeout=0.001)
    time.sleep(0.01)
    assert nearly_over._resend_delay(DRAINED, 0) is None
    assert nearly_over._call_timeout() == 0.0
    assert base(timeout=60)._resend_delay(DRAINED, 0) is not None


def test_a_new_call_gets_what_is_left_of_the_deadline() -> None:
    stream = _stream_base.StreamBase(10.0, window=4)
    assert stream._call_timeout() == 10.0
    left = stream._call_timeout()
    assert left is not None and 9.0 < left <= 10.0
    assert _stream_base.StreamBase(None, window=4)._call_timeout() is None


def test_the_drain_metadata_key_is_the_documented_one() -> None:
    assert DRAINED_METADATA_KEY == "remoteloss-drained"


class Failed(grpc.RpcError):
    """A failed call's error as gRPC raises it: ``code()`` and ``details()``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "failure", [Failed(grpc.StatusCode.UNAVAILABLE, "Socket closed"), Failed(grpc.StatusCode.INTERNAL, RESET)]
)
def test_a_unary_call_whose_connection_was_lost_is_sent_once_more(failure: Failed) -> None:
    resend = Resend(None)
    assert [resend.again(failure) for _ in range(UNARY_RESENDS + 1)] == [True] * UNARY_RESENDS + [False]
    assert resend.timeout is None


@pytest.mark.parametrize(
    "failure",
    [
        Failed(grpc.StatusCode.INTERNAL, "internal error"),  # the server's own
        Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server's queue is full"),
        Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        Failed(grpc.StatusCode.CANCELLED, "Cancelled"),
        # No server reached: gRPC's retries are spent, and nothing was computed.
        Failed(grpc.StatusCode.UNAVAILABLE, "connections to all backends failing; last error: UNKNOWN: ipv4:..."),
        Failed(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: ..."),
        Failed(grpc.StatusCode.UNAVAILABLE, "errors resolving nowhere.invalid:50051: [field:hostname lookup ..."),
        Failed(grpc.StatusCode.UNAVAILABLE, "DNS resolution failed for nowhere.invalid:50051: ..."),
    ],
)
def test_other_failures_of_a_unary_call_are_final(failure: Failed) -> None:
    assert not Resend(30.0).again(failure)


def test_a_resent_unary_call_gets_what_is_left_of_its_deadline() -> None:
    lost = Failed(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    resend = Resend(10.0)
    time.sleep(0.01)
    assert resend.again(lost)
    assert resend.timeout is not None and 9.0 < resend.timeout < 10.0 - 0.005
    over = Resend(0.001)
    time.sleep(0.01)
    assert not over.again(lost)  # no time left: final
