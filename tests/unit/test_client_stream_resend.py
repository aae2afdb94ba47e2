"""When a stream sends its unanswered requests again (remoteloss._stream_base): after UNAVAILABLE (a
drain's end, a lost connection) or grpc.aio's lost status, a bounded number of times in a row,
within the stream's deadline, never after cancel(); and the drain's metadata key is the server's."""

from __future__ import annotations

import time

import grpc
import pytest

from remoteloss import _stream_base
from remoteloss._errors import InternalServerError, InvalidArgumentError, LossServiceError, ServiceUnavailableError
from remoteloss_server.servicer import DRAINED_METADATA_KEY

DRAINED = ServiceUnavailableError("the server is draining: ...", grpc.StatusCode.UNAVAILABLE)


def base(timeout: float | None = None) -> _stream_base.StreamBase:
    stream = _stream_base.StreamBase(timeout, window=4)
    stream._call_timeout()  # the first call starts: the deadline runs from now
    return stream


@pytest.mark.parametrize(
    "failure",
    [DRAINED, InternalServerError(_stream_base.LOST_STATUS, grpc.StatusCode.INTERNAL)],
    ids=["unavailable", "grpc.aio lost status"],
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
